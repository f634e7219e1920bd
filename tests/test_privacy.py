"""Privacy: the gradient-inversion attack on each method's upload, and client-level DP."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.config import build_config
from fedlora.federation import Download
from fedlora.privacy import attack as A
from fedlora.privacy import dp


def _dp_sim(tmp_path, privacy: dict, **sections):
    from conftest import tiny_config

    from fedlora.runtime.simulation import Simulation

    cfg = build_config({**tiny_config(tmp_path, **sections), "privacy": privacy})
    return Simulation(cfg, tmp_path / "runs" / "dp")


def _task_vocab(sim) -> torch.Tensor:
    # attacker prior used by the test (stated): candidates = the task's token vocabulary (53 ids for
    # "synthetic"), not MiniLM's 30k; the optimization itself is unrestricted
    return torch.unique(torch.cat([d.input_ids.flatten() for d in sim.client_train]))


def test_attack_recovers_one_sentence_from_full_gradient(tiny):
    # five batch-1 sentences of client 0, not one lucky row: the word-embedding update gives the bag of tokens
    # exactly, the position-embedding update and the matching objective give their order
    sim = tiny(model={"name": "tiny-bert", "max_length": 8})
    f1, rouge = [], []
    for row in range(5):
        batch = sim.client_train[0].batch(slice(row, row + 1))
        obs = A.client_step(sim.am, None, sim.clients[0], Download(0, 1, {}), batch, sim.cfg.train, "sgd")
        bag = A.bag_of_tokens(sim.am, obs)
        assert set(bag.tolist()) == set(obs.true_ids[0].tolist())
        res = A.invert(sim.am, obs, None, steps=40, search=10)
        m = A.score(sim.tokenizer, res.ids, obs.true_ids, obs.attention_mask)
        f1.append(m["f1"])
        rouge.append(m["rouge_l"])
        # scored against the true tokens: the same reconstruction against another sentence scores low
        other = sim.client_train[0].batch(slice(row + 5, row + 6))
        assert A.score(sim.tokenizer, res.ids, other["input_ids"], other["attention_mask"])["f1"] < 0.5
    assert min(f1) >= 0.9, f1
    assert sum(rouge) / len(rouge) >= 0.8, rouge  # the order, not only the bag


def test_bag_of_tokens_needs_the_embedding_update(tiny):
    sim = tiny(method={"name": "fedit"})
    batch = sim.client_train[0].batch(slice(0, 2))
    obs = A.client_step(sim.am, sim.method, sim.clients[0], sim.server.download(0, 1), batch, sim.cfg.train)
    assert A.bag_of_tokens(sim.am, obs) is None  # an adapter upload has no word-embedding rows
    full = A.client_step(sim.am, None, sim.clients[0], Download(0, 1, {}), batch, sim.cfg.train, "adamw")
    want = set(batch["input_ids"][batch["attention_mask"].bool()].tolist())
    assert set(A.bag_of_tokens(sim.am, full).tolist()) == want  # AdamW's first step: exact too


def test_head_bias_gives_the_batch1_label(tiny):
    sim = tiny(method={"name": "fedit"})
    for row in range(4):
        batch = sim.client_train[0].batch(slice(row, row + 1))
        obs = A.client_step(sim.am, sim.method, sim.clients[0], sim.server.download(0, 1), batch, sim.cfg.train)
        assert A.head_label(sim.am, obs) == int(batch["labels"][0])


def test_repeated_attacks_on_one_simulation_agree(tiny):
    # the inversion must leave no .grad on the weights, or the next client step would add it to its gradient
    sim = tiny(model={"name": "tiny-bert", "max_length": 8})
    batch = sim.client_train[0].batch(slice(1, 2))

    def observe():
        return A.client_step(sim.am, None, sim.clients[0], Download(0, 1, {}), batch, sim.cfg.train, "sgd")

    first = observe()
    A.invert(sim.am, first, None, steps=3, search=2)
    again = observe()
    assert all(torch.equal(first.delta[k], again.delta[k]) for k in first.delta)


def test_attack_only_consumes_uploaded_keys(tiny):
    sim = tiny(method={"name": "celora"})
    t = 1
    assert set(A.observed_params(sim.am, sim.method, t)) == set(sim.am.keys({"C"}))
    batch = sim.client_train[0].batch(slice(0, 1))
    obs = A.client_step(sim.am, sim.method, sim.clients[0], sim.server.download(0, t), batch, sim.cfg.train)
    obs.delta[sim.am.keys({"A"})[0]] = torch.zeros(sim.am.get_state({"A"})[sim.am.keys({"A"})[0]].shape)
    with pytest.raises(ValueError, match="never uploaded"):
        A.invert(sim.am, obs, sim.method, steps=1)


@pytest.mark.parametrize("method", ["celora", "fedit"])
def test_attack_runs_on_method_uploads(tiny, method):
    sim = tiny(method={"name": method})
    r = A.attack_client(sim, method, batch_size=2, steps=20)
    for k in ("precision", "recall", "f1", "rouge_l"):
        assert 0.0 <= r[k] <= 1.0
    want = {"celora": {"C"}, "fedit": {"A", "B", "head"}}[method]
    assert r["observed_numbers"] == sum(sim.am.get_state()[k].numel() for k in sim.am.keys(want))


def test_attack_refuses_an_upload_in_a_basis_only_the_client_knows(tiny):
    sim = tiny(method={"name": "celora", "celora": {"c_basis": "common"}})
    with pytest.raises(ValueError, match="c_basis: common"):
        A.attack_client(sim, "celora", batch_size=2, steps=1)


def test_clip_bounds_delta_norm():
    gen = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 100.0):
        delta = {"a": torch.randn(5, 7, generator=gen) * scale, "b": torch.randn(3, generator=gen) * scale}
        clipped = dp.clip_delta(delta, 0.5)
        assert dp.delta_norm(clipped) <= 0.5 + 1e-6
        if dp.delta_norm(delta) <= 0.5:
            assert torch.equal(clipped["a"], delta["a"])


def test_local_noise_has_configured_std(tmp_path):
    sim = _dp_sim(tmp_path, {"dp": "local", "clip": 0.1, "noise_multiplier": 2.0})
    pr = sim.cfg.privacy
    start = {"w": torch.zeros(200, 50)}
    up = {"w": torch.full((200, 50), 1.0)}  # norm 100 -> clipped to 0.1
    noisy = dp.privatize_upload(up, start, pr, seed=0, cid=0, t=1)["w"]
    clean = dp.privatize_upload(up, start, pr.model_copy(update={"noise_multiplier": 0.0}), 0, 0, 1)["w"]
    assert dp.delta_norm({"w": clean}) == pytest.approx(0.1, rel=1e-5)
    std = float((noisy - clean).std())
    assert std == pytest.approx(2.0 * 0.1, rel=0.05)  # 10 000 draws


def test_dp_run_clips_every_upload_and_reports_epsilon(tmp_path):
    sim = _dp_sim(tmp_path, {"dp": "central", "clip": 0.05, "noise_multiplier": 1.0},
                  federation={"rounds": 2, "clients_per_round": 2})
    seen = []
    original = sim.server.method.aggregate

    def spy(server, t, uploads):
        for u in uploads:
            start = {k: v for k, v in sim.server.global_state.items() if k in u.tensors}
            seen.append(dp.delta_norm({k: u.tensors[k] - start[k] for k in start}))
        clean = {k: v.clone() for k, v in server.global_state.items()}
        original(server, t, uploads)
        seen.append(("agg", clean))

    sim.server.method.aggregate = spy
    rows = [sim.run_round(t) for t in (1, 2)]
    norms = [x for x in seen if not isinstance(x, tuple)]
    assert norms and max(norms) <= 0.05 + 1e-5
    assert rows[0]["epsilon"] is not None and 0 < rows[0]["epsilon"] < rows[1]["epsilon"] < math.inf


def test_central_noise_scale():
    like = {"w": torch.zeros(100, 100)}
    pr = type("P", (), {"noise_multiplier": 1.5, "clip": 0.2})()
    noise = dp.central_noise(like, [10, 10, 20], pr, seed=0, t=1)["w"]
    assert float(noise.std()) == pytest.approx(1.5 * 0.2 * 0.5, rel=0.05)  # sigma S max p_i


def test_epsilon_monotone():
    e = [dp.epsilon(1.0, 0.5, t, 1e-5) for t in (1, 5, 20)]
    assert e[0] < e[1] < e[2]
    s = [dp.epsilon(sigma, 0.5, 10, 1e-5) for sigma in (0.7, 1.0, 2.0, 4.0)]
    assert s[0] > s[1] > s[2] > s[3]
    assert dp.epsilon(0.0, 1.0, 1, 1e-5) == math.inf


def test_config_rejects_central_dp_for_celora(tmp_path):
    from conftest import tiny_config

    from fedlora.config import ConfigError

    with pytest.raises(ConfigError, match="central"):
        build_config({**tiny_config(tmp_path, method={"name": "celora"}), "privacy": {"dp": "central"}})


def test_celora_descriptor_release_is_in_the_budget(tmp_path):
    from conftest import tiny_config

    from fedlora.config import ConfigError

    def cfg(method, **celora):
        return build_config({**tiny_config(tmp_path, method={"name": method, "celora": celora}),
                             "privacy": {"dp": "local", "noise_multiplier": 1.0}})

    with pytest.raises(ConfigError, match="descriptor_sigma"):
        cfg("celora")  # beta 0.5 uses the descriptor: released without noise is refused
    plain = dp.run_epsilon(cfg("fedit"), 5)
    with_desc = dp.run_epsilon(cfg("celora", descriptor_sigma=2.0), 5)
    assert math.isfinite(with_desc) and with_desc > plain
    assert dp.run_epsilon(cfg("celora", descriptor_sigma=4.0), 5) < with_desc  # more noise, less spent
    assert dp.run_epsilon(cfg("celora", beta=0.0), 5) == pytest.approx(plain)  # no descriptor is sent


def test_descriptor_release_clips_and_hides_absent_classes():
    import numpy as np

    from fedlora.methods.similarity import data_descriptor, privatize

    feats = torch.randn(40, 8) * 5 + 3
    labels = torch.tensor([0] * 30 + [2] * 10)
    desc = data_descriptor(feats, labels, num_labels=4, kind="per_class", all_classes=True)
    assert desc["classes"].tolist() == [0, 1, 2, 3] and float(desc["mean"][1].abs().sum()) == 0.0
    out = privatize(desc, 1e-9, 1.0, np.random.default_rng(0))  # ~no noise: only the clipping shows
    flat = torch.cat([out[k].flatten() for k in ("mean", "var")])
    assert float(torch.cat([desc[k].flatten() for k in ("hist", "mean", "var")]).norm()) > 10
    assert float(flat.norm()) <= 1.0 + 1e-6
    draws = torch.stack([privatize(desc, 0.5, 2.0, np.random.default_rng(i))["mean"][1] for i in range(400)])
    assert float(draws.std()) == pytest.approx(0.5 * 2.0, rel=0.1)  # an absent class's row is pure noise


def test_mean_ci_and_the_half_claim():
    gen = torch.Generator().manual_seed(0)
    v = (torch.rand(40, generator=gen) * 0.2 + 0.4).tolist()  # scores in [0.4, 0.6]
    m, lo, hi = A.mean_ci(v)
    assert lo < m < hi and 0.4 < lo and hi < 0.6 and hi - lo < 0.1
    assert A.mean_ci([0.7]) == (0.7, 0.7, 0.7)
    fedit = [0.8] * 20 + [0.6] * 20
    low = [x * 0.2 for x in fedit]  # CE-LoRA at a fifth of FedIT on every sentence
    r, lo, hi = A.ratio_ci(low, fedit)
    assert r == pytest.approx(0.2) and A.verdict(hi, lo) == "holds"
    r, lo, hi = A.ratio_ci([x * 0.9 for x in fedit], fedit)
    assert A.verdict(hi, lo) == "does not hold"
    noisy = [0.0, 0.9] * 3  # 6 sentences, ratio 0.45 but far too few to settle it
    r, lo, hi = A.ratio_ci(noisy, [1.0] * 6)
    assert r == pytest.approx(0.45) and A.verdict(hi, lo) == "not settled"
    with pytest.raises(ValueError, match="same sentences"):
        A.ratio_ci([0.1], [0.1, 0.2])


# ---------------------------------------------------------------- the speed-ups leave the matched observation as it is


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()  # tiny updates: no eps floor as in F.cosine_similarity
    return float(a @ b / (a.norm() * b.norm()))


def _padded_batch(sim, rows: slice, width: int) -> dict:
    """A training batch right-padded after `width` columns (the synthetic task fills every column)."""
    batch = {k: v.clone() for k, v in sim.client_train[0].batch(rows).items()}
    batch["attention_mask"][:, width:] = 0
    batch["input_ids"][:, width:] = sim.tokenizer.pad_token_id or 0
    return batch


def _true_dummy(sim, obs):
    """The dummies the true batch gives: its word embeddings, and its labels as exact one-hot logits."""
    x = sim.am.model.get_input_embeddings().weight.detach()[obs.true_ids].clone().requires_grad_(True)
    y = torch.full((len(obs.true_labels), obs.num_labels), -math.inf)
    y[torch.arange(len(y)), obs.true_labels] = 0.0
    return x, y


def _observe(sim, batch, method="fedit"):
    m = sim.method if method != A.FULL else None
    dl = sim.server.download(0, 1) if m is not None else Download(0, 1, {})
    return A.client_step(sim.am, m, sim.clients[0], dl, batch, sim.cfg.train, "sgd")


def test_uploaded_keys_gradients_alone_equal_those_of_a_full_backward(tiny):
    sim = tiny(method={"name": "fedit"})
    obs = _observe(sim, _padded_batch(sim, slice(0, 2), 16))
    keys = sorted(obs.delta)
    params = dict(sim.am.model.named_parameters()) | sim.am._params
    x, y = _true_dummy(sim, obs)
    sim.am.model.eval()
    saved = {n: p.requires_grad for n, p in sim.am.model.named_parameters()}
    for p in sim.am.model.parameters():  # a full backward over every weight, as a reference
        p.requires_grad_(True)
    try:
        only = A.dummy_gradients(sim.am.model, x, y, obs.attention_mask, [params[k] for k in keys],
                                 create_graph=False)
        for p in sim.am.model.parameters():
            p.grad = None
        out = sim.am.model(inputs_embeds=x, attention_mask=obs.attention_mask).logits
        A._soft_ce(out, torch.softmax(y, -1)).backward()
        for k, g in zip(keys, only, strict=True):
            assert torch.allclose(g, params[k].grad, rtol=1e-5, atol=1e-8), k
            # and -lr·g is the observed update of that key (one SGD step, fp32 rounding of the weights)
            ind = -obs.lr[k] * g
            if float(obs.delta[k].abs().max()) == 0:  # round 1: B = 0, so A's gradient is exactly 0
                assert float(g.abs().max()) == 0, k
                continue
            assert _cos(ind, obs.delta[k]) > 0.9999, k
    finally:
        for n, p in sim.am.model.named_parameters():
            p.grad = None
            p.requires_grad_(saved[n])


@pytest.mark.parametrize("method", ["fedit", A.FULL])
def test_trim_to_the_real_width_leaves_the_matched_gradient_unchanged(tiny, method):
    sim = tiny(method={"name": "fedit"})
    w = sim.client_train[0].batch(slice(0, 2))["input_ids"].shape[1] - 3
    obs = _observe(sim, _padded_batch(sim, slice(0, 2), w), method)
    assert A.real_width(obs.attention_mask) == w < obs.attention_mask.shape[1]
    params = dict(sim.am.model.named_parameters()) | sim.am._params
    emb = A.word_embedding_key(sim.am)
    keys = [k for k in sorted(obs.delta) if k != emb]  # the continuous stage's keys
    ps = [params[k] for k in keys]
    saved = [p.requires_grad for p in ps]
    sim.am.model.eval()
    sim.am.model.set_attn_implementation("eager")
    for p in ps:
        p.requires_grad_(True)
    try:
        x, y = _true_dummy(sim, obs)
        wide = A.dummy_gradients(sim.am.model, x, y, obs.attention_mask, ps, create_graph=False)
        narrow = A.dummy_gradients(sim.am.model, x[:, :w], y, obs.attention_mask[:, :w], ps, create_graph=False)
    finally:
        for p, rg in zip(ps, saved, strict=True):
            p.requires_grad_(rg)
    for k, a, b in zip(keys, wide, narrow, strict=True):
        if k.endswith("position_embeddings.weight"):  # the padding rows' gradient is exactly 0
            assert float(a[w:].abs().max()) == 0.0
            a, b = a[:w], b[:w]
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), k
    # the attack itself: same objective at either width on the true tokens, decoded ids back at full width
    res = A.invert(sim.am, obs, sim.method if method != A.FULL else None, steps=2, search=0)
    assert res.ids.shape == obs.true_ids.shape and bool((res.ids[:, w:] == (sim.tokenizer.pad_token_id or 0)).all())


def test_early_stop_cuts_the_same_trajectory_on_the_same_observation(tiny):
    sim = tiny(method={"name": "fedit"})
    obs = _observe(sim, sim.client_train[0].batch(slice(0, 1)))
    before = {k: v.clone() for k, v in obs.delta.items()}
    full = A.invert(sim.am, obs, sim.method, steps=40, search=0)
    cut = A.invert(sim.am, obs, sim.method, steps=40, search=0, patience=3, tol=0.5)  # stalls at once
    assert full.steps_run == [40] and cut.steps_run[0] < 40
    assert cut.trace[0] == full.trace[0][:len(cut.trace[0])]  # the same objective, step for step, then cut
    assert all(torch.equal(before[k], obs.delta[k]) for k in before)
    never = A.invert(sim.am, obs, sim.method, steps=40, search=0, patience=100)  # never stalls that long
    assert never.trace == full.trace and torch.equal(never.ids, full.ids)


def test_bf16_is_an_option_and_auto_keeps_fp32_without_native_bf16(tiny, monkeypatch):
    import fedlora.compute

    sim = tiny(method={"name": "fedit"})
    obs = _observe(sim, sim.client_train[0].batch(slice(0, 2)))
    params = sim.am._params
    keys = sorted(obs.delta)
    ps = [params[k] for k in keys]
    for p in ps:
        p.requires_grad_(True)
    sim.am.model.eval()
    try:
        x, y = _true_dummy(sim, obs)
        g32 = A.dummy_gradients(sim.am.model, x, y, obs.attention_mask, ps, create_graph=False)
        g16 = A.dummy_gradients(sim.am.model, x, y, obs.attention_mask, ps, A._autocast("bf16"), create_graph=False)
    finally:
        for p in ps:
            p.requires_grad_(False)
    for a, b in zip(g32, g16, strict=True):
        assert b.dtype == torch.float32  # matched in fp32 against the fp32 observation
        assert float(a.abs().max()) == 0 or _cos(a, b) > 0.99
    monkeypatch.setattr(fedlora.compute, "native_bf16_cpu", lambda: False)
    fp32 = A.invert(sim.am, obs, sim.method, steps=5, search=0)
    auto = A.invert(sim.am, obs, sim.method, steps=5, search=0, precision="auto")
    assert auto.trace == fp32.trace  # no native bf16: auto is fp32, bit for bit
    bf16 = A.invert(sim.am, obs, sim.method, steps=3, search=0, precision="bf16")
    assert bf16.steps_run == [3] and math.isfinite(bf16.loss)
    with pytest.raises(ValueError, match="precision"):
        A.invert(sim.am, obs, sim.method, steps=1, precision="fp8")


def test_fedit_batch1_upload_gives_back_more_than_random_tokens(tmp_path):
    # the attack's strength on an adapter upload, with the speed-ups on (trim, early stop): FedIT's A, B and head
    # after one trained round, six batch-1 sentences, against a random guess from the same alphabet (the task's
    # tokens) at the same positions
    from conftest import make_sim

    sim = make_sim(tmp_path, model={"name": "tiny-bert", "max_length": 8}, federation={"rounds": 1})
    sim.run()
    vocab = _task_vocab(sim)
    f1, rand = [], []
    for row in range(6):
        r = A.attack_client(sim, "fedit", 0, 1, row, steps=100, vocab=vocab, seed=row, search=10, patience=20)
        batch = sim.client_train[0].batch(slice(row, row + 1))
        guess = vocab[torch.randint(len(vocab), batch["input_ids"].shape, generator=torch.Generator().manual_seed(row))]
        f1.append(r["f1"])
        rand.append(A.score(sim.tokenizer, guess, batch["input_ids"], batch["attention_mask"])["f1"])
    assert sum(f1) / 6 >= sum(rand) / 6 + 0.15, (f1, rand)


def test_attack_benchmark_resumes_from_its_items(tmp_path):
    # benchmarks/privacy.py appends one JSON line per finished (upload, batch, sentence); a rerun reads them back
    import importlib.util
    import json
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("privacy_bench", bench / "privacy.py")
        P = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(P)
    finally:
        sys.path.remove(str(bench))
    assert (P._warm("rolora", 2) + 1) % 2 == 1 and (P._warm("rolora-a", 2) + 1) % 2 == 0  # B round, A round
    settings = {"steps": 200}
    path = tmp_path / "items.jsonl"
    rows = [{"method": m, "batch_size": 1, "sentence": 0, "settings": settings} for m in ("rolora", "rolora-a")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"method": "fedit", "batch')  # torn last line
    assert set(P.read_items(path, settings)) == {("rolora", 1, 0), ("rolora-a", 1, 0)}
    with pytest.raises(ValueError, match="other settings"):
        P.read_items(path, {"steps": 100})
