"""K clients per batched pass (train.clients_per_pass) is the same mathematics as training them one by one.

The base model's own dropout is set to 0 here (nn.Dropout p=0 everywhere): in a batched pass its masks
are drawn over the concatenated batch, so they cannot equal the sequential ones. Everything else —
losses, AdamW, per-factor learning rates, clipping, personal heads, uneven batches, DP — must match.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import Recorder, tiny_config

from fedlora.adapters.stacked import stacked
from fedlora.config import ConfigError, build_config
from fedlora.methods import METHODS
from fedlora.runtime.simulation import Simulation
from fedlora.train import concat_batches, per_client_loss

# every registered method (methods added later are covered), plus the variants the maths differs in
VARIANTS = [(name, {}) for name in sorted(METHODS)] + [
    ("celora", {"method": {"celora": {"ab_train": "frozen"}}}),
    ("celora", {"method": {"celora": {"ab_train": "warmup", "ab_warmup_rounds": 1}}}),
    ("celora", {"method": {"celora": {"c_basis": "common"}}}),
    ("fedsa", {"method": {"head": "shared"}}),
    ("fedit", {"privacy": {"dp": "local", "clip": 0.5, "noise_multiplier": 0.3}}),
    ("fedit", {"train": {"max_grad_norm": None, "weight_decay": 0.1}}),
    ("fedsa", {"train": {"max_grad_norm": 0.02}}),  # clipping binds: each client's own norm
    ("fedit", {"train": {"optimizer": "sgd", "lr": 0.05}}),
]


def no_base_dropout(sim: Simulation) -> Simulation:
    for m in sim.am.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return sim


def build(tmp_path, name, method, k, extra, **over):
    # 4 clients of unequal sizes; batch 48 over 3 steps crosses an epoch, so last batches are short
    sections = {"method": {"name": method}, "partition": {"num_clients": 4, "scheme": "dirichlet", "alpha": 1.0,
                                                          "min_partition_size": 20},
                "train": {"local_steps": 3, "batch_size": 48, "clients_per_pass": k},
                "federation": {"rounds": 2}, "eval": {"every": 1, "max_global_examples": 32}}
    for sec, vals in {**extra, **over}.items():
        sections[sec] = {**sections.get(sec, {}), **vals}
    if "method" in extra:
        sections["method"] = {**extra["method"], "name": method}
    base = tiny_config(tmp_path)
    cfg = build_config(tiny_config(tmp_path, **{k: v for k, v in sections.items() if k in base}) |
                       {k: v for k, v in sections.items() if k not in base})
    return no_base_dropout(Simulation(cfg, tmp_path / name))


def close(a, b, tol=1e-5):
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=tol, abs_tol=tol) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("method,extra", VARIANTS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(VARIANTS)])
def test_batched_pass_equals_sequential(tmp_path, method, extra, monkeypatch):
    if method == "celora":
        # CE-LoRA's C trains at lr 0.1 under AdamW, whose step lr·g/(|g|+eps) has slope lr/eps = 1e7 at g ≈ 0:
        # float rounding of the batched matmuls (~1e-8 on a near-zero gradient component) becomes ~1e-4 in C,
        # and round 2's z-scored similarities pass it on. With eps 1e-3 the slope is 100 and both runs agree
        # to float rounding (measured: 9e-5 at eps 1e-8, 3e-8 at eps 1e-3), so the maths is checked tight.
        monkeypatch.setattr(torch.optim, "AdamW", functools.partial(torch.optim.AdamW, eps=1e-3))
    seq, bat = build(tmp_path, "seq", method, 1, extra), build(tmp_path, "bat", method, 3, extra)
    rec_seq, rec_bat = Recorder(seq), Recorder(bat)
    batchable = METHODS[method].batchable and not METHODS[method].pooled
    assert bat.clients_per_pass() == (3 if batchable else 1)
    assert bat.passes([0, 1, 2, 3]) == ([[0, 1, 2], [3]] if batchable else [[0], [1], [2], [3]])
    seq.run()
    bat.run()
    tol = 1e-5
    # both rounds (RoLoRA: B then A): every accepted upload within tol
    assert rec_seq.rounds.keys() == rec_bat.rounds.keys()
    for t in rec_seq.rounds:
        ups_s, ups_b = rec_seq.rounds[t]["uploads"], rec_bat.rounds[t]["uploads"]
        assert [u.client for u in ups_s] == [u.client for u in ups_b]
        for us, ub in zip(ups_s, ups_b, strict=True):
            assert us.tensors.keys() == ub.tensors.keys() and us.n_examples == ub.n_examples
            for k in us.tensors:
                torch.testing.assert_close(ub.tensors[k], us.tensors[k], rtol=tol, atol=tol, msg=(t, us.client, k))
    # personal states (FedSA's B, CE-LoRA's C/A/B, personal heads) within tol
    for cid in seq.clients:
        ps, pb = seq.clients[cid].personal, bat.clients[cid].personal
        assert ps.keys() == pb.keys()
        for k in ps:
            torch.testing.assert_close(pb[k], ps[k], rtol=tol, atol=tol, msg=(cid, k))
    # the same metrics rows up to float rounding
    for rs, rb in zip(seq.history, bat.history, strict=True):
        assert rs.keys() == rb.keys()
        bad = {k: (rs[k], rb[k]) for k in rs if k != "wall_s" and not close(rs[k], rb[k], max(tol, 1e-5))}
        assert not bad, bad


def test_stacked_model_gives_each_client_its_own_output(tmp_path):
    """The forward of a stacked pass equals each client's own forward, row block by row block."""
    sim = build(tmp_path, "fwd", "celora", 2, {})
    g = torch.Generator().manual_seed(0)
    states = [{k: torch.randn(v.shape, generator=g) * 0.1 for k, v in sim.init_state.items()} for _ in range(2)]
    data = sim.train_sets
    batches = [data[0].batch(slice(0, 5)), data[1].batch(slice(0, 3))]
    want = []
    for s, b in zip(states, batches, strict=True):
        sim.am.set_state(s)
        want.append(sim.am.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits)
    batch, w = concat_batches(batches)
    assert batch["input_ids"].shape[0] == 10 and w.tolist() == [1] * 5 + [1] * 3 + [0] * 2
    with stacked(sim.am, states), torch.no_grad():
        got = sim.am.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses = per_client_loss(got, batch["labels"], w, 2)
    torch.testing.assert_close(got[:5], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[5:8], want[1], rtol=1e-5, atol=1e-6)
    for i, b in enumerate(batches):
        torch.testing.assert_close(losses[i], torch.nn.functional.cross_entropy(want[i], b["labels"]))
    # the original layers are back after the pass
    sim.am.set_state(states[1])
    b = batches[1]
    torch.testing.assert_close(sim.am.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                               want[1])


def test_causal_lm_batched_pass_equals_sequential(tmp_path):
    extra = {"model": {"name": "tiny-llama", "max_length": 48}, "task": {"name": "chatterbot-qa"},
             "partition": {"num_clients": 3, "scheme": "iid", "min_partition_size": 5},
             "train": {"batch_size": 4, "local_steps": 2}, "eval": {"generate_examples": 0, "max_client_examples": 4}}
    seq = build(tmp_path, "seq", "fedsa", 1, extra, federation={"rounds": 1})
    bat = build(tmp_path, "bat", "fedsa", 3, extra, federation={"rounds": 1})
    rs, rb = Recorder(seq), Recorder(bat)
    seq.run()
    bat.run()
    for us, ub in zip(rs.rounds[1]["uploads"], rb.rounds[1]["uploads"], strict=True):
        for k in us.tensors:
            torch.testing.assert_close(ub.tensors[k], us.tensors[k], rtol=1e-5, atol=1e-5)
    for cid in seq.clients:
        for k, v in seq.clients[cid].personal.items():
            torch.testing.assert_close(bat.clients[cid].personal[k], v, rtol=1e-5, atol=1e-5)
    assert close(seq.history[0]["train_loss"], bat.history[0]["train_loss"])


def test_with_dropout_a_batched_run_is_deterministic_and_resumes_bit_exact(tmp_path):
    """Base and adapter dropout on: the batched pass draws its masks from a seeded generator per pass."""
    def sim(name, rounds):
        cfg = build_config(tiny_config(tmp_path, method={"name": "fedsa"}, adapter={"dropout": 0.2},
                                       partition={"num_clients": 5, "scheme": "iid"},
                                       federation={"rounds": rounds, "clients_per_round": 4, "dropout_rate": 0.2},
                                       train={"local_steps": 2, "batch_size": 8, "clients_per_pass": 2}))
        return Simulation(cfg, tmp_path / name)

    a, b = sim("a", 4), sim("b", 4)
    a.run()
    b.run()
    part = sim("c", 2)
    part.run()
    resumed = sim("c", 4)
    resumed.run(resume=True)
    for other in (b, resumed):
        assert [{k: v for k, v in r.items() if k != "wall_s"} for r in other.history] == \
               [{k: v for k, v in r.items() if k != "wall_s"} for r in a.history]
        for cid in a.clients:
            for k, v in a.clients[cid].personal.items():
                assert torch.equal(other.clients[cid].personal[k], v), (cid, k)
    # and the dropout really acts: a batched run differs from the sequential one
    seq = Simulation(build_config(tiny_config(tmp_path, method={"name": "fedsa"}, adapter={"dropout": 0.2},
                                              partition={"num_clients": 5, "scheme": "iid"},
                                              federation={"rounds": 4, "clients_per_round": 4, "dropout_rate": 0.2},
                                              train={"local_steps": 2, "batch_size": 8})), tmp_path / "s")
    seq.run()
    # (a round whose pass holds one client draws that client's own stream, as sequentially: compare all rounds)
    assert [r["train_loss"] for r in seq.history] != [r["train_loss"] for r in a.history]


def test_clients_per_pass_config():
    assert build_config({}).train.clients_per_pass == "auto"
    assert build_config({"train": {"clients_per_pass": 8}}).train.clients_per_pass == 8
    for bad in (0, -2, "many"):
        with pytest.raises(ConfigError, match="clients_per_pass"):
            build_config({"train": {"clients_per_pass": bad}})


def test_auto_is_one_on_cpu(tiny):
    assert tiny(train={"clients_per_pass": "auto"}).clients_per_pass() == 1
