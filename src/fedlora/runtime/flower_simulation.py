"""`fedlora simulate CONFIG.yaml --backend ray`: one federation on Flower's Simulation Engine (Ray).

The run's ServerApp and ClientApp are the Deployment Engine's (`fedlora.runtime.flower`), unchanged; only
the transport differs. `flwr.simulation.run_simulation` registers one virtual SuperNode per client
(`num_supernodes` = partition.num_clients, node config `partition-id` / `num-partitions` set by Flower),
runs the ServerApp in this process and every ClientApp call in a pool of Ray actors, each actor holding
`client_resources` (CPUs, GPU fractions) of a Ray cluster: a local one, or an existing one by address
(`ray start --head` on one machine, `ray start --address HEAD:PORT` on the others).

What a real SuperNode gets from `fedlora flower supernode` a virtual one gets from this module: the run
config (the fedlora config as text, run key, run directory) and node settings (`state-dir`, `threads`),
added to the Context of every message. An actor serves whichever client the pool hands it; it builds
the run (base model, adapters, data) once and keeps it across rounds and clients
(`fedlora.runtime.flower.client.environment`). A client's state lives on disk in the state directory
(`<state-dir>/run_<run key>/client_<i>/`), never in an actor: that directory must be on storage every
Ray node can read and write (a shared file system) when the cluster spans machines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
import warnings
from pathlib import Path

import typer

from .flower_constants import RUN_CONFIG_DEFAULTS, RUN_META, read_run_meta, write_run_meta

log = logging.getLogger("fedlora")
STATE_DIR = "client-state"  # default state directory, inside the run directory


def simulation_apps(run_config: dict, node_config: dict):
    """The ServerApp and ClientApp of one run: fedlora's own, with the run config that `flwr run` would carry
    and the node settings that `fedlora flower supernode` would set (the legacy engine passes neither)."""
    from flwr.app import Context
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from .flower import client_app, server_app

    server, client = ServerApp(), ClientApp()

    def with_settings(context: Context, node: dict) -> Context:  # a copy: Flower refuses a changed run_config
        return Context(run_id=context.run_id, node_id=context.node_id, state=context.state,
                       node_config={**dict(context.node_config), **node},
                       run_config={**dict(context.run_config), **run_config})

    @server.main()
    def _server(grid, context):
        return server_app(grid, with_settings(context, {}))

    def _client(msg, context):  # runs in a Ray actor
        return client_app(msg, with_settings(context, node_config))

    client.query()(_client)
    client.train()(_client)
    client.evaluate()(_client)
    return server, client


def start_ray(address: str | None, num_cpus: float | None, num_gpus: float | None) -> None:
    """Connect to a Ray cluster (address), or start a local one with num_cpus / num_gpus of this machine.

    The actors get this Python's import path and Flower's environment (the hub offline, as on a SuperNode)."""
    import ray

    from .flower_cli import FLOWER_ENV

    env = {k: os.environ.get(k, v) for k, v in FLOWER_ENV.items()}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [*sys.path, os.environ.get("PYTHONPATH", "")] if p)
    kwargs = {"address": address or "local", "include_dashboard": False, "logging_level": logging.WARNING,
              "runtime_env": {"env_vars": env}}
    if address is None:  # a new local cluster, never one another user started on this machine
        kwargs |= {k: v for k, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus)) if v is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Ray's notice on accelerator variables
        ray.init(**kwargs)


def run_on_ray(cfg_text: str, num_clients: int, run_config: dict, node_config: dict, client_resources: dict,
               address: str | None = None, num_cpus: float | None = None, num_gpus: float | None = None) -> None:
    """One run on Flower's Simulation Engine; Ray is shut down when it ends (the actors with it)."""
    import ray
    from flwr.simulation import run_simulation

    rc = {**RUN_CONFIG_DEFAULTS, **run_config, "config": cfg_text}
    server, client = simulation_apps(rc, node_config)
    start_ray(address, num_cpus, num_gpus)
    try:
        from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

        # Flower's own count of the actors that fit; none fit -> ValueError here, not a ServerApp left waiting
        actors = pool_size_from_resources(client_resources)
        print(f"fedlora: {num_clients} virtual SuperNodes on {actors} Ray actors of {client_resources}", flush=True)
        run_simulation(server_app=server, client_app=client, num_supernodes=num_clients, backend_name="ray",
                       backend_config={"client_resources": client_resources})
    finally:
        if ray.is_initialized():
            ray.shutdown()


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def simulate(config: Path | None = typer.Argument(None, help="YAML config (not with --resume)"),
             set_: list[str] = typer.Option([], "--set", help="override, e.g. --set method.name=rolora"),
             out: Path | None = typer.Option(None, "--out", help="run directory (default output.dir/name)"),
             resume: Path | None = typer.Option(None, "--resume", help="continue this run directory after its "
                                                "last checkpointed round (the simulation was killed)"),
             backend: str = typer.Option("ray", help="Flower's simulation backend (ray)"),
             cpus_per_client: float = typer.Option(1.0, help="CPUs of one ClientApp actor (client_resources)"),
             gpus_per_client: float = typer.Option(0.0, help="GPU share of one actor: 0.25 puts four on a GPU"),
             address: str | None = typer.Option(None, help="an existing Ray cluster (HEAD:PORT, or 'auto'); "
                                                "default: a new local one"),
             num_cpus: float | None = typer.Option(None, help="local cluster only: CPUs Ray may use (default all); "
                                                   "actors = num_cpus / cpus_per_client"),
             num_gpus: float | None = typer.Option(None, help="local cluster only: GPUs Ray may use (default all)"),
             state_dir: Path | None = typer.Option(None, help="the clients' state, readable by every Ray node "
                                                   f"(default RUN_DIR/{STATE_DIR}; shared storage on a cluster)"),
             round_timeout: float = typer.Option(3600.0, help="s to wait for the replies of one exchange")) -> None:
    """Run one federation on Flower's Simulation Engine: every client a virtual SuperNode, ClientApps in Ray
    actors on one machine or a Ray cluster; the same result as `fedlora run`."""
    from ..config import ConfigError, dump_config, load_config
    from .flower.server import check_flower_method

    if backend != "ray":
        _fail(f"--backend must be ray, got '{backend}'")
    if cpus_per_client <= 0 or gpus_per_client < 0:
        _fail("--cpus-per-client must be > 0 and --gpus-per-client >= 0")
    if address is not None and (num_cpus is not None or num_gpus is not None):
        _fail("--num-cpus / --num-gpus size a new local cluster: with --address the cluster has its own")
    try:
        if resume is not None:
            if config is not None:
                _fail("--resume RUN_DIR continues that run with its own config.yaml: give no CONFIG")
            meta = read_run_meta(resume)
            if meta is None or "state-dir" not in meta:
                _fail(f"--resume {resume}: no {RUN_META} of `fedlora simulate` (not a run directory of it)")
            cfg, run_dir, run_key = load_config(resume / "config.yaml", set_), resume, str(meta["run-key"])
            state = Path(str(meta["state-dir"])) if state_dir is None else state_dir
        else:
            if config is None:
                _fail("give a CONFIG, or --resume RUN_DIR")
            cfg = load_config(config, set_)
            run_dir, run_key = out or Path(cfg.output.dir) / cfg.name, uuid.uuid4().hex[:16]
            state = state_dir or run_dir / STATE_DIR
        if cfg.partition.scheme == "files":
            raise ConfigError("partition.scheme 'files' (each silo its own file) runs on Flower's Deployment "
                              "Engine (`fedlora flower`); the Simulation Engine partitions a shared task")
        check_flower_method(cfg)
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    run_dir, state = run_dir.expanduser().resolve(), state.expanduser().resolve()
    write_run_meta(run_dir, {"run-key": run_key, "state-dir": str(state), "engine": "ray"})
    rc = {"run-dir": str(run_dir), "run-key": run_key, "resume": resume is not None,
          "round-timeout": float(round_timeout)}
    # the threads of `fedlora run` (cfg.threads), else one per CPU of the actor: reductions in the same order
    node = {"state-dir": str(state), "threads": int(cfg.threads or max(1, int(cpus_per_client)))}
    resources = {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client}
    try:
        run_on_ray(dump_config(cfg), cfg.partition.num_clients, rc, node, resources, address, num_cpus, num_gpus)
    except ValueError as e:  # the ServerApp's checks (a resume without checkpoint, no actor fits the resources)
        _fail(str(e))
    if not (run_dir / "summary.json").is_file():
        _fail(f"the simulation ended without writing {run_dir / 'summary.json'}: see the log above")
    summary = json.loads((run_dir / "summary.json").read_text())
    typer.echo(f"run directory: {run_dir}  ({summary.get('rounds_completed', cfg.federation.rounds)} rounds, "
               f"{summary.get('wall_s', 0):.1f} s)")
