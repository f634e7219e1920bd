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

import fedlora.runtime.simulation as simulation
from fedlora.adapters import export_peft, factor_of
from fedlora.data import Split
from fedlora.federation import apply_download
from fedlora.methods import similarity as sim_fn
from fedlora.methods.celora import svd_factors
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
        after[t] = {"uploads": uploads, "cbar": {i: c for i, (r, c) in st["cbar"].items() if r == t},
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
    # the descriptor: histogram (L) + present classes (int64) + mean and var (present × hidden), float32
    hidden, labels = sim.am.model.config.hidden_size, sim.task.num_labels
    for cid, d in enumerate(sim.method.descriptors):
        counts = torch.bincount(sim.client_train[cid].labels, minlength=labels).float()
        torch.testing.assert_close(d["hist"], counts / counts.sum())
        m = len(d["classes"])
        assert sim.method.descriptor_bytes[cid] == labels * 4 + m * 8 + 2 * m * hidden * 4
    # ... is uplink in round 1 only, counted in the totals apart from the adapter and head columns
    assert rows[0]["up_raw_other"] == sum(sim.method.descriptor_bytes.values()) > 0
    assert rows[0]["up_raw"] == rows[0]["up_raw_adapter"] + rows[0]["up_raw_head"] + rows[0]["up_raw_other"]
    assert rows[1]["up_raw_other"] == 0 and rows[1]["up_raw"] == rows[1]["up_raw_adapter"] + rows[1]["up_raw_head"]
    # each round's weight matrix is saved in the run directory
    saved = np.load(sim.run_dir / "weights_round_2.npz")
    np.testing.assert_allclose(saved["weights"], sim.method.last_weights["weights"])
    np.testing.assert_allclose(saved["weights"].sum(1), 1.0)


def test_frozen_ab_identical_everywhere_and_huge_tau_is_fedavg(tmp_path):
    sim = celora(tmp_path, rounds=2, ab_train="frozen", tau=1e9)
    _, after = record(sim)
    ab = sim.am.keys({"A", "B"})
    init = {k: sim.init_state[k] for k in ab}
    assert all(init[k].abs().sum() > 0 for k in ab)

    def check(row):
        for cid in range(sim.num_clients):
            state = sim.eval_state(cid)
            assert all(torch.equal(state[k], init[k]) for k in ab)

    sim.run(on_round=check)
    for rec in after.values():
        ups = rec["uploads"]
        n = torch.tensor([u.n_examples for u in ups], dtype=torch.float64)
        assert len(set(n.tolist())) > 1  # unequal clients: a plain mean would fail below
        np.testing.assert_allclose(rec["weights"]["weights"], np.tile((n / n.sum()).numpy(), (len(ups), 1)),
                                   atol=1e-6)
        for k in ups[0].tensors:
            fedavg = sum((ni / n.sum()) * u.tensors[k].double() for ni, u in zip(n, ups, strict=True))
            plain = torch.stack([u.tensors[k].double() for u in ups]).mean(0)
            assert (fedavg - plain).abs().max() > 1e-7
            for cid in rec["cbar"]:
                torch.testing.assert_close(rec["cbar"][cid][k].double(), fedavg, atol=1e-6, rtol=0)


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
        start[t, cid] = apply_download(sim.clients[cid], dl).full()
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

    monkeypatch.setattr(simulation, "split_task", split)


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
        s = sim.method.s_data
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
    w0 = sim_fn.combine_weights(np.eye(3), np.eye(3), 0.5, 1.0, [10, 20, 30])
    np.testing.assert_allclose(w0.sum(1), 1.0)
    assert w0[0, 0] > 10 / 60  # self gets more than its example share
    np.testing.assert_allclose(sim_fn.combine_weights(np.eye(3), np.eye(3), 0.5, 1e9, [10, 20, 30])[1],
                               [1 / 6, 2 / 6, 3 / 6], atol=1e-8)
    x = np.random.default_rng(0).normal(size=(3, 8))
    w = sim_fn.refine_weights(w0, x, lam=0.1, steps=50, lr=0.1)
    np.testing.assert_allclose(w.sum(1), 1.0)
    assert (w >= 0).all()
    assert (sim_fn.objective(w, x, w0, 0.1) < sim_fn.objective(w0, x, w0, 0.1) - 1e-3).all()


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
    sim = celora(tmp_path, rounds=2, weights="learned", learned_steps=10, learned_lambda=0.1)
    sim.run()
    w = sim.method.last_weights["weights"]
    np.testing.assert_allclose(w.sum(1), 1.0)
    # refining towards ||C_i - Σ w C_j|| pulls weight onto the client itself
    w0 = sim_fn.combine_weights(sim.method.last_weights["s_data"], sim.method.last_weights["s_param"],
                                0.5, 1.0, [len(d) for d in sim.train_sets])
    assert (np.diag(w) > np.diag(w0)).all()


SVD_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(int(sys.argv[2]))
    from fedlora.adapters import inject_adapters
    from fedlora.methods.celora import init_tri_factors
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
    assert with_desc.method.extra_upload_bytes(0, 1) > 0
    assert without.method.extra_upload_bytes(0, 1) == 0 and without.method.s_data is None
    row = without.run_round(1)  # the data similarity is not needed to aggregate
    assert row["up_raw_other"] == 0
