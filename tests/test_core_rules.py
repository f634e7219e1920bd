"""Core rules checked against a value computed by hand, each where a plausible slip would otherwise go unseen:
FFA-LoRA's frozen A, FedAvgM's momentum, the seeded stratified sample, SCAFFOLD's resume and its |S|/N factor,
and central DP's noise on the aggregate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_sim
from test_fedopt import FixedData, NoStream, Quadratic

from fedlora.adapters import AdaptedModel
from fedlora.config import build_config
from fedlora.data import stratified_sample
from fedlora.federation import Server, Upload, client_fit
from fedlora.methods import get_method, weighted_mean


def equal(a, b) -> bool:
    """Bit-for-bit equality of nested dicts / lists / tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str) and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def bare_server(method: str, state: dict[str, torch.Tensor], num_clients: int = 3, **sections) -> Server:
    """A Server over hand-made adapter tensors (no model): aggregation and server rules only."""
    cfg = build_config({"method": {"name": method}, "partition": {"num_clients": num_clients}, **sections})
    return Server(get_method(method)(cfg), state, cfg.federation, num_clients)


# ---------------------------------------------------------------- FFA-LoRA: A never trains


def test_ffa_client_training_leaves_a_at_its_seeded_init_and_moves_b(tiny):
    sim = tiny(method={"name": "ffa"}, train={"local_steps": 3, "batch_size": 8})
    a_keys, b_keys = sim.am.keys({"A"}), sim.am.keys({"B"})
    init = {k: sim.init_state[k].clone() for k in a_keys + b_keys}
    server = sim.server
    for t in (1, 2):  # from round 2 on B ≠ 0, so a trainable A would get a nonzero gradient from the first step
        downloads = {cid: server.download(cid, t) for cid in server.sample()}
        uploads = {}
        for cid, dl in downloads.items():
            uploads[cid], sim.clients[cid] = client_fit(sim.am, sim.method, sim.clients[cid], dl, sim.train_sets[cid],
                                                        sim.streams[cid], sim.cfg.train)
            model = sim.am.get_state(keys=a_keys + b_keys)  # the model as this client's local training left it
            for k in a_keys:
                assert torch.equal(model[k], init[k]), (t, cid, k)
                assert torch.equal(sim.clients[cid].full()[k], init[k]), (t, cid, k)
            for k in b_keys:
                assert not torch.equal(model[k], init[k]), (t, cid, k)
                assert torch.equal(uploads[cid].tensors[k], model[k]), (t, cid, k)
        row = server.finish_round(t, downloads, uploads)
        assert not row["rejected"] and not row["skipped"]


# ---------------------------------------------------------------- FedAvgM: m ← β m + Δ, x ← x + η m


def test_fedavgm_two_rounds_by_hand():
    beta, lr = 0.9, 0.5
    g = torch.Generator().manual_seed(3)
    x0 = {"lin.A": torch.randn(2, 5, generator=g), "lin.B": torch.randn(4, 2, generator=g)}
    server = bare_server("fedit", {k: v.clone() for k, v in x0.items()},
                         federation={"server_optimizer": "avgm", "server_momentum": beta, "server_lr": lr})
    x = {k: v.double() for k, v in x0.items()}
    m = {k: torch.zeros_like(v) for k, v in x.items()}
    for t in (1, 2, 3):
        ups = [Upload(c, t, {k: torch.randn(v.shape, generator=g) for k, v in x0.items()}, n_examples=n)
               for c, n in enumerate((10, 30, 20))]
        server.aggregate(t, ups)
        for k in x:
            delta = weighted_mean([u.tensors[k] for u in ups], [u.n_examples for u in ups]).double() - x[k]
            m[k] = beta * m[k] + delta
            x[k] = x[k] + lr * m[k]
            torch.testing.assert_close(server.global_state[k].double(), x[k], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the stratified evaluation sample


def test_stratified_sample_is_a_seeded_random_choice_within_each_label():
    labels = np.repeat([0, 1, 2], [300, 200, 100])  # grouped by label: a per-label prefix is the file's head
    indices = np.arange(600)
    n = 60

    def sample(seed):
        return stratified_sample(indices, labels, n, np.random.default_rng(seed))

    a = sample(0)
    assert len(a) == n and len(set(a.tolist())) == n and np.all(np.diff(a) > 0) and set(a) <= set(indices)
    assert np.bincount(labels[a]).tolist() == [30, 20, 10]
    assert np.array_equal(a, sample(0))  # reproducible
    assert not np.array_equal(a, sample(1))  # and the seed matters
    for c, k in zip((0, 1, 2), (30, 20, 10), strict=True):
        within = indices[labels == c]
        picked = a[labels[a] == c]
        assert not np.array_equal(picked, within[:k]) and not np.array_equal(picked, within[-k:])
        # spread over the label's examples, not clustered at one end (a random choice: probability ~1e-9 otherwise)
        assert picked.min() < within[len(within) // 2] < picked.max()


# ---------------------------------------------------------------- central DP: noise on the aggregate


def test_central_dp_adds_noise_of_std_sigma_clip_max_p_to_the_aggregate():
    sigma, clip, n = 1.5, 0.2, (10, 10, 20)  # max p_i = 0.5
    g = torch.Generator().manual_seed(5)
    x0 = {"lin.A": torch.zeros(4, 2500), "lin.B": torch.zeros(2500, 4)}
    privacy = {"dp": "central", "clip": clip, "noise_multiplier": sigma}
    server = bare_server("fedit", {k: v.clone() for k, v in x0.items()}, privacy=privacy)
    quiet = bare_server("fedit", {k: v.clone() for k, v in x0.items()}, privacy={**privacy, "noise_multiplier": 0.0})
    for t in (1, 2):
        ups = [Upload(c, t, {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in x0.items()}, n_examples=m)
               for c, m in enumerate(n)]
        server.aggregate(t, ups)
        quiet.aggregate(t, ups)
        noise = []
        for k in x0:
            clean = weighted_mean([u.tensors[k] for u in ups], [u.n_examples for u in ups])
            torch.testing.assert_close(quiet.global_state[k], clean, atol=1e-7, rtol=0)  # σ = 0: the plain mean
            noise.append((server.global_state[k].double() - clean.double()).flatten())
            server.global_state[k] = clean.clone()  # the next round starts from the clean mean on both servers
        noise = torch.cat(noise)  # 20 000 draws
        assert float(noise.std()) == pytest.approx(sigma * clip * max(n) / sum(n), rel=0.05)
        assert abs(float(noise.mean())) < 0.01


# ---------------------------------------------------------------- SCAFFOLD under partial participation


def test_scaffold_with_partial_participation_matches_the_reference():
    """c ← c + (|S|/N) Σ_{i∈S} p_i Δc_i with p_i over the round's sample S; clients outside S keep their c_i."""
    a, n, steps, lr, rounds, k = [1.0, 4.0, 0.5, 2.0], [30, 10, 20, 15], 3, 0.1, 6, 2
    g = torch.Generator().manual_seed(1)
    targets = [(torch.randn(2, 3, generator=g), torch.randn(2, 2, generator=g)) for _ in a]
    cfg = build_config({"method": {"name": "scaffold"}, "partition": {"num_clients": len(a)},
                        "adapter": {"r": 2, "alpha": 2}, "federation": {"rounds": rounds, "clients_per_round": k},
                        "train": {"optimizer": "sgd", "lr": lr, "local_steps": steps, "max_grad_norm": None}})
    torch.manual_seed(0)
    am = AdaptedModel(Quadratic(), ["lin"], [], r=2, alpha=2, tri=False)
    method = get_method("scaffold")(cfg)
    init = am.get_state()
    server = Server(method, init, cfg.federation, len(a))
    states = {i: server.initial_client_state(init) for i in range(len(a))}
    data = [FixedData(n[i], {"a": a[i], "ta": targets[i][0], "tb": targets[i][1]}) for i in range(len(a))]
    samples = []
    for t in range(1, rounds + 1):
        downloads = {i: server.download(i, t) for i in server.sample()}
        samples.append(sorted(downloads))
        uploads = {}
        for i, dl in downloads.items():
            uploads[i], states[i] = client_fit(am, method, states[i], dl, data[i], NoStream(i), cfg.train)
        assert not server.finish_round(t, downloads, uploads)["rejected"]
    assert all(len(s) == k for s in samples) and len({tuple(s) for s in samples}) > 1

    keys = ["lin.A", "lin.B"]  # the reference, in float64
    x = {key: init[key].double() for key in keys}
    c = {key: torch.zeros_like(v) for key, v in x.items()}
    ci = [{key: torch.zeros_like(v) for key, v in x.items()} for _ in a]
    for sample in samples:
        p = {i: n[i] / sum(n[j] for j in sample) for i in sample}
        ys, dcs = {}, {}
        for i in sample:
            y = {key: v.clone() for key, v in x.items()}
            for _ in range(steps):
                y = {key: y[key] - lr * (a[i] * (y[key] - targets[i][keys.index(key)].double()) - ci[i][key] + c[key])
                     for key in keys}
            new = {key: ci[i][key] - c[key] + (x[key] - y[key]) / (steps * lr) for key in keys}
            dcs[i] = {key: new[key] - ci[i][key] for key in keys}
            ci[i], ys[i] = new, y
        x = {key: sum(p[i] * ys[i][key] for i in sample) for key in keys}
        c = {key: c[key] + len(sample) / len(a) * sum(p[i] * dcs[i][key] for i in sample) for key in keys}
    for key in keys:
        torch.testing.assert_close(server.global_state[key].double(), x[key], atol=1e-5, rtol=0)
        torch.testing.assert_close(server.global_state["scaffold/c/" + key].double(), c[key], atol=1e-5, rtol=0)
        for i in range(len(a)):
            got = states[i].personal.get("scaffold/ci/" + key)
            want = ci[i][key]
            if got is None:  # never sampled: still c_i = 0
                assert not want.abs().max() > 0
            else:
                torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- SCAFFOLD: killed and resumed, bit for bit


def test_scaffold_killed_after_a_round_and_resumed_equals_the_uninterrupted_run(tmp_path):
    """The client variates c_i are a method's own client state ('/' keys, outside the model): they must be
    checkpointed with the personal keys, or a resumed client restarts from c_i = 0."""
    sections = {"method": {"name": "scaffold"},
                "partition": {"num_clients": 4, "scheme": "dirichlet", "alpha": 1.0, "min_partition_size": 20},
                "federation": {"rounds": 4, "clients_per_round": 3},
                "train": {"local_steps": 2, "batch_size": 8, "optimizer": "sgd", "lr": 0.05},
                "eval": {"every": 1, "max_global_examples": 32}}
    ref = make_sim(tmp_path / "ref", **sections)
    ref.run()
    stopped = make_sim(tmp_path / "killed", **sections)

    def kill(row):
        if row["round"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stopped.run(on_round=kill)
    assert any(k.startswith("scaffold/ci/") for st in stopped.clients.values() for k in st.personal)
    resumed = make_sim(tmp_path / "killed", **sections)
    resumed.run(resume=True)

    def rows(sim):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in sim.history]

    assert [r["round"] for r in rows(resumed)] == [1, 2, 3, 4]
    assert equal(rows(resumed), rows(ref))
    assert equal(resumed.server.state_dict(), ref.server.state_dict())
    for cid in ref.clients:
        assert equal(resumed.clients[cid].shared, ref.clients[cid].shared), cid
        assert equal(resumed.clients[cid].personal, ref.clients[cid].personal), cid
