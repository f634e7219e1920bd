"""Server-side validation: a bad upload is rejected, logged and never averaged in; dropout and min_clients."""

from __future__ import annotations

import json

import torch
from conftest import Recorder

from fedlora.federation import Upload


def poison_client(sim, cid, corrupt):
    """Make client `cid`'s upload bad in the way `corrupt(tensors)` says."""
    import fedlora.runtime.simulation as simulation

    original = simulation.client_fit

    def fit(am, method, state, dl, *args):
        up, new_state = original(am, method, state, dl, *args)
        if dl.client == cid:
            up = Upload(up.client, up.round, corrupt(dict(up.tensors)), up.n_examples, up.metrics)
        return up, new_state

    simulation.client_fit = fit
    return lambda: setattr(simulation, "client_fit", original)


def rows(sim):
    return [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]


def nan_first(t):
    k = next(iter(t))
    t[k] = torch.full_like(t[k], float("nan"))
    return t


def drop_first(t):
    t.pop(next(iter(t)))
    return t


def wrong_shape(t):
    k = next(iter(t))
    t[k] = torch.zeros(t[k].shape[0] + 1, *t[k].shape[1:])
    return t


def huge(t):
    return {k: v * 1e6 for k, v in t.items()}


def test_bad_uploads_are_rejected_and_only_honest_clients_are_averaged(tiny):
    sim = tiny(partition={"num_clients": 6, "scheme": "iid"}, federation={"rounds": 1, "max_update_norm": 1e4})
    rec = Recorder(sim)
    bad = {2: (nan_first, "NaN"), 3: (wrong_shape, "shape"), 4: (huge, "max_update_norm"),
           5: (drop_first, "wrong keys")}
    restores = [poison_client(sim, cid, corrupt) for cid, (corrupt, _) in bad.items()]
    try:
        sim.run()
    finally:
        for restore in reversed(restores):
            restore()
    r = rows(sim)[0]
    assert sorted(x["client"] for x in r["rejected"]) == sorted(bad)
    for x in r["rejected"]:
        assert bad[x["client"]][1] in x["reason"]
    accepted = rec.rounds[1]["uploads"]
    assert sorted(u.client for u in accepted) == [0, 1]
    n0, n1 = accepted[0].n_examples, accepted[1].n_examples
    for k, v in rec.rounds[1]["after"].items():
        if k in accepted[0].tensors:  # the global state is the average of the two honest clients alone
            want = (n0 * accepted[0].tensors[k].double() + n1 * accepted[1].tensors[k].double()) / (n0 + n1)
            torch.testing.assert_close(v.double(), want, atol=1e-6, rtol=0)


def test_dropout_and_min_clients_skip_rounds_without_changing_state(tiny):
    sim = tiny(partition={"num_clients": 6, "scheme": "iid"},
               federation={"rounds": 10, "dropout_rate": 0.3, "min_clients": 5}, eval={"every": 10})
    rec = Recorder(sim)
    before = {k: v.clone() for k, v in sim.server.global_state.items()}
    sim.run()
    r = rows(sim)
    assert len(r) == 10 and sum(len(x["dropped"]) for x in r) > 0
    skipped = [x["round"] for x in r if x["skipped"]]
    assert skipped, "with 6 clients, dropout 0.3 and min_clients 5 some round must be skipped"
    assert not any(t in rec.rounds for t in skipped)  # never aggregated
    for x in r:
        if not x["skipped"]:
            assert 6 - len(x["dropped"]) >= 5
    # state only changes in aggregated rounds: replay the aggregated rounds' after-states
    last = before
    for t in range(1, 11):
        if t in rec.rounds:
            assert all(torch.equal(rec.rounds[t]["before"][k], last[k]) for k in last)
            last = rec.rounds[t]["after"]
    assert all(torch.equal(sim.server.global_state[k], last[k]) for k in last)
