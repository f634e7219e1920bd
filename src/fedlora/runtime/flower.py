"""Flower runtime: the same rounds on Flower's Deployment Engine (one SuperLink, one SuperNode per client).

Nothing of a round is re-implemented here. Both sides build the run exactly as the in-process simulation
does (`Simulation(cfg)`: data, model, adapters, `method.setup`), then

    ServerApp (SuperLink side)                      ClientApp (SuperNode side, partition i)
    Server.sample(); Server.download(i, t)   --->   train message: Download as an ArrayRecord
                                                    client_fit(...) on the persisted ClientState
    Upload  <---  reply (ArrayRecord + n_examples)  state saved to disk before the reply
    Server.finish_round(t, downloads, uploads)      (validation, aggregation, raw byte accounting)
    global test (single-model methods)      --->    evaluate message: Method.download(i, t + 1) applied
    metrics.jsonl / summary.json / states/  <---    per-client metrics on the client's own test split

Every download is built per client (`Server.download(cid, t)` -> `Method.download`), so a method that
personalizes what it sends (CE-LoRA's C̄_i) works unchanged: each node gets its own message.

Partitions: a SuperNode says which client it is with its node config (`partition-id`, `num-partitions`,
optional `state-dir` and `threads`); the ServerApp learns the mapping from node ids with a `query`
message, and again whenever a node (re)appears, so a restarted SuperNode (new node id) takes over its
partition.

Client state: a client's `ClientState` (its copy of the server tensors, its personal factors), its batch
stream position, its sync mark and its last upload live in `<state-dir>/run_<run id>/client_<i>/`
(`state.safetensors`, whose header also holds `state.json`'s content), written atomically after every
message that changes them. Flower's `Context.state` is in memory only; this survives a restart. A
message is idempotent: a retried round returns the stored upload instead of training twice, and a
client whose sync mark differs from the server's (it lost its disk, or missed a download) answers
`resync` and gets the tensors it is missing.

Bytes: `up_*` / `down_*` are counted by `Server.finish_round` exactly as in process (raw tensor bytes
and safetensors size). What crosses Flower is added as `flower_*` columns: `*_array_bytes` (the
ArrayRecords' payload, `ArrayRecord.count_bytes`) and `*_message_bytes` (every serialized object of the
messages, records and metadata included, retries included; HTTP framing and TLS not included).
Flower's arrays are NumPy arrays, which have no bfloat16: such tensors are cast to float32 on the wire
(the exact value, 2x the bytes) and cast back on arrival; the raw columns count the tensors' own dtype.

Randomness: client training noise is seeded per (seed, client, round) in `client_fit`, sampling and the
simulated `federation.dropout_rate` use the server's generators, so a Flower run reproduces the
in-process run of the same config (see tests/test_flower.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from safetensors.torch import save_file

from ..config import build_config, dump_config
from ..federation import ClientState, Download, Upload, apply_download, client_fit
from ..methods import Method
from .simulation import METRICS, Simulation, evaluation_row

log = logging.getLogger("fedlora")

HELLO = MessageType.QUERY
TRAIN = MessageType.TRAIN
EVALUATE = MessageType.EVALUATE
# errors after which the same message is sent again (to the partition's current node)
RETRYABLE = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
             ErrorCode.CLIENT_APP_CRASHED}
DEFAULT_STATE_DIR = "~/.fedlora/clients"
TRACE = os.environ.get("FEDLORA_FLOWER_TRACE") == "1"  # timestamps of every message's phases, on stdout

# run config keys of the Flower app ([tool.flwr.app.config]) and their defaults
RUN_CONFIG_DEFAULTS = {
    "config": "",  # the fedlora YAML config, as text
    "run-dir": "",  # where the ServerApp writes the run directory ("" -> output.dir/name), on the SuperLink host
    "poll-interval": 0.05,  # s between the ServerApp's pulls of replies
    "node-wait": 120.0,  # s to wait for a partition's SuperNode to (re)appear before giving up on it
    "round-timeout": 3600.0,  # s for one message exchange
    "max-attempts": 3,  # sends of one message (node gone, crashed ClientApp)
    "collect-client-states": True,  # final per-client adapters into the run directory (as `fedlora run`)
    "wire": "packed",  # tensors on the wire: "packed" (one safetensors blob per payload) or "arrays" (one per tensor)
}


# ---------------------------------------------------------------- wire format


PACKED = "safetensors"  # the one key of a packed ArrayRecord


def to_record(tensors: dict[str, torch.Tensor], wire: str = "arrays") -> tuple[ArrayRecord, ConfigRecord]:
    """Tensors as an ArrayRecord.

    wire = "arrays": one Flower Array per tensor (Flower's own form); dtypes NumPy lacks (bfloat16, float8)
    travel as their raw bits in an integer Array of the same width (bf16: 2 bytes, as counted), and are named
    in the returned ConfigRecord to be viewed back.
    wire = "packed": the whole payload as one safetensors blob in a single uint8 Array (every dtype as is,
    bfloat16 included; one Flower object per payload instead of two per tensor: fewer HTTP requests).
    """
    if wire == "packed":
        blob = safetensors_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}) if tensors else b""
        return ArrayRecord({PACKED: Array.from_numpy_ndarray(np.frombuffer(blob, dtype=np.uint8))}), ConfigRecord()
    rec, cast = ArrayRecord(), {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        try:
            arr = v.numpy()
        except TypeError:
            cast[k] = str(v.dtype).removeprefix("torch.")
            arr = v.view(_BITS[v.element_size()]).numpy()
        rec[k] = Array.from_numpy_ndarray(arr)
    return rec, ConfigRecord(cast)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-width carriers of raw bits


def from_record(rec: ArrayRecord, cast: ConfigRecord | None = None) -> dict[str, torch.Tensor]:
    if list(rec.keys()) == [PACKED]:
        blob = rec[PACKED].numpy().tobytes()
        return safetensors_load(blob) if blob else {}
    cast = cast or {}
    out = {}
    for k, a in rec.items():
        t = torch.from_numpy(a.numpy().copy())
        out[k] = t.view(getattr(torch, str(cast[k]))) if k in cast else t
    return out


def array_bytes(msg: Message) -> int:
    """Payload bytes of the message's ArrayRecords (what Flower reports as its size)."""
    if not msg.has_content():
        return 0
    return sum(r.count_bytes() for r in msg.content.array_records.values())


def message_bytes(msg: Message) -> int:
    """Bytes of every serialized object of the message (the objects Flower pushes and pulls)."""
    try:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    except ImportError:  # a Flower without this internal helper: the arrays at least
        return array_bytes(msg)
    return sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())


def fast_object_pulls(initial: float = 0.02, cap: float = 0.25) -> None:
    """Retry pulls of not-yet-available message objects after 20 ms (doubling to 0.25 s), in this process.

    A message becomes visible before its objects are all pushed, and Flower 1.42 retries such a pull after
    1 s, doubling to 10 s (`PULL_INITIAL_BACKOFF`, not configurable): on loopback every exchange lost 1-3 s
    to it, at each hop (ServerApp <- SuperLink <- SuperNode <- ClientApp). No effect where Flower lacks it.
    """
    import functools
    import importlib

    try:
        iu = importlib.import_module("flwr.supercore.inflatable.inflatable_utils")
    except ImportError:
        return
    orig = getattr(iu.pull_objects, "__wrapped__", iu.pull_objects)

    @functools.wraps(orig)
    def pull_objects(*args, **kwargs):
        kwargs["initial_backoff"] = min(kwargs.get("initial_backoff", initial), initial)
        kwargs["backoff_cap"] = min(kwargs.get("backoff_cap", cap), cap)
        return orig(*args, **kwargs)

    for name in ("flwr.supercore.inflatable.inflatable_utils", "flwr.superlink.grid.http_grid",
                 "flwr.supernode.start_client_internal"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(mod, "pull_objects", None) in (orig, iu.pull_objects):
            mod.pull_objects = pull_objects


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the client side


_ENV: dict[str, Simulation] = {}
_ENV_LOCK = threading.Lock()


def environment(cfg_text: str, workdir: Path) -> Simulation:
    """The run built as the simulation builds it, once per process and config (cached for later messages)."""
    key = config_hash(cfg_text)
    with _ENV_LOCK:
        if key not in _ENV:
            _ENV.clear()
            cfg = build_config(yaml.safe_load(cfg_text))
            _ENV[key] = Simulation(cfg, workdir / f"env_{key}")
        return _ENV[key]


class ClientStore:
    """One client's persistent state: `state.safetensors` (tensors + the metadata in its header) and `state.json`."""

    def __init__(self, root: Path, run_id: int, cid: int):
        self.dir = root / f"run_{run_id}" / f"client_{cid}"
        self.path, self.json_path = self.dir / "state.safetensors", self.dir / "state.json"

    def load(self, cfg_key: str) -> tuple[ClientState, dict, dict[str, torch.Tensor] | None] | None:
        if not self.path.exists():
            return None
        with safe_open(str(self.path), framework="pt") as f:
            meta = json.loads(f.metadata()["fedlora"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        if meta.get("config") != cfg_key:
            log.warning("client state in %s belongs to another config; starting fresh", self.dir)
            return None
        part = {p: {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(p + "/")}
                for p in ("shared", "personal", "upload")}
        upload = part["upload"] if meta.get("has_upload") else None
        return ClientState(part["shared"], part["personal"]), meta, upload

    def save(self, state: ClientState, meta: dict, upload: dict[str, torch.Tensor] | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"shared/{k}": v for k, v in state.shared.items()}
        tensors |= {f"personal/{k}": v for k, v in state.personal.items()}
        tensors |= {f"upload/{k}": v for k, v in (upload or {}).items()}
        meta = {**meta, "has_upload": upload is not None}
        text = json.dumps(meta, sort_keys=True)
        tmp = self.path.with_suffix(".tmp")
        tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}  # no shared storage
        save_file(tensors, str(tmp), metadata={"fedlora": text})
        os.replace(tmp, self.path)  # the commit point
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, self.json_path)


def _node(context: Context) -> tuple[int, int]:
    nc = context.node_config
    if "partition-id" not in nc or "num-partitions" not in nc:
        raise ValueError("this SuperNode has no partition: start it with --node-config "
                         "'partition-id=I num-partitions=N' (or `fedlora flower supernode --partition-id I`)")
    return int(nc["partition-id"]), int(nc["num-partitions"])


def _state_root(context: Context) -> Path:
    return Path(str(context.node_config.get("state-dir", DEFAULT_STATE_DIR))).expanduser()


def _threads(context: Context) -> None:
    if (n := context.node_config.get("threads")) and int(n) > 0:
        torch.set_num_threads(int(n))


class _ClientCall:
    """What every train / evaluate message needs on the client: the environment, the partition, its state."""

    def __init__(self, msg: Message, context: Context):
        c = msg.content["config"]
        self.cfg_text = str(context.run_config.get("config", ""))  # the app's run config, fetched once per run
        self.key = config_hash(self.cfg_text)
        if self.key != str(c["config"]):
            raise ValueError("the run config's fedlora config differs from the server's")
        self.cid, self.t, self.wire = int(c["client"]), int(c["round"]), str(c.get("wire", "arrays"))
        self.synced_from, self.synced_to = int(c["synced_from"]), int(c["synced_to"])
        pid, n = _node(context)
        if pid != self.cid:
            raise ValueError(f"message for client {self.cid} reached the SuperNode of partition {pid}")
        root = _state_root(context)
        self.env = environment(self.cfg_text, root)
        if n != self.env.num_clients:
            raise ValueError(f"num-partitions {n} != partition.num_clients {self.env.num_clients}")
        _threads(context)
        self.store = ClientStore(root, msg.metadata.run_id, self.cid)
        saved = self.store.load(self.key)
        if saved is None:
            self.state = self.env.server.initial_client_state(self.env.init_state, self.cid)
            self.meta, self.last_upload = {"config": self.key, "synced": 0, "round": 0, "stream": None}, None
        else:
            self.state, self.meta, self.last_upload = saved
        self.download = from_record(msg.content["download"], msg.content["download_dtypes"])

    def in_sync(self) -> bool:
        # synced_to: this download was applied already (and persisted) -> applying it again changes nothing
        return self.meta["synced"] in (self.synced_from, self.synced_to)

    def resync(self, msg: Message) -> Message:
        log.warning("client %d: holds the server's tensors of round %d, the server assumed %d: resync",
                    self.cid, self.meta["synced"], self.synced_from)
        return _reply(msg, {"status": "resync", "have": int(self.meta["synced"])})


def _reply(msg: Message, status: dict, **records) -> Message:
    return Message(RecordDict({"status": ConfigRecord(status), **records}), reply_to=msg)


def _upload_reply(msg: Message, cid: int, t: int, tensors: dict[str, torch.Tensor], n: int, metrics: dict,
                  wire: str) -> Message:
    rec, cast = to_record(tensors, wire)
    return _reply(msg, {"status": "ok", "client": cid, "round": t, "n_examples": n}, upload=rec, upload_dtypes=cast,
                  metrics=MetricRecord({k: float(v) for k, v in metrics.items()}))


def client_train(msg: Message, context: Context) -> Message:
    call = _ClientCall(msg, context)
    env, cid, t, meta = call.env, call.cid, call.t, call.meta
    if meta["round"] == t and meta["synced"] == call.synced_to and call.last_upload is not None:
        log.info("client %d: round %d was trained already; sending the stored upload", cid, t)
        return _upload_reply(msg, cid, t, call.last_upload, int(meta["n_examples"]), meta.get("metrics", {}),
                             call.wire)
    if not call.in_sync():
        return call.resync(msg)
    dl = Download(cid, t, call.download)
    stream = env.streams[cid]
    stream.load(meta["stream"] or {"epoch": 0, "offset": 0})
    if bool(msg.content["config"]["drop"]):  # federation.dropout_rate: received, then vanished
        call.store.save(apply_download(call.state, dl), {**meta, "synced": call.synced_to}, None)
        return _reply(msg, {"status": "dropped", "client": cid, "round": t})
    upload, state = client_fit(env.am, env.method, call.state, dl, env.train_sets[cid], stream, env.cfg.train)
    metrics = {k: float(v) for k, v in upload.metrics.items()}
    call.store.save(state, {**meta, "synced": call.synced_to, "round": t, "stream": stream.state(),
                            "n_examples": upload.n_examples, "metrics": metrics}, upload.tensors)
    return _upload_reply(msg, cid, t, upload.tensors, upload.n_examples, metrics, call.wire)


def client_evaluate(msg: Message, context: Context) -> Message:
    call = _ClientCall(msg, context)
    if not call.in_sync():
        return call.resync(msg)
    env, c = call.env, msg.content["config"]
    state = apply_download(call.state, Download(call.cid, call.t + 1, call.download)).full()
    env.am.set_state(state)
    generate, own, on_global = bool(c["generate"]), [], []
    metrics = {}
    if bool(c.get("own_test", True)):  # eval.clients: not every client is measured on its own test set
        own_m = env.measure(env.client_test[call.cid], generate, own, env.client_prompts[call.cid])
        metrics = {f"personal_{k}": float(v) for k, v in own_m.items()}
    if bool(c["global_test"]):
        g_m = env.measure(env.global_test, generate, on_global, env.global_prompts)
        metrics |= {f"global_{k}": float(v) for k, v in g_m.items()}
    records = {"metrics": MetricRecord(metrics)}
    if generate:  # a few generated answers, for the run directory's samples file
        records["samples"] = ConfigRecord({"own": json.dumps(own[:3]), "global": json.dumps(on_global[:3])})
    if bool(c["final"]):
        call.store.dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(call.store.dir / "final.safetensors"))
        if bool(c["collect"]):
            records["state"], records["state_dtypes"] = to_record(state, call.wire)
    return _reply(msg, {"status": "ok", "client": call.cid, "round": call.t}, **records)


client_app = ClientApp()


@client_app.query()
def _hello(msg: Message, context: Context) -> Message:
    pid, n = _node(context)
    return _reply(msg, {"status": "ok", "partition-id": pid, "num-partitions": n})


def _timed(handler: Callable[[Message, Context], Message], msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    reply = handler(msg, context)
    reply.content["status"]["elapsed"] = time.perf_counter() - start  # the ClientApp's own time, for the overhead
    return reply


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return _timed(client_train, msg, context)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return _timed(client_evaluate, msg, context)


# ---------------------------------------------------------------- the server side


class _Send:
    """One message to one client, re-buildable for a retry on another node or after a resync."""

    def __init__(self, cid: int, build: Callable[[], RecordDict], on_resync: Callable[[int], None] | None = None):
        self.cid, self.build, self.on_resync = cid, build, on_resync
        self.attempts, self.resyncs, self.node, self.msg_id, self.waiting_since = 0, 0, None, None, None


class FlowerServer:
    """The ServerApp's loop: the simulation's rounds, with Flower messages as the transport."""

    def __init__(self, grid: Grid, context: Context):
        rc = {**RUN_CONFIG_DEFAULTS, **dict(context.run_config)}
        if not str(rc["config"]).strip():
            raise ValueError("run config 'config' is empty: start runs with `fedlora flower run CONFIG.yaml`")
        self.grid, self.rc, self.cfg_text = grid, rc, str(rc["config"])
        self.cfg_key = config_hash(self.cfg_text)
        self.cfg = build_config(yaml.safe_load(self.cfg_text))
        run_dir = str(rc["run-dir"]) or str(Path(self.cfg.output.dir) / self.cfg.name)
        self.sim = Simulation(self.cfg, Path(run_dir).expanduser())
        if self.sim.method.pooled:
            raise ValueError(f"method '{self.sim.method.name}' pools every client's data in one trainer: "
                             f"it has no federated form; run it with `fedlora run`")
        if type(self.sim.method).download_wire is not Method.download_wire:
            raise ValueError(f"method '{self.sim.method.name}' sends downloads that the client decodes (stacked "
                             f"factors), which this runtime does not do yet; run it with `fedlora run`")
        self.server, self.run_dir = self.sim.server, self.sim.run_dir
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
            log.warning("SuperNode %d did not say which partition it is: %s", node, reply.error.reason)
            self.bad_nodes.add(node)
            return
        s = reply.content["status"]
        cid, n = int(s["partition-id"]), int(s["num-partitions"])
        if n != self.sim.num_clients or not 0 <= cid < n:
            log.error("SuperNode %d is partition %d of %d, but this run has partition.num_clients = %d: ignored",
                      node, cid, n, self.sim.num_clients)
            self.bad_nodes.add(node)
            return
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
        plan: dict[int, list] = {}  # cid -> [synced_from, Download]
        for cid in sampled:
            if cid not in self.nodes:
                self.wait_for_nodes([cid], float(self.rc["node-wait"]))
            if cid not in self.nodes:
                log.warning("round %d: client %d has no SuperNode; not asked this round", t, cid)
                continue
            self.sim.send_descriptor(cid, t)  # computed from the config's split here; not yet a Flower message
            plan[cid] = [server.synced.get(cid, 0), server.download(cid, t)]

        def build(cid: int) -> Callable[[], RecordDict]:
            def make() -> RecordDict:
                s0, dl = plan[cid]
                rec, cast = to_record(dl.tensors, self.wire)
                return RecordDict({"config": self.base_config(cid, t, s0, server.last_round, drop=drop[cid]),
                                   "download": rec, "download_dtypes": cast})
            return make

        def resync(cid: int) -> Callable[[int], None]:
            def redo(have: int) -> None:
                server.synced[cid] = have
                plan[cid] = [have, server.download(cid, t)]
            return redo

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
        row = server.finish_round(t, {cid: plan[cid][1] for cid in plan}, uploads)
        self.times["aggregate_s"] = time.perf_counter() - t0
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

    def timing(self, replies: dict, kind: str, t0: float) -> None:
        """Wall time of an exchange, and the longest a ClientApp itself worked on it (the rest is transport)."""
        self.times[f"{kind}_exchange_s"] = time.perf_counter() - t0
        worked = [float(r.content["status"].get("elapsed", 0.0)) for r in replies.values()
                  if isinstance(r, Message) and r.has_content()]
        self.times[f"{kind}_client_max_s"] = max(worked, default=0.0)

    # ---- evaluation ----
    def single_model(self) -> bool:
        return not (set(self.sim.init_state) - set(self.server.global_state))

    def evaluate(self, t: int, final: bool) -> dict:
        """As `Simulation.evaluate`: the single global model on the server, every client's model on the client."""
        server, sim, cfg = self.server, self.sim, self.cfg
        generate = final and sim.task.causal and cfg.eval.generate_examples > 0
        single = self.single_model()
        samples: dict[str, list] = {}
        g = None
        server_eval: dict = {}
        own_samples = samples.setdefault("global", []) if single else None

        def global_test() -> None:  # the one global model on the server's held-out test set, while clients work
            t0 = time.perf_counter()
            sim.am.set_state(dict(server.global_state))
            server_eval["g"] = sim.measure(sim.global_test, generate, own_samples, sim.global_prompts)
            self.times["server_eval_s"] = time.perf_counter() - t0

        if single:
            worker = threading.Thread(target=global_test, name="fedlora-global-test")
            worker.start()
        global_cids = sim.global_eval_clients()  # as in Simulation.evaluate
        own_cids = set(sim.eval_clients())
        # the last round reaches every client too: each saves (and may send) its final state
        wanted = [c for c in range(sim.num_clients) if final or c in own_cids or (not single and c in global_cids)]
        collect = final and bool(self.rc["collect-client-states"]) and cfg.output.save_client_states

        def build(cid: int) -> Callable[[], RecordDict]:
            def make() -> RecordDict:
                s0 = server.synced.get(cid, 0)
                rec, cast = to_record(sim.method.download(server, cid, server.last_round + 1), self.wire)
                c = self.base_config(cid, t, s0, s0, global_test=not single and cid in global_cids, final=final,
                                     collect=collect, generate=generate, own_test=cid in own_cids)
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
            if single:
                worker.join()
        self.timing(replies, "eval", t0)
        if single:
            g = server_eval["g"]
        per_client, gs, self.final_states = [], [], {}
        for cid in wanted:
            r = replies.get(cid)
            if not isinstance(r, Message):
                log.warning("round %d: client %d not evaluated: %s", t, cid, r or "no SuperNode")
                continue
            m = r.content["metrics"]
            part = {w: {k.removeprefix(w): float(v) for k, v in m.items() if k.startswith(w)}
                    for w in ("personal_", "global_")}
            if part["personal_"]:
                per_client.append(part["personal_"])
            if part["global_"]:
                gs.append(part["global_"])
            if "samples" in r.content:
                samples[f"client_{cid}"] = json.loads(str(r.content["samples"]["own"]))
                if part["global_"]:
                    samples[f"global_by_{cid}"] = json.loads(str(r.content["samples"]["global"]))
            if "state" in r.content:
                self.final_states[cid] = from_record(r.content["state"], r.content["state_dtypes"])
        if not per_client or (g is None and not gs):
            return {}
        if g is None:
            g = {k: float(np.mean([x[k] for x in gs])) for k in gs[0] if k in METRICS}
        if generate:
            with open(self.run_dir / f"samples_round_{server.last_round}.jsonl", "w") as f:
                for who, rows in samples.items():
                    for r in rows[:3]:
                        f.write(json.dumps({"model": who, **r}) + "\n")
        row = evaluation_row(g, per_client)
        if len(own_cids) < sim.num_clients:
            row["eval_clients"] = sorted(own_cids)
        if len(per_client) < len(own_cids):
            row["evaluated_clients"] = len(per_client)
        return row

    # ---- the run ----
    def run(self) -> dict:
        sim, cfg = self.sim, self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        sim.write_adapter_meta()
        self.final_states: dict[int, dict[str, torch.Tensor]] = {}
        self.wait_for_nodes(list(range(sim.num_clients)), float(self.rc["node-wait"]))
        if not self.nodes:
            raise RuntimeError(f"no SuperNode joined within node-wait = {self.rc['node-wait']} s")
        print(f"fedlora: {len(self.nodes)}/{sim.num_clients} clients connected; run directory {self.run_dir}",
              flush=True)
        with open(self.run_dir / "metrics.jsonl", "w") as f:
            for t in range(1, cfg.federation.rounds + 1):
                row = self.run_round(t)
                sim.history.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()
                acc = "".join(f"  {w} {row[f'{w}_{m}']:.3f}" for m in ("accuracy", "perplexity")
                              for w in ("global", "personal") if f"{w}_{m}" in row)
                print(f"fedlora: round {t}/{cfg.federation.rounds}{acc}  {row['wall_s']:.2f} s", flush=True)
        summary = sim.summary(sum(r["wall_s"] for r in sim.history))
        summary |= {"runtime": "flower", **{f"flower_{k}": v for k, v in self.cum_flower.items()}}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.output.save_client_states:
            self.save_states()
        return summary

    def save_states(self) -> None:
        """As `Simulation.save_states`: the server's tensors, the global model, each client's model (collected)."""
        d = self.run_dir / "states"
        d.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.server.global_state.items()}, str(d / "server.safetensors"))
        if self.single_model():
            save_file({k: v.contiguous() for k, v in self.server.global_state.items()}, str(d / "global.safetensors"))
        for cid, state in self.final_states.items():
            save_file({k: v.contiguous() for k, v in state.items()}, str(d / f"client_{cid}.safetensors"))


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fast_object_pulls()
    FlowerServer(grid, context).run()


# ---------------------------------------------------------------- a long-lived ClientApp worker


def serve_client_tasks(runtime_address: str, stop: threading.Event, poll: float = 0.05) -> None:
    """Run this process's `client_app` for every ClientApp task of the local SuperNode, until `stop` is set.

    Flower 1.42 starts a fresh `flwr-clientapp` process for every message (both isolation modes); with
    `--isolation process` it leaves the launching to us. This loop takes that role (what Flower's
    SuperExec + `flwr-clientapp` do: acquire the task, pull its message, call the ClientApp, push the
    reply), in a process that keeps torch, the model and the tokenized data loaded between messages.
    """
    from flwr.common.constant import SubStatus
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    def client(*interceptors) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(runtime_address, True, None, list(interceptors),
                                                     retry_invoker=make_simple_http_retry_invoker())

    acquirer = client(RuntimeVersionHttpInterceptor(component_name="SuperExec"))
    while not stop.is_set():
        try:
            res = acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        except Exception as e:  # noqa: BLE001 - the SuperNode's API is not up yet, or restarting
            log.debug("AcquireTask failed: %s", e)
            stop.wait(0.5)
            continue
        if not (res.HasField("task") and res.token):
            stop.wait(poll)
            continue
        task = client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(res.token))
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(task))
        heartbeat.start()
        context, status, details = None, SubStatus.FAILED, "ClientApp failed"
        marks = [("acquired", time.time())]
        try:
            message, context, _run, _fab = pull_task_input(task)
            marks.append(("pulled", time.time()))
            try:
                reply = client_app(message=message, context=context)
                status, details = SubStatus.COMPLETED, ""
            except Exception as e:  # noqa: BLE001 - becomes an error reply, as in flwr-clientapp
                log.error("ClientApp raised: %s", traceback.format_exc())
                details = f"{type(e).__name__}: {e}"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
            marks.append(("ran", time.time()))
            push_message(task, reply, context)
            marks.append(("pushed", time.time()))
        except Exception:  # noqa: BLE001 - keep serving the next task
            log.error("task failed: %s", traceback.format_exc())
        finally:
            try:
                push_task_output(task, context, status, details)
            finally:
                heartbeat.stop()
                task.close()
                marks.append(("closed", time.time()))
                if TRACE:
                    print("fedlora-trace " + " ".join(f"{k}={v:.3f}" for k, v in marks), flush=True)
