"""Flower runtime over loopback: a SuperLink and 3 SuperNodes (TLS, a throw-away CA) as real processes.

The Flower runs are compared with the in-process simulation of the same config and seed. They are
equal bit for bit (bytes, accuracies, every client's final adapter), not only within a tolerance:
both runtimes build the run the same way (`Simulation(cfg)`), drive the same `Server` /
`client_fit`, the wire carries float32 exactly, and the only process-dependent randomness, the base
model's dropout during local training, is seeded per (seed, client, round) in `client_fit`.
Threads are pinned to 1 on both sides, so reductions run in the same order.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config

pytest.importorskip("flwr", reason="flwr is not installed")

from safetensors.torch import load_file  # noqa: E402

from fedlora.accounting import raw_bytes, serialized_bytes  # noqa: E402
from fedlora.config import build_config  # noqa: E402
from fedlora.federation import ClientState  # noqa: E402
from fedlora.runtime.flower import ClientStore, from_record, to_record  # noqa: E402
from fedlora.runtime.flower_cli import free_port, make_certificates  # noqa: E402
from fedlora.runtime.simulation import Simulation  # noqa: E402

NUM = 3
CLI = [sys.executable, "-m", "fedlora.cli", "flower"]


class Federation:
    def __init__(self, root: Path):
        self.root, self.procs, self.logs = root, {}, {}
        self.certs = make_certificates(root / "certs", ["127.0.0.1"])
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.state_dir = root / "client-state"

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        p = subprocess.Popen(CLI + args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.procs[name], self.logs[name] = p, log
        return p

    def start_superlink(self) -> None:
        self.start("superlink", ["superlink", "--port", str(self.port), "--certificates", str(self.root / "certs")])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError("the SuperLink did not start:\n" + self.tail("superlink"))

    def start_supernode(self, i: int) -> None:
        self.start(f"supernode{i}", ["supernode", "--partition-id", str(i), "--num-partitions", str(NUM),
                                     "--superlink", self.address, "--root-certificates", str(self.certs["ca"]),
                                     "--state-dir", str(self.state_dir), "--threads", "1"])

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        p = self.procs.pop(name, None)
        if p is None:
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        self.logs.pop(name).close()

    def stop(self) -> None:
        for p in self.procs.values():  # all at once: each takes a few seconds to say goodbye
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)

    def tail(self, name: str, n: int = 40) -> str:
        path = self.root / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def run(self, cfg: dict, out: Path, background: bool = False, wire: str = "packed"):
        path = out.parent / f"{out.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg))
        args = CLI + ["run", str(path), "--superlink", self.address, "--root-certificates", str(self.certs["ca"]),
                      "--out", str(out), "--node-wait", "90", "--round-timeout", "120", "--wire", wire]
        if background:
            return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
        r = subprocess.run(args, capture_output=True, text=True, timeout=150)
        assert r.returncode == 0 and (out / "summary.json").is_file(), self.explain(r.stdout + r.stderr)
        return out

    def explain(self, output: str) -> str:
        return output + "".join(f"\n--- {n}.log\n{self.tail(n)}" for n in ("superlink", *sorted(self.procs)))


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("flower"))
    try:
        fed.start_superlink()
        for i in range(NUM):
            fed.start_supernode(i)
        yield fed
    finally:
        fed.stop()


def config(tmp_path: Path, method: str, rounds: int = 2, **extra) -> dict:
    cfg = tiny_config(tmp_path, method={"name": method, **extra}, federation={"rounds": rounds})
    cfg["threads"] = 1
    return cfg


def simulate(cfg: dict, out: Path) -> Path:
    Simulation(build_config(cfg), out).run()
    return out


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(flower_dir: Path, sim_dir: Path) -> None:
    fr, sr = rows(flower_dir), rows(sim_dir)
    assert len(fr) == len(sr)
    for f, s in zip(fr, sr, strict=True):
        # every column of the in-process row, bytes and accuracies included (wall time aside), is equal
        diff = {k: (f.get(k), v) for k, v in s.items() if k != "wall_s" and f.get(k) != v}
        assert not diff, f"round {s['round']}: (flower, in process) differ: {diff}; flower row: {f}"
        assert f["rejected"] == [] and "failed" not in f
        # CE-LoRA's data descriptor (up_raw_other) crosses Flower in the clients' first replies
        assert f["flower_up_array_bytes"] >= f["up_raw"]
        assert f["flower_up_message_bytes"] > f["flower_up_array_bytes"]
    assert_same_states(flower_dir, sim_dir)
    summary = json.loads((flower_dir / "summary.json").read_text())
    assert summary["runtime"] == "flower" and summary["up_raw"] == json.loads((sim_dir / "summary.json").read_text())[
        "up_raw"]


def assert_same_states(flower_dir: Path, sim_dir: Path) -> None:
    sim_states = sorted(p.name for p in (sim_dir / "states").iterdir())
    assert sorted(p.name for p in (flower_dir / "states").iterdir()) == sim_states
    for name in sim_states:
        a, b = load_file(str(flower_dir / "states" / name)), load_file(str(sim_dir / "states" / name))
        assert a.keys() == b.keys()
        for k in b:
            assert torch.equal(a[k], b[k]), f"{name} {k}: max diff {(a[k] - b[k]).abs().max().item()}"


# wire "arrays": one Flower Array per tensor; "packed": one safetensors blob per message (the default)
METHODS = [("rolora", "arrays"), ("celora", "packed")]


@pytest.mark.parametrize("method,wire", METHODS)
def test_flower_run_equals_in_process(federation, tmp_path, method, wire):
    cfg = config(tmp_path, method)
    flower_dir = federation.run(cfg, tmp_path / "flower", wire=wire)
    assert_same_run(flower_dir, simulate(cfg, tmp_path / "sim"))
    # uploads are validated by the shared Server: per client and round, exactly the method's factors
    first = rows(flower_dir)[0]
    assert first["up_raw"] == rows(tmp_path / "sim")[0]["up_raw"] > 0 and first["down_raw"] == 0


def test_flower_columns_equal_in_process_with_user_metrics_and_validation(federation, tmp_path):
    """One evaluation and one driver for both runtimes: the user's metric (eval.metrics) and the validation columns
    reach the Flower run's rows, which equal `fedlora run`'s column for column; the best round is chosen on
    validation; the baseline (eval.baseline) is measured the same way."""
    cfg = config(tmp_path, "fedsa")
    cfg["eval"] = {**cfg["eval"], "metrics": ["sklearn.metrics:balanced_accuracy_score"], "baseline": True}
    cfg["partition"] = {**cfg["partition"], "client_val_fraction": 0.2}
    flower_dir = federation.run(cfg, tmp_path / "flower")
    sim_dir = simulate(cfg, tmp_path / "sim")
    assert_same_run(flower_dir, sim_dir)
    for row in rows(sim_dir):
        assert {"personal_balanced_accuracy_score", "val_personal_accuracy"} <= set(row)
    for run_dir in (flower_dir, sim_dir):  # the same keys in both rows, not only the in-process ones in Flower's
        assert {k for k in rows(run_dir)[-1] if not k.startswith(("flower_", "cum_flower_", "time_"))} == \
            set(rows(sim_dir)[-1])
    flower, sim = (json.loads((d / "summary.json").read_text()) for d in (flower_dir, sim_dir))
    assert flower["best_round"] is not None and flower["best_round"] == sim["best_round"]
    assert flower["best"] == sim["best"]
    # the one driver writes the base model's metrics before round 1 under both runtimes
    assert flower["baseline"] == sim["baseline"] and "val_personal_accuracy" in sim["baseline"]


def test_restarted_supernode_resumes_from_disk(federation, tmp_path):
    """FedSA keeps B and the head on the client: a SuperNode killed after round 1 and restarted must read
    them back from its state directory, or client 1's final adapter would differ from the in-process run."""
    cfg = config(tmp_path, "fedsa", rounds=3)
    out = tmp_path / "flower"
    proc = federation.run(cfg, out, background=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.1)
        federation.kill("supernode1")  # SIGKILL: no goodbye to the SuperLink, in-memory state lost
        persisted = list(federation.state_dir.glob("run_*/client_1/state.json"))
        assert persisted and json.loads(persisted[-1].read_text())["round"] >= 1
        federation.start_supernode(1)
        output, _ = proc.communicate(timeout=150)
        assert proc.returncode == 0, federation.explain(output)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert_same_run(out, simulate(cfg, tmp_path / "sim"))
    log = (federation.root / "supernode1.log").read_text(errors="replace")
    assert log.count("SuperNode ID") >= 2  # it really was a new SuperNode process


def test_wire_formats_carry_bf16_exactly():
    t = {"a.A": torch.randn(3, 4).to(torch.bfloat16), "classifier.weight": torch.randn(2, 4)}
    rec, cast = to_record(t, "arrays")
    assert dict(cast) == {"a.A": "bfloat16"} and rec["a.A"].dtype == "int16"  # NumPy has no bfloat16: its bits
    # bf16 crosses the wire at 2 bytes an element, as accounting.raw_bytes counts it: half of fp32
    fp32_rec, _ = to_record({"a.A": t["a.A"].float()}, "arrays")
    assert rec["a.A"].numpy().nbytes * 2 == fp32_rec["a.A"].numpy().nbytes == 3 * 4 * 4
    assert raw_bytes({"a.A": t["a.A"]}) * 2 == raw_bytes({"a.A": t["a.A"].float()}) == 3 * 4 * 4
    back = from_record(rec, cast)
    assert back["a.A"].dtype == torch.bfloat16 and all(torch.equal(back[k], t[k]) for k in t)
    rec, cast = to_record(t, "packed")  # one uint8 Array holding a safetensors blob: bf16 as is
    assert list(rec) == ["safetensors"] and rec["safetensors"].dtype == "uint8" and not cast
    half = {"a.A": torch.zeros(64, 64, dtype=torch.bfloat16)}
    gap = serialized_bytes({"a.A": half["a.A"].float()}) - serialized_bytes(half)
    assert abs(gap - 64 * 64 * 2) <= 8  # the header may differ by its alignment padding
    back = from_record(rec, cast)
    assert back["a.A"].dtype == torch.bfloat16 and all(torch.equal(back[k], t[k]) for k in t)
    assert from_record(*to_record({}, "packed")) == {}
    many = {f"k{i}": torch.zeros(2, dtype=torch.int64) for i in (3, 0, 5, 1, 4, 2)}
    assert all(list(from_record(*to_record(many, "packed"))) == sorted(many) for _ in range(5))  # a fixed order


def test_client_store_round_trip(tmp_path):
    store = ClientStore(tmp_path, 7, 1)
    shared = {"l.A": torch.randn(2, 3)}
    personal = {"l.B": torch.randn(3, 2), "l.C": torch.randn(2, 2)}
    store.save(ClientState(shared, personal), {"config": "k", "synced": 2, "round": 3}, {"l.C": personal["l.C"]})
    state, meta, upload = store.load("k")
    assert torch.equal(state.shared["l.A"], shared["l.A"]) and torch.equal(state.personal["l.B"], personal["l.B"])
    assert meta["synced"] == 2 and meta["round"] == 3 and torch.equal(upload["l.C"], personal["l.C"])
    assert json.loads((store.dir / "state.json").read_text())["round"] == 3
    assert store.load("another config") is None
