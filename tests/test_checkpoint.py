"""Incremental checkpoints: each round writes what changed; a resume is bit-exact; state is copy-on-write."""

from __future__ import annotations

import io

import torch
from conftest import make_sim

from fedlora.checkpoint import Checkpointer, flatten, load_checkpoint, unflatten
from fedlora.federation import _leaving, client_fit


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def test_flatten_round_trips():
    x = {"a": [1, 2.5, None, (3, {"t": torch.ones(2)})], 4: {}, "e": [], "s": "x", "b": True}
    assert equal(unflatten(flatten(x)), x)


def test_chain_of_deltas_reloads_every_payload_bit_exact(tmp_path):
    big = {c: {"w": torch.randn(64)} for c in range(20)}
    ck = Checkpointer(tmp_path)
    payloads = []
    for t in range(1, 9):
        big = dict(big)
        big[t % 20] = {"w": torch.randn(64)}  # one client changes per round
        if t == 4:
            del big[7]  # and keys can go away
        p = {"round": t, "clients": big, "history": [{"round": u} for u in range(1, t + 1)],
             "rng": (t, [t, t + 1])}
        ck.save(p)
        payloads.append(p)
        got = load_checkpoint(tmp_path)
        assert got["round"] == t and equal({k: got[k] for k in p}, p)
        if t > 1:  # a delta holds one client, not twenty
            assert ck.last_bytes < ck.base_bytes / 3 or ck.delta_bytes == 0
    names = sorted(f.name for f in (tmp_path / "checkpoint").iterdir())
    assert any(n.startswith("delta_") for n in names)
    # a truncated newest file: the round before it
    newest = max((tmp_path / "checkpoint").glob("*.pt"), key=lambda f: int(f.stem.split("_")[-1]))
    newest.write_bytes(newest.read_bytes()[:40])
    got = load_checkpoint(tmp_path)
    assert got["round"] == 7 and equal({k: got[k] for k in payloads[6]}, payloads[6])


def test_a_chain_compacts_into_a_new_base_and_keeps_the_previous(tmp_path):
    ck = Checkpointer(tmp_path)
    for t in range(1, 12):
        ck.save({"round": t, "x": torch.randn(256)})  # everything changes: deltas as big as the base
    bases = sorted(f.name for f in (tmp_path / "checkpoint").glob("base_*.pt"))
    assert len(bases) == 2  # the current chain and the previous one, older ones deleted
    assert load_checkpoint(tmp_path)["round"] == 11


def test_checkpoint_bytes_per_round_do_not_grow_with_idle_clients_and_resume_is_bit_exact(tmp_path):
    def sim(name, rounds, method, n=30):
        return make_sim(tmp_path / name, method={"name": method},
                        partition={"num_clients": n, "scheme": "iid", "min_partition_size": 5},
                        federation={"rounds": rounds, "clients_per_round": 2}, eval={"every": 3, "global_clients": 2},
                        train={"local_steps": 1, "batch_size": 4})

    small, large = sim("small", 4, "fedsa", 8), sim("large", 4, "fedsa", 48)
    small.run()
    large.run()
    per_round = [sorted(c["bytes"] for c in s.checkpoint_costs[1:])[1] for s in (small, large)]  # median delta
    assert per_round[1] < 1.3 * per_round[0], per_round  # 2 clients change per round, whatever N
    buf = io.BytesIO()
    torch.save(large.snapshot(), buf)
    assert per_round[1] < buf.tell() / 2, (per_round, buf.tell())  # a full write costs more

    for method in ("fedsa", "celora"):
        ref = sim(f"ref-{method}", 6, method)
        ref.run()
        part = sim(method, 3, method)
        part.run()
        resumed = sim(method, 6, method)
        resumed.run(resume=True)
        for r in (ref, resumed):
            for row in r.history:
                row.pop("wall_s")
        assert equal(resumed.history, ref.history)
        assert equal(resumed.server.state_dict(), ref.server.state_dict())
        for cid in ref.clients:
            assert equal(resumed.clients[cid].full(), ref.clients[cid].full()), (method, cid)


def test_initial_states_are_copy_on_write_and_only_what_leaves_is_cloned(tiny):
    sim = tiny(method={"name": "celora", "celora": {"ab_train": "frozen"}}, partition={"num_clients": 4})
    init = sim.init_state
    # no client holds a copy of the initial personal state: all reference the one tensor
    for st in sim.clients.values():
        assert all(v is init[k] for k, v in st.personal.items())
    cid, t = 0, 1
    dl = sim.server.download(cid, t)
    state = sim.clients[cid]
    leaving = _leaving(sim.method, state, t)
    assert leaving == set(sim.am.keys({"C", "head"}))  # frozen A, B never leave the model
    _, new = client_fit(sim.am, sim.method, state, dl, sim.train_sets[cid], sim.streams[cid], sim.cfg.train)
    for k, v in new.personal.items():
        assert (v is init[k]) == (k not in leaving), k  # frozen A, B: still the shared initial tensor
    assert all(not torch.equal(v, init[k]) for k, v in new.personal.items() if k in leaving)  # C, head trained
