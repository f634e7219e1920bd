"""The run directory, written the same way by both runtimes.

    config.yaml         the resolved config
    adapter_meta.json   what a reader needs to rebuild the adapters (PEFT export, `fedlora eval`)
    baseline.json       the base model's metrics before round 1 (eval.baseline; the simulation writes it)
    metrics.jsonl       one row per round, flushed as each round ends
    summary.json        the run's totals and final metrics
    checkpoint/         the incremental checkpoint (checkpoint.py)
    states/             server.safetensors, global.safetensors (one shared model), client_<id>.safetensors
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import RunConfig, dump_config


def start(run_dir: Path, cfg: RunConfig, adapter_meta: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    # a run in progress has no summary: one left from a shorter budget (a run resumed for more rounds)
    # would otherwise read as this run finished, should it stop before its last round
    (run_dir / "summary.json").unlink(missing_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    (run_dir / "adapter_meta.json").write_text(json.dumps(adapter_meta, indent=2))


def config_differences(cfg: RunConfig, run_dir: Path, allowed: tuple[str, ...] = ()) -> list[str] | None:
    """Fields whose value differs between `cfg` and the run directory's config.yaml (None: no config).

    The stored config is read through today's schema first, so a field added since with a default that
    keeps the old behaviour compares equal; one it no longer validates under counts as all different.
    Fields starting with a prefix in `allowed` are ignored."""
    import yaml

    from .config import build_config
    from .errors import ConfigError

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return None
    saved = yaml.safe_load(saved_path.read_text()) or {}
    try:
        saved = build_config(saved).model_dump(mode="json")
    except ConfigError as e:
        return [f"the stored config ({e})"]

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    a, b = flat(saved), flat(cfg.model_dump(mode="json"))
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not k.startswith(allowed)]


def write_rounds(run_dir: Path, history: list[dict], rounds: int, run_round: Callable[[int], dict],
                 after_round: Callable[[int, dict], None]) -> None:
    """Rewrite metrics.jsonl from `history` (a resumed run's checkpointed rows; rows of later rounds are dropped),
    then run rounds len(history)+1 .. `rounds`, appending each row to `history` and to the file."""
    with open(run_dir / "metrics.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
        for t in range(len(history) + 1, rounds + 1):
            row = run_round(t)
            history.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            after_round(t, row)


def write_summary(run_dir: Path, summary: dict) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def save_states(run_dir: Path, server: dict[str, torch.Tensor], shared: dict[str, torch.Tensor] | None,
                clients: Iterable[tuple[int, dict[str, torch.Tensor]]]) -> None:
    """states/: the server's tensors, the one shared model (None when each client has its own), each client's
    model, as safetensors."""
    d = run_dir / "states"
    d.mkdir(exist_ok=True)

    def save(state: dict[str, torch.Tensor], name: str) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(d / name))

    save(server, "server.safetensors")
    if shared is not None:
        save(shared, "global.safetensors")
    for cid, state in clients:
        save(state, f"client_{cid}.safetensors")
