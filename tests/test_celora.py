"""CE-LoRA: C-only upload, exact FedAvg limit, similarity weights, SVD init, PEFT export."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import make_sim

import fedlora.run as run_module
from fedlora.adapters import export_peft, factor_of
from fedlora.adapters.tri_init import svd_factors
from fedlora.data import Split
from fedlora.federation import apply_download
from fedlora.methods import similarity as sim_fn
from fedlora.models import load_classifier

DIRICHLET = {"num_clients": 3, "scheme": "dirichlet", "alpha": 1.0, "min_partition_size": 20}


def celora(tmp_path, rounds=2, partition=DIRICHLET, head=None, **opts):
    method = {"name": "celora", "celora": opts} | ({"head": head} if head else {})
    return make_sim(tmp_path, method=method, partition=partition, federation={"rounds": rounds})


def record(sim):
    """Every upload the server sees, and the server's CE-LoRA state after each aggregation."""
    seen, after = [], {}
    validate, aggregate = sim.server.validate, sim.server.aggregate

    def v(up, t):
        seen.append(up)
        return validate(up, t)

    def a(t, uploads):
        aggregate(t, uploads)
        st = sim.server.extra["celora"]
        after[t] = {"uploads": uploads,
                    "cbar": {i: sim.method.unflatten(st, c) for i, (r, c) in st["cbar"].items() if r == t},
                    "weights": sim.method.last_weights}

    sim.server.validate, sim.server.aggregate = v, a
    return seen, after


@pytest.mark.parametrize("head", ["personal", "shared"])
def test_upload_is_c_only_r_squared_per_matrix(tmp_path, head):
    sim = celora(tmp_path, head=head)
    seen, _ = record(sim)
    sim.run()
    r, n_mat = sim.cfg.adapter.r, len(sim.am.targets)
    assert n_mat == 4  # tiny-bert: 2 layers × (query, value)
    c_bytes = r * r * n_mat * 4
    assert len(seen) == 2 * sim.num_clients
    for up in seen:
        assert {factor_of(k) for k in up.tensors} == ({"C"} if head == "personal" else {"C", "head"})
        c = [v for k, v in up.tensors.items() if factor_of(k) == "C"]
        assert sum(v.numel() * v.element_size() for v in c) == c_bytes
    rows = [json.loads(line) for line in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["up_raw_adapter_per_client"] == c_bytes
        assert (row["up_raw_head"] == 0) == (head == "personal")
        assert not row["rejected"]
    assert rows[1]["down_raw_adapter"] == c_bytes * sim.num_clients  # round 2: each client its own C̄
    # the descriptor (default overall): histogram (L) + feature mean and var (hidden each), float32
    hidden, labels = sim.am.model.config.hidden_size, sim.task.num_labels
    descs = sim.server.extra["celora"]["descriptors"]
    assert sorted(descs) == list(range(sim.num_clients))
    for cid, (t, d) in descs.items():
        assert t == 1
        counts = torch.bincount(sim.client_train[cid].labels, minlength=labels).float()
        torch.testing.assert_close(d["hist"], counts / counts.sum())
        assert sim.method.charged[cid] == (1, labels * 4 + 2 * hidden * 4)
    # ... is uplink in the round it is sent, counted in the totals apart from the adapter and head columns
    assert rows[0]["up_raw_other"] == sum(b for _, b in sim.method.charged.values()) > 0
    assert rows[0]["up_raw"] == rows[0]["up_raw_adapter"] + rows[0]["up_raw_head"] + rows[0]["up_raw_other"]
    assert rows[1]["up_raw_other"] == 0 and rows[1]["up_raw"] == rows[1]["up_raw_adapter"] + rows[1]["up_raw_head"]
    # each round's weight matrix is saved in the run directory
    saved = np.load(sim.run_dir / "weights_round_2.npz")
    np.testing.assert_allclose(saved["weights"], sim.method.last_weights["weights"])
    np.testing.assert_allclose(saved["weights"].sum(1), 1.0)


def test_frozen_ab_identical_everywhere_and_fedavg_variant(tmp_path):
    sim = celora(tmp_path, rounds=2, ab_train="frozen", weights="fedavg")
    _, after = record(sim)
    ab = sim.am.keys({"A", "B"})
    init = {k: sim.init_state[k] for k in ab}
    assert all(init[k].abs().sum() > 0 for k in ab)

    def check(row):
        for cid in range(sim.num_clients):
            state = sim.eval_state(cid)
            assert all(torch.equal(state[k], init[k]) for k in ab)

    sim.run(on_round=check)
    # FedAvg of C uses no similarity: no client sends a data descriptor, and none is charged
    assert not sim.server.extra["celora"]["descriptors"]
    assert all(r["up_raw_other"] == 0 for r in sim.history)
    for rec in after.values():
        ups = rec["uploads"]
        n = torch.tensor([u.n_examples for u in ups], dtype=torch.float64)
        assert len(set(n.tolist())) > 1  # unequal clients: a plain mean would fail below
        np.testing.assert_allclose(rec["weights"]["weights"], np.tile((n / n.sum()).numpy(), (len(ups), 1)),
                                   atol=1e-12)
        for k in ups[0].tensors:
            fedavg = sum((ni / n.sum()) * u.tensors[k].double() for ni, u in zip(n, ups, strict=True))
            plain = torch.stack([u.tensors[k].double() for u in ups]).mean(0)
            assert (fedavg - plain).abs().max() > 1e-7
            for cid in rec["cbar"]:
                torch.testing.assert_close(rec["cbar"][cid][k].double(), fedavg, atol=1e-6, rtol=0)


def test_cbar_is_the_weighted_sum_of_uploads_per_key(tmp_path):
    """The vectorised aggregation: C̄_i[k] = Σ_j w_ij C_j[k] for every client and key."""
    sim = celora(tmp_path, rounds=2, partition={**DIRICHLET, "num_clients": 4})
    _, after = record(sim)
    sim.run()
    rec = after[2]
    w, ups = rec["weights"]["weights"], rec["uploads"]
    for row, i in enumerate(rec["weights"]["clients"]):
        for k in ups[0].tensors:
            want = sum(w[row, j] * u.tensors[k].double() for j, u in enumerate(ups))
            torch.testing.assert_close(rec["cbar"][i][k].double(), want, atol=1e-6, rtol=0)


def test_common_basis_maps_the_same_update_in_any_basis_to_the_same_c(tmp_path):
    """c_basis common: a client whose A, B are a rotated and scaled A0, B0 sends the C of its ΔW in A0, B0,
    and stores a received C̄ as the C whose B C A is exactly B0 C̄ A0."""
    sim = celora(tmp_path, rounds=1, c_basis="common")
    key = sim.am.keys({"C"})[0]
    p = key[:-1]
    a0, b0 = sim.init_state[p + "A"].double(), sim.init_state[p + "B"].double()
    r = a0.shape[0]
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
    c = torch.randn(r, r, generator=gen, dtype=torch.float64)
    a, b = q @ a0, 2.0 * b0 @ q.T  # another basis of the same subspaces
    c_own = q @ c @ q.T / 2.0  # b @ c_own @ a == b0 @ c @ a0
    torch.testing.assert_close(b @ c_own @ a, b0 @ c @ a0)
    model = {p + "A": a.float(), p + "B": b.float()}
    sent = sim.method.encode_upload({key: c_own.float()}, model)[key]
    assert (c_own - c).abs().max() > 0.1  # the raw C differs: its basis is not the common one
    torch.testing.assert_close(sent.double(), c, atol=1e-5, rtol=0)
    cbar = torch.randn(r, r, generator=gen, dtype=torch.float64)
    stored = sim.method.decode_download({key: cbar.float()}, model)[key].double()
    torch.testing.assert_close(b @ stored @ a, b0 @ cbar @ a0, atol=1e-5, rtol=0)


def test_common_basis_in_a_run(tmp_path):
    """Each real upload is B0ᵀ B_i C_i A_i A0ᵀ of the client's trained factors; with A, B frozen it is exactly
    the plain upload (both maps are the identity)."""
    sim = celora(tmp_path / "local", rounds=2, c_basis="common")
    seen, _ = record(sim)
    sim.run()
    last = [u for u in seen if u.round == 2]
    assert len(last) == sim.num_clients
    moved = 0.0
    for up in last:
        st = sim.clients[up.client].full()
        for k in (k for k in up.tensors if factor_of(k) == "C"):
            p = k[:-1]
            a0, b0 = sim.init_state[p + "A"].double(), sim.init_state[p + "B"].double()
            a, b = st[p + "A"].double(), st[p + "B"].double()
            moved = max(moved, float((a - a0).abs().max()))
            want = b0.T @ b @ st[k].double() @ a @ a0.T
            torch.testing.assert_close(up.tensors[k].double(), want, atol=1e-6, rtol=0)
    assert moved > 1e-4  # A trained: the map is not the identity here
    st = sim.clients[0].full()  # ... and the final C̄ is stored in client 0's basis: B_0 C_0 A_0 ≈ B0 C̄ A0
    cbar = sim.method.unflatten(sim.server.extra["celora"], sim.server.extra["celora"]["cbar"][0][1])
    stored = sim.eval_state(0)
    for k, v in cbar.items():
        p = k[:-1]
        a, b = st[p + "A"].double(), st[p + "B"].double()
        want = torch.linalg.pinv(b) @ sim.init_state[p + "B"].double() @ v.double() @ sim.init_state[p + "A"].double() \
            @ torch.linalg.pinv(a)
        torch.testing.assert_close(stored[k].double(), want, atol=1e-5, rtol=0)
        assert (stored[k] - v).abs().max() > 1e-6  # not stored as received
    plain, common = (celora(tmp_path / name, rounds=2, ab_train="frozen", **opts)
                     for name, opts in (("own", {}), ("common", {"c_basis": "common"})))
    ups = [record(s)[0] for s in (plain, common)]
    plain.run(), common.run()
    for x, y in zip(*ups, strict=True):
        for k in x.tensors:
            torch.testing.assert_close(x.tensors[k], y.tensors[k], atol=1e-6, rtol=0)


def test_delta_c_is_measured_from_what_each_client_started_with(tmp_path):
    """Partial participation and dropouts: the server's idea of each client's starting C (its last C̄,
    the FedAvg C for a newcomer, or 0) must be the C the client really started the round with."""
    sim = make_sim(tmp_path, method={"name": "celora"}, partition={**DIRICHLET, "num_clients": 4},
                   federation={"rounds": 5, "clients_per_round": 2, "dropout_rate": 0.3})
    c_keys = sim.am.keys({"C"})
    start, newcomer_downloads, checked = {}, [], []
    download, aggregate = sim.server.download, sim.server.aggregate

    def d(cid, t):
        dl = download(cid, t)
        start[t, cid] = apply_download(sim.clients[cid], dl, sim.method).full()
        if c_keys[0] in dl.tensors and cid not in sim.server.extra["celora"]["cbar"]:
            newcomer_downloads.append((t, cid))
        return dl

    def a(t, uploads):
        aggregate(t, uploads)
        delta = torch.stack([torch.cat([(u.tensors[k] - start[t, u.client][k]).double().flatten() for k in c_keys])
                             for u in uploads])
        np.testing.assert_allclose(sim.method.last_weights["s_param"], sim_fn.cosine_matrix(delta), atol=1e-9)
        checked.append(t)

    sim.server.download, sim.server.aggregate = d, a
    rows = sim.run()
    assert len(checked) >= 3 and newcomer_downloads, (checked, newcomer_downloads)
    assert rows["rounds"] == 5


def two_groups(monkeypatch, per_client=40):
    """6 clients: 0-2 hold labels {0, 1} only, 3-5 labels {2, 3} only (synthetic task)."""
    def split(task, cfg, seed):
        labels = np.asarray(task.labels)
        rng = np.random.default_rng(seed)
        test = np.sort(rng.choice(len(labels), 80, replace=False))
        rest = np.setdiff1d(np.arange(len(labels)), test)
        clients = []
        for group in ((0, 1), (2, 3)):
            pool = rng.permutation(rest[np.isin(labels[rest], group)])
            for c in range(3):
                idx = pool[c * per_client:(c + 1) * per_client]
                clients.append((np.sort(idx[8:]), np.sort(idx[:8])))
        return Split(test, clients)

    monkeypatch.setattr(run_module, "split_task", split)


def group_mass(w, ids):
    group = np.array([i // 3 for i in ids])
    own = np.array([w[r, group == group[r]].sum() for r in range(len(ids))])
    return own, 1.0 - own


@pytest.mark.parametrize("beta,rounds", [(1.0, 1), (0.0, 3)])
def test_disjoint_label_groups_weigh_their_own_group(tmp_path, monkeypatch, beta, rounds):
    two_groups(monkeypatch)
    sim = celora(tmp_path, rounds=rounds, partition={"num_clients": 6, "scheme": "iid"}, beta=beta)
    assert {int(x) for x in sim.client_train[4].labels} <= {2, 3}
    sim.run()
    lw = sim.method.last_weights
    own, other = group_mass(lw["weights"], lw["clients"])
    assert (own > other).all(), (own, other)
    group = np.array(lw["clients"]) // 3
    same = (group[:, None] == group[None, :]) & ~np.eye(6, dtype=bool)
    if beta == 1.0:  # the data similarity alone separates the groups, pair by pair
        s = sim.method.s_data(sim.server, lw["clients"])
        for i in range(6):
            assert s[i, same[i]].min() > s[i, ~same[i] & (group != group[i])].max()
    else:  # ΔC of round 3 (relative to each client's C̄): more alike within a group than across
        sp = lw["s_param"]
        assert sp[same].mean() > sp[group[:, None] != group[None, :]].mean() + 0.05


def test_similarity_functions():
    p, q = np.array([0.5, 0.5, 0, 0]), np.array([0, 0, 0.5, 0.5])
    assert sim_fn.js_divergence(p, q) == pytest.approx(np.log(2))
    assert sim_fn.js_divergence(p, p) == 0.0
    s = sim_fn.cosine_matrix(np.array([[1.0, 0], [2.0, 0], [0, 0]]))
    np.testing.assert_allclose(s, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    proj = sim_fn.project_simplex(np.array([[0.9, 0.6, -1.0], [0.2, 0.2, 0.2]]))
    np.testing.assert_allclose(proj, [[0.65, 0.35, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    z = sim_fn.zscore_others(np.array([[1.0, 0.2, 0.4], [0.2, 1.0, 0.2], [0.4, 0.2, 1.0]]))
    np.testing.assert_allclose(z, [[0, -1, 1], [0, 0, 0], [1, -1, 0]])  # the diagonal never counts


def test_self_weight_is_the_configured_lambda_and_the_rest_is_a_softmax_over_others():
    rng = np.random.default_rng(0)
    s = rng.uniform(size=(5, 5))
    s = (s + s.T) / 2
    np.fill_diagonal(s, 1.0)  # S_ii = 1: it must not matter
    n = np.array([10, 20, 30, 40, 50])
    w = sim_fn.combine_weights(s, s, 1.0, 0.5, n, self_weight=0.3)
    np.testing.assert_allclose(np.diag(w), 0.3)
    np.testing.assert_allclose(w.sum(1), 1.0)
    z = sim_fn.zscore_others(s)
    for i in range(5):
        others = [j for j in range(5) if j != i]
        logit = z[i, others] / 0.5 + np.log(n[others] / n.sum())
        np.testing.assert_allclose(w[i, others], 0.7 * np.exp(logit) / np.exp(logit).sum())
    assert (1 / (w**2).sum(1) > 1).all()  # more than one collaborator
    # τ → ∞: the others by example share
    big = sim_fn.combine_weights(s, s, 1.0, 1e9, n, self_weight=0.3)
    np.testing.assert_allclose(big[0, 1:], 0.7 * n[1:] / n[1:].sum())
    # auto: self scored as its most similar other -> strictly between 0 and 1, and the same as that other's raw
    auto = sim_fn.combine_weights(s, s, 1.0, 0.5, n, self_weight="auto")
    np.testing.assert_allclose(auto.sum(1), 1.0)
    for i in range(5):
        others = [j for j in range(5) if j != i]
        best = others[int(np.argmax(z[i, others]))]
        assert 0 < auto[i, i] < 1
        assert auto[i, i] / auto[i, best] == pytest.approx(n[i] / n[best])


def test_learned_objective_is_not_minimised_at_local():
    """The alignment objective lives on the others: the self-weight stays λ, and weight moves onto the other
    whose update points where client 0's does, away from the similarity prior."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=16)
    delta = np.stack([base, base + 0.1 * rng.normal(size=16), -base, rng.normal(size=16)])
    w0 = sim_fn.combine_weights(np.full((4, 4), 0.5), np.full((4, 4), 0.5), 0.5, 1.0, [1, 1, 1, 1], 0.4)
    np.testing.assert_allclose(w0[0, 1:], 0.2)  # uniform prior over the others
    w = sim_fn.refine_others(w0, delta, mu=0.1, steps=50, lr=0.1)
    np.testing.assert_allclose(np.diag(w), 0.4)
    np.testing.assert_allclose(w.sum(1), 1.0)
    assert (w >= 0).all()
    assert w[0, 1] > w0[0, 1] + 0.1 and w[0, 2] < w0[0, 2]
    u, u0 = (np.where(np.eye(4, dtype=bool), 0, x) / 0.6 for x in (w, w0))
    assert (sim_fn.align_objective(u, delta, u0, 0.1) < sim_fn.align_objective(u0, delta, u0, 0.1) - 1e-3).all()


def test_per_class_distance_compares_a_class_with_the_same_class():
    """Two clients with identical class-conditional features but different label mixtures: per class their
    features agree (F = 0), while the overall Gaussians differ."""
    rng = np.random.default_rng(0)
    f0, f1 = torch.tensor(rng.normal(0, 1, (40, 6))), torch.tensor(rng.normal(3, 1, (40, 6)))
    lab = torch.tensor([0] * 40 + [1] * 40)
    a = (torch.cat([f0, f1[:10]]), lab[:50])  # mostly class 0
    b = (torch.cat([f0[:10], f1]), torch.tensor([0] * 10 + [1] * 40))  # mostly class 1
    per = [sim_fn.data_descriptor(f, y, 2, "per_class") for f, y in (a, b)]
    per[1]["mean"], per[1]["var"] = per[0]["mean"], per[0]["var"]  # the same class statistics exactly
    overall = [sim_fn.data_descriptor(f, y, 2, "overall") for f, y in (a, b)]
    assert sim_fn.feature_distance(per)[0, 1] == pytest.approx(0.0, abs=1e-9)
    assert sim_fn.feature_distance(overall)[0, 1] > 1.0
    assert overall[0]["mean"].shape == (6,) and per[0]["mean"].shape == (2, 6)
    # a pair with no class in common gets the largest F of the pairs that share one
    c = sim_fn.data_descriptor(f1[:20], torch.tensor([1] * 20), 3, "per_class")
    d = sim_fn.data_descriptor(f0[:20] + 9, torch.tensor([2] * 20), 3, "per_class")
    e = sim_fn.data_descriptor(f1[20:], torch.tensor([1] * 20), 3, "per_class")
    f = sim_fn.feature_distance([c, d, e])
    assert f[0, 1] == f[1, 2] == f[0, 2] > 0


def test_centered_param_similarity_removes_a_shared_drift():
    rng = np.random.default_rng(0)
    drift, g1, g2 = 5 * rng.normal(size=16), rng.normal(size=16), rng.normal(size=16)
    delta = np.stack([drift + g + 0.1 * rng.normal(size=16) for g in (g1, g1, g1, g2, g2, g2)])
    group = np.arange(6) // 3
    same = (group[:, None] == group[None, :]) & ~np.eye(6, dtype=bool)
    plain, centered = sim_fn.param_similarity(delta), sim_fn.param_similarity(delta, center=True)
    assert plain[group[:, None] != group[None, :]].min() > 0.8  # the drift hides the groups
    assert centered[same].min() > 0.9 and centered[group[:, None] != group[None, :]].max() < -0.9


def test_learned_weights_run(tmp_path):
    sims = {w: celora(tmp_path / w, rounds=2, partition={**DIRICHLET, "num_clients": 4}, weights=w,
                      learned_steps=10, learned_lambda=0.1) for w in ("softmax", "learned")}
    for sim in sims.values():
        sim.run()
    soft, learned = (sims[k].method.last_weights["weights"] for k in ("softmax", "learned"))
    np.testing.assert_allclose(learned.sum(1), 1.0)
    np.testing.assert_allclose(np.diag(learned), 0.5)  # the self-weight is not what is learned
    assert np.abs(learned - soft).max() > 1e-3  # the refinement moved the others' weights


def test_metrics_row_shows_the_sharing(tmp_path):
    rows = {}
    for lam in (0.3, "auto"):
        sim = celora(tmp_path / str(lam), rounds=2, partition={**DIRICHLET, "num_clients": 4}, self_weight=lam)
        sim.run()
        rows[lam] = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
        w = sim.method.last_weights["weights"]
        assert rows[lam][-1]["celora_self_weight"] == pytest.approx(np.diag(w).mean())
        assert rows[lam][-1]["celora_collaborators"] == pytest.approx(np.mean(1 / (w**2).sum(1)))
        # the similarity diagnostics: means over distinct client pairs, and their agreement
        lw = sim.method.last_weights
        pairs = np.triu_indices(4, 1)
        sp, sd = lw["s_param"][pairs], lw["s_data"][pairs]
        assert rows[lam][-1]["celora_param_similarity"] == pytest.approx(sp.mean())
        assert rows[lam][-1]["celora_data_similarity"] == pytest.approx(sd.mean())
        assert rows[lam][-1]["celora_similarity_agreement"] == pytest.approx(np.corrcoef(sp, sd)[0, 1])
    assert all(r["celora_self_weight"] == pytest.approx(0.3) for r in rows[0.3])
    assert all(r["celora_collaborators"] > 1.5 for r in rows[0.3])
    assert all(0 < r["celora_self_weight"] < 0.9 for r in rows["auto"])


def test_descriptor_charged_once_per_client_that_took_part(tmp_path):
    """4 clients, 2 per round: each descriptor is charged in the round its client first takes part, and a
    client that never takes part sends none and is not in the data similarity."""
    sim = make_sim(tmp_path, method={"name": "celora"}, partition={**DIRICHLET, "num_clients": 4},
                   federation={"rounds": 3, "clients_per_round": 2})
    order = iter([[0, 1], [1, 2], [0, 2]])  # client 2 first takes part in round 2, client 3 never
    sim.server.sample = lambda: next(order)
    sim.run()
    rows = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    first = {}
    for r in rows:
        for c in r["clients"]:
            first.setdefault(c, r["round"])
    assert first == {0: 1, 1: 1, 2: 2}
    size = sim.method.charged[next(iter(first))][1]
    assert size > 0 and all(b == size for _, b in sim.method.charged.values())
    assert sum(r["up_raw_other"] for r in rows) == size * len(first)
    for t in (1, 2, 3):
        assert rows[t - 1]["up_raw_other"] == size * sum(1 for v in first.values() if v == t)
    assert sorted(sim.server.extra["celora"]["descriptors"]) == sorted(first)
    never = ({0, 1, 2, 3} - set(first)).pop()
    assert np.isnan(sim.method.s_data(sim.server, [never, *first])[0, 1:]).all()


def test_newcomer_gets_cbar_from_data_similarity(tmp_path, monkeypatch):
    two_groups(monkeypatch)
    sim = celora(tmp_path, rounds=2, partition={"num_clients": 6, "scheme": "iid"}, beta=1.0)
    order = iter([[0, 1, 3, 4], [2]])
    sim.server.sample = lambda: next(order)
    sim.run_round(1)
    st = sim.server.extra["celora"]
    assert sim.method.needs_descriptor(sim.server, 2)  # not described yet: the plain FedAvg C
    fedavg = sim.method.unflatten(st, st["fedavg"][1])
    assert all(torch.equal(v, fedavg[k]) for k, v in sim.method.download(sim.server, 2, 2).items())
    sim.send_descriptor(2, 2)
    dl = sim.method.download(sim.server, 2, 2)
    seen = [0, 1, 3, 4]
    s = sim.method.s_data(sim.server, [2, *seen])
    n = np.array([st["last"][j][0] for j in seen], dtype=float)
    logit = sim_fn.zscore_others(s)[0, 1:] + np.log(n / n.sum())
    w = np.exp(logit) / np.exp(logit).sum()
    assert w[:2].sum() > 0.8  # its own label group
    want = sim.method.unflatten(st, (torch.from_numpy(w) @ torch.stack([st["last"][j][1] for j in seen]).double()))
    for k, v in want.items():
        torch.testing.assert_close(dl[k].double(), v, atol=1e-6, rtol=0)
        assert (dl[k] - fedavg[k]).abs().max() > 1e-6
    row = sim.run_round(2)
    assert row["up_raw_other"] == sim.method.charged[2][1] and sim.method.charged[2][0] == 2


def test_warmup_trains_ab_then_freezes(tmp_path):
    sim = celora(tmp_path, rounds=3, ab_train="warmup", ab_warmup_rounds=1)
    ab = sim.am.keys({"A", "B"})
    states = []
    sim.run(on_round=lambda row: states.append({k: sim.clients[0].personal[k].clone() for k in ab}))
    assert any(not torch.equal(states[0][k], sim.init_state[k]) for k in ab)  # trained in round 1
    assert all(torch.equal(states[0][k], states[2][k]) for k in ab)  # frozen after
    assert sim.method.train_factors(1) == {"A", "B", "C"} and sim.method.train_factors(2) == {"C"}


SVD_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(int(sys.argv[2]))
    from fedlora.adapters import inject_adapters
    from fedlora.adapters.tri_init import init_tri_factors
    from fedlora.models import load_classifier
    am = inject_adapters(load_classifier("tiny-bert", 4, 0), ["query", "value"], 4, 8, tri=True)
    init_tri_factors(am, "svd", 0)
    torch.save(am.get_state({"A", "B"}), sys.argv[1])
""")


def test_svd_init_deterministic_across_processes_and_delta_w_zero(tmp_path):
    paths = [tmp_path / f"ab{i}.pt" for i in (1, 2)]
    procs = [subprocess.Popen([sys.executable, "-c", SVD_SCRIPT, str(p), str(n)]) for p, n in zip(paths, (1, 2),
                                                                                                   strict=True)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    a, b = (torch.load(p) for p in paths)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    sim = celora(tmp_path, rounds=1)
    state = sim.am.get_state()
    assert all(torch.equal(a[k], state[k]) for k in a)  # the simulation's factors are the same ones
    for name, layer in sim.am.layers.items():
        w0 = layer.base.weight.double()
        A, B = state[f"{name}.A"].double(), state[f"{name}.B"].double()
        torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
        core = B.T @ w0 @ A.T  # diag(top-4 singular values)
        sv = torch.linalg.svdvals(w0)[:4]
        torch.testing.assert_close(core, torch.diag(sv), atol=1e-5, rtol=0)
        pivot = B.abs().argmax(0)
        assert (B[pivot, torch.arange(4)] > 0).all()
        assert torch.equal(state[f"{name}.C"], torch.zeros(4, 4))
    # ΔW = 0: the injected, initialized model computes exactly what the base model computes
    base = load_classifier("tiny-bert", sim.task.num_labels, sim.cfg.seed)
    batch = sim.client_train[0].batch(slice(0, 16))
    with torch.inference_mode():
        assert torch.equal(sim.am.model(**batch).logits, base(**batch).logits)


def test_svd_sign_convention_keeps_a_valid_svd():
    w = torch.randn(12, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    A, B = svd_factors(w, 3)
    A2, B2 = svd_factors(-w, 3)  # the sign rule fixes B's pivots positive, so A absorbs the flip
    torch.testing.assert_close(B2 @ torch.diag(torch.linalg.svdvals(w)[:3]) @ A2, -(B @ torch.diag(
        torch.linalg.svdvals(w)[:3]) @ A))
    assert (B[B.abs().argmax(0), torch.arange(3)] > 0).all()


def test_peft_export_reproduces_client_logits(tmp_path):
    peft = pytest.importorskip("peft")
    sim = celora(tmp_path, rounds=2)
    sim.run()
    cid = 1
    state = sim.eval_state(cid)
    assert any(state[k].abs().sum() > 0 for k in sim.am.keys({"C"}))
    out = export_peft(state, tmp_path / "peft", r=sim.am.r, alpha=sim.am.alpha, targets=sim.am.targets,
                      head_modules=sim.am.head_modules)
    sim.am.set_state(state)
    batch = sim.client_test[cid].batch(slice(0, 16))
    batch = {k: v for k, v in batch.items() if k != "labels"}
    with torch.inference_mode():
        ours = sim.am.model(**batch).logits
        base = load_classifier("tiny-bert", sim.task.num_labels, sim.cfg.seed)
        plain = base(**batch).logits.clone()
        model = peft.PeftModel.from_pretrained(base, str(out)).eval()
        theirs = model(**batch).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter and head changed the model
    assert (ours - theirs).abs().max() < 1e-5


def test_beta_zero_sends_no_descriptor(tmp_path):
    with_desc = celora(tmp_path / "a", rounds=1)
    without = celora(tmp_path / "b", rounds=1, beta=0.0)
    assert with_desc.method.needs_descriptor(with_desc.server, 0)
    assert not without.method.needs_descriptor(without.server, 0)
    assert with_desc.run_round(1)["up_raw_other"] > 0
    row = without.run_round(1)  # the data similarity is not needed to aggregate
    assert row["up_raw_other"] == 0 and not without.server.extra["celora"]["descriptors"]


def test_shrink_control_scales_each_clients_own_c_and_mixes_in_nobody_elses(tmp_path):
    sim = celora(tmp_path, rounds=2, partition={**DIRICHLET, "num_clients": 4}, weights="shrink", self_weight=0.3)
    _, after = record(sim)
    sim.run()
    for rec in after.values():
        for row, i in enumerate(rec["weights"]["clients"]):
            for k, v in rec["uploads"][row].tensors.items():
                assert v.abs().max() > 0
                torch.testing.assert_close(rec["cbar"][i][k].double(), 0.3 * v.double(), atol=1e-7, rtol=0)
    # nothing else is used: no descriptor is sent, and the metrics say one collaborator (itself) at w_ii 0.3
    assert not sim.server.extra["celora"]["descriptors"] and all(r["up_raw_other"] == 0 for r in sim.history)
    assert sim.history[-1]["celora_self_weight"] == pytest.approx(0.3)
    assert sim.history[-1]["celora_collaborators"] == pytest.approx(1.0)


def test_shrink_needs_a_numeric_factor():
    from fedlora.config import build_config
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match="self_weight"):
        build_config({"method": {"name": "celora", "celora": {"weights": "shrink", "self_weight": "auto"}}})
