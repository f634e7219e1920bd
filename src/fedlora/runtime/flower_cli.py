"""`fedlora flower ...`: start a SuperLink, SuperNodes and runs of fedlora on Flower's Deployment Engine.

    fedlora flower certificates DIR --host HOST      a throw-away CA and server certificate (experiments)
    fedlora flower silos CONFIG.yaml --out DIR       each client's partition as its own file (a rehearsal)
    fedlora flower keys DIR --nodes N                one key pair per SuperNode (node authentication)
    fedlora flower register DIR/node_*.pub           admit those nodes on a SuperLink started with --node-auth
    fedlora flower superlink --certificates DIR      flower-superlink, TLS, no runtime dependency install
    fedlora flower supernode --partition-id I --num-partitions N --data SILO.csv --superlink HOST:PORT
                             --root-certificates CA --auth-key node_I
    fedlora flower run CONFIG.yaml --superlink HOST:PORT --root-certificates CA
    fedlora flower run --resume RUN_DIR ...          continue after the SuperLink or the ServerApp died
    fedlora flower app CONFIG.yaml --out DIR         the Flower app folder, for a plain `flwr run DIR`

The commands wrap Flower's own (`flower-superlink`, `flower-supernode`, `flwr run`) with the settings
fedlora needs: runtime dependency installation off (FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 and
`--disable-runtime-dependency-installation`, so Flower never replaces the installed fedlora), fast poll
intervals, and by default a long-lived ClientApp worker inside the SuperNode process (`--isolation
inprocess`, see `fedlora.runtime.flower.patches.serve_client_tasks`) instead of a fresh `flwr-clientapp`
process per message.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import typer

from .flower_constants import DEFAULT_STATE_DIR, RUN_META, SUPERLINK_NAME, read_run_key
from .flower_credentials import make_certificates, make_node_keys

flower_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Run on Flower's Deployment Engine (SuperLink + SuperNodes, several machines).")

# environment of every Flower process we start (a value the user set wins)
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # never `uv sync` the app over the installed fedlora
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",  # the SuperLink's SuperExec: start the ServerApp quickly (1 s)
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def flower_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for k, v in FLOWER_ENV.items():
        env.setdefault(k, v)
    # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name: ours first
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env | (extra or {})


def _exe(name: str) -> str:
    """A Flower executable: next to this Python (the virtualenv's bin), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise typer.BadParameter(f"'{name}' not found: is flwr installed in this environment?")
    return found


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _is_local(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- certificates


@flower_app.command()
def certificates(out: Path = typer.Argument(..., help="folder for ca.crt, server.pem, server.key"),
                 host: list[str] = typer.Option(["127.0.0.1", "localhost"], "--host",
                                                help="the SuperLink's address as the SuperNodes see it (repeatable)"),
                 days: int = typer.Option(30, help="validity")) -> None:
    """A throw-away CA and a SuperLink certificate, for experiments (use your organisation's CA in production)."""
    paths = make_certificates(out, host, days)
    typer.echo(f"wrote {paths['ca']} (give it to every SuperNode and to `fedlora flower run`), "
               f"{paths['cert']} and {paths['key']} (the SuperLink's)")


# ---------------------------------------------------------------- silo files (rehearsals)


@flower_app.command()
def silos(config: Path = typer.Argument(..., help="YAML config with a shared task and a partition"),
          out: Path = typer.Option(..., "--out", help="folder for client_i.csv and run.yaml"),
          set_: list[str] = typer.Option([], "--set", help="override, e.g. --set partition.num_clients=3")) -> None:
    """Write each client's partition as its own file, and the config that runs on them (a rehearsal)."""
    from ..data.silo import write_silo_files
    from ..errors import ConfigError

    try:
        path = write_silo_files(_load(config, set_), out)
    except ConfigError as e:
        _fail(str(e))
    typer.echo(f"wrote {path} and the clients' files in {out}: give client_i.csv to SuperNode i (--data); "
               f"`fedlora run {path}` is the same run in one process")


# ---------------------------------------------------------------- node keys


@flower_app.command()
def keys(out: Path = typer.Argument(..., help="folder for one key pair per SuperNode"),
         nodes: int = typer.Option(..., "--nodes", help="how many SuperNodes (keys node_0 ... node_{N-1})")) -> None:
    """Node keys: each SuperNode keeps its private key (`supernode --auth-key`), the SuperLink admits the public."""
    paths = make_node_keys(out, [f"node_{i}" for i in range(nodes)])
    typer.echo(f"wrote {len(paths)} key pairs in {out}: give node_i to SuperNode i (--auth-key), register each "
               f"node_i.pub with `fedlora flower register` on a SuperLink started with --node-auth")


@flower_app.command()
def register(public_keys: list[Path] = typer.Argument(..., help="the SuperNodes' public keys (node_i.pub)"),
             superlink: str = typer.Option("127.0.0.1:8000", help="the SuperLink's HOST:PORT"),
             root_certificates: Path | None = typer.Option(None, "--root-certificates", help="CA of the SuperLink"),
             insecure: bool = typer.Option(False, "--insecure", help="no TLS: local experiments only"),
             superlink_wait: float = typer.Option(60.0, help="s to wait for the SuperLink to listen")) -> None:
    """Admit SuperNodes: register their public keys with a SuperLink started with --node-auth."""
    for key in public_keys:
        if not key.is_file():
            _fail(f"{key}: no such public key file")
    wait_for_superlink(superlink, superlink_wait)
    with tempfile.TemporaryDirectory(prefix="fedlora-flower-") as tmp:
        home = write_flower_home(Path(tmp) / "flwr-home", superlink, root_certificates, insecure)
        for key in public_keys:
            r = subprocess.run([_exe("flwr"), "supernode", "register", str(key), SUPERLINK_NAME],
                               env=flower_env({"FLWR_HOME": str(home)}), capture_output=True, text=True)
            if r.returncode != 0:
                _fail(f"registering {key} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
            typer.echo(f"{key}: {r.stdout.strip().splitlines()[-1] if r.stdout.strip() else 'registered'}")


# ---------------------------------------------------------------- SuperLink


def superlink_command(host: str, port: int, certificates: Path | None, insecure: bool,
                      database: str | None = None, node_auth: bool = False) -> list[str]:
    cmd = [_exe("flower-superlink"), "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if node_auth:  # only SuperNodes whose public key was registered (`fedlora flower register`) may join
        cmd.append("--enable-supernode-auth")
    if insecure:
        cmd.append("--insecure")
    else:
        if certificates is None:
            _fail("TLS needs certificates: --certificates DIR (ca.crt, server.pem, server.key; "
                  "`fedlora flower certificates DIR` makes throw-away ones), or --insecure for a local experiment")
        for f in ("ca.crt", "server.pem", "server.key"):
            if not (certificates / f).is_file():
                _fail(f"--certificates {certificates}: missing {f}")
        cmd += ["--ssl-ca-certfile", str(certificates / "ca.crt"), "--ssl-certfile", str(certificates / "server.pem"),
                "--ssl-keyfile", str(certificates / "server.key")]
    if database:
        cmd += ["--database", database]
    return cmd


@flower_app.command()
def superlink(host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 for other machines)"),
              port: int = typer.Option(8000, help="the Fleet, Control and Runtime APIs (HTTP, one port)"),
              certificates: Path | None = typer.Option(None, "--certificates",
                                                       help="folder with ca.crt, server.pem, server.key"),
              insecure: bool = typer.Option(False, "--insecure", help="no TLS: local experiments only"),
              database: str | None = typer.Option(None, help="SuperLink state database (default: in memory)"),
              node_auth: bool = typer.Option(False, "--node-auth", help="admit only registered SuperNodes "
                                             "(`fedlora flower keys`, `fedlora flower register`)")) -> None:
    """Start the SuperLink (runs the ServerApp of each run, routes messages to the SuperNodes)."""
    cmd = superlink_command(host, port, certificates, insecure, database, node_auth)
    os.execve(cmd[0], cmd, flower_env())


# ---------------------------------------------------------------- SuperNode


def supernode_args(superlink: str, partition_id: int, num_partitions: int, state_dir: Path,
                   root_certificates: Path | None, insecure: bool, runtime_port: int,
                   threads: int | None = None, local: dict[str, str | float | None] | None = None,
                   auth_key: Path | None = None) -> list[str]:
    """flower-supernode's arguments; `local`: this node's own data (data, test, test-fraction, column names)."""
    node_config = f"partition-id={partition_id} num-partitions={num_partitions} " \
                  f"state-dir={json.dumps(str(state_dir.expanduser().resolve()))}"
    if threads:
        node_config += f" threads={threads}"
    for key, value in (local or {}).items():
        if value is not None:
            path = key in ("data", "test")
            node_config += f" {key}={json.dumps(str(Path(value).expanduser().resolve()) if path else value)}"
    args = ["--superlink", superlink, "--node-config", node_config, "--host", "127.0.0.1", "--port", str(runtime_port)]
    if auth_key is not None:
        args += ["--auth-supernode-private-key", str(auth_key.expanduser().resolve())]
    if insecure:
        args.append("--insecure")
    elif root_certificates is not None:
        args += ["--root-certificates", str(root_certificates)]
    return args


@flower_app.command()
def supernode(partition_id: int = typer.Option(..., "--partition-id", help="this client's id, 0..N-1 (with --data: "
                                              "client i of partition.scheme files; else its partition of the task)"),
              num_partitions: int = typer.Option(..., "--num-partitions", help="partition.num_clients of the runs"),
              data: Path | None = typer.Option(None, "--data", help="this silo's own data: a CSV / JSONL file or a "
                                               "saved Hugging Face dataset folder (runs with partition.scheme files)"),
              test: Path | None = typer.Option(None, "--test", help="this silo's own test file (default: "
                                               "--test-fraction of --data)"),
              test_fraction: float | None = typer.Option(None, help="share of --data held out as its test split "
                                                         "(default: the run's partition.client_test_fraction)"),
              text_column: str | None = typer.Option(None, help="text column of --data (default: task.text_column)"),
              label_column: str | None = typer.Option(None, help="label column (default: task.label_column)"),
              auth_key: Path | None = typer.Option(None, "--auth-key", help="this node's private key (`fedlora flower "
                                                   "keys`), for a SuperLink started with --node-auth"),
              superlink: str = typer.Option("127.0.0.1:8000", help="the SuperLink's HOST:PORT"),
              root_certificates: Path | None = typer.Option(None, "--root-certificates",
                                                            help="the CA that signed the SuperLink's certificate"),
              insecure: bool = typer.Option(False, "--insecure", help="no TLS: local experiments only"),
              state_dir: Path = typer.Option(Path(DEFAULT_STATE_DIR), "--state-dir",
                                             help="where this client's personal state is kept between rounds"),
              isolation: str = typer.Option("inprocess", help="inprocess: one long-lived process runs every "
                                            "message; subprocess: Flower's default, a new process per message"),
              poll_interval: float = typer.Option(0.1, help="s between polls of the SuperLink (inprocess)"),
              threads: int | None = typer.Option(None, help="torch threads for local training"),
              runtime_port: int | None = typer.Option(None, help="local port of the SuperNode's Runtime API "
                                                      "(default: a free one)")) -> None:
    """Start a SuperNode for one client (partition); it serves every run of the SuperLink."""
    if isolation not in ("inprocess", "subprocess"):
        _fail("--isolation must be inprocess or subprocess")
    if not insecure and root_certificates is None:
        typer.echo("note: no --root-certificates: the SuperLink's certificate is checked against the system CAs",
                   err=True)
    for path, flag in ((data, "--data"), (test, "--test"), (auth_key, "--auth-key")):
        if path is not None and not path.expanduser().exists():
            _fail(f"{flag} {path}: no such file or folder")
    if data is None and (test or test_fraction is not None or text_column or label_column):
        _fail("--test, --test-fraction and the column options describe --data: give --data too")
    local = {"data": data, "test": test, "test-fraction": test_fraction, "text-column": text_column,
             "label-column": label_column} if data is not None else None
    args = supernode_args(superlink, partition_id, num_partitions, state_dir, root_certificates, insecure,
                          runtime_port or free_port(), threads, local, auth_key)
    env = flower_env()
    if isolation == "subprocess":
        exe = _exe("flower-supernode")
        os.execve(exe, [exe, *args, "--isolation", "subprocess"], env)
    os.environ.update({k: v for k, v in env.items() if k in FLOWER_ENV})
    run_inprocess_supernode(args, poll_interval)


def run_inprocess_supernode(args: list[str], poll_interval: float) -> None:
    """flower-supernode with `--isolation process`, plus the ClientApp worker as a thread of this process."""
    import flwr.supernode.start_client_internal as loop

    from . import flower  # torch, transformers, the apps: imported once, before the first message

    if hasattr(loop, "time"):
        loop.time = flower.patches.CappedSleep(poll_interval)
    flower.fast_object_pulls()
    port = args[args.index("--port") + 1]
    stop = threading.Event()
    threading.Thread(target=flower.patches.serve_client_tasks, args=(f"127.0.0.1:{port}", stop), daemon=True,
                     name="fedlora-clientapp").start()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *args, "--isolation", "process"]
    try:
        flower_supernode()
    finally:
        stop.set()


# ---------------------------------------------------------------- runs


def app_pyproject(cfg_text: str, run_config: dict) -> dict:
    """The Flower app's pyproject.toml: fedlora's ServerApp / ClientApp and this run's config."""
    return {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedlora-run", "version": "1.0.0", "license": "Apache-2.0",
                    "description": "a fedlora run (fedlora must be installed on the SuperLink and every SuperNode)",
                    "dependencies": []},
        "tool": {"hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
                 "flwr": {"app": {"publisher": "fedlora",
                                  "components": {"serverapp": "fedlora.runtime.flower:server_app",
                                                 "clientapp": "fedlora.runtime.flower:client_app"},
                                  "config": {"config": cfg_text, **run_config}}}},
    }


def write_app(app_dir: Path, cfg, run_config: dict) -> Path:
    import tomli_w

    from ..config import dump_config

    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(app_pyproject(dump_config(cfg), run_config)))
    return app_dir


def write_flower_home(home: Path, superlink: str, root_certificates: Path | None, insecure: bool) -> Path:
    import tomli_w

    conn: dict = {"address": superlink}
    if insecure:
        conn["insecure"] = True
    elif root_certificates is not None:
        conn["root-certificates"] = str(root_certificates.expanduser().resolve())
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": SUPERLINK_NAME, SUPERLINK_NAME: conn}}))
    return home


def _run_config(cfg, out: str | None, superlink: str, node_wait: float, round_timeout: float,
                collect_client_states: bool, wire: str = "packed", run_key: str | None = None,
                resume: bool = False) -> dict:
    run_dir = out or str(Path(cfg.output.dir) / cfg.name)
    if _is_local(superlink):  # same machine: the run directory is where the user is
        run_dir = str(Path(run_dir).expanduser().resolve())
    return {"run-dir": run_dir, "node-wait": float(node_wait), "round-timeout": float(round_timeout),
            "collect-client-states": bool(collect_client_states), "wire": wire,
            "run-key": run_key or uuid.uuid4().hex[:16], "resume": resume}


def for_flower(cfg):
    """The config the SuperLink gets: client files are the nodes' own (each SuperNode's --data), never named."""
    p = cfg.partition
    if p.scheme == "files" and (p.files or p.test_files):
        typer.echo("note: partition.files / test_files are dropped from the run's config: on Flower each "
                   "SuperNode reads its own file (--data)", err=True)
        cfg = cfg.model_copy(update={"partition": p.model_copy(update={"files": None, "test_files": None})})
    return cfg


def wait_for_superlink(address: str, timeout: float) -> None:
    """Wait until the SuperLink's port accepts connections (a run started right after the SuperLink fails)."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                _fail(f"the SuperLink at {address} does not answer after {timeout:.0f} s (--superlink-wait)")
            time.sleep(0.3)


def _load(config: Path, set_: list[str]):
    from ..config import ConfigError, load_config

    try:
        return load_config(config, set_)
    except ConfigError as e:
        _fail(str(e))


@flower_app.command()
def run(config: Path | None = typer.Argument(None, help="YAML config (not with --resume)"),
        set_: list[str] = typer.Option([], "--set", help="override, e.g. --set method.name=rolora"),
        superlink: str = typer.Option("127.0.0.1:8000", help="the SuperLink's HOST:PORT"),
        root_certificates: Path | None = typer.Option(None, "--root-certificates", help="CA of the SuperLink"),
        insecure: bool = typer.Option(False, "--insecure", help="no TLS: local experiments only"),
        out: str | None = typer.Option(None, "--out", help="run directory, on the SuperLink's machine "
                                       "(default output.dir/name; relative to where the SuperLink runs)"),
        node_wait: float = typer.Option(120.0, help="s to wait for the SuperNodes of all partitions"),
        round_timeout: float = typer.Option(3600.0, help="s to wait for the replies of one exchange"),
        collect_client_states: bool = typer.Option(True, help="copy each client's final adapter into the run "
                                                   "directory (off: personal adapters never leave the clients)"),
        wire: str = typer.Option("packed", help="tensors on the wire: packed (one safetensors blob per message) "
                                 "or arrays (one Flower Array per tensor; bfloat16 cast to float32)"),
        app_dir: Path | None = typer.Option(None, help="keep the generated Flower app here"),
        resume: Path | None = typer.Option(None, "--resume", help="continue the run in this run directory after "
                                           "its last checkpointed round (the SuperLink or the ServerApp died)"),
        superlink_wait: float = typer.Option(60.0, help="s to wait for the SuperLink to listen")) -> None:
    """Start a run on the SuperLink and stream its log until it ends."""
    if wire not in ("packed", "arrays"):
        _fail("--wire must be packed or arrays")
    if resume is not None:
        if config is not None:
            _fail("--resume RUN_DIR continues that run with its own config.yaml: give no CONFIG")
        run_key = read_run_key(resume)
        if run_key is None:
            _fail(f"--resume {resume}: no {RUN_META} (not a run directory of `fedlora flower run`)")
        cfg = _load(resume / "config.yaml", set_)
        rc = _run_config(cfg, str(resume), superlink, node_wait, round_timeout, collect_client_states, wire,
                         run_key, resume=True)
    else:
        if config is None:
            _fail("give a CONFIG, or --resume RUN_DIR")
        cfg = for_flower(_load(config, set_))
        rc = _run_config(cfg, out, superlink, node_wait, round_timeout, collect_client_states, wire)
    wait_for_superlink(superlink, superlink_wait)
    with tempfile.TemporaryDirectory(prefix="fedlora-flower-") as tmp:
        app = write_app(app_dir or Path(tmp) / "app", cfg, rc)
        home = write_flower_home(Path(tmp) / "flwr-home", superlink, root_certificates, insecure)
        code = subprocess.call([_exe("flwr"), "run", str(app), SUPERLINK_NAME, "--stream"],
                               env=flower_env({"FLWR_HOME": str(home)}))
    summary = Path(rc["run-dir"]) / "summary.json"
    if code == 0 and _is_local(superlink) and not summary.is_file():
        _fail(f"the run ended without writing {summary}: see the log above")
    if code == 0:
        typer.echo(f"run directory: {rc['run-dir']}" + ("" if _is_local(superlink) else " (on the SuperLink)"))
    raise typer.Exit(code)


@flower_app.command()
def app(config: Path = typer.Argument(..., help="YAML config"),
        out: Path = typer.Option(..., "--out", help="folder for the Flower app (pyproject.toml)"),
        set_: list[str] = typer.Option([], "--set", help="override, e.g. --set method.name=rolora"),
        run_dir: str | None = typer.Option(None, help="run directory on the SuperLink's machine")) -> None:
    """Write the Flower app of a config, for `flwr run DIR SUPERLINK` with your own Flower config."""
    cfg = for_flower(_load(config, set_))
    write_app(out, cfg, _run_config(cfg, run_dir, "remote:0", 120.0, 3600.0, True))
    typer.echo(f"wrote {out / 'pyproject.toml'}; run it with: flwr run {out} <superlink> --stream "
               "(FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 on the SuperLink)")
