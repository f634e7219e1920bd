"""The command line end to end on the tiny model: run, errors, export, tasks."""

from __future__ import annotations

import json

import torch
import yaml
from conftest import tiny_config
from peft import PeftModel
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlora.adapters import inject_adapters
from fedlora.cli import app
from fedlora.models import load_classifier, load_tokenizer

runner = CliRunner()


def write_config(tmp_path, **sections):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(tiny_config(tmp_path, **sections)))
    return p


def test_run_each_method_writes_metrics_with_bytes_by_the_rules(tmp_path):
    cfg = write_config(tmp_path, federation={"rounds": 2})
    per_client = {}
    for m in ("fedit", "ffa", "rolora", "fedsa", "local", "centralized"):
        out = tmp_path / "runs" / m
        res = runner.invoke(app, ["run", str(cfg), "--set", f"method.name={m}", "--set", "method.head=personal",
                                  "--out", str(out)])
        assert res.exit_code == 0, res.output
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and (out / "summary.json").is_file() and (out / "config.yaml").is_file()
        per_client[m] = [r["up_raw_adapter_per_client"] for r in rows]
    # tiny-bert: 2 layers × (query, value), hidden 32, r 4 -> per matrix A and B are 4×32 = 128 floats each
    n_matrices, factor = 4, 4 * 32 * 4
    assert per_client["fedit"] == [2 * factor * n_matrices] * 2
    assert per_client["ffa"] == [factor * n_matrices] * 2
    assert per_client["rolora"] == [factor * n_matrices] * 2
    assert per_client["fedsa"] == [factor * n_matrices] * 2
    assert per_client["local"] == per_client["centralized"] == [0, 0]


def test_config_errors_are_one_line_exit_2(tmp_path):
    cfg = write_config(tmp_path)
    for args, words in ((["--set", "train.lrr=1"], "unknown field 'train.lrr'"),
                        (["--set", "method.name=fedavg"], "unknown method 'fedavg'"),
                        (["--set", "model.name=./no/such/model"], "model.name: folder not found"),
                        (["--set", "adapter.target_modules=[q_proj]"], "match no linear layer"),
                        (["--set", "adapter.r=999"], "larger than the layer"),
                        (["--set", "task.name=nope"], "unknown task 'nope'")):
        res = runner.invoke(app, ["run", str(cfg), *args])
        assert res.exit_code == 2, (args, res.output)
        assert words in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
    res = runner.invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "config file not found" in res.output


def test_data_errors_are_one_line_exit_2(tmp_path):
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(b"\x00\xff\xfe binary \x00\x00 \n\x89PNG")
    tiny_csv = tmp_path / "tiny.csv"
    tiny_csv.write_text("text,label\nriver lake,a\nmoney bank,b\nsong drum,a\nbank tax,b\n")
    cases = ((["--set", "task.name=csv", "--set", f"task.path={tmp_path / 'nope.csv'}"], "task.path: file not found"),
             (["--set", "task.name=csv", "--set", f"task.path={garbage}"], "line 1 is not UTF-8"),
             (["--set", "task.name=csv", "--set", f"task.path={tiny_csv}",
               "--set", "partition.global_test_fraction=0.01"], "partition.num_clients: 3 clients need at least 6"))
    cfg = write_config(tmp_path)
    for args, words in cases:
        res = runner.invoke(app, ["run", str(cfg), *args])
        assert res.exit_code == 2, (args, res.output)
        assert words in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_export_client_adapter_loads_in_peft(tmp_path):
    cfg = write_config(tmp_path, method={"name": "fedsa"}, federation={"rounds": 1})
    out = tmp_path / "runs" / "fedsa"
    assert runner.invoke(app, ["run", str(cfg), "--out", str(out)]).exit_code == 0
    res = runner.invoke(app, ["export", str(out), "--client", "1", "--out", str(tmp_path / "peft")])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "adapter_meta.json").read_text())
    x = dict(load_tokenizer("tiny-bert")(["river ocean lake"], return_tensors="pt"))
    am = inject_adapters(load_classifier("tiny-bert", meta["num_labels"], 0), ["query", "value"], r=4, alpha=8)
    am.set_state(load_file(str(out / "states" / "client_1.safetensors")))
    peft_model = PeftModel.from_pretrained(load_classifier("tiny-bert", meta["num_labels"], 0), tmp_path / "peft")
    assert torch.allclose(am.model(**x).logits, peft_model.eval()(**x).logits, atol=1e-5)
    res = runner.invoke(app, ["export", str(out), "--client", "global", "--out", str(tmp_path / "g")])
    assert res.exit_code == 2 and "no single global model" in res.output


def test_tasks_lists_registry():
    res = runner.invoke(app, ["tasks"])
    assert res.exit_code == 0 and "rt-sentiment" in res.output and "healthtweets-outlet" in res.output
