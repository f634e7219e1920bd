"""Each method's defining property, on a tiny random BERT (3 clients, non-equal sizes)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Recorder

from fedlora.accounting import raw_bytes
from fedlora.adapters import factor_of

DIRICHLET = {"num_clients": 3, "scheme": "dirichlet", "alpha": 1.0, "min_partition_size": 20}


def weighted(tensors, weights):
    w = torch.tensor(weights, dtype=torch.float64)
    return sum((wi / w.sum()) * t.double() for wi, t in zip(w, tensors, strict=True))


def run(tiny, name, rounds=2, **kw):
    kw.setdefault("method", {"name": name})
    sim = tiny(federation={"rounds": rounds}, partition=DIRICHLET, **kw)
    rec = Recorder(sim)
    sim.run()
    return sim, rec


def factors(upload):
    return {factor_of(k) for k in upload.tensors}


def test_fedit_uploads_a_b_and_server_average_is_example_weighted(tiny):
    sim, rec = run(tiny, "fedit")
    sizes = {len(d) for d in sim.train_sets}
    assert len(sizes) > 1, "clients should hold different numbers of examples"
    for r in rec.rounds.values():
        ups = r["uploads"]
        assert all(factors(u) == {"A", "B", "head"} for u in ups)
        for k in ups[0].tensors:
            expected = weighted([u.tensors[k] for u in ups], [u.n_examples for u in ups])
            torch.testing.assert_close(r["after"][k].double(), expected, atol=1e-6, rtol=0)
            # the unweighted mean differs, so the test would catch a plain average
        k = next(k for k in ups[0].tensors if k.endswith(".B"))
        plain = torch.stack([u.tensors[k] for u in ups]).double().mean(0)
        assert (r["after"][k].double() - plain).abs().max() > 1e-9


def test_ffa_a_identical_everywhere_and_never_uploaded(tiny):
    sim, rec = run(tiny, "ffa", rounds=3)
    a_keys = sim.am.keys({"A"})
    init_a = {k: sim.init_state[k] for k in a_keys}
    for r in rec.rounds.values():
        assert all(factors(u) == {"B", "head"} for u in r["uploads"])
        for k in a_keys:
            assert torch.equal(r["after"][k], init_a[k])
    for cid in range(sim.num_clients):
        state = sim.eval_state(cid)
        assert all(torch.equal(state[k], init_a[k]) for k in a_keys)


def test_rolora_alternates_and_aggregation_is_exact(tiny):
    sim, rec = run(tiny, "rolora", rounds=4)
    for t, r in rec.rounds.items():
        ups = r["uploads"]
        want = {"B", "head"} if t % 2 == 1 else {"A", "head"}
        assert all(factors(u) == want for u in ups), f"round {t}"
        p = [u.n_examples for u in ups]
        for layer in sim.am.targets:
            A0, B0 = r["before"][f"{layer}.A"], r["before"][f"{layer}.B"]
            # each client's product B_i A_i, with the frozen factor as it was downloaded
            products = [(u.tensors.get(f"{layer}.B", B0).double() @ u.tensors.get(f"{layer}.A", A0).double())
                        for u in ups]
            global_product = r["after"][f"{layer}.B"].double() @ r["after"][f"{layer}.A"].double()
            torch.testing.assert_close(global_product, weighted(products, p), atol=1e-6, rtol=0)
    assert any(r["after"][k].abs().sum() > 0 for r in rec.rounds.values() for k in sim.am.keys({"B"}))


def test_fedit_aggregation_is_not_exact(tiny):
    """The contrast that motivates RoLoRA: FedIT's averaged product differs from the average product."""
    sim, rec = run(tiny, "fedit", rounds=2)
    r = rec.rounds[2]
    ups, p = r["uploads"], [u.n_examples for u in r["uploads"]]
    layer = sim.am.targets[0]
    products = [u.tensors[f"{layer}.B"].double() @ u.tensors[f"{layer}.A"].double() for u in ups]
    global_product = r["after"][f"{layer}.B"].double() @ r["after"][f"{layer}.A"].double()
    assert (global_product - weighted(products, p)).abs().max() > 1e-7


def test_fedsa_never_uploads_b_and_personal_bs_differ(tiny):
    sim, rec = run(tiny, "fedsa")
    for r in rec.rounds.values():
        assert all(factors(u) == {"A"} for u in r["uploads"])  # head personal by default
    b_key = sim.am.keys({"B"})[0]
    bs = [sim.clients[c].personal[b_key] for c in range(sim.num_clients)]
    assert all(b.abs().sum() > 0 for b in bs)
    assert not torch.equal(bs[0], bs[1]) and not torch.equal(bs[1], bs[2])


def test_local_sends_nothing(tiny):
    sim, rec = run(tiny, "local")
    rows = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r[f"{d}_{k}"] == 0 for r in rows for d in ("up", "down") for k in ("raw", "serialized"))
    assert all(not u.tensors for r in rec.rounds.values() for u in r["uploads"])


def test_centralized_pools_all_training_data(tiny):
    sim, _ = run(tiny, "centralized", rounds=1)
    assert len(sim.train_sets) == 1
    assert len(sim.train_sets[0]) == sum(len(d) for d in sim.client_train)
    rows = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["up_raw"] == 0 and len(rows[-1]["client_accuracy"]) == sim.num_clients


def test_raw_bytes_are_numel_times_element_size(tiny):
    sim, rec = run(tiny, "fedit", rounds=1)
    rows = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    ups = rec.rounds[1]["uploads"]
    expected = sum(t.numel() * t.element_size() for u in ups for t in u.tensors.values())
    assert rows[0]["up_raw"] == expected == sum(raw_bytes(u.tensors) for u in ups)
    assert rows[0]["up_serialized"] > rows[0]["up_raw"]  # safetensors adds a header per payload
    # the head is counted apart from the adapter
    head = sum(t.numel() * 4 for u in ups for k, t in u.tensors.items() if factor_of(k) == "head")
    assert rows[0]["up_raw_head"] == head and rows[0]["up_raw_adapter"] == expected - head


@pytest.mark.parametrize("head", ["shared", "personal"])
def test_rolora_uplink_is_half_of_fedit(tiny, head):
    per_client = {}
    for m in ("fedit", "rolora"):
        sim, _ = run(tiny, m, rounds=2, method={"name": m, "head": head})
        rows = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
        per_client[m] = sum(r["up_raw_adapter"] for r in rows), sum(r["up_raw_head"] for r in rows)
    (fedit_adapter, fedit_head), (rolora_adapter, rolora_head) = per_client["fedit"], per_client["rolora"]
    # query/value are square (hidden × hidden), so one factor is exactly half of A + B
    assert rolora_adapter * 2 == fedit_adapter
    assert rolora_head == fedit_head


def test_rolora_downloads_only_the_factor_just_averaged(tiny):
    sim, _ = run(tiny, "rolora", rounds=3, method={"name": "rolora", "head": "personal"})
    rows = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["down_raw"] == 0  # round 1: the seeded init is built locally
    assert rows[1]["down_raw"] == rows[0]["up_raw"]  # round 2 downloads B (same size as the B uploads)
    assert rows[2]["down_raw"] == rows[1]["up_raw"]  # round 3 downloads A


def test_lorafair_corrects_b_towards_the_average_product(tiny):
    """B' = B̄ + ΔB solves min ‖P − B'Ā‖² + ρ‖B' − B̄‖² (its gradient vanishes), A stays FedAvg's Ā, B'Ā is
    closer to P = Σ p_i B_i A_i than FedIT's B̄Ā, and the bytes are FedIT's."""
    sim, rec = run(tiny, "lorafair", rounds=2)
    lam = sim.cfg.method.lorafair.lam
    assert lam > 0
    for r in rec.rounds.values():
        ups, n = r["uploads"], [u.n_examples for u in r["uploads"]]
        for layer in sim.am.targets:
            a_bar = weighted([u.tensors[f"{layer}.A"] for u in ups], n)
            b_bar = weighted([u.tensors[f"{layer}.B"] for u in ups], n)
            torch.testing.assert_close(r["after"][f"{layer}.A"].double(), a_bar, atol=1e-6, rtol=0)
            p = weighted([u.tensors[f"{layer}.B"].double() @ u.tensors[f"{layer}.A"].double() for u in ups], n)
            b = r["after"][f"{layer}.B"].double()
            g = a_bar @ a_bar.T
            rho = lam * torch.trace(g) / g.shape[0]
            grad = (b @ a_bar - p) @ a_bar.T + rho * (b - b_bar)
            fedit_grad = (b_bar @ a_bar - p) @ a_bar.T  # the same gradient at FedIT's B̄
            assert grad.norm() < 1e-3 * fedit_grad.norm(), (grad.norm(), fedit_grad.norm())
            assert (p - b @ a_bar).norm() < (p - b_bar @ a_bar).norm()
    fedit, _ = run(tiny, "fedit", rounds=2)
    rows = {m: [json.loads(x) for x in (s.run_dir / "metrics.jsonl").read_text().splitlines()]
            for m, s in (("lorafair", sim), ("fedit", fedit))}
    for a, b in zip(rows["lorafair"], rows["fedit"], strict=True):
        assert (a["up_raw"], a["down_raw"]) == (b["up_raw"], b["down_raw"])


def test_ravan_sends_only_the_head_blocks_and_aggregates_them_exactly(tiny):
    """h heads on frozen shared bases: every upload is the (h, q, q) blocks of C, the server's C is their
    example-weighted mean laid out block-diagonally, so B C̄ A = Σ p_i B C_i A exactly; A and B never move,
    the off-diagonal blocks never train, and the update reaches rank R = h q at h q² numbers per layer."""
    from fedlora.federation import apply_download, client_fit
    from fedlora.methods.ravan import unpack

    heads, r = 2, 4
    sim, rec = run(tiny, "ravan", rounds=2, adapter={"r": r, "alpha": 8},
                   method={"name": "ravan", "head": "shared", "ravan": {"heads": heads}})
    q = r // heads
    init = sim.server.init_state
    for r_ in rec.rounds.values():
        ups, n = r_["uploads"], [u.n_examples for u in r_["uploads"]]
        assert all(factors(u) == {"C", "head"} for u in ups)
        for layer in sim.am.targets:
            blocks = [u.tensors[f"{layer}.C"] for u in ups]
            assert all(tuple(b.shape) == (heads, q, q) for b in blocks)
            c_bar = r_["after"][f"{layer}.C"].double()
            torch.testing.assert_close(c_bar, unpack(weighted(blocks, n)), atol=1e-6, rtol=0)
            a, b = init[f"{layer}.A"].double(), init[f"{layer}.B"].double()
            exact = weighted([b @ unpack(x).double() @ a for x in blocks], n)
            torch.testing.assert_close(b @ c_bar @ a, exact, atol=1e-6, rtol=0)
    layer = sim.am.targets[0]
    assert torch.linalg.matrix_rank(rec.rounds[2]["after"][f"{layer}.C"].double()) == r  # all heads carry rank
    rows = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    blocks_bytes = len(sim.am.targets) * heads * q * q * 4  # per client, each way
    assert rows[0]["up_raw_adapter_per_client"] == blocks_bytes
    assert rows[1]["down_raw_adapter"] == len(sim.train_sets) * blocks_bytes  # downloads carry the blocks too
    # one client's local training: A, B as initialised, C's off-diagonal blocks still zero, its blocks trained
    dl = sim.server.download(0, 3)
    client_fit(sim.am, sim.method, sim.clients[0], dl, sim.train_sets[0], sim.streams[0], sim.cfg.train)
    start = apply_download(sim.clients[0], dl, sim.method).full()
    trained = sim.am.get_state({"A", "B", "C"})
    off = ~unpack(torch.ones(heads, q, q, dtype=torch.bool))
    for layer in sim.am.targets:
        assert torch.equal(trained[f"{layer}.A"], init[f"{layer}.A"])
        assert torch.equal(trained[f"{layer}.B"], init[f"{layer}.B"])
        c = trained[f"{layer}.C"]
        assert torch.count_nonzero(c[off]) == 0 and not torch.equal(c, start[f"{layer}.C"])


def test_ravan_refuses_a_rank_that_does_not_split_into_its_heads(tiny):
    with pytest.raises(ValueError, match="method.ravan.heads"):
        tiny(adapter={"r": 6, "alpha": 12}, method={"name": "ravan", "ravan": {"heads": 4}})


def test_ravan_masks_the_off_diagonal_gradients_before_the_step():
    """The mask acts on the gradients (so gradient clipping sees only the heads'), not on the parameters."""
    from fedlora.methods.ravan import BlockDiagonal, unpack

    c = torch.nn.Parameter(torch.zeros(4, 4))
    c.grad = torch.ones(4, 4)
    BlockDiagonal(2).before_step({"layer.C": c})
    torch.testing.assert_close(c.grad, unpack(torch.ones(2, 2, 2)))
