"""FedProx, SCAFFOLD, server optimizers, pFedGraph: each one's defining rule."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from conftest import Recorder, make_sim
from scipy.optimize import minimize
from torch import nn

from fedlora.adapters import AdaptedModel, LowRankLinear, factor_of
from fedlora.config import build_config
from fedlora.federation import Server, client_fit
from fedlora.methods import get_method, weighted_mean
from fedlora.methods.pfedgraph import collaboration_graph
from fedlora.server_opt import update

DIRICHLET = {"num_clients": 3, "scheme": "dirichlet", "alpha": 1.0, "min_partition_size": 20}


def run(tiny, name, rounds=2, method=None, **kw):
    sim = tiny(federation={"rounds": rounds, **kw.pop("federation", {})}, partition=DIRICHLET,
               method={"name": name, **(method or {})}, **kw)
    rec = Recorder(sim)
    sim.run()
    return sim, rec


def rows(sim):
    return [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- FedProx


def test_fedprox_at_mu_0_uploads_exactly_what_fedit_uploads(tiny):
    _, fedit = run(tiny, "fedit", rounds=3)
    _, prox = run(tiny, "fedprox", rounds=3, method={"fedprox": {"mu": 0.0}})
    for t, r in fedit.rounds.items():
        ups, pups = r["uploads"], prox.rounds[t]["uploads"]
        assert [u.client for u in ups] == [u.client for u in pups]
        for u, p in zip(ups, pups, strict=True):
            assert u.tensors.keys() == p.tensors.keys()
            assert all(torch.equal(u.tensors[k], p.tensors[k]) for k in u.tensors), f"round {t}"


def test_fedprox_mu_pulls_uploads_toward_the_global(tiny):
    def drift(rec):  # how far the clients' uploads move from the factors they downloaded
        return sum(float((u.tensors[k] - r["before"][k]).double().norm()) for r in rec.rounds.values()
                   for u in r["uploads"] for k in u.tensors if factor_of(k) in ("A", "B"))

    train = {"local_steps": 6, "batch_size": 8, "optimizer": "sgd", "lr": 0.5}
    _, fedit = run(tiny, "fedit", train=train)
    _, prox = run(tiny, "fedprox", method={"fedprox": {"mu": 1.0}}, train=train)
    assert drift(prox) < 0.9 * drift(fedit)


# ---------------------------------------------------------------- SCAFFOLD on a quadratic


class Quadratic(nn.Module):
    """F_i(A, B) = ½ a_i (‖A − tA_i‖² + ‖B − tB_i‖²) on the factors of one adapted linear; no data used."""

    def __init__(self, d=3, k=2, r=2):
        super().__init__()
        self.lin = LowRankLinear(nn.Linear(d, k, bias=False), r, alpha=r)

    def forward(self, a, ta, tb):
        loss = 0.5 * a * ((self.lin.A - ta).pow(2).sum() + (self.lin.B - tb).pow(2).sum())
        return types.SimpleNamespace(loss=loss)


class FixedData:
    def __init__(self, n, batch):
        self.n, self._batch = n, batch

    def __len__(self):
        return self.n

    def batch(self, rows):
        return self._batch


class NoStream:
    def __init__(self, cid):
        self.seed, self.stream_id = 0, cid

    def next_rows(self):
        return None


def quadratic_federation(method, rounds, a, targets, n, steps, lr):
    cfg = build_config({"method": {"name": method}, "partition": {"num_clients": len(a)},
                        "adapter": {"r": 2, "alpha": 2},  # the rank of Quadratic's layer: uploads are validated at it
                        "federation": {"rounds": rounds},
                        "train": {"optimizer": "sgd", "lr": lr, "local_steps": steps, "max_grad_norm": None}})
    torch.manual_seed(0)
    model = Quadratic()
    am = AdaptedModel(model, ["lin"], [], r=2, alpha=2, tri=False)
    m = get_method(method)(cfg)
    init = am.get_state()
    server = Server(m, init, cfg.federation, len(a))
    states = {i: server.initial_client_state(init) for i in range(len(a))}
    data = [FixedData(n[i], {"a": a[i], "ta": targets[i][0], "tb": targets[i][1]}) for i in range(len(a))]
    history = []
    for t in range(1, rounds + 1):
        downloads = {i: server.download(i, t) for i in range(len(a))}
        uploads = {}
        for i, dl in downloads.items():
            uploads[i], states[i] = client_fit(am, m, states[i], dl, data[i], NoStream(i), cfg.train)
        history.append(server.finish_round(t, downloads, uploads) | {"uploads": uploads})
    return server, states, init, history


def reference_scaffold(x, a, targets, p, steps, lr, rounds):
    """SCAFFOLD (option II, SGD, full participation, example weights) written out in float64."""
    keys = list(x)
    x = {k: v.double() for k, v in x.items()}
    c = {k: torch.zeros_like(v) for k, v in x.items()}
    ci = [{k: torch.zeros_like(v) for k, v in x.items()} for _ in a]
    for _ in range(rounds):
        ys, dcs = [], []
        for i, ai in enumerate(a):
            y = {k: v.clone() for k, v in x.items()}
            for _ in range(steps):
                y = {k: y[k] - lr * (ai * (y[k] - targets[i][keys.index(k)].double()) - ci[i][k] + c[k])
                     for k in keys}
            new = {k: ci[i][k] - c[k] + (x[k] - y[k]) / (steps * lr) for k in keys}
            dcs.append({k: new[k] - ci[i][k] for k in keys})
            ci[i] = new
            ys.append(y)
        x = {k: sum(p[i] * ys[i][k] for i in range(len(a))) for k in keys}
        c = {k: c[k] + sum(p[i] * dcs[i][k] for i in range(len(a))) for k in keys}
    return x, c, ci


def test_scaffold_update_rule_on_a_quadratic():
    a, n, steps, lr, rounds = [1.0, 4.0, 0.5], [30, 10, 20], 5, 0.1, 40
    g = torch.Generator().manual_seed(1)
    targets = [(torch.randn(2, 3, generator=g), torch.randn(2, 2, generator=g)) for _ in a]
    p = [ni / sum(n) for ni in n]
    server, states, init, _ = quadratic_federation("scaffold", rounds, a, targets, n, steps, lr)
    curv = sum(pi * ai for pi, ai in zip(p, a, strict=True))  # Σ p_i a_i
    x, c, ci = reference_scaffold({"lin.A": init["lin.A"], "lin.B": init["lin.B"]}, a, targets, p, steps, lr, rounds)
    for j, k in enumerate(("lin.A", "lin.B")):
        torch.testing.assert_close(server.global_state[k].double(), x[k], atol=1e-5, rtol=0)
        torch.testing.assert_close(server.global_state["scaffold/c/" + k].double(), c[k], atol=1e-5, rtol=0)
        for i in range(len(a)):
            torch.testing.assert_close(states[i].personal["scaffold/ci/" + k].double(), ci[i][k], atol=1e-5, rtol=0)
        # the known answer: the minimizer of Σ p_i F_i, which FedAvg's local drift misses
        star = sum(p[i] * a[i] * targets[i][j].double() for i in range(len(a))) / curv
        torch.testing.assert_close(server.global_state[k].double(), star, atol=1e-4, rtol=0)
    fedavg, *_ = quadratic_federation("fedit", rounds, a, targets, n, steps, lr)
    star_a = sum(p[i] * a[i] * targets[i][0].double() for i in range(len(a))) / curv
    assert (fedavg.global_state["lin.A"].double() - star_a).abs().max() > 1e-2


def test_scaffold_counts_the_control_variates_both_ways(tiny):
    fedit, _ = run(tiny, "fedit", rounds=3)
    scaf, rec = run(tiny, "scaffold", rounds=3)
    f, s = rows(fedit), rows(scaf)
    assert s[0]["down_raw"] == f[0]["down_raw"] == 0  # round 1: x_0 seeded, c_0 = 0, nothing sent
    for t in (1, 2):  # c is as large as the factors it controls, in each download from round 2 on
        assert s[t]["down_raw"] == 2 * f[t]["down_raw"] > 0 and s[t]["down_serialized"] > f[t]["down_serialized"]
    for t in range(3):  # y_i and Δc_i every round
        assert s[t]["up_raw"] == 2 * f[t]["up_raw"] and s[t]["up_raw_adapter"] == 2 * f[t]["up_raw_adapter"]
    ups = rec.rounds[3]["uploads"]
    assert all(any(k.startswith("scaffold/dc/") for k in u.tensors) for u in ups)
    # the client state holds c_i, never loaded into the model
    st = scaf.clients[0]
    assert any(k.startswith("scaffold/ci/") for k in st.personal)
    assert all("/" not in k for k in st.full())


# ---------------------------------------------------------------- server optimizers


def test_server_sgd_at_lr_1_is_fedavg_exactly(tiny):
    sim, rec = run(tiny, "fedit", rounds=2, federation={"server_optimizer": "sgd", "server_lr": 1.0})
    for r in rec.rounds.values():
        ups = r["uploads"]
        for k in ups[0].tensors:
            assert torch.equal(r["after"][k], weighted_mean([u.tensors[k] for u in ups], [u.n_examples for u in ups]))


def test_server_adam_one_step_by_hand():
    fed = build_config({"federation": {"server_optimizer": "adam", "server_lr": 0.5, "server_beta1": 0.9,
                                       "server_beta2": 0.99, "server_eps": 1e-3}}).federation
    x, delta, st = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64), torch.tensor([0.2, 0.0, -4.0],
                                                                                       dtype=torch.float64), {}
    new = update(fed, x, delta, st)
    # m = 0.1 Δ; v = 0.99 τ² + 0.01 Δ²; x + 0.5 m / (√v + τ)
    m = [0.02, 0.0, -0.4]
    v = [0.99e-6 + 0.01 * 0.04, 0.99e-6, 0.99e-6 + 0.01 * 16]
    want = [xi + 0.5 * mi / (vi ** 0.5 + 1e-3) for xi, mi, vi in zip([1.0, -2.0, 0.0], m, v, strict=True)]
    assert new.tolist() == pytest.approx(want, abs=1e-12)
    assert st["m"].tolist() == pytest.approx(m) and st["v"].tolist() == pytest.approx(v)
    # a second step uses the stored moments
    new2 = update(fed, new, delta, st)
    m2 = [0.9 * mi + 0.1 * di for mi, di in zip(m, [0.2, 0.0, -4.0], strict=True)]
    assert st["m"].tolist() == pytest.approx(m2) and not torch.equal(new2, new)


def test_server_adam_in_a_run_steps_from_the_fedavg_pseudo_gradient(tiny):
    fed = {"server_optimizer": "adam", "server_lr": 0.01}
    sim, rec = run(tiny, "fedit", rounds=1, federation=fed)
    r = rec.rounds[1]
    ups = r["uploads"]
    cfg = sim.cfg.federation
    for k in ups[0].tensors:
        x = r["before"][k].double()
        delta = weighted_mean([u.tensors[k] for u in ups], [u.n_examples for u in ups]).double() - x
        m, v = 0.1 * delta, 0.99 * 1e-6 + 0.01 * delta**2
        torch.testing.assert_close(r["after"][k].double(), x + cfg.server_lr * m / (v.sqrt() + 1e-3), atol=1e-6, rtol=0)
    assert set(sim.server.extra["server_opt"]) == set(ups[0].tensors)


@pytest.mark.parametrize("kind", ["avgm", "adam", "yogi", "adagrad"])
def test_server_optimizer_state_survives_resume_bit_identically(tmp_path, kind):
    fed = {"rounds": 3, "server_optimizer": kind, "server_lr": 0.1}
    ref = make_sim(tmp_path / "ref", federation=fed, partition=DIRICHLET)
    ref.run()
    stop = make_sim(tmp_path / "res", federation=fed, partition=DIRICHLET)

    def halt(row):
        if row["round"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stop.run(on_round=halt)
    resumed = make_sim(tmp_path / "res", federation=fed, partition=DIRICHLET)
    resumed.run(resume=True)
    a, b = [{k: v for k, v in r.items() if k != "wall_s"} for r in ref.history], \
           [{k: v for k, v in r.items() if k != "wall_s"} for r in resumed.history]
    assert a == b
    for k, v in ref.server.global_state.items():
        assert torch.equal(v, resumed.server.global_state[k]), k


def test_server_optimizer_refused_without_a_server_held_factor(tiny):
    with pytest.raises(ValueError, match="federation.server_optimizer"):
        tiny(method={"name": "pfedgraph"}, federation={"server_optimizer": "adam"})


# ---------------------------------------------------------------- pFedGraph


def test_pfedgraph_graph_solves_the_qp_on_the_simplex():
    rng = np.random.default_rng(0)
    m = 5
    x = rng.normal(size=(m, 8))
    s = (x @ x.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(x, axis=1))
    p = rng.dirichlet(np.ones(m))
    for alpha in (0.05, 0.8, 5.0):
        w = collaboration_graph(s, p, alpha)
        assert np.allclose(w.sum(1), 1) and (w >= 0).all()
        for i in range(m):
            def f(v, alpha=alpha, si=s[i]):
                return alpha * np.sum((v - p) ** 2) - v @ si

            ref = minimize(f, p, method="SLSQP", bounds=[(0, 1)] * m,
                           constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1}], options={"ftol": 1e-14})
            assert f(w[i]) <= ref.fun + 1e-9
            assert np.allclose(w[i], ref.x, atol=1e-5)
    assert np.allclose(collaboration_graph(s, p, 1e9), p[None, :].repeat(m, 0), atol=1e-8)  # α → ∞: FedAvg


def test_pfedgraph_sends_each_client_its_graph_weighted_model(tiny):
    sim, rec = run(tiny, "pfedgraph", rounds=2, method={"pfedgraph": {"alpha": 0.05}})
    graph = sim.method.last_graph
    ups = rec.rounds[2]["uploads"]
    assert graph["round"] == 2 and [u.client for u in ups] == graph["clients"]
    w = graph["graph"]
    assert not np.allclose(w, w[0][None, :])  # personalized: the rows differ
    downloads = {cid: sim.method.download(sim.server, cid, 3) for cid in range(sim.num_clients)}
    for row, cid in enumerate(graph["clients"]):
        for k in ups[0].tensors:
            want = sum(w[row, j] * u.tensors[k].double() for j, u in enumerate(ups))
            torch.testing.assert_close(downloads[cid][k].double(), want, atol=1e-6, rtol=0)
    k = sim.am.keys({"B"})[0]
    assert not torch.equal(downloads[0][k], downloads[1][k])
    # downlink: one personalized A, B per participant, as large as its upload
    r = rows(sim)[1]
    assert r["down_raw"] == r["up_raw"] > 0


# ---------------------------------------------------------------- in `fedlora compare`


def test_new_methods_run_in_compare(tmp_path):
    import yaml
    from conftest import tiny_config
    from typer.testing import CliRunner

    from fedlora.cli import app

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path, name="cmp", federation={"rounds": 2})))
    methods = ["fedprox", "scaffold", "pfedgraph", "feddpa", "lorafair", "ravan"]
    res = CliRunner().invoke(app, ["compare", str(cfg), "--methods", ",".join(methods), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    report = (tmp_path / "o" / "report.md").read_text()
    assert all(f"| {m} |" in report for m in methods)
    res = CliRunner().invoke(app, ["compare", str(cfg), "--methods", "fedit,scaffold", "--out", str(tmp_path / "a"),
                                   "--set", "federation.server_optimizer=adam", "--set", "federation.server_lr=0.01"])
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------- FedDPA


def test_feddpa_global_pair_is_fedavg_and_local_pair_never_leaves(tiny):
    sim, rec = run(tiny, "feddpa", rounds=2)
    local_keys = sim.am.keys({"LA", "LB"})
    assert local_keys and not set(local_keys) & set(sim.server.global_state)
    for r in rec.rounds.values():
        ups = r["uploads"]
        assert all({factor_of(k) for k in u.tensors} == {"A", "B"} for u in ups)  # head personal by default
        for k in ups[0].tensors:
            torch.testing.assert_close(r["after"][k], weighted_mean([u.tensors[k] for u in ups],
                                                                     [u.n_examples for u in ups]), atol=0, rtol=0)
    lb = sim.am.keys({"LB"})[0]
    bs = [sim.clients[c].personal[lb] for c in range(sim.num_clients)]
    assert all(b.abs().sum() > 0 for b in bs) and not torch.equal(bs[0], bs[1])
    assert all(r["up_raw_adapter"] == rows(run(tiny, "fedit", rounds=2)[0])[i]["up_raw_adapter"]
               for i, r in enumerate(rows(sim)))


def test_feddpa_mixes_the_two_pairs_at_inference():
    torch.manual_seed(0)
    layer = LowRankLinear(nn.Linear(6, 5), r=2, alpha=4, dual=True)
    with torch.no_grad():
        for p in (layer.B, layer.LB):
            p.normal_()
    x = torch.randn(3, 6)
    g = layer.scale * layer.B @ layer.A
    loc = layer.scale * layer.LB @ layer.LA
    layer.local_weight = 0.3
    layer.train()
    torch.testing.assert_close(layer(x), layer.base(x) + x @ (g + loc).t())  # training: both pairs, weight 1
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base(x) + x @ (g + 0.3 * loc).t())
    torch.testing.assert_close(layer.delta_weight(), g + 0.3 * loc)
    layer.local_weight = 0.0
    torch.testing.assert_close(layer(x), layer.base(x) + x @ g.t())  # w = 0: the global adapter alone
