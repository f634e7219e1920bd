"""Users' data through Hugging Face `datasets`, trackers, the Python API, library metrics and the best round."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config
from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.data import load_task, load_task_source

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
WORDS = [w.split() for w in ("river ocean lake stream water", "money bank price market trade",
                             "music guitar piano song drum")]


def classification_rows(n: int = 120) -> list[dict]:
    r = np.random.default_rng(0)
    return [{"sentence": " ".join(r.choice(WORDS[i % 3], 4)), "y": i % 3, "site": str(i % 2)} for i in range(n)]


def instruction_rows(n: int = 60) -> list[dict]:
    cats = ["geo", "money", "music"]
    return [{"instruction": f"name a word like {WORDS[i % 3][i % 5]}", "input": "" if i % 2 else "one word",
             "output": WORDS[i % 3][(i + 1) % 5], "category": cats[i % 3]} for i in range(n)]


def saved_classifier_dataset(tmp_path) -> Path:
    features = datasets.Features({"sentence": datasets.Value("string"), "site": datasets.Value("string"),
                                  "y": datasets.ClassLabel(names=["water", "finance", "music"])})
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(classification_rows(), features=features),
                               "extra": datasets.Dataset.from_list(classification_rows(9), features=features)})
    dd.save_to_disk(str(tmp_path / "cls_ds"))
    return tmp_path / "cls_ds"


def write_config(tmp_path, **sections) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(tiny_config(tmp_path, **sections)))
    return p


def read_events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_hf_sources_share_one_loader(tmp_path):
    folder = saved_classifier_dataset(tmp_path)
    task = load_task("hf", path=str(folder), text_column="sentence", label_column="y")
    assert task.label_names == ["finance", "music", "water"] and len(task.texts) == 120  # ClassLabel names kept
    assert task.columns["site"][:2] == ["0", "1"]
    assert len(load_task("hf", path=str(folder), split="extra", text_column="sentence", label_column="y").texts) == 9
    with pytest.raises(ValueError, match="task.split: .* no split 'test'"):
        load_task("hf", path=str(folder), split="test", text_column="sentence", label_column="y")
    # the same rows as parquet, as a Dataset object, as a list of dicts: the same task
    datasets.Dataset.from_list(classification_rows()).to_parquet(str(tmp_path / "d.parquet"))
    from_parquet = load_task("hf", path=str(tmp_path / "d.parquet"), text_column="sentence", label_column="y")
    from_list = load_task_source(classification_rows(), text_column="sentence", label_column="y")
    assert from_parquet.texts == from_list.texts == task.texts and from_parquet.labels == from_list.labels
    datasets.Dataset.from_list(classification_rows()).to_json(str(tmp_path / "d.json"))
    assert load_task("hf", path=str(tmp_path / "d.json"), text_column="sentence", label_column="y").texts == task.texts
    # instructions, alpaca style, with categories as labels
    inst = load_task_source(datasets.Dataset.from_list(instruction_rows()))
    assert inst.causal and inst.label_names == ["geo", "money", "music"]
    assert inst.texts[0] == "name a word like river\n\none word" and inst.texts[1] == "name a word like bank"
    with pytest.raises(ValueError, match="task.output_column: no column 'answer'"):
        load_task_source(instruction_rows(), kind="instructions", output_column="answer")


def test_unreachable_hub_ids_are_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from fedlora.cli import _quiet_libraries

    _quiet_libraries()
    assert "HF_HUB_OFFLINE" not in os.environ  # the CLI leaves the hub reachable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the test itself never touches the network
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cfg = write_config(tmp_path)
    for args, words in ((["--set", "model.name=nobody-here/no-such-model"],
                         "model.name: cannot load the tokenizer 'nobody-here/no-such-model'"),
                        (["--set", "task.name=hf", "--set", "task.path=nobody-here/no-such-dataset"],
                         "task.path: cannot load dataset 'nobody-here/no-such-dataset'")):
        res = runner.invoke(app, ["run", str(cfg), *args])
        assert res.exit_code == 2, res.output
        assert words in res.output and "--local-dir DIR" in res.output or "save_to_disk(DIR)" in res.output
        assert len(res.output.strip().splitlines()) == 1, res.output


def test_cli_runs_hf_classifier_and_instructions_with_tensorboard(tmp_path):
    folder = saved_classifier_dataset(tmp_path)
    cfg = write_config(tmp_path, task={"name": "hf", "path": str(folder), "text_column": "sentence",
                                       "label_column": "y"},
                       method={"name": "celora"}, output={"dir": str(tmp_path / "runs"), "loggers": ["tensorboard"]})
    out = tmp_path / "runs" / "cls"
    res = runner.invoke(app, ["run", str(cfg), "--out", str(out)])
    assert res.exit_code == 0, res.output
    acc = read_events(out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    got = {e.step: e.value for e in acc.Scalars("metrics/global_accuracy")}
    assert got == pytest.approx({r["round"]: r["global_accuracy"] for r in rows})
    assert [e.value for e in acc.Scalars("bytes/up_raw")] == [r["up_raw"] for r in rows]
    assert len(acc.Scalars("time/wall_s")) == 2
    images = acc.Images("celora/weights")  # CE-LoRA's mixing weights, one heatmap per round
    assert [e.step for e in images] == [1, 2] and images[0].width > 50 and images[0].height > 50

    datasets.Dataset.from_list(instruction_rows()).to_parquet(str(tmp_path / "inst.parquet"))
    cfg = write_config(tmp_path, model={"name": "tiny-llama", "max_length": 96},
                       task={"name": "hf", "path": str(tmp_path / "inst.parquet")},
                       partition={"num_clients": 3, "scheme": "natural", "column": "category"},
                       eval={"generate_examples": 1, "max_new_tokens": 4},
                       output={"dir": str(tmp_path / "runs"), "loggers": ["tensorboard"]})
    out = tmp_path / "runs" / "inst"
    res = runner.invoke(app, ["run", str(cfg), "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "inst" and summary["personal_perplexity"] > 1
    assert [e.step for e in read_events(out).Scalars("metrics/personal_perplexity")] == [1, 2]


def test_wandb_offline_and_mlflow_file_store(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="optional extra fedlora[trackers]")
    pytest.importorskip("mlflow", reason="optional extra fedlora[trackers]")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    uri = (tmp_path / "mlruns").resolve().as_uri()  # MLflow's file store: fast, no database to migrate
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from conftest import make_sim

    sim = make_sim(tmp_path, method={"name": "celora"},
                   output={"dir": str(tmp_path / "runs"), "loggers": ["wandb", "mlflow"]})
    sim.run()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])
    history = client.get_metric_history(run.info.run_id, "metrics.global_accuracy")
    assert [m.step for m in history] == [r["round"] for r in sim.history]
    assert [m.value for m in history] == pytest.approx([r["global_accuracy"] for r in sim.history])
    assert run.data.params["method.name"] == "celora"
    (record,) = list((sim.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    data = record.read_bytes()
    assert b"metrics/global_accuracy" in data and b"bytes/up_raw" in data


def test_python_api_readme_example_with_a_model_object(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    result = scope["result"]
    s = result.summary
    assert s["method"] == "celora" and s["num_clients"] == 3 and s["rounds"] == 2 and s["final_round"] == 2
    assert s["best_round"] in (1, 2) and s["best_selected_on"].startswith("validation personal_accuracy")
    assert set(result.adapters) == {0, 1, 2}
    # the exported PEFT folder gives the logits of client 0's model
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedlora.adapters import inject_adapters
    from fedlora.models import minilm_dir

    x = dict(scope["tokenizer"](["great fun film", "dull slow"], return_tensors="pt", padding=True))
    peft = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2),
                                     str(tmp_path / "runs" / "notebook" / "client0-peft")).eval()
    ours = inject_adapters(AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2),
                           result.meta["targets"], result.meta["r"], result.meta["alpha"], tri=True)
    ours.set_state(result.adapters[0])
    with torch.no_grad():
        assert torch.allclose(peft(**x).logits, ours.model.eval()(**x).logits, atol=1e-5)
    # a second call with the same (now adapted) model is refused in one line
    with pytest.raises(ValueError, match="already holds fedlora adapters"):
        scope["fedlora"].federate(model=scope["model"], tokenizer=scope["tokenizer"], clients=[[{}]])


def test_api_dataset_and_partition_with_tiny_model(tmp_path):
    import fedlora
    from fedlora.models import load_classifier, load_tokenizer

    data = datasets.Dataset.from_list(classification_rows())
    kwargs = dict(tokenizer=load_tokenizer("tiny-bert"), dataset=data, method="fedit",
                  partition={"num_clients": 4, "scheme": "iid"},
                  columns={"text_column": "sentence", "label_column": "y"},
                  federation={"rounds": 1}, train={"local_steps": 2})
    with pytest.raises(ValueError, match="the classifier has 2 labels but the data have 3"):
        fedlora.federate(model=load_classifier("tiny-bert", 2, 0), run_dir=tmp_path / "x", **kwargs)
    result = fedlora.federate(model=load_classifier("tiny-bert", 3, 0), run_dir=tmp_path / "api", **kwargs)
    assert result.summary["num_clients"] == 4 and len(result.adapters) == 4
    assert result.summary["best_round"] is None and "never chosen on test" in result.summary["best_selected_on"]
    peft_dir = result.export(2, tmp_path / "peft2")
    assert json.loads((peft_dir / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"


def test_metrics_come_from_sklearn_plus_user_metrics(tmp_path):
    from conftest import make_sim
    from sklearn.metrics import balanced_accuracy_score, f1_score

    import fedlora
    from fedlora.train import evaluate

    fedlora.register_metric("wrong_rate", lambda y, p: float(np.mean(y != p)))
    sim = make_sim(tmp_path, eval={"metrics": ["wrong_rate", "sklearn.metrics:balanced_accuracy_score"],
                                   "max_global_examples": 64})
    row = sim.run_round(1)
    assert row["global_wrong_rate"] == pytest.approx(1 - row["global_accuracy"])
    assert "personal_balanced_accuracy_score" in row
    sim.am.set_state(sim.eval_state(0))
    data = sim.global_test
    with torch.no_grad():
        pred = torch.cat([sim.am.model(**data.batch(slice(i, i + 64))).logits.argmax(-1)
                          for i in range(0, len(data), 64)]).numpy()
    m = evaluate(sim.am, data, 64, sim.metric_fns)
    gold = data.labels.numpy()
    assert m["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"))
    assert m["balanced_accuracy_score"] == pytest.approx(balanced_accuracy_score(gold, pred))
    assert row["global_macro_f1"] == pytest.approx(m["macro_f1"])
    with pytest.raises(ValueError, match="eval.metrics: unknown metric 'nope'"):
        make_sim(tmp_path, eval={"metrics": ["nope"]})


def test_best_round_is_chosen_on_validation_never_on_test(tmp_path):
    from conftest import make_sim

    from fedlora.evaluation import best_round

    sim = make_sim(tmp_path, partition={"num_clients": 3, "scheme": "iid", "client_val_fraction": 0.25},
                   federation={"rounds": 3})
    summary = sim.run()
    assert all("val_personal_accuracy" in r for r in sim.history)
    best = max(sim.history, key=lambda r: r["val_personal_accuracy"])
    assert summary["best_round"] == best["round"] and summary["final_round"] == 3
    assert summary["best"]["personal_accuracy"] == best["personal_accuracy"]  # that round's test number
    # test and validation disagree: the best round follows validation
    sim.history = [{"round": 1, "personal_accuracy": 0.9, "val_personal_accuracy": 0.2},
                   {"round": 2, "personal_accuracy": 0.1, "val_personal_accuracy": 0.8}]
    assert best_round(sim, sim.history)["best_round"] == 2
    sim.cfg.eval.best_metric = "personal_loss"  # a loss is minimized
    sim.history = [{"round": 1, "val_personal_loss": 0.5, "personal_loss": 0.1},
                   {"round": 2, "val_personal_loss": 0.4, "personal_loss": 0.9}]
    assert best_round(sim, sim.history)["best_round"] == 2
    plain = make_sim(tmp_path)
    plain.history = [{"round": 1, "personal_accuracy": 0.9}]
    assert best_round(plain, plain.history)["best_round"] is None


def test_max_per_class_is_honoured_by_every_task(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n" + "".join(f"w{i} x,{'ab'[i % 2] if i < 40 else 'c'}\n" for i in range(60)))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"w{i}", "label": i % 3}) + "\n" for i in range(60)))
    datasets.Dataset.from_list(classification_rows()).save_to_disk(str(tmp_path / "ds"))
    cases = {"synthetic": {}, "rt-sentiment": {}, "csv": {"path": str(csv)}, "jsonl": {"path": str(jsonl)},
             "hf": {"path": str(tmp_path / "ds"), "text_column": "sentence", "label_column": "y"}}
    for name, kw in cases.items():
        full = np.bincount(load_task(name, **kw).labels)
        task = load_task(name, max_per_class=7, **kw)
        counts = np.bincount(task.labels)
        assert counts.max() == 7 and len(counts) == len(full), (name, counts)
        assert len(set(task.texts)) == len(task.texts)
    # a seeded sample, not the first rows of each label
    assert load_task("csv", path=str(csv), max_per_class=7).texts != [f"w{i} x" for i in range(14)]


def test_subtle_input_errors(tmp_path, caplog, recwarn):
    from fedlora.config import PartitionConfig
    from fedlora.data import split_task

    # a label seen once: a warning; refused below task.min_examples_per_label
    p = tmp_path / "d.csv"
    p.write_text("text,label\n" + "".join(f"row {i},{'a' if i else 'lonely'}\n" for i in range(10)))
    with caplog.at_level("WARNING", logger="fedlora"):
        load_task("csv", path=str(p))
    assert "1 label(s) occur only once (lonely)" in caplog.text
    with pytest.raises(ValueError, match=r"task.min_examples_per_label: 1 label\(s\) .* 'lonely' \(1\)"):
        load_task("csv", path=str(p), min_examples_per_label=2)
    # a malformed JSONL line is reported with its real line number (blank lines counted)
    j = tmp_path / "bad.jsonl"
    j.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(8)) + "\n\n"
                 + '{"text": "x", "label": 1,,}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 11 is not JSON"):
        load_task("jsonl", path=str(j))
    # a non-UTF-8 CSV names the line
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\nok,a\nfine,b\ncaf\u00e9,a\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.csv line 4 is not UTF-8"):
        load_task("csv", path=str(latin))
    # task.name jsonl wins over the suffix (and csv over .jsonl)
    odd = tmp_path / "rows.csv"
    odd.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(6)))
    assert len(load_task("jsonl", path=str(odd)).texts) == 6
    # more clients than data: one line naming partition.num_clients
    task = load_task_source([{"text": f"t{i}", "label": i % 3} for i in range(30)])
    with pytest.raises(ValueError, match=r"^partition.num_clients: 20 clients need at least 40 examples, but 24"):
        split_task(task, PartitionConfig(num_clients=20, scheme="iid"), 0)
    # an infeasible Dirichlet split: its one line, no warnings on the way
    recwarn.clear()
    with pytest.raises(ValueError, match="^partition.alpha: no Dirichlet split"):
        split_task(load_task("synthetic"), PartitionConfig(num_clients=50, alpha=0.01, min_partition_size=10), 0)
    assert not [w for w in recwarn if "min_partition_size" in str(w.message)]
