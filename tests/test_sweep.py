"""The sweep engine (fedlora.sweep): arms x seeds, the one rule for a changed config, the one JSON writer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_config
from typer.testing import CliRunner

from fedlora import sweep
from fedlora.cli import app
from fedlora.config import dump_config
from fedlora.sweep import Arm, ConfigChanged, run_sweep, write_json

runner = CliRunner()


class FakeRun:
    """A runner that writes what a finished run leaves (config, one metrics row, summary) and records each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg, run_dir, resume):
        self.calls.append((cfg.name, cfg.seed, cfg.data_seed, resume))
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
        summary = {"method": cfg.method.name, "seed": cfg.seed, "personal_accuracy": 0.5 + 0.1 * cfg.seed}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary


def test_arms_run_seed_major_on_one_data_split_and_aggregate_over_seeds(tmp_path):
    fake = FakeRun()
    arms = [Arm("a", {"seed": 5}), Arm("b", ["data_seed=7", "method.name=rolora"])]
    result = run_sweep(arms, tmp_path, base=tiny_config(tmp_path), seeds=2, runner=fake, log=lambda _: None)
    # seed-major: a sweep cut short leaves every arm at the same number of seeds
    assert fake.calls == [("a@s0", 0, 5, False), ("b@s0", 0, 7, False), ("a@s1", 1, 5, False), ("b@s1", 1, 7, False)]
    assert [s["method"] for s, _ in result.arms["b"]] == ["rolora", "rolora"]
    assert [d.name for d in result.run_dirs] == ["a@s0", "a@s1", "b@s0", "b@s1"]  # arm by arm
    mean, std = result.mean_std("personal_accuracy")["a"]
    assert mean == pytest.approx(0.55) and std == pytest.approx(0.0707107)
    assert sweep.mean_std([0.5]) == (0.5, None) and sweep.mean_std([]) == (None, None)
    with pytest.raises(ValueError, match="two arms share a name"):
        run_sweep([Arm("a"), Arm("a")], tmp_path, runner=fake)


def test_a_forbidden_change_is_refused_in_one_line_naming_the_field(tmp_path):
    fake = FakeRun()
    base = tiny_config(tmp_path)
    run_sweep([Arm("a")], tmp_path / "s", base=base, runner=fake)
    summary = tmp_path / "s" / "runs" / "a@s0" / "summary.json"
    before = summary.stat().st_mtime_ns
    for change, field in ((["train.lr=0.5"], "train.lr"), (["eval.split=test", "eval.max_global_examples=32"],
                                                            "eval.max_global_examples"),
                          (["federation.rounds=1"], "federation.rounds")):  # fewer rounds: never read from more
        with pytest.raises(ConfigChanged) as e:
            run_sweep([Arm("a", change)], tmp_path / "s", base=base, runner=fake)
        msg = str(e.value)
        assert "\n" not in msg and field in msg and "a@s0" in msg, msg
    assert summary.stat().st_mtime_ns == before and len(fake.calls) == 1  # nothing rerun, nothing lost
    # --overwrite: the refused folder is deleted and rerun
    run_sweep([Arm("a", ["train.lr=0.5"])], tmp_path / "s", base=base, runner=fake, overwrite=True)
    assert yaml.safe_load((summary.parent / "config.yaml").read_text())["train"]["lr"] == 0.5


def test_allowed_differences_reuse_a_finished_run_and_more_rounds_resume_it(tmp_path, capsys):
    base = tiny_config(tmp_path, federation={"rounds": 1}, eval={"every": 1, "max_global_examples": 16})
    run_sweep([Arm("a")], tmp_path / "s", base=base)
    run_dir = tmp_path / "s" / "runs" / "a@s0"
    finished = (run_dir / "summary.json").stat().st_mtime_ns
    # what changes no result: read back, not rerun
    free = ["threads=1", "eval.every=3", "output.save_client_states=false"]
    run_sweep([Arm("a", free)], tmp_path / "s", base=base)
    assert (run_dir / "summary.json").stat().st_mtime_ns == finished
    assert "1 of 1 runs finished earlier; running 0" in capsys.readouterr().out
    # more rounds (with the free changes): continued from the checkpoint, not started again
    result = run_sweep([Arm("a", [*free, "federation.rounds=2"])], tmp_path / "s", base=base)
    assert "[1/1] a@s0 (resumed)" in capsys.readouterr().out
    assert [r["round"] for r in result.arms["a"][0][1]] == [1, 2]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["federation"]["rounds"] == 2
    # `fedlora run --resume` follows the same rule
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({**base, "name": "a@s0", "data_seed": 0}))
    res = runner.invoke(app, ["run", str(cfg_path), "--resume", str(run_dir), "--set", "federation.rounds=1"])
    assert res.exit_code == 2 and "federation.rounds" in res.output


def test_the_rule_names_exactly_the_refused_fields(tmp_path):
    from fedlora.config import build_config

    cfg = build_config(tiny_config(tmp_path))
    assert sweep.refused_changes(cfg, tmp_path / "nothing") is None
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text(dump_config(cfg))
    changed = build_config(tiny_config(tmp_path, name="other", threads=1, eval={"every": 5, "batch_size": 8},
                                      output={"dir": "elsewhere"}, federation={"rounds": 4}))
    # no checkpoint to continue from: more rounds are refused too
    assert sweep.refused_changes(changed, tmp_path / "r") == ["eval.batch_size", "federation.rounds"]


def test_write_json_records_command_date_machine_and_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/x.py", "--quick", "--out", "a b"])
    path = write_json(tmp_path / "deep" / "x.json", [{"k": 1}])
    obj = json.loads(path.read_text())
    assert obj["rows"] == [{"k": 1}]
    meta = obj["meta"]
    assert meta["command"].endswith("benchmarks/x.py --quick --out 'a b'")
    assert meta["date"].endswith("+00:00") and meta["torch"] == torch.__version__
    assert set(meta["machine"]["cpu_flags"]) >= {"avx512_bf16", "amx_bf16"}
    assert meta["machine"]["cpus"] >= 1 and "python" in meta
    assert json.loads(write_json(tmp_path / "y.json", {"rows": [], "n": 2}).read_text())["n"] == 2
    with pytest.raises(ValueError, match="meta"):
        write_json(tmp_path / "z.json", {"meta": 1})


def test_write_json_needs_neither_pydantic_nor_numpy(tmp_path):
    """The torch-only benchmarks write through it on a bare GPU machine."""
    block = tmp_path / "block"
    for name in ("pydantic", "numpy", "yaml"):
        (block / name).mkdir(parents=True)
        (block / name / "__init__.py").write_text(f"raise ImportError('{name}')\n")
    code = ("import sys; sys.modules['torch'] = None\n"  # torch absent as well: its version is recorded as None
            "from fedlora.sweep import write_json; import json, pathlib\n"
            f"path = write_json(pathlib.Path({str(tmp_path / 'o.json')!r}), [])\n"
            "print(json.loads(path.read_text())['meta']['torch'])")
    src = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "src")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": f"{block}:{src}", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0 and res.stdout.strip() == "None", res.stderr[-2000:]


def test_compare_runs_through_the_engine_and_its_rule(tmp_path, monkeypatch):
    from fedlora import cli

    calls = []
    real = sweep.run_sweep

    def spy(arms, out, **kw):
        calls.append(([a.name for a in arms], kw["label"], kw["seeds"], kw["runner"]))
        return real(arms, out, **kw)

    monkeypatch.setattr(sweep, "run_sweep", spy)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path, name="cmp", federation={"rounds": 1})))
    args = ["compare", str(cfg), "--methods", "fedit,local", "--seeds", "1", "--out", str(tmp_path / "cmp")]
    assert runner.invoke(app, args).exit_code == 0
    assert calls == [(["fedit", "local"], "{arm}-s{seed}", 1, cli.run_with_progress)]
    res = runner.invoke(app, [*args, "--set", "eval.every=4"])  # changes no result: reused
    assert res.exit_code == 0 and "2 of 2 runs finished earlier; running 0" in res.output
    res = runner.invoke(app, [*args, "--set", "adapter.r=2"])
    assert res.exit_code == 2 and "adapter.r" in res.output and "--overwrite" in res.output
