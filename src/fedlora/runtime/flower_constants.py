"""Flower's constants for fedlora, in one import-light module (no flwr, no torch): the CLI reads them without
starting Flower's runtime."""

from __future__ import annotations

import json
from pathlib import Path

RUN_META = "flower_run.json"  # in the run directory: the run's key, for `fedlora flower run --resume RUN_DIR`
DEFAULT_STATE_DIR = "~/.fedlora/clients"  # a SuperNode's client state (node config `state-dir`)
SUPERLINK_NAME = "fedlora"  # the connection name in the generated Flower config

# run config keys of the Flower app ([tool.flwr.app.config]) and their defaults
RUN_CONFIG_DEFAULTS = {
    "config": "",  # the fedlora YAML config, as text
    "run-dir": "",  # where the ServerApp writes the run directory ("" -> output.dir/name), on the SuperLink host
    "poll-interval": 0.05,  # s between the ServerApp's pulls of replies
    "node-wait": 120.0,  # s to wait for a partition's SuperNode to (re)appear before giving up on it
    "round-timeout": 3600.0,  # s for one message exchange
    "max-attempts": 3,  # sends of one message (node gone, crashed ClientApp)
    "collect-client-states": True,  # final per-client adapters into the run directory (as `fedlora run`)
    "wire": "packed",  # tensors on the wire: "packed" (one safetensors blob per payload) or "arrays" (one per tensor)
    "run-key": "",  # names the clients' state folders; kept by `--resume` ("" -> Flower's run id)
    "resume": False,  # continue after the last round checkpointed in run-dir
}


def write_run_meta(run_dir: Path, meta: dict) -> None:
    """flower_run.json: what `--resume RUN_DIR` needs to find the clients' state again (the run key; under
    `fedlora simulate`, the state directory too). Keys already there are kept unless `meta` sets them."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_META).write_text(json.dumps({**(read_run_meta(run_dir) or {}), **meta}))


def read_run_meta(run_dir: Path) -> dict | None:
    path = run_dir / RUN_META
    return json.loads(path.read_text()) if path.is_file() else None


def write_run_key(run_dir: Path, run_key: str) -> None:
    write_run_meta(run_dir, {"run-key": run_key})


def read_run_key(run_dir: Path) -> str | None:
    meta = read_run_meta(run_dir)
    return None if meta is None else meta["run-key"]
