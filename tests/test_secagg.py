"""Secure aggregation (fedlora.secagg): the unmasked sum is the plain weighted sum within one quantization step,
the server sees nothing correlated with an upload, dropouts after key sharing are unmasked, fewer than the
threshold skip the round, and a method that needs single uploads refuses in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_sim, tiny_config

import fedlora.runtime.simulation as simulation
from fedlora.config import ConfigError, build_config
from fedlora.secagg import (
    WEIGHT,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    check_and_clip,
    mask,
    share_keys_in_process,
    unmask_in_process,
)

PARAMS = SecAggParams(threshold=0.5, neighbours=None, clip_range=8.0, bits=24, seed=0)


def vectors(m: int, seed: int = 0) -> dict[int, tuple[dict[str, np.ndarray], int]]:
    r = np.random.default_rng(seed)
    return {c: ({"l.A": r.normal(size=(4, 6)), "l.B": r.normal(size=(5, 4))}, int(r.integers(5, 50)))
            for c in range(m)}


def plain_mean(vecs: dict, live: list[int]) -> dict[str, np.ndarray]:
    n = sum(vecs[c][1] for c in live)
    return {k: sum(vecs[c][1] * vecs[c][0][k] for c in live) / n for k in vecs[live[0]][0]}


def secure(vecs: dict, drop: set[int] = frozenset(), params: SecAggParams = PARAMS):
    server, clients = share_keys_in_process(sorted(vecs), 1, params)
    unmask_in_process(server, clients, {c: (None if c in drop else v) for c, v in vecs.items()})
    return server


def test_unmasked_mean_equals_plain_weighted_mean_within_the_quantization_step():
    vecs = vectors(4)
    server = secure(vecs)
    mean, n = server.unmask_result
    assert n == sum(v[1] for v in vecs.values())  # the example counts were folded in (factor_combine)
    want = plain_mean(vecs, list(vecs))
    for k in want:
        assert np.abs(mean[k] - want[k]).max() <= PARAMS.step
    coarse = SecAggParams(0.5, None, 8.0, 10, 0)  # a coarser field: the error grows with the step, still within it
    err = max(np.abs(secure(vecs, params=coarse).unmask_result[0][k] - want[k]).max() for k in want)
    assert PARAMS.step < err <= coarse.step


def test_masks_come_from_a_cryptographic_generator():
    a, b = mask(b"k" * 32, [1000]), mask(b"k" * 31 + b"j", [1000])
    assert a[0].dtype == np.uint64 and not np.array_equal(a[0], b[0])
    assert np.array_equal(a[0], mask(b"k" * 32, [1000])[0])  # keyed: both ends of a pair draw the same mask
    assert abs(a[0].astype(np.float64).mean() / 2.0**64 - 0.5) < 0.05  # uniform over the field


def test_one_client_dropped_after_key_sharing_is_still_unmasked():
    vecs = vectors(4, seed=1)
    server = secure(vecs, drop={2})
    assert server.dropped() == [2] and server.reason is None
    mean, n = server.unmask_result
    want = plain_mean(vecs, [0, 1, 3])
    assert n == sum(vecs[c][1] for c in (0, 1, 3))
    assert max(np.abs(mean[k] - want[k]).max() for k in want) <= PARAMS.step


def test_secagg_plus_neighbour_graph_unmasks_with_dropouts():
    vecs = vectors(9, seed=2)
    params = SecAggParams(0.5, 4, 8.0, 24, 0)
    server = secure(vecs, drop={1, 5}, params=params)
    assert all(len(n) == 5 for n in server.graph.values())  # each client and 4 neighbours, not everyone
    want = plain_mean(vecs, [c for c in vecs if c not in (1, 5)])
    assert max(np.abs(server.unmask_result[0][k] - want[k]).max() for k in want) <= params.step


def test_below_the_threshold_nothing_is_unmasked():
    vecs = vectors(3)
    server = secure(vecs, drop={0, 1})  # one survivor of three, threshold 2
    assert server.unmask_result is None and "threshold" in server.reason


def test_masked_vectors_in_any_key_order_are_unmasked():
    """A transport may hand a masked vector back with its keys in another order (a safetensors blob is decoded in
    no fixed order): the server sums and unmasks by name, not by position."""
    vecs = {c: ({f"l{i}.A": v[0]["l.A"] + i for i in range(4)} | {"l.B": v[0]["l.B"]}, v[1])
            for c, v in vectors(3, seed=3).items()}
    server, clients = share_keys_in_process(sorted(vecs), 1, PARAMS)
    order = np.random.default_rng(0)
    masked = {}
    for c, (v, n) in vecs.items():
        m = clients[c].masked_vector(v, n)
        masked[c] = {k: m[k] for k in order.permutation(list(m))}
    ask = server.collect_masked(masked)
    assert server.reason is None, server.reason
    server.unmask({c: clients[c].unmask(*ask[c]) for c in ask})
    want = plain_mean(vecs, list(vecs))
    assert max(np.abs(server.unmask_result[0][k] - want[k]).max() for k in want) <= PARAMS.step
    masked[1] = {k: a for k, a in masked[1].items() if k != WEIGHT}  # no folded-in weight: refused, not misread
    again, _ = share_keys_in_process(sorted(vecs), 1, PARAMS)
    assert again.collect_masked(masked) == {} and "layout" in again.reason


def test_client_state_round_trip_between_every_stage():
    """A Flower client rebuilds itself from `state()` before each stage message: a round run that way unmasks,
    and a rebuilt client still refuses a second unmask request."""
    vecs = vectors(3, seed=4)
    server = SecAggServer(sorted(vecs), 1, PARAMS)
    clients = {c: SecAggClient(c, 1, PARAMS) for c in vecs}

    def rebuilt() -> dict[int, SecAggClient]:
        return {c: SecAggClient.from_state(dict(sa.state()), PARAMS) for c, sa in clients.items()}

    keys = server.collect_keys({c: sa.setup() for c, sa in clients.items()})
    clients = rebuilt()
    sent = {c: clients[c].share_keys(keys[c], len(vecs)) for c in keys}
    clients = rebuilt()
    for c, box in server.route_shares(sent).items():
        clients[c].receive_shares(box)
    masked = {c: clients[c].masked_vector(*vecs[c]) for c in vecs}
    clients = rebuilt()
    ask = server.collect_masked(masked)
    server.unmask({c: clients[c].unmask(*ask[c]) for c in ask})
    want = plain_mean(vecs, list(vecs))
    assert max(np.abs(server.unmask_result[0][k] - want[k]).max() for k in want) <= PARAMS.step
    clients = rebuilt()
    with pytest.raises(SecAggError, match="twice"):
        clients[0].unmask(*ask[0])


def test_a_client_checks_and_clips_its_own_upload():
    spec = {"l.A": ((2, 3), torch.float32)}
    start = {"l.A": torch.zeros(2, 3)}
    bad = {"l.A": torch.tensor([[float("nan"), 0, 0], [0, 0, 0]])}
    assert check_and_clip(bad, spec, start, None, 8.0)[1] == "l.A: contains NaN or Inf"
    assert "shape" in check_and_clip({"l.A": torch.zeros(3, 3)}, spec, start, None, 8.0)[1]
    assert "wrong keys" in check_and_clip({"l.B": torch.zeros(2, 3)}, spec, start, None, 8.0)[1]
    clipped, reason = check_and_clip({"l.A": torch.full((2, 3), 2.0)}, spec, start, 1.0, 8.0)
    assert reason is None and abs(float(clipped["l.A"].norm()) - 1.0) < 1e-6  # clipped to the norm bound
    assert "secagg_clip_range" in check_and_clip({"l.A": torch.full((2, 3), 9.0)}, spec, start, None, 8.0)[1]


def record(monkeypatch) -> dict:
    """Wrap the simulation's stages: the SecAggServer of each round and each client's true vector."""
    seen: dict = {"servers": [], "vectors": []}
    keys, unmask = simulation.share_keys_in_process, simulation.unmask_in_process

    def keys_(*a):
        out = keys(*a)
        seen["servers"].append(out[0])
        return out

    def unmask_(server, clients, vecs):
        seen["vectors"].append(vecs)
        return unmask(server, clients, vecs)

    monkeypatch.setattr(simulation, "share_keys_in_process", keys_)
    monkeypatch.setattr(simulation, "unmask_in_process", unmask_)
    return seen


def test_server_inputs_are_uncorrelated_with_each_upload(tmp_path, monkeypatch):
    seen = record(monkeypatch)
    make_sim(tmp_path, federation={"rounds": 1, "secure_aggregation": True}).run()
    server, vecs = seen["servers"][0], seen["vectors"][0]
    kinds = {kind for kind, _, _ in server.received}
    assert kinds == {"keys", "shares", "masked", "unmask"}
    for kind, cid, payload in server.received:
        if kind != "masked":
            continue  # keys, encrypted shares, shares of seeds: no function of the upload at all
        true = np.concatenate([np.ravel(v) for v in vecs[cid][0].values()])
        seen_ = np.concatenate([np.ravel(v) for k, v in payload.items() if k != WEIGHT]).astype(np.float64)
        assert true.size > 1000
        # what the server got says nothing about the upload: the sample correlation of independent vectors is
        # about N(0, 1/N); 5 standard deviations (masks are fresh each run: a false alarm is one in a million)
        assert abs(np.corrcoef(true, seen_)[0, 1]) < 5 / np.sqrt(true.size)
        assert abs(seen_.mean() / 2.0**64 - 0.5) < 0.05  # uniform over Z_2^64
        assert payload[WEIGHT][0] != vecs[cid][1]  # nor its example count


SUPPORTED = ["fedit", "ffa", "rolora", "fedsa", "fedprox", "scaffold", "ravan", "hetlora", "feddpa"]
TOLERANCE = 1e-4  # on every server-held value after 2 rounds: a few quantization steps, carried through training


@pytest.mark.parametrize("method", SUPPORTED)
def test_secure_run_equals_plain_run_within_tolerance(tmp_path, method):
    extra = {"adapter": {"r": 4, "alpha": 8, "client_ranks": [2, 4, 4]}} if method == "hetlora" else {}
    plain = make_sim(tmp_path / "p", method={"name": method}, **extra)
    plain.run()
    sec = make_sim(tmp_path / "s", method={"name": method}, federation={"rounds": 2, "secure_aggregation": True},
                   **extra)
    sec.run()
    a, b = plain.server, sec.server
    state = {**a.global_state, **{k: v for x in a.extra.values() if isinstance(x, dict)
                                  for k, v in x.get("factors", {}).items()}}
    other = {**b.global_state, **{k: v for x in b.extra.values() if isinstance(x, dict)
                                  for k, v in x.get("factors", {}).items()}}
    assert state and state.keys() == other.keys()
    # SCAFFOLD's variates are (x − y) / (K η): a step of x there is 1 / (K η) times larger (K = 2, η = 1e-3)
    tol = {k: TOLERANCE * (1 if "/" not in k else 1 / (2 * 1e-3)) for k in state}
    assert max((state[k] - other[k]).abs().max().item() / tol[k] for k in state) < 1
    assert max((state[k] - sec.init_state[k]).abs().max().item() for k in state if k in sec.init_state) > 1e-3


def test_dropout_rate_unmasks_or_skips(tmp_path):
    import json

    sim = make_sim(tmp_path, partition={"num_clients": 5, "scheme": "iid"},
                   federation={"rounds": 6, "secure_aggregation": True, "dropout_rate": 0.5}, seed=3)
    sim.run()
    rows = [json.loads(line) for line in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    unmasked = [r for r in rows if r["dropped"] and not r["skipped"]]
    skipped = [r for r in rows if r["skipped"]]
    assert unmasked, "no round had a client drop after key sharing and still unmask"
    assert skipped and all(r["secagg_survivors"] < r["secagg_threshold"] for r in skipped)
    assert all(r["up_secagg_keys"] > 0 and r["down_secagg_shares"] > 0 for r in rows)  # every byte counted
    assert all(r["up_secagg_unmask"] == 0 for r in skipped)  # never partially unmasked: nobody was asked


@pytest.mark.parametrize("method,extra,why", [
    ("celora", {}, "C̄_i"), ("pfedgraph", {}, "cosine"), ("flora", {}, "stacks"), ("flexlora", {}, "SVD"),
    ("fedex", {}, "B_i A_i"), ("lorafair", {}, "B_i A_i"), ("local", {}, "nothing to sum"),
    ("hetlora", {"hetlora": {"aggregation": "sparsity"}}, "sparsity")])
def test_methods_that_need_single_uploads_refuse_in_one_line(tmp_path, method, extra, why):
    cfg = tiny_config(tmp_path, method={"name": method, **extra}, federation={"rounds": 1, "secure_aggregation": True})
    with pytest.raises(ConfigError) as e:
        build_config(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "federation.secure_aggregation" in msg and why in msg, msg
