"""In-process simulation: one process, ONE base model (`Run`), every client's adapter state swapped in and out.

Per round: sample clients -> each downloads, trains, uploads -> the server validates and
aggregates -> evaluation -> one line in `metrics.jsonl`. Memory grows with the clients' adapter
states only (server-held tensors are shared by reference, never copied per client).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..adapters.stacked import head_is_stackable
from ..checkpoint import load_checkpoint
from ..compute import rng_state, set_rng_state
from ..config import RunConfig
from ..driver import RunDriver
from ..federation import ClientState, Upload, apply_download, client_fit, clients_fit, secure_vector
from ..run import Run
from ..secagg import SecAggParams, share_keys_in_process, unmask_in_process

log = logging.getLogger("fedlora")


def auto_clients_per_pass(model: torch.nn.Module, cfg: RunConfig) -> int:
    """`clients_per_pass: auto`: 1 on a CPU; on a GPU, as many clients as the free memory holds, from a
    rough estimate of one client's activations kept for backward (batch · tokens · hidden · layers ·
    ~48 bytes in fp32), at most the round's clients."""
    p = next(model.parameters())
    if p.device.type != "cuda":
        return 1
    c = model.config
    hidden, layers = getattr(c, "hidden_size", 768), getattr(c, "num_hidden_layers", 12)
    per_client = cfg.train.batch_size * cfg.model.max_length * hidden * layers * 48 * p.element_size() / 4
    free, _ = torch.cuda.mem_get_info(p.device)
    n = cfg.federation.clients_per_round or cfg.partition.num_clients
    return int(max(1, min(n, 0.7 * free // per_client)))


class Simulation(Run):
    """The in-process runtime: `Run` driven round by round in this process, K clients per pass."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # as Run's
        super().__init__(*args, **kwargs)
        self._warned_sequential = False
        self.driver = RunDriver(self, self)

    # ---- one round ----
    def run_round(self, t: int) -> dict:
        start = time.perf_counter()
        cids = self.server.sample()
        for cid in cids:
            self.send_descriptor(cid, t)
        downloads = {cid: self.server.download(cid, t) for cid in cids}
        secure = None  # secure aggregation: stages 0 and 1 (keys) before training; a client may drop after them
        if self.cfg.federation.secure_aggregation:
            secure = share_keys_in_process(cids, t, SecAggParams.from_config(self.cfg.federation, self.cfg.seed))
            secure = (*secure, {cid: self.clients[cid] for cid in cids})  # the states the uploads start from
        fitted: dict[int, Upload | None] = {}
        live = []
        for cid, dl in downloads.items():
            if self.cfg.federation.dropout_rate and self.dropout_rng.random() < self.cfg.federation.dropout_rate:
                self.clients[cid] = apply_download(self.clients[cid], dl, self.method)  # received, then vanished
                fitted[cid] = None
            else:
                live.append(cid)
        for group in self.passes(live):  # the in-process "transport": K clients per pass, passes one after another
            if len(group) == 1:
                cid = group[0]
                fitted[cid], self.clients[cid] = client_fit(self.am, self.method, self.clients[cid], downloads[cid],
                                                            self.train_sets[cid], self.streams[cid], self.cfg.train)
                continue
            results = clients_fit(self.am, self.method, [self.clients[c] for c in group],
                                  [downloads[c] for c in group], [self.train_sets[c] for c in group],
                                  [self.streams[c] for c in group], self.cfg.train)
            for cid, (up, state) in zip(group, results, strict=True):
                fitted[cid], self.clients[cid] = up, state
        uploads = {cid: fitted[cid] for cid in downloads}  # in sampling order: aggregation sums in this order
        if secure is not None:  # stages 2 and 3: each live client masks its checked upload, the server unmasks
            row = self.secure_finish(t, downloads, secure, uploads)
        else:
            row = self.server.finish_round(t, downloads, uploads)
        if t % self.cfg.eval.every == 0 or t == self.cfg.federation.rounds:
            row |= self.evaluate(generate=t == self.cfg.federation.rounds)
        row["wall_s"] = time.perf_counter() - start
        return row

    def secure_finish(self, t: int, downloads: dict, secure: tuple, uploads: dict[int, Upload | None]) -> dict:
        server, clients, starts = secure
        spec = self.method.upload_spec(t, self.server.spec)
        vectors, withheld = {}, {}
        for cid, up in uploads.items():
            vectors[cid] = None
            if up is not None:
                vec, reason = secure_vector(self.method, starts[cid], downloads[cid], up, spec, self.cfg.federation)
                vectors[cid] = None if vec is None else (vec, up.n_examples)
                if reason:
                    withheld[cid] = reason
        unmask_in_process(server, clients, vectors)
        metrics = {cid: up.metrics for cid, up in uploads.items() if up is not None}
        return self.server.finish_secure_round(t, downloads, server, metrics, withheld)

    def clients_per_pass(self) -> int:
        """K of `train.clients_per_pass`, resolved; 1 where a pass of several clients cannot be batched."""
        k = self.cfg.train.clients_per_pass
        if k == "auto":
            k = auto_clients_per_pass(self.am.model, self.cfg)
        k = min(k, len(self.train_sets))  # a pass holds at most every trainer (one, for the centralized reference)
        # fp16: one loss scale (and one skipped step on overflow) would be shared by the pass's clients
        if k > 1 and (not self.method.batchable or not head_is_stackable(self.am)
                      or self.am.precision == "fp16"
                      or self.task.images is not None):  # image tasks: one client at a time
            if not self._warned_sequential:
                log.info("train.clients_per_pass=%d: method %s trains its clients one after another",
                         k, self.method.name)
                self._warned_sequential = True
            return 1
        return k

    def passes(self, cids: list[int]) -> list[list[int]]:
        """The round's live clients in passes of at most K, clients with equal state shapes together."""
        k = self.clients_per_pass()
        if k == 1:
            return [[c] for c in cids]
        by_shape: dict[tuple, list[int]] = {}
        for c in cids:
            by_shape.setdefault(tuple((n, tuple(v.shape)) for n, v in self.clients[c].full().items()), []).append(c)
        return [g[i:i + k] for g in by_shape.values() for i in range(0, len(g), k)]

    # ---- what the run driver asks of a runtime ----
    def snapshot(self) -> dict:
        """Everything a bit-identical resume needs: the run's part, every client's state, the batch streams and
        this process's generators (written incrementally, see checkpoint.py)."""
        snap = super().snapshot()
        server = self.server
        clients = {}
        for cid, st in self.clients.items():
            # a shared tensor that IS the server's current one is stored once, as a reference
            shared = {k: (None if v is server.global_state.get(k) else v) for k, v in st.shared.items()}
            clients[cid] = {"shared": shared, "personal": st.personal}
        snap["rng"] |= {"torch": torch.get_rng_state(), "python": random.getstate(), **rng_state(self.device)}
        return snap | {"clients": clients, "streams": [s.state() for s in self.streams]}

    def restore(self, ck: dict) -> None:
        super().restore(ck)
        server = self.server
        self.clients = {
            cid: ClientState({k: (server.global_state[k] if v is None else v) for k, v in c["shared"].items()},
                             c["personal"]) for cid, c in ck["clients"].items()}
        for stream, state in zip(self.streams, ck["streams"], strict=True):
            stream.load(state)
        torch.set_rng_state(ck["rng"]["torch"])
        set_rng_state(ck["rng"])
        random.setstate(ck["rng"]["python"])

    def evaluate_now(self) -> dict:
        return self.evaluate(generate=self.vlm is not None)  # a VLM's starting VQA accuracy needs its answers

    def final_models(self) -> tuple[dict[str, torch.Tensor] | None, Iterable[tuple[int, dict[str, torch.Tensor]]]]:
        return (self.eval_state(0) if self.single_model() else None,
                ((cid, self.eval_state(cid)) for cid in range(self.num_clients)))

    def summary_extra(self) -> dict:
        return {}

    @property
    def checkpoint_costs(self) -> list[dict]:
        """Bytes and seconds of each round's checkpoint written by this process."""
        return self.driver.checkpoint_costs

    # ---- the whole run ----
    def run(self, on_round: Callable[[dict], None] | None = None, resume: bool = False) -> dict:
        """Run every round; with `resume`, continue after the last complete checkpointed round."""
        self.driver = RunDriver(self, self)
        return self.driver.drive(load_checkpoint(self.run_dir) if resume else None, on_round)
