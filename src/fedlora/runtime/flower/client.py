"""The ClientApp: one silo's side of a round (see the package docstring)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors import safe_open
from safetensors.torch import save_file

from ...config import RunConfig, build_config
from ...data.silo import Silo, load_local
from ...evaluation import ClientTask, measure_client
from ...federation import ClientState, Download, apply_download, client_fit, secure_vector
from ...run import Run
from ...secagg import SecAggClient, SecAggParams
from ..flower_constants import DEFAULT_STATE_DIR
from .wire import config_hash, from_record, results_to_records, to_record

log = logging.getLogger("fedlora")

_ENV: dict[str, Run] = {}
_ENV_LOCK = threading.Lock()


def node_silo(context: Context) -> Silo | None:
    """This SuperNode's own data (node config `data`, optional `test`), or None: a partition of a shared task."""
    nc = context.node_config
    if not str(nc.get("data", "")):
        return None
    return Silo(str(nc["data"]), str(nc["test"]) if str(nc.get("test", "")) else None)


def node_config(cfg_text: str, context: Context) -> RunConfig:
    """The run's config, with the column names and test fraction this node's own data needs (node config wins)."""
    cfg = build_config(yaml.safe_load(cfg_text))
    nc, silo = context.node_config, node_silo(context)
    if silo is None:
        if cfg.partition.scheme == "files":
            raise ValueError("the run's partition.scheme is 'files': start this SuperNode with its own data "
                             "(`fedlora flower supernode --data PATH`)")
        return cfg
    if cfg.partition.scheme != "files":
        raise ValueError(f"this SuperNode holds its own data (--data) but the run's partition.scheme is "
                         f"'{cfg.partition.scheme}': run it with partition.scheme 'files'")
    task = {k: str(nc[n]) for k, n in (("text_column", "text-column"), ("label_column", "label-column")) if n in nc}
    part = {"files": None, "test_files": None}  # this node reads its own file, whatever the config names
    if "test-fraction" in nc:
        part["client_test_fraction"] = float(nc["test-fraction"])
    return cfg.model_copy(update={"task": cfg.task.model_copy(update=task),
                                  "partition": cfg.partition.model_copy(update=part)})


def environment(cfg_text: str, context: Context, cid: int, labels: list[str] | None) -> Run:
    """The run built as the simulation builds it, once per process, config and label space (cached):
    from this node's own file (`--data`), or every node's partition of the shared task (experiments).
    A run of the shared task holds every client's partition, so one process serving many clients (a Ray
    actor of the Simulation Engine) builds it once for all of them."""
    silo = node_silo(context)
    node = {k: str(v) for k, v in context.node_config.items() if silo is not None or k != "partition-id"}
    key = config_hash(json.dumps([cfg_text, cid if silo is not None else None, labels,
                                  silo and [silo.data, silo.test], node]))
    with _ENV_LOCK:
        if key not in _ENV:
            _ENV.clear()
            cfg = node_config(cfg_text, context)
            workdir = _state_root(context) / f"env_{key}"
            _ENV[key] = Run(cfg, workdir) if silo is None else \
                Run(cfg, workdir, silos={cid: silo}, label_names=labels)
        return _ENV[key]


def local_labels(cfg_text: str, context: Context) -> list[str] | None:
    """The labels this node's own data holds (None: no own data); checked against task.labels if the run sets it."""
    silo = node_silo(context)
    if silo is None:
        return None
    cfg = node_config(cfg_text, context)
    names = set()
    for path in (silo.data, silo.test):
        if path:
            names |= set(load_local(path, cfg.task).label_names)
    if cfg.task.labels and (unknown := sorted(names - set(cfg.task.labels))):
        raise ValueError(f"{silo.data}: labels {unknown[:5]} are not in the run's task.labels {cfg.task.labels}")
    return sorted(names)


class ClientStore:
    """One client's persistent state: `state.safetensors` (tensors + the metadata in its header) and `state.json`."""

    def __init__(self, root: Path, run_key: int | str, cid: int):
        self.dir = root / f"run_{run_key}" / f"client_{cid}"
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
        labels = json.loads(str(c["labels"])) if "labels" in c else None
        self.env = environment(self.cfg_text, context, self.cid, labels)
        if n != self.env.num_clients:
            raise ValueError(f"num-partitions {n} != partition.num_clients {self.env.num_clients}")
        _threads(context)
        # the run's key outlives Flower's run id, so that a resumed run (a new Flower run) finds this state
        self.store = ClientStore(root, str(context.run_config.get("run-key", "")) or msg.metadata.run_id, self.cid)
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


def _upload_reply(msg: Message, call: _ClientCall, tensors: dict[str, torch.Tensor], n: int, metrics: dict) -> Message:
    rec, cast = to_record(tensors, call.wire)
    records = {"upload": rec, "upload_dtypes": cast, "metrics": MetricRecord({k: float(v) for k, v in metrics.items()})}
    return _reply(msg, {"status": "ok", "client": call.cid, "round": call.t, "n_examples": n}, **records)


SECAGG_STATE = "fedlora-secagg"  # this client's secure-aggregation state between the stage messages


def _secagg_client(env: Run, context: Context) -> SecAggClient:
    return SecAggClient.from_state(dict(context.state.config_records[SECAGG_STATE]),
                                   SecAggParams.from_config(env.cfg.federation, env.cfg.seed))


def client_secagg(msg: Message, context: Context) -> Message:
    """Stages 0, 1 and 3 of secure aggregation (secagg.py); stage 2 is the train message."""
    c = msg.content["secagg"]
    cfg_text = str(context.run_config.get("config", ""))
    if config_hash(cfg_text) != str(c["config"]):
        raise ValueError("the run config's fedlora config differs from the server's")
    cid, t, (pid, _) = int(c["client"]), int(c["round"]), _node(context)
    if pid != cid:
        raise ValueError(f"message for client {cid} reached the SuperNode of partition {pid}")
    env = environment(cfg_text, context, cid, json.loads(str(c["labels"])) if "labels" in c else None)
    stage, out = str(c["stage"]), {}
    if stage == "setup":
        sa = SecAggClient(cid, t, SecAggParams.from_config(env.cfg.federation, env.cfg.seed))
        out["pk1"], out["pk2"] = sa.setup()
    else:
        sa = _secagg_client(env, context)
        if sa.t != t:
            raise ValueError(f"secure aggregation: stage {stage} of round {t}, but this client's keys are of {sa.t}")
        if stage == "share":
            keys = {int(n): (bytes(c[f"pk1/{n}"]), bytes(c[f"pk2/{n}"])) for n in json.loads(str(c["ids"]))}
            out = {f"ct/{d}": ct for d, ct in sa.share_keys(keys, int(c["m"])).items()}
        else:  # unmask
            shares = sa.unmask(json.loads(str(c["active"])), json.loads(str(c["dead"])))
            out = {f"sh/{o}": s for o, s in shares.items()}
    context.state.config_records[SECAGG_STATE] = ConfigRecord(sa.state())
    return _reply(msg, {"status": "ok", "client": cid, "round": t}, secagg=ConfigRecord(out))


def _masked_reply(msg: Message, call: _ClientCall, context: Context, vector: dict | None, n: int, reason: str | None,
                  metrics: dict) -> Message:
    """Stage 2: the masked vector (uint64 arrays), or the reason this client withholds its upload."""
    if vector is None:
        return _reply(msg, {"status": "withheld", "client": call.cid, "round": call.t, "reason": str(reason)})
    sa = _secagg_client(call.env, context)
    sa.receive_shares({int(k[3:]): bytes(v) for k, v in msg.content["secagg"].items() if k.startswith("ct/")})
    masked = {k: torch.from_numpy(v) for k, v in sa.masked_vector(vector, n).items()}
    context.state.config_records[SECAGG_STATE] = ConfigRecord(sa.state())
    rec, cast = to_record(masked, call.wire)
    return _reply(msg, {"status": "ok", "client": call.cid, "round": call.t}, masked=rec, masked_dtypes=cast,
                  metrics=MetricRecord({k: float(v) for k, v in metrics.items()}))


def client_train(msg: Message, context: Context) -> Message:
    call = _ClientCall(msg, context)
    env, cid, t, meta = call.env, call.cid, call.t, call.meta
    secure = env.cfg.federation.secure_aggregation
    if secure and meta["round"] == t and meta["synced"] == call.synced_to:  # its masked reply was lost
        return _reply(msg, {"status": "withheld", "client": cid, "round": t,
                            "reason": "trained this round already; a masked vector is sent once"})
    if meta["round"] == t and meta["synced"] == call.synced_to and call.last_upload is not None:
        log.info("client %d: round %d was trained already; sending the stored upload", cid, t)
        return _upload_reply(msg, call, call.last_upload, int(meta["n_examples"]), meta.get("metrics", {}))
    if not call.in_sync():
        return call.resync(msg)
    dl = Download(cid, t, call.download)
    stream = env.streams[cid]
    stream.load(meta["stream"] or {"epoch": 0, "offset": 0})
    if bool(msg.content["config"]["drop"]):  # federation.dropout_rate: received, then vanished
        call.store.save(apply_download(call.state, dl, env.method), {**meta, "synced": call.synced_to}, None)
        return _reply(msg, {"status": "dropped", "client": cid, "round": t})
    upload, state = client_fit(env.am, env.method, call.state, dl, env.train_sets[cid], stream, env.cfg.train)
    metrics = {k: float(v) for k, v in upload.metrics.items()}
    call.store.save(state, {**meta, "synced": call.synced_to, "round": t, "stream": stream.state(),
                            "n_examples": upload.n_examples, "metrics": metrics}, None if secure else upload.tensors)
    if secure:
        vector, reason = secure_vector(env.method, call.state, dl, upload, env.method.upload_spec(t, env.server.spec),
                                       env.cfg.federation)
        return _masked_reply(msg, call, context, vector, upload.n_examples, reason, metrics)
    return _upload_reply(msg, call, upload.tensors, upload.n_examples, metrics)


def client_evaluate(msg: Message, context: Context) -> Message:
    """This client's part of the run's evaluation plan (fedlora.evaluation), on its own model."""
    call = _ClientCall(msg, context)
    if not call.in_sync():
        return call.resync(msg)
    env, c = call.env, msg.content["config"]
    state = apply_download(call.state, Download(call.cid, call.t + 1, call.download), call.env.method).full()
    env.am.set_state(state)
    task = ClientTask(test=bool(c["own_test"]), validation=bool(c["own_val"]), global_test=bool(c["global_test"]))
    records = results_to_records(measure_client(env, call.cid, task, bool(c["generate"])))
    if bool(c["final"]):
        call.store.dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(call.store.dir / "final.safetensors"))
        if bool(c["collect"]):
            records["state"], records["state_dtypes"] = to_record(state, call.wire)
    return _reply(msg, {"status": "ok", "client": call.cid, "round": call.t}, **records)


client_app = ClientApp()


def client_describe(msg: Message, context: Context) -> Message:
    """The client's data descriptor (CE-LoRA), computed on its own training data, sent before its first download."""
    c = msg.content["describe"]
    cfg_text = str(context.run_config.get("config", ""))
    if config_hash(cfg_text) != str(c["config"]):
        raise ValueError("the run config's fedlora config differs from the server's")
    cid, (pid, _) = int(c["client"]), _node(context)
    if pid != cid:
        raise ValueError(f"message for client {cid} reached the SuperNode of partition {pid}")
    env = environment(cfg_text, context, cid, json.loads(str(c["labels"])) if "labels" in c else None)
    _threads(context)
    desc = env.method.client_descriptor(env.am, env.client_train[cid], env.client_classes(cid), cid)
    rec, cast = to_record(desc, str(c.get("wire", "arrays")))
    return _reply(msg, {"status": "ok", "client": cid, "round": int(c["round"])}, descriptor=rec,
                  descriptor_dtypes=cast)


@client_app.query()
def _hello(msg: Message, context: Context) -> Message:
    if "describe" in msg.content:
        return _timed(client_describe, msg, context)
    if "secagg" in msg.content:
        return _timed(client_secagg, msg, context)
    pid, n = _node(context)
    status = {"status": "ok", "partition-id": pid, "num-partitions": n}
    labels = local_labels(str(context.run_config.get("config", "")), context)
    if labels is not None:  # the server builds the label space from these when task.labels is unset
        status["labels"] = json.dumps(labels)
    return _reply(msg, status)


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


