"""Flower's Simulation Engine: `fedlora simulate --backend ray` on a local Ray cluster (`ray start --head`).

Three virtual SuperNodes, their ClientApps in two Ray actors (each actor serves several clients and keeps
one built run across them), equal bit for bit to `fedlora run` of the same config; killed mid-run and
resumed, equal again. One Ray head for the module: the runs connect to it by address, as on a cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from test_flower import assert_same_run, config, simulate

from fedlora.config import build_config
from fedlora.runtime.flower_cli import free_port

CLI = [sys.executable, "-m", "fedlora.cli", "simulate"]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` with ports of its own and a short temp dir (Ray's sockets), stopped with its group."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    port = free_port()
    log = Path(temp) / "head.log"
    ports = ["--ray-client-server-port", str(free_port()), "--dashboard-port", str(free_port()),
             "--dashboard-agent-listen-port", str(free_port())]
    with open(log, "wb") as out:
        head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                                 "--port", str(port), "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard",
                                 "false", "--disable-usage-stats", "--temp-dir", temp, *ports],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text(errors="replace"):
            assert head.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=20)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    """FedSA, 3 clients, 3 rounds: B and the head stay on the clients, so their state must outlive a kill."""
    root = tmp_path_factory.mktemp("ray")
    cfg = config(root, "fedsa", rounds=3)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, simulate(cfg, root / "in_process")


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-6000:]
    return output


def test_ray_simulation_equals_in_process(ray_head, run_config, tmp_path):
    path, in_process = run_config
    out = tmp_path / "ray"
    finish(start([str(path), "--out", str(out), "--address", ray_head, "--cpus-per-client", "1"]))
    assert_same_run(out, in_process)
    meta = json.loads((out / "flower_run.json").read_text())
    assert meta["engine"] == "ray" and Path(meta["state-dir"]) == out / "client-state"
    assert sorted(p.name for p in (out / "client-state" / f"run_{meta['run-key']}").iterdir()) == \
        ["client_0", "client_1", "client_2"]


def test_killed_ray_simulation_resumes_to_the_same_run(ray_head, run_config, tmp_path):
    path, in_process = run_config
    out = tmp_path / "ray"
    proc = start([str(path), "--out", str(out), "--address", ray_head, "--cpus-per-client", "2"])  # one actor
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, with the ServerApp: no goodbye, the actors die with it
    proc.wait()
    assert not (out / "summary.json").exists(), "the run ended before it was killed"
    done = metrics.read_text().splitlines()
    assert len(done) < 3
    finish(start(["--resume", str(out), "--address", ray_head, "--cpus-per-client", "2"]))
    assert_same_run(out, in_process)
    # resumed after the checkpointed rounds, not run again from round 1: their rows are kept as written
    assert metrics.read_text().splitlines()[:len(done)] == done


@pytest.mark.parametrize("args,message", [
    (["--backend", "dask"], "--backend must be ray"),
    (["--set", "partition.scheme=files"], "partition.scheme 'files'"),
    (["--set", "method.name=centralized"], "no federated form"),
    (["--address", "127.0.0.1:1", "--num-cpus", "2"], "--num-cpus / --num-gpus size a new local cluster"),
])
def test_simulate_refuses_bad_input_in_one_line(run_config, args, message):
    from typer.testing import CliRunner

    from fedlora.cli import app

    r = CliRunner().invoke(app, ["simulate", str(run_config[0]), *args])
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_simulate_resume_needs_its_run_directory(tmp_path):
    from typer.testing import CliRunner

    from fedlora.cli import app

    r = CliRunner().invoke(app, ["simulate", "--resume", str(tmp_path)])
    assert r.exit_code == 2 and "flower_run.json" in r.output, r.output


def test_one_process_builds_the_run_once_for_every_client(tmp_path):
    """A Ray actor serves whichever client the pool hands it: the run (base model, adapters, partitions) is
    built at its first message and reused for the next client, not rebuilt per client."""
    from flwr.app import Context, RecordDict

    from fedlora.config import dump_config
    from fedlora.runtime.flower import client

    text = dump_config(build_config(config(tmp_path, "fedsa")))

    def node(cid: int) -> Context:
        return Context(run_id=1, node_id=100 + cid, state=RecordDict(), run_config={},
                       node_config={"partition-id": cid, "num-partitions": 3, "state-dir": str(tmp_path),
                                    "threads": 1})

    first = client.environment(text, node(0), 0, None)
    assert all(client.environment(text, node(cid), cid, None) is first for cid in (1, 2, 0))
