"""Node-local data in process: `partition.scheme: files`, one file per client, the server reads none."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_config

from fedlora.config import ConfigError, build_config
from fedlora.data.silo import Silo, files_task
from fedlora.data.tasks import synthetic
from fedlora.runtime.simulation import Simulation


def write_silos(root: Path, n: int = 3, rows: int = 60, labels_of=None) -> list[str]:
    """Disjoint CSV files of the synthetic task, one per client; client c holds the classes labels_of(c)."""
    task = synthetic(n=rows * n * 2)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for c in range(n):
        keep = set(labels_of(c)) if labels_of else set(range(task.num_labels))
        idx = [i for i in range(c, len(task.texts), n) if task.labels[i] in keep][:rows + 20 * c]  # unequal sizes
        path = root / f"silo_{c}.csv"
        pd.DataFrame({"sentence": [task.texts[i] for i in idx],
                      "y": [task.label_names[task.labels[i]] for i in idx]}).to_csv(path, index=False)
        paths.append(str(path))
    return paths


def files_config(tmp_path: Path, files: list[str] | None, method: str = "fedit", **extra) -> dict:
    cfg = tiny_config(tmp_path, method={"name": method},
                      task={"name": "csv", "text_column": "sentence", "label_column": "y"},
                      partition={"num_clients": 3, "scheme": "files", "files": files})
    for k, v in extra.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


def test_each_client_reads_its_own_file(tmp_path):
    files = write_silos(tmp_path / "silos", labels_of=lambda c: [c, c + 1])
    cfg = build_config(files_config(tmp_path, files))
    task, split = files_task(cfg, {c: Silo(f) for c, f in enumerate(files)})
    assert task.label_names == ["class0", "class1", "class2", "class3"]  # the union of the files' labels
    offset = 0
    for c, (train, test) in enumerate(split.clients):
        n = len(pd.read_csv(files[c]))
        rows = set(range(offset, offset + n))
        assert set(train) | set(test) == rows and not set(train) & set(test)  # its own rows only, disjoint
        assert len(test) == round(n * cfg.partition.client_test_fraction)
        assert {task.label_names[task.labels[i]] for i in rows} == {f"class{c}", f"class{c + 1}"}
        offset += n
    assert len(split.global_test) == 0  # no eval.server_test: no global test set
    # a Flower node reads only its own silo: the other clients' rows are empty, its own are the same texts
    t1, s1 = files_task(cfg, {1: Silo(files[1])}, task.label_names, server_test=False)
    assert all(len(tr) == 0 for c, (tr, _) in enumerate(s1.clients) if c != 1)
    assert [t1.texts[i] for i in s1.clients[1][0]] == [task.texts[i] for i in split.clients[1][0]]


def test_files_run_without_global_test_weights_client_reports(tmp_path):
    files = write_silos(tmp_path / "silos")
    sim = Simulation(build_config(files_config(tmp_path, files, "fedit")), tmp_path / "run")
    sim.run()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    n = [len(sim.client_test[c]) for c in range(3)]
    acc = row["client_accuracy"]
    assert len(set(n)) == 3  # unequal test sets: the weighted mean is not the plain one
    want = sum(a * k for a, k in zip(acc, n, strict=True)) / sum(n)
    assert row["global_accuracy"] == pytest.approx(want, abs=1e-4)  # the example-weighted client reports


def test_celora_descriptor_comes_from_each_clients_own_file(tmp_path):
    files = write_silos(tmp_path / "silos", labels_of=lambda c: [c])
    cfg = files_config(tmp_path, files, "celora", federation={"rounds": 2, "clients_per_round": 2})
    sim = Simulation(build_config(cfg), tmp_path / "run")
    row = sim.run_round(1)
    received = sim.server.extra["celora"]["descriptors"]
    assert sorted(received) == row["clients"]  # only the participants' descriptors reach the server
    for c, (t, desc) in received.items():
        assert t == 1 and desc["hist"].argmax().item() == c  # client c holds class c only: its own file
        again = sim.method.client_descriptor(sim.am, sim.client_train[c], sim.client_classes(c), c)
        assert all(torch.equal(desc[k], again[k]) for k in desc)
    nbytes = sum(v.numel() * v.element_size() for _, d in received.values() for v in d.values())
    assert row["up_raw_other"] == nbytes > 0


def test_unknown_labels_and_bad_files_are_one_line_errors(tmp_path):
    files = write_silos(tmp_path / "silos")
    cfg = build_config(files_config(tmp_path, files, task={"labels": ["class0", "class1"]}))
    with pytest.raises(ValueError, match=r"silo_0.csv: labels \['class2', 'class3'\] are not in task.labels"):
        files_task(cfg, {0: Silo(files[0])})
    with pytest.raises(ConfigError, match="partition.files lists 2 files but partition.num_clients is 3"):
        build_config(files_config(tmp_path, files[:2]))
    with pytest.raises(ValueError, match="needs partition.files"):
        Simulation(build_config(files_config(tmp_path, None)), tmp_path / "x")
    with pytest.raises(ConfigError, match="need partition.scheme 'files'"):
        build_config(tiny_config(tmp_path, partition={"files": files}))
