"""The ServerApp: the simulation's rounds with Flower messages as the transport (see the package docstring)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ...checkpoint import load_checkpoint
from ...config import build_config
from ...driver import RunDriver
from ...evaluation import combine, measure_global, plan_evaluation, write_samples
from ...federation import Upload
from ...methods import get_method
from ...methods.capabilities import DownloadWire
from ...run import Run
from ..flower_constants import RUN_CONFIG_DEFAULTS, write_run_key
from .patches import TRACE, fast_object_pulls
from .secure import secure_round
from .wire import (
    EVALUATE,
    HELLO,
    RETRYABLE,
    TRAIN,
    array_bytes,
    config_hash,
    from_record,
    message_bytes,
    results_from_record,
    to_record,
)

log = logging.getLogger("fedlora")

# ---------------------------------------------------------------- the server side


class _Send:
    """One message to one client, re-buildable for a retry on another node or after a resync."""

    def __init__(self, cid: int, build: Callable[[], RecordDict], on_resync: Callable[[int], None] | None = None):
        self.cid, self.build, self.on_resync = cid, build, on_resync
        self.attempts, self.resyncs, self.node, self.msg_id, self.waiting_since = 0, 0, None, None, None


def check_flower_method(cfg) -> None:
    """ValueError for a method that the Flower runtimes cannot run."""
    if get_method(cfg.method.name).pooled:
        raise ValueError(f"method '{cfg.method.name}' pools every client's data in one trainer: "
                         f"it has no federated form; run it with `fedlora run`")
    if issubclass(get_method(cfg.method.name), DownloadWire):
        raise ValueError(f"method '{cfg.method.name}' sends downloads that the client decodes (stacked "
                         f"factors), which this runtime does not do yet; run it with `fedlora run`")


class FlowerServer:
    """The ServerApp's loop: the simulation's rounds, with Flower messages as the transport."""

    def __init__(self, grid: Grid, context: Context):
        rc = {**RUN_CONFIG_DEFAULTS, **dict(context.run_config)}
        if not str(rc["config"]).strip():
            raise ValueError("run config 'config' is empty: start runs with `fedlora flower run CONFIG.yaml`")
        self.grid, self.rc, self.cfg_text = grid, rc, str(rc["config"])
        self.cfg_key = config_hash(self.cfg_text)
        self.cfg = build_config(yaml.safe_load(self.cfg_text))
        self.files = self.cfg.partition.scheme == "files"  # node-local data: this process reads no client's data
        if self.files and (self.cfg.partition.files or self.cfg.partition.test_files):
            raise ValueError("the run's config names client files (partition.files): on Flower each SuperNode "
                             "brings its own (`fedlora flower run` drops them)")
        self.num_clients = self.cfg.partition.num_clients
        self.run_dir = Path(str(rc["run-dir"]) or str(Path(self.cfg.output.dir) / self.cfg.name)).expanduser()
        self.sim: Run | None = None  # built once the nodes have said which labels they hold
        self.labels: list[str] | None = None
        self.node_labels: dict[int, list[str]] = {}
        check_flower_method(self.cfg)
        self.poll = float(rc["poll-interval"])
        self.wire = str(rc["wire"])
        if self.wire not in ("packed", "arrays"):
            raise ValueError(f"run config 'wire' must be 'packed' or 'arrays', got '{self.wire}'")
        self.nodes: dict[int, int] = {}  # partition -> node id (the newest node that claimed it)
        self.node_cid: dict[int, int] = {}  # node id -> partition
        self.bad_nodes: set[int] = set()
        self.hellos: dict[str, int] = {}  # pending hello message id -> node id
        self.last_discovery = 0.0
        self.flower = {k: 0 for k in ("down_array_bytes", "down_message_bytes", "up_array_bytes", "up_message_bytes",
                                      "eval_message_bytes", "messages", "resent")}
        self.cum_flower = dict.fromkeys(self.flower, 0)
        self.times: dict[str, float] = {}  # where a round's wall time went (time_* columns)

    # ---- nodes ----
    def discover(self, force: bool = False) -> None:
        """Ask new nodes which partition they are; forget nodes that left."""
        now = time.monotonic()
        if not force and now - self.last_discovery < 1.0:
            return
        self.last_discovery = now
        online = set(self.grid.get_node_ids())
        for node in list(self.node_cid):
            if node not in online:
                cid = self.node_cid.pop(node)
                if self.nodes.get(cid) == node:
                    del self.nodes[cid]
                    log.warning("client %d: its SuperNode %d left", cid, node)
        asked = set(self.hellos.values())
        new = [n for n in online if n not in self.node_cid and n not in self.bad_nodes and n not in asked]
        if new:
            msgs = [Message(RecordDict({"hello": ConfigRecord({"run": "fedlora"})}), dst_node_id=n, message_type=HELLO)
                    for n in new]
            for n, mid in zip(new, self.grid.push_messages(msgs), strict=True):
                if mid:
                    self.hellos[mid] = n

    def on_hello(self, node: int, reply: Message) -> None:
        if reply.has_error():
            reason = (reply.error.reason or "").strip().splitlines()
            log.error("SuperNode %d refused to join: %s", node, reason[-1] if reason else reply.error.code)
            self.bad_nodes.add(node)
            return
        s = reply.content["status"]
        cid, n = int(s["partition-id"]), int(s["num-partitions"])
        if n != self.num_clients or not 0 <= cid < n:
            log.error("SuperNode %d is partition %d of %d, but this run has partition.num_clients = %d: ignored",
                      node, cid, n, self.num_clients)
            self.bad_nodes.add(node)
            return
        if self.files != ("labels" in s):
            log.error("SuperNode %d (client %d): %s: ignored", node, cid,
                      "holds no data of its own (--data), but the run's partition.scheme is 'files'" if self.files
                      else "holds its own data (--data), but the run's partition.scheme is not 'files'")
            self.bad_nodes.add(node)
            return
        if self.files:
            self.node_labels[cid] = json.loads(str(s["labels"]))
        if cid in self.nodes and self.nodes[cid] != node:
            log.warning("client %d: SuperNode %d replaces SuperNode %d", cid, node, self.nodes[cid])
        self.nodes[cid], self.node_cid[node] = node, cid

    def wait_for_nodes(self, cids: list[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.discover(force=True)
            self.collect_hellos()
            if all(c in self.nodes for c in cids) or time.monotonic() > deadline:
                return
            time.sleep(max(self.poll, 0.2))

    def collect_hellos(self) -> None:
        if self.hellos:
            for r in self.grid.pull_messages(list(self.hellos)):
                node = self.hellos.pop(r.metadata.reply_to_message_id, None)
                if node is not None:
                    self.on_hello(node, r)

    # ---- one exchange: a message per client, replies back ----
    def exchange(self, kind: str, t: int, sends: list[_Send]) -> dict[int, Message | str]:
        """Send every client its message and wait for the replies: {cid: reply, or the reason it failed}."""
        rc, out = self.rc, {}
        deadline = time.monotonic() + float(rc["round-timeout"])
        todo = {s.cid: s for s in sends}
        pending: dict[str, _Send] = {}

        def push(batch: list[_Send]) -> None:
            msgs = []
            for s in batch:
                s.node, s.attempts, s.waiting_since = self.nodes[s.cid], s.attempts + 1, None
                msgs.append(Message(s.build(), dst_node_id=s.node, message_type=kind, group_id=str(t)))
            t_push = time.time()
            ids = self.grid.push_messages(msgs)
            if TRACE:
                print(f"fedlora-trace server {kind} push {t_push:.3f} -> {time.time():.3f}", flush=True)
            for s, m, mid in zip(batch, msgs, ids, strict=True):
                self.count(kind, m, up=False)
                if s.attempts > 1:
                    self.flower["resent"] += 1
                if mid:
                    s.msg_id, pending[mid] = mid, s
                else:
                    s.msg_id, s.waiting_since = None, time.monotonic()

        def retry(s: _Send, reason: str) -> None:
            if s.attempts >= int(rc["max-attempts"]):
                out[s.cid] = reason
                todo.pop(s.cid, None)
            else:
                log.warning("round %d: client %d: %s; sending again", t, s.cid, reason)
                s.msg_id, s.node, s.waiting_since = None, None, time.monotonic()

        push([s for s in sends if s.cid in self.nodes])
        for s in sends:
            if s.cid not in self.nodes:
                s.waiting_since = time.monotonic()
        while todo and time.monotonic() < deadline:
            ids = list(pending) + list(self.hellos)
            for r in self.grid.pull_messages(ids) if ids else []:
                mid = r.metadata.reply_to_message_id
                if mid in self.hellos:
                    self.on_hello(self.hellos.pop(mid), r)
                    continue
                s = pending.pop(mid, None)
                if s is None or s.msg_id != mid or s.cid not in todo:
                    continue  # a reply to a message that was superseded
                self.count(kind, r, up=True)
                if TRACE:
                    print(f"fedlora-trace server {kind} reply client {s.cid} {time.time():.3f}", flush=True)
                if r.has_error():
                    reason = f"error {r.error.code}: {(r.error.reason or '').splitlines()[0][:300]}"
                    if r.error.code in RETRYABLE:
                        retry(s, reason)
                    else:
                        out[s.cid], _ = reason, todo.pop(s.cid)
                    continue
                status = r.content["status"]
                if status["status"] == "resync" and s.on_resync is not None and s.resyncs < 3:
                    s.on_resync(int(status["have"]))
                    s.attempts, s.resyncs = s.attempts - 1, s.resyncs + 1  # a resync is not a failure
                    s.msg_id, s.waiting_since = None, time.monotonic()
                    continue
                out[s.cid], _ = r, todo.pop(s.cid)
            self.discover()
            for s in todo.values():  # a message stuck on a node that has left or was replaced
                if s.msg_id is not None and self.nodes.get(s.cid) != s.node:
                    pending.pop(s.msg_id, None)
                    retry(s, f"SuperNode {s.node} is gone")
            ready = [s for s in todo.values() if s.msg_id is None and s.cid in self.nodes]
            if ready:
                push(ready)
            for s in list(todo.values()):
                if s.msg_id is None and time.monotonic() - s.waiting_since > float(rc["node-wait"]):
                    out[s.cid], _ = f"no SuperNode for partition {s.cid}", todo.pop(s.cid)
            if todo:
                time.sleep(self.poll)
        for cid in todo:
            out[cid] = "timed out"
        return out

    def count(self, kind: str, msg: Message, up: bool) -> None:
        n = message_bytes(msg)
        self.flower["messages"] += 1
        if kind == EVALUATE:
            self.flower["eval_message_bytes"] += n
        else:
            d = "up" if up else "down"
            self.flower[f"{d}_message_bytes"] += n
            self.flower[f"{d}_array_bytes"] += array_bytes(msg)

    def base_config(self, cid: int, t: int, synced_from: int, synced_to: int, **extra) -> ConfigRecord:
        if self.labels is not None:  # node-local data: the run's label space, for the node's classifier head
            extra["labels"] = json.dumps(self.labels)
        return ConfigRecord({"config": self.cfg_key, "client": cid, "round": t, "synced_from": synced_from,
                             "synced_to": synced_to, "wire": self.wire, **extra})

    # ---- a round ----
    def run_round(self, t: int) -> dict:
        start = time.perf_counter()
        server, cfg = self.server, self.cfg
        sampled = server.sample()
        self.wait_for_nodes(sampled, 0.0)
        # simulated dropout: the simulation's generator, drawn in the same order
        drop = {cid: bool(cfg.federation.dropout_rate and self.sim.dropout_rng.random() < cfg.federation.dropout_rate)
                for cid in sampled}
        reachable = []
        for cid in sampled:
            if cid not in self.nodes:
                self.wait_for_nodes([cid], float(self.rc["node-wait"]))
            if cid not in self.nodes:
                log.warning("round %d: client %d has no SuperNode; not asked this round", t, cid)
                continue
            reachable.append(cid)
        self.collect_descriptors(t, [c for c in reachable if self.sim.method.needs_descriptor(server, c)])
        plan: dict[int, list] = {cid: [server.synced.get(cid, 0), server.download(cid, t)]
                                 for cid in reachable}  # cid -> [synced_from, Download]

        def build(cid: int) -> Callable[[], RecordDict]:
            def make() -> RecordDict:
                s0, dl = plan[cid]
                rec, cast = to_record(dl.tensors, self.wire)
                c = self.base_config(cid, t, s0, server.last_round, drop=drop[cid])
                return RecordDict({"config": c, "download": rec, "download_dtypes": cast})
            return make

        def resync(cid: int) -> Callable[[int], None]:
            def redo(have: int) -> None:
                server.synced[cid] = have
                plan[cid] = [have, server.download(cid, t)]
            return redo

        train = secure_round if cfg.federation.secure_aggregation else FlowerServer.train_round
        row, failed = train(self, t, plan, build, resync)
        if failed:
            row["failed"] = failed
        if missing := [cid for cid in sampled if cid not in plan]:
            row["unreachable"] = missing
        if t % cfg.eval.every == 0 or t == cfg.federation.rounds:
            row |= self.evaluate(t, final=t == cfg.federation.rounds)
        for k, v in self.flower.items():
            row[f"flower_{k}"] = v
            self.cum_flower[k] += v
            row[f"cum_flower_{k}"] = self.cum_flower[k]
        self.flower = dict.fromkeys(self.flower, 0)
        row["wall_s"] = time.perf_counter() - start
        row |= {f"time_{k}": round(v, 4) for k, v in self.times.items()}
        self.times = {}
        return row

    def train_round(self, t: int, plan: dict[int, list], build: Callable, resync: Callable) -> tuple[dict, list]:
        """The train exchange, each upload in clear, and the server's round: (row, the clients that failed)."""
        t0 = time.perf_counter()
        replies = self.exchange(TRAIN, t, [_Send(cid, build(cid), resync(cid)) for cid in plan])
        self.timing(replies, "train", t0)
        uploads: dict[int, Upload | None] = {}
        failed = []
        for cid in plan:
            r = replies.get(cid)
            if isinstance(r, Message) and r.content["status"]["status"] == "ok":
                s = r.content["status"]
                uploads[cid] = Upload(int(s["client"]), int(s["round"]),
                                      from_record(r.content["upload"], r.content["upload_dtypes"]),
                                      n_examples=int(s["n_examples"]),
                                      metrics={k: float(v) for k, v in r.content["metrics"].items()})
            else:
                uploads[cid] = None
                if not isinstance(r, Message):
                    failed.append({"client": cid, "reason": str(r)})
                    log.warning("round %d: client %d failed: %s", t, cid, r)
        t0 = time.perf_counter()
        row = self.server.finish_round(t, {cid: plan[cid][1] for cid in plan}, uploads)
        self.times["aggregate_s"] = time.perf_counter() - t0
        return row, failed

    def collect_descriptors(self, t: int, cids: list[int]) -> None:
        """A client's first contact (CE-LoRA): it computes its data descriptor on its own data and sends it,
        before its first download, as a message of its own (counted in the flower_up_* columns)."""
        if not cids:
            return

        def build(cid: int) -> Callable[[], RecordDict]:
            s0 = self.server.synced.get(cid, 0)
            return lambda: RecordDict({"describe": self.base_config(cid, t, s0, s0)})

        t0 = time.perf_counter()
        replies = self.exchange(HELLO, t, [_Send(cid, build(cid)) for cid in cids])
        self.times["describe_exchange_s"] = time.perf_counter() - t0
        for cid in cids:
            r = replies.get(cid)
            if isinstance(r, Message) and "descriptor" in r.content:
                desc = from_record(r.content["descriptor"], r.content["descriptor_dtypes"])
                self.sim.method.receive_descriptor(self.server, cid, desc, t)
            else:
                log.warning("round %d: client %d sent no data descriptor: %s", t, cid, r)

    def timing(self, replies: dict, kind: str, t0: float) -> None:
        """Wall time of an exchange, and the longest a ClientApp itself worked on it (the rest is transport)."""
        self.times[f"{kind}_exchange_s"] = time.perf_counter() - t0
        worked = [float(r.content["status"].get("elapsed", 0.0)) for r in replies.values()
                  if isinstance(r, Message) and r.has_content()]
        self.times[f"{kind}_client_max_s"] = max(worked, default=0.0)

    # ---- evaluation: the plan of fedlora.evaluation, the clients' part sent as messages ----
    def evaluate(self, t: int, final: bool) -> dict:
        """As `Run.evaluate`: the one global model on the server (its own test set), each client's model on
        the client, combined by the same `combine`."""
        server, sim, cfg = self.server, self.sim, self.cfg
        plan = plan_evaluation(sim, generate=final)
        server_eval: dict = {}

        def global_test() -> None:  # the one global model on the server's held-out test set, while clients work
            t0 = time.perf_counter()
            sim.am.set_state(dict(server.global_state))
            server_eval["metrics"], server_eval["samples"] = measure_global(sim, plan.generate)
            self.times["server_eval_s"] = time.perf_counter() - t0

        if plan.global_source == "server":
            worker = threading.Thread(target=global_test, name="fedlora-global-test")
            worker.start()
        # the last round reaches every client too: each saves (and may send) its final state
        wanted = [c for c in range(self.num_clients) if final or c in plan.clients]
        collect = final and bool(self.rc["collect-client-states"]) and cfg.output.save_client_states

        def build(cid: int) -> Callable[[], RecordDict]:
            def make() -> RecordDict:
                s0 = server.synced.get(cid, 0)
                rec, cast = to_record(sim.method.download(server, cid, server.last_round + 1), self.wire)
                task = plan.clients.get(cid)
                c = self.base_config(cid, t, s0, s0, final=final, collect=collect, generate=plan.generate,
                                     own_test=bool(task and task.test), own_val=bool(task and task.validation),
                                     global_test=bool(task and task.global_test))
                return RecordDict({"config": c, "download": rec, "download_dtypes": cast})
            return make

        def resync(cid: int) -> Callable[[int], None]:
            def redo(have: int) -> None:
                server.synced[cid] = have
            return redo

        cids = [c for c in wanted if c in self.nodes]
        t0 = time.perf_counter()
        try:
            replies = self.exchange(EVALUATE, t, [_Send(c, build(c), resync(c)) for c in cids])
        finally:
            if plan.global_source == "server":
                worker.join()
        self.timing(replies, "eval", t0)
        results, self.final_states = {}, {}
        for cid in wanted:
            r = replies.get(cid)
            if not isinstance(r, Message):
                log.warning("round %d: client %d not evaluated: %s", t, cid, r or "no SuperNode")
                continue
            if cid in plan.clients:
                results[cid] = results_from_record(r.content)
            if "state" in r.content:
                self.final_states[cid] = from_record(r.content["state"], r.content["state_dtypes"])
        row, samples = combine(sim, plan, server_eval.get("metrics"), results, server_eval.get("samples"))
        if plan.generate:
            write_samples(self.run_dir, server.last_round, samples)
        return row

    # ---- the run: built once the nodes have said which labels they hold, then driven by the RunDriver ----
    def label_space(self, ck: dict | None) -> list[str] | None:
        """Node-local data: the checkpoint's, task.labels, or the union of what every client reported (the classes,
        or a causal LM's categories)."""
        if not self.files:
            return None
        if ck is not None and ck.get("labels"):
            return list(ck["labels"])
        if self.cfg.task.labels:
            return list(self.cfg.task.labels)
        if missing := [c for c in range(self.num_clients) if c not in self.node_labels]:
            raise ValueError(f"task.labels is not set and clients {missing} did not report their labels within "
                             f"node-wait = {self.rc['node-wait']} s: set task.labels in the config")
        return sorted({n for names in self.node_labels.values() for n in names})

    def build(self, ck: dict | None) -> None:
        """The run as the simulation builds it: model, adapters, method, server; no client's data (files mode)."""
        self.labels = self.label_space(ck)
        if self.files:
            self.sim = Run(self.cfg, self.run_dir, silos={}, label_names=self.labels)
        else:  # partitioned experiments: the shared task is loaded here too, as on every node
            self.sim = Run(self.cfg, self.run_dir)
        self.server = self.sim.server

    def snapshot(self) -> dict:
        """The run's checkpoint (each client keeps its own state on its node) and this runtime's counters."""
        return self.sim.snapshot() | {"flower": self.cum_flower, "labels": self.labels or []}

    def restore(self, ck: dict) -> None:
        self.sim.restore(ck)
        self.cum_flower = ck["flower"]

    def evaluate_now(self) -> dict:
        return self.evaluate(self.server.last_round, final=False)

    def final_models(self) -> tuple[dict[str, torch.Tensor] | None, Iterable[tuple[int, dict[str, torch.Tensor]]]]:
        # each client's model was collected at the final evaluation
        return (self.server.global_state if self.sim.single_model() else None), self.final_states.items()

    def summary_extra(self) -> dict:
        return {"runtime": "flower", **{f"flower_{k}": v for k, v in self.cum_flower.items()}}

    def run(self) -> dict:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ck = load_checkpoint(self.run_dir) if bool(self.rc["resume"]) else None
        if bool(self.rc["resume"]) and ck is None:
            raise ValueError(f"--resume: no checkpoint in {self.run_dir}")
        self.final_states: dict[int, dict[str, torch.Tensor]] = {}
        self.wait_for_nodes(list(range(self.num_clients)), float(self.rc["node-wait"]))
        if not self.nodes:
            raise RuntimeError(f"no SuperNode joined within node-wait = {self.rc['node-wait']} s")
        self.build(ck)
        if str(self.rc["run-key"]):  # what `fedlora flower run --resume RUN_DIR` needs to find the clients' state
            write_run_key(self.run_dir, str(self.rc["run-key"]))
        print(f"fedlora: {len(self.nodes)}/{self.num_clients} clients connected; run directory {self.run_dir}",
              flush=True)

        def progress(row: dict) -> None:
            acc = "".join(f"  {w} {row[f'{w}_{m}']:.3f}" for m in ("accuracy", "perplexity")
                          for w in ("global", "personal") if f"{w}_{m}" in row)
            print(f"fedlora: round {row['round']}/{cfg.federation.rounds}{acc}  {row['wall_s']:.2f} s", flush=True)

        return RunDriver(self.sim, self).drive(ck, progress)


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fast_object_pulls()
    FlowerServer(grid, context).run()
