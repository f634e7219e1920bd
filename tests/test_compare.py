"""`fedlora compare`: every method and seed on the same split, a report with a table and two plots."""

from __future__ import annotations

import yaml
from conftest import tiny_config
from typer.testing import CliRunner

from fedlora.cli import app

runner = CliRunner()


def test_compare_writes_report_and_plots_and_skips_finished_runs(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path, name="cmp", federation={"rounds": 2})))
    out = tmp_path / "cmp"
    args = ["compare", str(cfg), "--methods", "fedit,rolora,local", "--seeds", "2", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    report = (out / "report.md").read_text()
    for m in ("fedit", "rolora", "local"):
        assert f"| {m} |" in report
    assert " ± " in report  # two seeds -> mean ± std
    assert report.count("since round 1 (") == 3  # each method's gain over its last 20 % of rounds
    for png in ("accuracy_vs_round.png", "accuracy_vs_uplink.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert len(list((out / "runs").iterdir())) == 6
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "6 of 6 runs finished earlier; running 0" in res.output
