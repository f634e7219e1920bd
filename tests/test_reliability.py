"""Checkpoint and resume: a run killed with SIGKILL and resumed equals an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import make_sim, tiny_config
from safetensors.torch import load_file

from fedlora.checkpoint import load_checkpoint

ROUNDS = 4


def cli(*args):
    return [sys.executable, "-c", "from fedlora.cli import main; main()", *args]


def write_config(tmp_path, method):
    cfg = tiny_config(tmp_path, method={"name": method}, federation={"rounds": ROUNDS, "dropout_rate": 0.2},
                      partition={"num_clients": 4, "scheme": "dirichlet", "alpha": 1.0, "min_partition_size": 20},
                      model={"name": "tiny-bert", "max_length": 16}, threads=1)
    cfg["adapter"]["dropout"] = 0.1  # dropout draws from torch's RNG: its state must be restored too
    p = tmp_path / f"{method}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def comparable(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("wall_s")
    states = {p.name: load_file(str(p)) for p in sorted((run_dir / "states").glob("*.safetensors"))}
    return rows, states


@pytest.mark.parametrize("method", ["rolora", "celora"])
def test_sigkill_and_resume_is_bit_identical(tmp_path, method):
    cfg = write_config(tmp_path, method)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(cli("run", str(cfg), "--out", str(ref)), check=True, env=env, capture_output=True)

    # killed by SIGKILL in the middle of round 3 (its downloads sent and dropouts drawn), as a client trains
    killer = f"""
import os, signal
import fedlora.runtime.simulation as sim
from fedlora.config import load_config
fit, calls = sim.client_fit, []
def client_fit(am, method, state, dl, *a):
    calls.append(dl.round)
    if calls.count(3) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return fit(am, method, state, dl, *a)
sim.client_fit = client_fit
sim.Simulation(load_config({str(cfg)!r}), {str(killed)!r}).run()
"""
    proc = subprocess.run([sys.executable, "-c", killer], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    done = load_checkpoint(killed)["round"]
    assert done == 2 and len((killed / "metrics.jsonl").read_text().splitlines()) == 2
    res = subprocess.run(cli("run", str(cfg), "--resume", str(killed)), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]

    ref_rows, ref_states = comparable(ref)
    rows, states = comparable(killed)
    assert rows == ref_rows
    assert ref_states.keys() == states.keys() and len(states) > 1
    for name in ref_states:
        assert ref_states[name].keys() == states[name].keys()
        for k in ref_states[name]:
            assert torch.equal(ref_states[name][k], states[name][k]), (name, k)


def test_truncated_checkpoint_is_never_resumed_from(tmp_path):
    sim = make_sim(tmp_path, federation={"rounds": 3})
    sim.run()
    run_dir = sim.run_dir
    assert load_checkpoint(run_dir)["round"] == 3
    # a crash mid-write leaves a partial temp file: ignored
    (run_dir / "checkpoint" / "delta_000001_000003.pt.tmp").write_bytes(b"\x80\x02garbage")
    assert load_checkpoint(run_dir)["round"] == 3
    # a checkpoint truncated on disk: the previous one is used
    newest = max((run_dir / "checkpoint").glob("*.pt"), key=lambda p: int(p.stem.split("_")[-1]))
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    assert load_checkpoint(run_dir)["round"] == 2


def test_resume_rejects_a_changed_config(tmp_path):
    from typer.testing import CliRunner

    from fedlora.cli import app

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path, federation={"rounds": 1})))
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(app, ["run", str(cfg), "--out", str(out)]).exit_code == 0
    res = runner.invoke(app, ["run", str(cfg), "--resume", str(out), "--set", "train.lr=0.5"])
    assert res.exit_code == 2 and "train.lr" in res.output
    # more rounds is a valid resumption: it continues from round 1
    res = runner.invoke(app, ["run", str(cfg), "--resume", str(out), "--set", "federation.rounds=2"])
    assert res.exit_code == 0, res.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
