"""Secure aggregation over Flower messages: the four stages of fedlora.secagg, moved, nothing more.

    setup   (query)  -> each client's public keys
    share   (query)  -> each client's encrypted shares, routed by the server
    train   (train)  -> the download and the shares for this client; back: the masked vector
    unmask  (query)  -> each survivor's shares of the survivors' seeds and the dropped clients' keys
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Message, RecordDict

from ...secagg import SecAggParams, SecAggServer
from .wire import HELLO, TRAIN, from_record

if TYPE_CHECKING:
    from .server import FlowerServer


def _ok(r: object) -> bool:
    return isinstance(r, Message) and r.has_content() and r.content["status"]["status"] == "ok"


def secure_round(fs: FlowerServer, t: int, plan: dict[int, list],
                 build_train: Callable[[int], Callable[[], RecordDict]],
                 resync: Callable[[int], Callable[[int], None]]) -> tuple[dict, list[dict]]:
    """One training round under secure aggregation on Flower: (the round's row, the clients that failed)."""
    from .server import _Send

    cfg, cids = fs.cfg, list(plan)
    sa = SecAggServer(cids, t, SecAggParams.from_config(cfg.federation, cfg.seed))
    failed: list[dict] = []

    def stage(name: str, who: list[int], extra: Callable[[int], dict]) -> dict[int, ConfigRecord | None]:
        def build(cid: int) -> Callable[[], RecordDict]:
            s0 = fs.server.synced.get(cid, 0)
            return lambda: RecordDict({"secagg": fs.base_config(cid, t, s0, s0, stage=name, **extra(cid))})

        t0 = time.perf_counter()
        replies = fs.exchange(HELLO, t, [_Send(c, build(c)) for c in who])
        fs.times[f"secagg_{name}_s"] = time.perf_counter() - t0
        for c in who:
            if not _ok(replies.get(c)):
                failed.append({"client": c, "reason": f"secagg {name}: {replies.get(c)}"})
        return {c: (replies[c].content["secagg"] if _ok(replies.get(c)) else None) for c in who}

    got = stage("setup", cids, lambda c: {})
    keys = sa.collect_keys({c: (None if r is None else (bytes(r["pk1"]), bytes(r["pk2"]))) for c, r in got.items()})

    def key_config(c: int) -> dict:
        out: dict = {"m": len(cids), "ids": json.dumps(sorted(keys[c]))}
        for n, (a, b) in keys[c].items():
            out[f"pk1/{n}"], out[f"pk2/{n}"] = a, b
        return out

    got = stage("share", sorted(keys), key_config) if not sa.reason else {}
    sent = {c: (None if r is None else {int(k[3:]): bytes(v) for k, v in r.items() if k.startswith("ct/")})
            for c, r in got.items()}
    inbox = sa.route_shares(sent) if not sa.reason else {}

    def train_build(cid: int) -> Callable[[], RecordDict]:
        make = build_train(cid)
        return lambda: RecordDict({**make(), "secagg": ConfigRecord({f"ct/{s}": ct for s, ct in
                                                                      inbox.get(cid, {}).items()})})

    masked, metrics, withheld = {}, {}, {}
    if not sa.reason:
        t0 = time.perf_counter()
        replies = fs.exchange(TRAIN, t, [_Send(c, train_build(c), resync(c)) for c in inbox])
        fs.timing(replies, "train", t0)
        for c in inbox:
            r = replies.get(c)
            masked[c] = None
            if not isinstance(r, Message):
                failed.append({"client": c, "reason": str(r)})
                continue
            status = r.content["status"]
            if status["status"] == "withheld":
                withheld[c] = str(status["reason"])
            elif status["status"] == "ok":
                vec = from_record(r.content["masked"], r.content["masked_dtypes"])
                masked[c] = {k: v.numpy() for k, v in vec.items()}
                metrics[c] = {k: float(v) for k, v in r.content["metrics"].items()}
    ask = sa.collect_masked(masked) if not sa.reason else {}
    if ask:
        got = stage("unmask", sorted(ask), lambda c: {"active": json.dumps(ask[c][0]), "dead": json.dumps(ask[c][1])})
        sa.unmask({c: (None if r is None else {int(k[3:]): bytes(v) for k, v in r.items() if k.startswith("sh/")})
                   for c, r in got.items()})
    t0 = time.perf_counter()
    row = fs.server.finish_secure_round(t, {c: plan[c][1] for c in plan}, sa, metrics, withheld)
    fs.times["aggregate_s"] = time.perf_counter() - t0
    return row, failed
