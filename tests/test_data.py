"""Tasks and partitions: determinism, skew under Dirichlet, disjoint splits."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.config import PartitionConfig
from fedlora.data import label_histogram, load_task, split_task


def split(scheme="dirichlet", seed=0, **kw):
    task = load_task("synthetic", seed=0)
    cfg = PartitionConfig(num_clients=kw.pop("num_clients", 6), scheme=scheme, **kw)
    return task, split_task(task, cfg, seed)


def label_shares(task, s):
    hists = [label_histogram(np.array(task.labels)[tr], task.num_labels) for tr, _ in s.clients]
    return np.array([h / h.sum() for h in hists])


def test_same_seed_same_split_other_seed_other_split():
    _, a = split(seed=3, alpha=0.5)
    _, b = split(seed=3, alpha=0.5)
    _, c = split(seed=4, alpha=0.5)
    pairs = zip(a.clients, b.clients, strict=True)
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in pairs)
    assert np.array_equal(a.global_test, b.global_test)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a.clients, c.clients, strict=True))


def test_splits_are_disjoint_and_cover_the_data():
    task, s = split(alpha=0.5)
    parts = [s.global_test] + [p for c in s.clients for p in c]
    allidx = np.concatenate(parts)
    assert len(allidx) == len(set(allidx.tolist())) == len(task.labels)


def test_dirichlet_alpha_controls_skew():
    task, skewed = split(alpha=0.05, min_partition_size=5)
    _, uniform = split(alpha=1000.0)
    # max label share per client: near 1 when skewed, near 1/num_labels when uniform
    assert label_shares(task, skewed).max(1).mean() > 0.7
    assert label_shares(task, uniform).max(1).mean() < 0.4


def test_shards_and_iid_and_natural():
    task, s = split("shards", shards_per_client=1, num_clients=4)
    assert (label_shares(task, s) > 0).sum(1).max() <= 2  # one label-sorted shard: 1-2 labels
    task, s = split("iid")
    assert max(len(tr) for tr, _ in s.clients) - min(len(tr) for tr, _ in s.clients) <= 2
    task, s = split("natural", column="group", num_clients=3)
    groups = np.array(task.columns["group"])
    assert all(len(set(groups[np.concatenate(c)])) == 1 for c in s.clients)
    with pytest.raises(ValueError, match="partition.num_clients is 5 but column 'group' has 3"):
        split("natural", column="group", num_clients=5)


def test_real_tasks_load_and_clean():
    rt = load_task("rt-sentiment")
    assert rt.label_names == ["fresh", "rotten"] and len(rt.texts) == 7403 + 5405
    ht = load_task("healthtweets-outlet")
    assert ht.num_labels == 16 and max(np.bincount(ht.labels)) <= 500
    assert not any("http" in t for t in ht.texts)
    assert len(set(ht.texts)) == len(ht.texts)


def test_user_files_and_errors(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("sentence,y\nhello world,pos\nbad day,neg\nnice,pos\n")
    task = load_task("csv", path=str(p), text_column="sentence", label_column="y")
    assert task.labels == [1, 0, 1] and task.label_names == ["neg", "pos"]
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert load_task("jsonl", path=str(j)).labels == [1, 0]
    with pytest.raises(ValueError, match="task.label_column: no column 'label'"):
        load_task("csv", path=str(p), text_column="sentence")
    with pytest.raises(FileNotFoundError, match="task.path: file not found"):
        load_task("csv", path=str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_task("nope")


def test_validation_split_is_carved_from_train_and_leaves_test_untouched():
    task = load_task("synthetic", seed=0)
    base = split_task(task, PartitionConfig(num_clients=4, scheme="dirichlet", alpha=0.5), 0)
    s = split_task(task, PartitionConfig(num_clients=4, scheme="dirichlet", alpha=0.5, client_val_fraction=0.25), 0)
    assert np.array_equal(s.global_test, base.global_test)
    for (tr0, te0), (tr, te), val in zip(base.clients, s.clients, s.validation, strict=True):
        assert np.array_equal(te, te0)  # the test split is the same with or without validation
        assert set(tr) | set(val) == set(tr0) and not set(tr) & set(val)
        assert len(val) == max(1, round(len(tr0) * 0.25))


def test_eval_split_validation_needs_a_validation_fraction():
    from fedlora.config import ConfigError, build_config
    with pytest.raises(ConfigError, match="client_val_fraction"):
        build_config({"eval": {"split": "validation"}})


def test_simulation_evaluates_on_validation_sets_when_tuning(tmp_path):
    from fedlora.config import build_config
    from fedlora.runtime.simulation import Simulation

    cfg = {"model": {"name": "tiny-bert", "max_length": 16}, "task": {"name": "synthetic"},
           "partition": {"num_clients": 3, "client_val_fraction": 0.25}, "federation": {"rounds": 1}}
    test = Simulation(build_config(cfg), tmp_path / "a")
    val = Simulation(build_config({**cfg, "eval": {"split": "validation"}}), tmp_path / "b")
    for cid, v in enumerate(val.split.validation):
        assert len(val.client_test[cid]) == len(v)
        assert len(test.client_test[cid]) == len(test.split.clients[cid][1])
        assert len(val.client_train[cid]) == len(test.client_train[cid])  # same training data either way
    pooled = {tuple(r.tolist()) for r in val.global_test.input_ids}
    assert pooled <= {tuple(r.tolist()) for c in val.client_test for r in c.input_ids}
