"""A real federation over loopback: each SuperNode holds only its own file, the SuperLink holds none.

The SuperLink (and the ServerApp it starts) runs with an audit hook (`sys.addaudithook`, installed by a
`sitecustomize` on its PYTHONPATH) that records every file the process opens: the test shows that no
client file is among them, and that the run's config names none. Every Flower run equals the in-process
`partition.scheme: files` run on the same files, bit for bit. Nodes authenticate with keys from
`fedlora flower keys`; an unregistered node is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="flwr is not installed")

from test_flower import NUM, Federation, assert_same_run, assert_same_states, rows, simulate  # noqa: E402
from test_silos import files_config, write_silos  # noqa: E402

from fedlora.runtime.flower_cli import make_node_keys  # noqa: E402

AUDIT = '''import os, sys
_fd = os.open(os.environ["FEDLORA_AUDIT_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
def _hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        os.write(_fd, (os.fsdecode(args[0]) + "\\n").encode())
sys.addaudithook(_hook)
'''


class Silos(Federation):
    """A SuperLink with node authentication and an audit of its opened files; one SuperNode per silo file."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.files = write_silos(root / "silos", labels_of=lambda c: [c, (c + 1) % 4])
        self.keys = make_node_keys(root / "keys", [f"node_{i}" for i in range(NUM + 1)])
        (root / "audit").mkdir()
        (root / "audit" / "sitecustomize.py").write_text(AUDIT)
        self.audit_log = root / "superlink-opened.txt"

    def start_superlink(self) -> None:
        path = os.pathsep.join([str(self.root / "audit"), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "PYTHONPATH": path, "FEDLORA_AUDIT_LOG": str(self.audit_log)}
        log = open(self.root / "superlink.log", "ab")  # noqa: SIM115 - closed in stop()
        self.procs["superlink"] = subprocess.Popen(
            [sys.executable, "-m", "fedlora.cli", "flower", "superlink", "--port", str(self.port), "--certificates",
             str(self.root / "certs"), "--node-auth", "--database", str(self.root / "superlink.db")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=self.root / "audit")
        self.logs["superlink"] = log

    def register(self, *names: str) -> None:
        r = subprocess.run([sys.executable, "-m", "fedlora.cli", "flower", "register",
                            *[str(self.keys[n][1]) for n in names], "--superlink", self.address,
                            "--root-certificates", str(self.certs["ca"])], capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, r.stdout + r.stderr + self.tail("superlink")

    def start_supernode(self, i: int, key: str | None = None, name: str | None = None) -> None:
        self.start(name or f"supernode{i}", ["supernode", "--partition-id", str(i), "--num-partitions", str(NUM),
                                     "--data", self.files[i], "--text-column", "sentence", "--label-column", "y",
                                     "--superlink", self.address, "--root-certificates", str(self.certs["ca"]),
                                     "--state-dir", str(self.state_dir), "--threads", "1",
                                     *(["--auth-key", str(self.keys[key or f"node_{i}"][0])] if key != "" else [])])

    def refusals(self) -> int:
        """The SuperLink's refusals of a node's request to register or activate itself."""
        return sum(1 for line in self.tail("superlink", 100000).splitlines()
                   if "-node HTTP/1.1" in line and "/v1/fleet/" in line and 'HTTP/1.1" 200' not in line)

    def opened(self) -> str:
        return self.audit_log.read_text(errors="replace") if self.audit_log.exists() else ""


@pytest.fixture(scope="module")
def silos(tmp_path_factory):
    fed = Silos(tmp_path_factory.mktemp("silos"))
    try:
        fed.start_superlink()
        fed.register(*[f"node_{i}" for i in range(NUM)])
        for i in range(NUM):
            fed.start_supernode(i)
        yield fed
    finally:
        fed.stop()


def flower_config(tmp_path: Path, method: str, rounds: int = 2) -> dict:
    cfg = files_config(tmp_path, None, method, federation={"rounds": rounds})
    cfg["threads"] = 1
    return cfg


def in_process(silos: Silos, cfg: dict, out: Path) -> Path:
    return simulate({**cfg, "partition": {**cfg["partition"], "files": silos.files}}, out)


@pytest.mark.parametrize("method", ["fedit", "rolora", "celora"])
def test_silo_run_equals_in_process_files_run(silos, tmp_path, method):
    cfg = flower_config(tmp_path, method)
    flower_dir = silos.run(cfg, tmp_path / "flower")
    assert_same_run(flower_dir, in_process(silos, cfg, tmp_path / "sim"))
    # the SuperLink's processes opened files (the audit works) but not one of the clients'
    opened = silos.opened()
    assert "config.yaml" in opened or "metrics.jsonl" in opened
    assert not [f for f in silos.files if f in opened], "the SuperLink opened a client file"
    text = (flower_dir / "config.yaml").read_text()
    assert not [f for f in silos.files if Path(f).name in text]  # the run's config names no client file
    if method == "celora":  # each client's descriptor crossed Flower once, before its first download, and was counted
        first, second = rows(flower_dir)[:2]
        assert first["up_raw_other"] > 0 and second["up_raw_other"] == 0
        assert first["flower_up_array_bytes"] >= first["up_raw"]


def test_silo_columns_and_best_round_with_user_metrics_and_validation(silos, tmp_path):
    """On silos each node carves its own validation split: the Flower rows carry the user's metric and the
    validation columns as the in-process files run does, and the best round is chosen on them."""
    cfg = flower_config(tmp_path, "fedit")
    cfg["eval"] = {**cfg.get("eval", {}), "metrics": ["sklearn.metrics:balanced_accuracy_score"]}
    cfg["partition"] = {**cfg["partition"], "client_val_fraction": 0.2}
    flower_dir = silos.run(cfg, tmp_path / "flower")
    sim_dir = in_process(silos, cfg, tmp_path / "sim")
    assert_same_run(flower_dir, sim_dir)
    assert {"global_balanced_accuracy_score", "val_personal_accuracy"} <= set(rows(flower_dir)[-1])
    flower, sim = (json.loads((d / "summary.json").read_text()) for d in (flower_dir, sim_dir))
    assert flower["best_round"] is not None and flower["best_round"] == sim["best_round"]


@pytest.mark.parametrize("key", [f"node_{NUM}", ""], ids=["unregistered-key", "no-key"])
def test_unknown_node_is_refused(silos, tmp_path, key):
    name = f"intruder-{key or 'nokey'}"  # a 4th node, claiming client 0: a key never registered, or none at all
    refusals = silos.refusals()
    silos.start_supernode(0, key=key, name=name)
    try:
        deadline = time.monotonic() + 180  # a loaded machine takes a while to import torch and flwr
        while silos.procs[name].poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        log = silos.tail(name, 200)
        assert silos.procs[name].poll() not in (None, 0), log  # it gave up: the SuperLink refused it
        assert "SuperNode ID" not in log and "could not establish a connection to the SuperLink" in log, log
        assert silos.refusals() > refusals, silos.tail("superlink")  # the SuperLink said no
    finally:
        silos.kill(name)


def test_serverapp_resumes_after_the_superlink_dies(silos, tmp_path):
    cfg = flower_config(tmp_path, "fedit", rounds=3)
    out = tmp_path / "flower"
    proc = silos.run(cfg, out, background=True)
    try:
        deadline = time.monotonic() + 150
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.1)
        silos.kill("superlink")  # SIGKILL to its process group: the ServerApp dies with it
        proc.wait(timeout=60)
        assert not (out / "summary.json").exists()
        silos.start_superlink()  # same database: the nodes' registrations survive
        r = subprocess.run([sys.executable, "-m", "fedlora.cli", "flower", "run", "--resume", str(out),
                            "--superlink", silos.address, "--root-certificates", str(silos.certs["ca"]),
                            "--node-wait", "90", "--round-timeout", "120"],
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, silos.explain(r.stdout + r.stderr)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert_same_run(out, in_process(silos, cfg, tmp_path / "sim"))
    assert json.loads((out / "summary.json").read_text())["rounds"] == 3


def test_node_keys_are_what_flower_reads(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    (private, public), = make_node_keys(tmp_path, ["node_0"]).values()
    key = load_ssh_private_key(private.read_bytes(), password=None)  # as flower-supernode loads it
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(public)  # as `flwr supernode register` loads it
    assert private.stat().st_mode & 0o077 == 0  # the private key is the node's only


def test_silo_run_with_secure_aggregation_equals_in_process(silos, tmp_path):
    """Three silos over TLS with node authentication, SecAgg+ as four message exchanges: the rows, bytes and states
    equal the in-process run with secure aggregation (masks cancel exactly; rounding is seeded)."""
    cfg = flower_config(tmp_path, "fedit")
    cfg["federation"] = {**cfg["federation"], "secure_aggregation": True}
    flower_dir = silos.run(cfg, tmp_path / "flower")
    sim_dir = in_process(silos, cfg, tmp_path / "sim")
    fr, sr = rows(flower_dir), rows(sim_dir)
    assert len(fr) == len(sr) == 2
    for f, s in zip(fr, sr, strict=True):
        diff = {k: (f.get(k), v) for k, v in s.items() if k != "wall_s" and f.get(k) != v}
        assert not diff, diff
        assert not f["skipped"] and f["secagg_survivors"] == 3 and f["up_secagg_masked"] > 0
    assert_same_states(flower_dir, sim_dir)
