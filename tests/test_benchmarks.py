"""Smoke tests: each benchmark's --quick size runs end to end and writes its JSON (no claims asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    ("privacy.py", ["--attack-methods", "full,celora", "--dp-methods", "fedit,celora"], "privacy_quick.json"),
    ("llm_personalization.py", ["--methods", "fedit,celora"], "llm_personalization_quick.json"),
])
def test_benchmark_quick(tmp_path, script, args, out):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(tmp_path),
                          *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / out).read_text())
    assert rows and res.stdout.strip().splitlines()[-1].startswith("|")
