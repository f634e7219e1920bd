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
