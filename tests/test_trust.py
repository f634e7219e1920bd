"""Numbers a reviewer can trust: random evaluation samples, every byte counted, one generator per purpose,
the update norm bounded, fair comparisons and wins called only beyond two standard errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import make_sim, tiny_config
from typer.testing import CliRunner

from fedlora.accounting import raw_bytes
from fedlora.cli import app
from fedlora.config import build_config
from fedlora.data import load_task, split_task
from fedlora.data.partition import make_partitioner
from fedlora.report import _style, late_gain, late_gain_text, versus_best
from fedlora.runtime.simulation import Simulation
from fedlora.seeding import rng

runner = CliRunner()


# ---------------------------------------------------------------- evaluation samples


def test_capped_global_test_on_healthtweets_holds_every_outlet_in_proportion(tmp_path):
    sim = make_sim(tmp_path, task={"name": "healthtweets-outlet"}, partition={"num_clients": 4, "scheme": "iid"},
                   eval={"max_global_examples": 300})
    labels = np.asarray(sim.task.labels)
    full = np.bincount(labels[sim.split.global_test], minlength=16) / len(sim.split.global_test)
    sampled = np.bincount(sim.global_test.labels.numpy(), minlength=16) / len(sim.global_test)
    assert len(sim.global_test) == 300
    assert (sampled > 0).all(), "every outlet appears"
    assert np.abs(sampled - full).max() < 0.03


def test_sorted_user_csv_gives_mixed_capped_sets(tmp_path):
    """A user's file sorted by category: capped global and client test sets are seeded stratified samples."""
    rows = [{"text": f"item {i} about topic{c} and more words", "label": f"cat{c:02d}"}
            for c in range(26) for i in range(30)]
    path = tmp_path / "sorted.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    sim = make_sim(tmp_path, task={"name": "csv", "path": str(path)}, partition={"num_clients": 3, "scheme": "iid"},
                   eval={"max_global_examples": 104, "max_client_examples": 50})
    assert len(set(sim.global_test.labels.tolist())) == 26
    for test in sim.client_test:
        assert len(set(test.labels.tolist())) > 10  # a prefix of a sorted file would hold one or two classes


def test_validation_path_uses_the_same_stratified_rule(tmp_path):
    sim = make_sim(tmp_path, task={"name": "healthtweets-outlet"}, partition={"num_clients": 4, "scheme": "iid",
                                                                               "client_val_fraction": 0.2},
                   eval={"split": "validation", "max_global_examples": 200})
    labels = np.asarray(sim.task.labels)
    pooled = np.concatenate(sim.split.validation)
    full = np.bincount(labels[pooled], minlength=16) / len(pooled)
    sampled = np.bincount(sim.global_test.labels.numpy(), minlength=16) / len(sim.global_test)
    assert np.abs(sampled - full).max() < 0.03 and (sampled > 0).all()


def test_each_clients_test_split_is_a_random_part_of_its_partition(tmp_path):
    """Not the first examples in the partitioner's order: each client's split is shuffled first."""
    cfg = build_config(tiny_config(tmp_path, partition={"num_clients": 3, "scheme": "iid"}))
    task = load_task("synthetic", seed=cfg.split_seed)
    split = split_task(task, cfg.partition, cfg.split_seed)
    order = rng("split", cfg.split_seed).permutation(len(task.labels))
    rest = order[int(round(len(order) * cfg.partition.global_test_fraction)):]
    part = make_partitioner(cfg.partition, cfg.split_seed)
    from datasets import Dataset

    part.dataset = Dataset.from_dict({"idx": rest.tolist(), "label": [task.labels[i] for i in rest]})
    for cid, (_, test) in enumerate(split.clients):
        idx = np.asarray(part.load_partition(cid)["idx"])
        assert not np.array_equal(np.sort(idx[:len(test)]), test)


# ---------------------------------------------------------------- bytes


@pytest.mark.parametrize("method", ["fedit", "local"])
def test_final_downloads_are_counted(tmp_path, method):
    sim = make_sim(tmp_path, method={"name": method}, federation={"rounds": 2})
    summary = sim.run()
    rows = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    per_client = raw_bytes(sim.server.global_state)  # every client took part in round 2: all keys changed
    assert summary["final_down_raw"] == sim.num_clients * per_client
    assert summary["down_raw"] == sum(r["down_raw"] for r in rows) + summary["final_down_raw"]
    assert (summary["final_down_raw"] > 0) == (method == "fedit")


# ---------------------------------------------------------------- generators


def test_generator_keys_never_collide():
    draws = {key: rng(*key).integers(2**62) for key in [("split", 0), ("split", 0, 0), ("split", 0, 0, 0),
                                                        ("batch_order", 0, 1), ("batch_order", 0, 1, 0),
                                                        ("batch_order", 0, 101), ("sampling", 0)]}
    assert len(set(draws.values())) == len(draws)
    with pytest.raises(ValueError, match="unknown random purpose"):
        rng("splitt", 0)


def test_seed_changes_training_not_the_split_and_data_seed_changes_the_split(tmp_path):
    a = make_sim(tmp_path / "a", seed=0)
    b = make_sim(tmp_path / "b", seed=1, data_seed=0)
    c = make_sim(tmp_path / "c", seed=0, data_seed=1)
    same = all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])
               for x, y in zip(a.split.clients, b.split.clients, strict=True))
    assert same and np.array_equal(a.split.global_test, b.split.global_test)
    key = a.am.keys({"A"})[0]
    assert not torch.equal(a.init_state[key], b.init_state[key])  # adapter init follows the training seed
    assert not np.array_equal(a.streams[0].next_rows(), b.streams[0].next_rows())  # so does the batch order
    assert not np.array_equal(a.split.global_test, c.split.global_test)
    assert torch.equal(a.init_state[key], c.init_state[key])


def test_adapter_init_has_its_own_stream(tmp_path):
    """A comes from its own generator: a model that draws more numbers before it (a larger head) gets the same A."""
    a = make_sim(tmp_path / "a")
    b = make_sim(tmp_path / "b", task={"name": "synthetic", "keep_labels": ["class0", "class1", "class2"]})
    assert a.task.num_labels != b.task.num_labels
    for k in a.am.keys({"A"}):
        assert torch.equal(a.init_state[k], b.init_state[k])


# ---------------------------------------------------------------- update norm


def test_max_update_norm_bounds_the_update_not_the_tensors(tmp_path):
    probe = make_sim(tmp_path / "probe")
    a_norm = float(torch.cat([v.flatten() for k, v in probe.init_state.items() if k.endswith(".A")]).norm())
    # far below the norm of the fresh A, far above one round's update at this lr: every upload is accepted
    sim = make_sim(tmp_path / "run", federation={"rounds": 1, "max_update_norm": a_norm / 4},
                   train={"local_steps": 1, "lr": 1e-4, "lr_head": 1e-4})
    sim.run()
    row = json.loads((sim.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["rejected"] == []
    # and a bound below the update rejects them, naming the update
    tight = make_sim(tmp_path / "tight", federation={"rounds": 1, "max_update_norm": 1e-9})
    tight.run()
    row = json.loads((tight.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert len(row["rejected"]) == 3 and "upload − round start" in row["rejected"][0]["reason"]


# ---------------------------------------------------------------- fair comparisons


def test_centralized_takes_the_federations_steps_per_round(tmp_path):
    sim = make_sim(tmp_path, method={"name": "centralized"}, partition={"num_clients": 3, "scheme": "iid"},
                   train={"local_steps": 2, "batch_size": 8})
    assert sim.method.local_steps() == 6
    sim.run_round(1)
    # the pooled stream is where six batches of 8 leave a fresh stream of the same data
    from fedlora.data import BatchStream

    ref = BatchStream(len(sim.train_sets[0]), 8, sim.cfg.seed, 0)
    for _ in range(6):
        ref.next_rows()
    assert sim.streams[0].state() == ref.state()


def test_compare_one_head_policy_and_config_checked_reuse(tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(tmp_path, name="cmp", federation={"rounds": 1})))
    out = tmp_path / "cmp"
    args = ["compare", str(cfg_path), "--methods", "fedit,celora", "--seeds", "1", "--head", "shared",
            "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    heads = {json.loads(p.read_text())["head"] for p in out.glob("runs/*/summary.json")}
    assert heads == {"shared"}
    assert "Head policy: **shared**" in (out / "report.md").read_text()
    # the same folder with another config: refused in one line, nothing lost
    res = runner.invoke(app, [*args, "--set", "train.lr=0.5"])
    assert res.exit_code == 2 and "different config" in res.output and "train.lr" in res.output
    assert (out / "runs" / "fedit-s0" / "summary.json").is_file()
    res = runner.invoke(app, [*args, "--set", "train.lr=0.5", "--overwrite"])
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((out / "runs" / "fedit-s0" / "config.yaml").read_text())
    assert saved["train"]["lr"] == 0.5


def test_benchmark_sweep_reuses_a_run_only_under_the_same_config(tmp_path):
    from fedlora.sweep import ConfigChanged, run_sweep

    cfg = tiny_config(tmp_path, federation={"rounds": 1})
    run_sweep([("a", cfg)], tmp_path / "sweep")
    summary = tmp_path / "sweep" / "runs" / "a@s0" / "summary.json"
    first = summary.stat().st_mtime_ns
    run_sweep([("a", cfg)], tmp_path / "sweep")  # the same config: read back, not rerun
    assert summary.stat().st_mtime_ns == first
    # a field added to the schema after the run was stored, at its default: still the same config
    saved_path = summary.parent / "config.yaml"
    saved = yaml.safe_load(saved_path.read_text())
    del saved["method"]["celora"]["c_basis"]
    saved_path.write_text(yaml.safe_dump(saved))
    run_sweep([("a", cfg)], tmp_path / "sweep")
    assert summary.stat().st_mtime_ns == first
    with pytest.raises(ConfigChanged, match="train.lr"):  # another learning rate: refused, the stored run kept
        run_sweep([("a", {**cfg, "train": {**cfg["train"], "lr": 0.5}})], tmp_path / "sweep")
    assert summary.stat().st_mtime_ns == first


def test_resume_refuses_a_change_of_what_metrics_mean(tmp_path):
    cfg = tiny_config(tmp_path, partition={"num_clients": 3, "scheme": "iid", "client_val_fraction": 0.2})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "r"
    Simulation(build_config(cfg), run_dir).run()
    res = runner.invoke(app, ["run", str(path), "--resume", str(run_dir), "--set", "eval.split=validation"])
    assert res.exit_code == 2 and "eval.split" in res.output


def test_a_win_needs_two_standard_errors():
    def runs(method, xs):
        return [({"method": method, "personal_accuracy": x}, []) for x in xs]

    groups = {"a": runs("a", [0.80, 0.81, 0.79]), "b": runs("b", [0.70, 0.71, 0.69]),
              "c": runs("c", [0.78, 0.83, 0.74]), "d": runs("d", [0.5])}
    vs = versus_best(groups, "personal_accuracy", True)
    assert vs["a"] == "best"
    assert "beyond 2 SE" in vs["b"] and "within 2 SE" in vs["c"] and "no call" in vs["d"]


def test_late_gain_measures_the_last_fifth_of_the_rounds():
    every_round = [(t, 0.5 + 0.01 * t) for t in range(1, 11)]
    assert late_gain(every_round) == pytest.approx((0.02, 8))  # rounds 8 -> 10
    assert late_gain([(3, 0.52), (6, 0.565)]) == pytest.approx((0.045, 3))  # only round 3 is early enough
    assert late_gain([(2, 0.70), (4, 0.75), (6, 0.737)]) == pytest.approx((-0.013, 4))
    assert late_gain([(6, 0.7)]) is None
    assert late_gain_text([(3, 0.52), (6, 0.565)]).endswith("(rising)")
    assert late_gain_text([(2, 0.70), (4, 0.75), (6, 0.737)]).endswith("(falling)")
    assert late_gain_text([(2, 0.70), (4, 0.75), (6, 0.745)]).endswith("(flat)")
    assert late_gain_text([(8, 0.708), (10, 0.646)]).startswith("-0.062")


def test_plot_styles_keep_methods_apart():
    styles = [(_style(i)["marker"], _style(i)["linestyle"]) for i in range(11)]
    assert len(set(styles)) == 11


def test_central_dp_epsilon_uses_the_clients_sampling_rate(tmp_path):
    """Central DP amplifies by subsampling: 2 of 10 clients per round spend less than every client every round."""
    from fedlora.privacy.dp import epsilon, run_epsilon

    def cfg(k):
        base = tiny_config(tmp_path, partition={"num_clients": 10, "scheme": "iid"},
                           federation={"rounds": 3, "clients_per_round": k})
        return build_config({**base, "privacy": {"dp": "central", "clip": 1.0, "noise_multiplier": 1.0}})

    sampled, everyone = run_epsilon(cfg(2), 3), run_epsilon(cfg(None), 3)
    assert sampled < everyone
    assert sampled == pytest.approx(epsilon(1.0, 0.2, 3, 1e-5))
