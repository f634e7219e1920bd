"""Heterogeneous client ranks and the methods built on them: HetLoRA, FlexLoRA, FLoRA, FedEx-LoRA."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import Recorder, make_sim, tiny_config
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlora.adapters import LowRankLinear
from fedlora.cli import app
from fedlora.config import ConfigError, build_config
from fedlora.ranks import client_ranks

DIRICHLET = {"num_clients": 3, "scheme": "dirichlet", "alpha": 1.0, "min_partition_size": 20}
RANKS = [4, 8, 2]
runner = CliRunner()


def run(tmp_path, name, rounds=2, ranks=RANKS, head="personal", **kw):
    sim = make_sim(tmp_path / name, method={"name": name, "head": head, **kw.pop("method", {})},
                   adapter={"r": 4, "alpha": 8, "client_ranks": ranks}, federation={"rounds": rounds},
                   partition=DIRICHLET, **kw)
    rec = Recorder(sim)
    sim.run()
    return sim, rec


def rows_of(sim):
    return [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]


def weighted(tensors, weights):
    w = torch.tensor(weights, dtype=torch.float64)
    return sum((wi / w.sum()) * t.double() for wi, t in zip(w, tensors, strict=True))


def layer_sizes(sim):
    return [tuple(layer.base.weight.shape) for layer in sim.am.layers.values()]  # (k, d) per adapted layer


# ---------------------------------------------------------------- client ranks


def test_client_ranks_list_and_seeded_tiers(tmp_path):
    base = tiny_config(tmp_path, partition={"num_clients": 10, "scheme": "iid"})
    as_list = build_config(base, {"adapter": {"client_ranks": [2, 4, 8, 16, 2, 4, 8, 16, 2, 2]}})
    assert client_ranks(as_list) == [2, 4, 8, 16, 2, 4, 8, 16, 2, 2]
    tiers = {4: 0.5, 8: 0.3, 16: 0.2}
    drawn = [client_ranks(build_config(base, {"seed": s, "adapter": {"client_ranks": tiers}})) for s in (0, 0, 1)]
    assert drawn[0] == drawn[1] != drawn[2]  # seeded: the same seed the same assignment
    for d in drawn:
        assert sorted(d) == [4] * 5 + [8] * 3 + [16] * 2
    assert client_ranks(build_config(base)) == [4] * 10  # adapter.r for everyone


@pytest.mark.parametrize("ranks,words", [([2, 4], "2 ranks for partition.num_clients 3"),
                                         ({2: 0.5, 4: 0.4}, "sum to 1"), ([2, 0, 4], "positive")])
def test_client_ranks_errors_name_the_field(tmp_path, ranks, words):
    with pytest.raises(ConfigError, match=words):
        build_config(tiny_config(tmp_path, adapter={"client_ranks": ranks}))


@pytest.mark.parametrize("method", ["fedit", "fedex", "rolora", "celora"])
def test_methods_without_mixed_ranks_refuse_them_in_one_line(tmp_path, method):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path, method={"name": method}, adapter={"client_ranks": RANKS})))
    res = runner.invoke(app, ["run", str(cfg)])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "cannot take mixed ranks" in res.output and "adapter.client_ranks" in res.output


def test_rank_padded_layer_trains_exactly_like_the_small_layer():
    """A rank-2 state trained inside a rank-8 layer (rest zero) matches a rank-2 layer, and the padding stays 0."""
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    small, big = LowRankLinear(base, 2, 8.0, scale=2.0), LowRankLinear(base, 8, 8.0, scale=2.0)
    with torch.no_grad():
        small.B.normal_()
        big.A.copy_(torch.cat([small.A, torch.zeros(6, 12)]))
        big.B.copy_(torch.cat([small.B, torch.zeros(10, 6)], dim=1))
    x = torch.randn(16, 12)
    for layer in (small, big):
        opt = torch.optim.AdamW([layer.A, layer.B], lr=1e-2, weight_decay=0.01)
        for _ in range(5):
            layer(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert torch.equal(big.A[2:], torch.zeros(6, 12)) and torch.equal(big.B[:, 2:], torch.zeros(10, 6))
    torch.testing.assert_close(big.A[:2], small.A, atol=1e-6, rtol=0)
    torch.testing.assert_close(big.B[:, :2], small.B, atol=1e-6, rtol=0)


def test_uploads_and_bytes_are_per_client_by_its_own_rank(tmp_path):
    sim, rec = run(tmp_path, "hetlora")
    assert sim.method.ranks == RANKS and all(layer.r == 8 for layer in sim.am.layers.values())
    for r in rec.rounds.values():
        for u in r["uploads"]:
            ri = RANKS[u.client]
            assert all(v.shape[0 if k.endswith(".A") else 1] == ri for k, v in u.tensors.items())
    numbers = sum(r * (k + d) for r in RANKS for k, d in layer_sizes(sim))
    assert all(row["up_raw_adapter"] == 4 * numbers and not row["rejected"] for row in rows_of(sim))
    # an upload at another client's rank is rejected, naming the shape
    u = rec.rounds[1]["uploads"][0]
    other = next(c for c in range(3) if RANKS[c] != RANKS[u.client])
    u.client = other
    assert "shape" in sim.server.validate(u, 1)


# ---------------------------------------------------------------- HetLoRA


def test_hetlora_zero_pads_and_a_rank4_client_receives_the_leading_4_components(tmp_path):
    sim, rec = run(tmp_path, "hetlora")
    ups, p = rec.rounds[2]["uploads"], [u.n_examples for u in rec.rounds[2]["uploads"]]
    factors = sim.server.extra["hetlora"]["factors"]  # after round 2
    key = f"{sim.am.targets[0]}.A"
    padded = [torch.cat([u.tensors[key].double(), torch.zeros(8 - u.tensors[key].shape[0], 32, dtype=torch.float64)])
              for u in ups]
    torch.testing.assert_close(factors[key].double(), weighted(padded, p), atol=1e-6, rtol=0)
    # component 5..8 is held by the rank-8 client only: zero padding shrinks it by that client's weight p_i < 1
    i8 = next(i for i, u in enumerate(ups) if RANKS[u.client] == 8)
    assert factors[key][4:].abs().sum() > 0
    torch.testing.assert_close(factors[key][4:].double(), p[i8] / sum(p) * ups[i8].tensors[key][4:].double(),
                               atol=1e-6, rtol=0)
    rank4 = RANKS.index(4)
    dl = sim.method.download(sim.server, rank4, 3)
    for k, v in factors.items():
        want = v[:4] if k.endswith(".A") else v[:, :4]
        assert torch.equal(dl[k], want)
    up2 = next(u for u in rec.rounds[2]["uploads"] if u.client == rank4)
    assert up2.tensors[key].shape == (4, 32)


def test_hetlora_sparsity_weights_follow_the_update_norms(tmp_path):
    sim, rec = run(tmp_path, "hetlora", rounds=1, method={"hetlora": {"aggregation": "sparsity"}})
    ups = rec.rounds[1]["uploads"]
    layer = sim.am.targets[0]
    norms = [float((u.tensors[f"{layer}.B"].double() @ u.tensors[f"{layer}.A"].double()).norm()) for u in ups]
    assert sim.method.weights(ups, layer) == pytest.approx(norms)
    key = f"{layer}.B"
    padded = [torch.cat([u.tensors[key].double(), torch.zeros(32, 8 - u.tensors[key].shape[1], dtype=torch.float64)],
                        dim=1) for u in ups]
    torch.testing.assert_close(sim.server.extra["hetlora"]["factors"][key].double(), weighted(padded, norms),
                               atol=1e-6, rtol=0)


def test_hetlora_self_pruning_shrinks_rank_uploads_and_bytes(tmp_path):
    sim = make_sim(tmp_path, method={"name": "hetlora", "head": "personal", "hetlora": {"prune_gamma": 0.5}},
                   adapter={"r": 4, "alpha": 8, "client_ranks": RANKS}, federation={"rounds": 3}, partition=DIRICHLET)
    rows = [sim.run_round(1)]
    st = sim.server.extra["hetlora"]
    assert st["ranks"] == {} and set(st["tail"]) == {0, 1, 2}  # first upload: the tail is only recorded
    st["tail"][1] = math.inf  # client 1 (rank 8): its tail "shrank" at round 2
    rows.append(sim.run_round(2))
    assert st["ranks"][1] == 4 and sim.method.client_rank(sim.server, 1) == 4
    now = [sim.method.client_rank(sim.server, c) for c in range(3)]  # others may have pruned by the rule too
    assert all(r <= r0 for r, r0 in zip(now, RANKS, strict=True))
    rows.append(sim.run_round(3))
    assert not rows[2]["rejected"]
    sizes = layer_sizes(sim)
    assert rows[2]["up_raw_adapter"] == 4 * sum(r * (k + d) for r in now for k, d in sizes)
    assert rows[2]["up_raw_adapter"] < rows[0]["up_raw_adapter"]
    assert sim.clients[1].personal[f"{sim.am.targets[0]}.A"].shape == (4, 32)


# ---------------------------------------------------------------- FlexLoRA


def test_flexlora_download_is_the_best_rank_r_approximation_and_counted_at_r(tmp_path):
    sim, rec = run(tmp_path, "flexlora")
    ups, p = rec.rounds[2]["uploads"], [u.n_examples for u in rec.rounds[2]["uploads"]]
    for layer in sim.am.targets:
        full = weighted([u.tensors[f"{layer}.B"].double() @ u.tensors[f"{layer}.A"].double() for u in ups], p)
        u_, s, vh = torch.linalg.svd(full)
        for cid, r in enumerate(RANKS):
            dl = sim.method.download(sim.server, cid, 3)
            got = dl[f"{layer}.B"].double() @ dl[f"{layer}.A"].double()
            assert dl[f"{layer}.A"].shape == (r, 32) and dl[f"{layer}.B"].shape == (32, r)
            torch.testing.assert_close(got, u_[:, :r] @ torch.diag(s[:r]) @ vh[:r], atol=1e-5, rtol=0)
            # Eckart–Young: the error is the energy of the dropped singular values
            assert (full - got).norm() ** 2 == pytest.approx(float(s[r:].pow(2).sum()), rel=1e-3, abs=1e-9)
    down = sum(r * (k + d) for r in RANKS for k, d in layer_sizes(sim))
    assert rows_of(sim)[1]["down_raw_adapter"] == 4 * down  # r_i (d + k) per client, never k × d


# ---------------------------------------------------------------- FLoRA


def test_flora_stacking_is_exact_and_its_downlink_grows_with_the_sum_of_ranks(tmp_path):
    sim, rec = run(tmp_path, "flora")
    s = 8 / 4
    for r in rec.rounds.values():
        ups, p = r["uploads"], [u.n_examples for u in r["uploads"]]
        for layer in sim.am.targets:
            want = weighted([u.tensors[f"{layer}.B"].double() @ u.tensors[f"{layer}.A"].double() for u in ups], p)
            got = r["after"][f"{layer}.W"].double() - r["before"][f"{layer}.W"].double()
            torch.testing.assert_close(got, s * want, atol=1e-6, rtol=0)
            assert got.abs().max() > 1e-6
            # the LoRA restarts: A, B on the server never change, so each round starts from the seeded init
            assert torch.equal(r["after"][f"{layer}.A"], sim.init_state[f"{layer}.A"])
    sizes = layer_sizes(sim)
    per_client = sum(sum(RANKS) * (k + d) for k, d in sizes)
    assert rows_of(sim)[1]["down_raw_adapter"] == 3 * 4 * per_client
    uniform, _ = run(tmp_path / "u", "flora", ranks=[2, 2, 2])
    assert rows_of(uniform)[1]["down_raw_adapter"] == 3 * 4 * sum(6 * (k + d) for k, d in sizes)
    # the base weights W0 are untouched: W lives beside them
    sim2 = make_sim(tmp_path / "fresh", method={"name": "flora"}, partition=DIRICHLET)
    for name, layer in sim.am.layers.items():
        assert torch.equal(layer.base.weight, sim2.am.layers[name].base.weight)


def test_flora_refuses_peft_export_and_resumes_bit_identically(tmp_path):
    def build(rounds, out):
        return make_sim(tmp_path / out, method={"name": "flora"}, adapter={"r": 4, "alpha": 8, "client_ranks": RANKS},
                        federation={"rounds": rounds}, partition=DIRICHLET)

    ref = build(3, "ref")
    ref.run()
    part = build(2, "part")
    part.run()
    resumed = build(3, "part")
    resumed.run(resume=True)
    strip = [{k: v for k, v in r.items() if k != "wall_s"} for r in rows_of(ref)]
    assert strip == [{k: v for k, v in r.items() if k != "wall_s"} for r in rows_of(resumed)]
    for f in ("server.safetensors", "client_0.safetensors", "global.safetensors"):
        a, b = load_file(str(ref.run_dir / "states" / f)), load_file(str(resumed.run_dir / "states" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert any(k.endswith(".W") for k in a) or f == "client_0.safetensors"
    res = runner.invoke(app, ["export", str(ref.run_dir), "--client", "0", "--out", str(tmp_path / "peft")])
    assert res.exit_code == 2 and "cannot hold them" in res.output and len(res.output.strip().splitlines()) == 1


# ---------------------------------------------------------------- FedEx-LoRA


def test_fedex_effective_weight_is_the_average_of_client_weights(tmp_path):
    sim, rec = run(tmp_path, "fedex", ranks=None)
    s = 8 / 4
    for r in rec.rounds.values():
        ups, p = r["uploads"], [u.n_examples for u in r["uploads"]]
        for name, layer in sim.am.layers.items():
            w0 = layer.base.weight.double()
            clients = [w0 + r["before"][f"{name}.W"].double()
                       + s * u.tensors[f"{name}.B"].double() @ u.tensors[f"{name}.A"].double() for u in ups]
            after = w0 + r["after"][f"{name}.W"].double() + s * r["after"][f"{name}.B"].double() @ r["after"][
                f"{name}.A"].double()
            torch.testing.assert_close(after, weighted(clients, p), atol=1e-6, rtol=0)
            assert (r["after"][f"{name}.W"] - r["before"][f"{name}.W"]).abs().max() > 1e-7  # a residual was folded
    # the download: Ā, B̄ and the full k × d residual, every client, every round after the first
    per_client = sum(4 * (k + d) + k * d for k, d in layer_sizes(sim))
    assert rows_of(sim)[1]["down_raw_adapter"] == 3 * 4 * per_client


# ---------------------------------------------------------------- compare


def test_compare_runs_the_new_methods_on_three_clients(tmp_path):
    for tag, adapter, methods in (("same", {}, "hetlora,flexlora,flora,fedex"),
                                  ("mixed", {"client_ranks": RANKS}, "hetlora,flexlora,flora")):
        cfg = tmp_path / f"{tag}.yaml"
        cfg.write_text(yaml.safe_dump(tiny_config(tmp_path, name=tag, adapter=adapter, federation={"rounds": 2})))
        res = runner.invoke(app, ["compare", str(cfg), "--methods", methods, "--out", str(tmp_path / tag)])
        assert res.exit_code == 0, res.output
        report = (tmp_path / tag / "report.md").read_text()
        assert all(f"| {m} |" in report for m in methods.split(","))


def test_a_low_rank_client_exports_at_its_own_rank_and_loads_in_peft(tmp_path):
    from peft import PeftModel

    from fedlora.models import load_classifier, load_tokenizer

    sim, _ = run(tmp_path, "hetlora", rounds=1)
    cid = RANKS.index(2)
    out = tmp_path / "peft"
    res = runner.invoke(app, ["export", str(sim.run_dir), "--client", str(cid), "--out", str(out)])
    assert res.exit_code == 0, res.output
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["r"] == 2 and conf["lora_alpha"] / conf["r"] == 8 / 4  # the run's scale at rank 2
    x = dict(load_tokenizer("tiny-bert")(["river ocean lake"], return_tensors="pt"))
    sim.am.set_state(load_file(str(sim.run_dir / "states" / f"client_{cid}.safetensors")))
    peft_model = PeftModel.from_pretrained(load_classifier("tiny-bert", sim.task.num_labels, 0), out).eval()
    assert torch.allclose(sim.am.model(**x).logits, peft_model(**x).logits, atol=1e-5)


def test_set_state_at_a_lower_rank_zeroes_the_rest_and_get_state_returns_that_rank(tmp_path):
    sim = make_sim(tmp_path, method={"name": "hetlora"}, adapter={"r": 4, "alpha": 8, "client_ranks": RANKS})
    layer = sim.am.targets[0]
    full = {k: torch.randn_like(v) for k, v in sim.init_state.items() if k.startswith(layer + ".")}
    sim.am.set_state(full)  # rank 8 everywhere in this layer
    sim.am.set_state({f"{layer}.A": full[f"{layer}.A"][:2], f"{layer}.B": full[f"{layer}.B"][:, :2]})
    lr = sim.am.layers[layer]
    assert torch.equal(lr.A[2:], torch.zeros_like(lr.A[2:])) and torch.equal(lr.B[:, 2:], torch.zeros_like(lr.B[:, 2:]))
    got = sim.am.get_state({"A", "B"})
    assert got[f"{layer}.A"].shape == (2, 32) and got[f"{layer}.B"].shape == (32, 2)
    with pytest.raises(ValueError, match="different ranks"):
        sim.am.set_state({f"{layer}.A": full[f"{layer}.A"][:2], f"{layer}.B": full[f"{layer}.B"][:, :4]})


def test_api_export_of_a_mixed_rank_client_equals_cli_export_and_the_run(tmp_path):
    """The API's export and `fedlora export` read one adapter metadata (Run.adapter_meta): with adapter.r 2 and
    client ranks [2, 4], client 1 (rank 4) keeps the run's scale alpha / r = 8 in both, and both give its logits."""
    from peft import PeftModel

    import fedlora
    from fedlora.models import load_classifier, load_tokenizer

    rows = [{"sentence": f"{w} river ocean lake {i}", "y": i % 2} for i, w in enumerate(["a", "b", "c", "d"] * 12)]
    result = fedlora.federate(
        model=load_classifier("tiny-bert", 2, 0), tokenizer=load_tokenizer("tiny-bert"), clients=[rows[:24], rows[24:]],
        method="hetlora", columns={"text_column": "sentence", "label_column": "y"}, run_dir=tmp_path / "api",
        adapter={"r": 2, "alpha": 16, "client_ranks": [2, 4]}, federation={"rounds": 1}, train={"local_steps": 2})
    api_dir = result.export(1, tmp_path / "api-peft")
    res = runner.invoke(app, ["export", str(result.run_dir), "--client", "1", "--out", str(tmp_path / "cli-peft")])
    assert res.exit_code == 0, res.output
    api_conf = json.loads((api_dir / "adapter_config.json").read_text())
    cli_conf = json.loads((tmp_path / "cli-peft" / "adapter_config.json").read_text())
    assert api_conf == cli_conf and api_conf["r"] == 4 and api_conf["lora_alpha"] == 4 * 16 / 2
    x = dict(load_tokenizer("tiny-bert")(["river ocean lake"], return_tensors="pt"))
    logits = []
    for d in (api_dir, tmp_path / "cli-peft"):
        logits.append(PeftModel.from_pretrained(load_classifier("tiny-bert", 2, 0), d).eval()(**x).logits)
    from fedlora.adapters import inject_adapters

    am = inject_adapters(load_classifier("tiny-bert", 2, 0), ["query", "value"], r=4, alpha=16, scale=8.0)
    am.set_state(result.adapters[1])
    assert torch.equal(logits[0], logits[1])
    assert torch.allclose(am.model(**x).logits, logits[0], atol=1e-5)
