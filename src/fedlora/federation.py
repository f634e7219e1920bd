"""The core of a round, transport-free: the Server and the client's fit, driven by every runtime.

    Server.sample()                       -> the round's clients
    Server.download(cid, t)               -> Download (per client; a method may personalize it)
    client_fit(...)                       -> Upload, the client's new state       (on the client)
    Server.finish_round(t, downloads, uploads)
        validate each upload (rejected ones are logged, never averaged), aggregate via the method,
        count the bytes of every download and upload -> the round's metrics row
A runtime only moves Downloads to clients and Uploads back (in process, or over Flower).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .accounting import payload_bytes
from .adapters import AdaptedModel, factor_of
from .config import FederationConfig, TrainConfig
from .data import BatchStream, Examples
from .methods import Method
from .seeding import torch_seed
from .train import local_train, local_train_stacked

log = logging.getLogger("fedlora")
BYTE_KEYS = ("raw", "raw_adapter", "raw_head", "serialized")


@dataclass
class Download:
    client: int
    round: int
    tensors: dict[str, torch.Tensor]


@dataclass
class Upload:
    client: int
    round: int
    tensors: dict[str, torch.Tensor]
    n_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ClientState:
    """What a client keeps between rounds: its copy of the server-held keys (as last downloaded,
    never its own trained values) and its personal keys (as last trained or downloaded)."""

    shared: dict[str, torch.Tensor]
    personal: dict[str, torch.Tensor]

    def full(self) -> dict[str, torch.Tensor]:
        return {**self.shared, **self.personal}


class Server:
    def __init__(self, method: Method, init_state: dict[str, torch.Tensor], fed: FederationConfig,
                 num_clients: int, seed: int = 0):
        self.method, self.fed, self.num_clients = method, fed, num_clients
        self.sample_rng = np.random.default_rng([seed, 101])
        self.cumulative = {f"{d}_{k}": 0 for d in ("up", "down") for k in BYTE_KEYS}
        shared = method.shared()
        self.global_state = {k: v for k, v in init_state.items() if factor_of(k) in shared}
        self.version = dict.fromkeys(self.global_state, 0)  # round in which each key last changed
        self.synced: dict[int, int] = {}  # client -> last aggregated round it has downloaded
        self.last_round = 0  # last round that was aggregated
        self.spec = {k: (tuple(v.shape), v.dtype) for k, v in init_state.items()}  # for validation
        self.extra: dict = {}  # method-specific server state

    def initial_client_state(self, init_state: dict[str, torch.Tensor]) -> ClientState:
        """The seeded initial adapter, identical on every client: shared keys reference the server's, personal
        keys reference `init_state` itself (copy-on-write: a client's personal tensor is replaced, never
        written in place, when it trains), so N clients that never trained cost no memory."""
        return ClientState(shared=dict(self.global_state),
                           personal={k: v for k, v in init_state.items() if k not in self.global_state})

    def sample(self) -> list[int]:
        k = self.fed.clients_per_round
        if k is None or k >= self.num_clients:
            return list(range(self.num_clients))
        return sorted(self.sample_rng.choice(self.num_clients, size=k, replace=False).tolist())

    def download(self, cid: int, t: int) -> Download:
        dl = Download(cid, t, self.method.download(self, cid, t))
        self.synced[cid] = self.last_round
        return dl

    def expected_keys(self, t: int) -> set[str]:
        up = self.method.uploaded(t)
        return {k for k in self.spec if factor_of(k) in up}

    def validate(self, up: Upload, t: int) -> str | None:
        """The reason an upload must not be averaged in, or None if it is acceptable."""
        if up.round != t:
            return f"upload for round {up.round}, expected {t}"
        want, got = self.expected_keys(t), set(up.tensors)
        if got != want:
            missing, extra = sorted(want - got), sorted(got - want)
            return f"wrong keys (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, " \
                   f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})"
        if up.n_examples <= 0:
            return f"n_examples must be positive, got {up.n_examples}"
        sq = 0.0
        for k, v in up.tensors.items():
            shape, dtype = self.spec[k]
            if tuple(v.shape) != shape:
                return f"{k}: shape {tuple(v.shape)} != {shape}"
            if v.dtype != dtype:
                return f"{k}: dtype {v.dtype} != {dtype}"
            if not torch.isfinite(v).all():
                return f"{k}: contains NaN or Inf"
            sq += float(v.double().pow(2).sum())
        if self.fed.max_update_norm is not None and math.sqrt(sq) > self.fed.max_update_norm:
            return f"update norm {math.sqrt(sq):.4g} > max_update_norm {self.fed.max_update_norm}"
        return None

    def aggregate(self, t: int, uploads: list[Upload]) -> None:
        if uploads and uploads[0].tensors:
            self.method.aggregate(self, t, uploads)
            pr = self.method.cfg.privacy  # central DP (issue 7): noise on the aggregated server-held keys
            if pr.dp == "central" and pr.noise_multiplier > 0:
                from .privacy.dp import central_noise

                keys = [k for k in uploads[0].tensors if k in self.global_state]
                noise = central_noise({k: self.global_state[k] for k in keys}, [u.n_examples for u in uploads], pr,
                                      self.method.cfg.seed, t)
                for k in keys:
                    self.global_state[k] = self.global_state[k] + noise[k]
        self.last_round = t

    def finish_round(self, t: int, downloads: dict[int, Download], uploads: dict[int, Upload | None]) -> dict:
        """Validate, aggregate and count one round; `uploads[cid]` is None for a client that never returned."""
        up, down = dict.fromkeys(BYTE_KEYS, 0), dict.fromkeys(BYTE_KEYS, 0)
        for dl in downloads.values():
            for k, v in payload_bytes(dl.tensors).items():
                down[k] += v
        accepted, rejected, losses = [], [], []
        dropped = [cid for cid in downloads if uploads.get(cid) is None]
        # bytes sent besides the tensors (CE-LoRA's descriptor, sent before the download): every client asked
        extra = sum(self.method.extra_upload_bytes(cid, t) for cid in downloads)
        for cid, upload in uploads.items():
            if upload is None:
                continue
            for k, v in payload_bytes(upload.tensors).items():
                up[k] += v
            if "train_loss" in upload.metrics:
                losses.append(upload.metrics["train_loss"])
            reason = self.validate(upload, t)
            if reason:
                log.warning("round %d: rejected upload of client %d: %s", t, cid, reason)
                rejected.append({"client": cid, "reason": reason})
            else:
                accepted.append(upload)
        skipped = len(accepted) < self.fed.min_clients
        if skipped:
            log.warning("round %d: %d uploads < min_clients %d, round skipped", t, len(accepted),
                        self.fed.min_clients)
        else:
            self.aggregate(t, accepted)
        up["raw"] += extra  # counted in the totals, apart from the adapter and head columns
        up["serialized"] += extra
        for k in BYTE_KEYS:
            self.cumulative[f"up_{k}"] += up[k]
            self.cumulative[f"down_{k}"] += down[k]
        n_up = max(1, len(downloads) - len(dropped))
        from .privacy.dp import run_epsilon  # issue 7: (epsilon, delta) spent after t rounds; None without DP

        return {"round": t, "clients": sorted(downloads), "dropped": dropped, "rejected": rejected,
                "skipped": skipped, "train_loss": float(np.mean(losses)) if losses else None,
                "up_raw_other": extra,
                **{f"up_{k}": v for k, v in up.items()}, **{f"down_{k}": v for k, v in down.items()},
                "up_raw_adapter_per_client": up["raw_adapter"] / n_up, "up_raw_per_client": up["raw"] / n_up,
                **{f"cum_{k}": v for k, v in self.cumulative.items()}, "epsilon": run_epsilon(self.method.cfg, t),
                **(self.method.round_metrics(self, t) if not skipped else {})}

    def state_dict(self) -> dict:
        return {"global_state": self.global_state, "version": self.version, "synced": self.synced,
                "last_round": self.last_round, "extra": self.extra, "cumulative": self.cumulative,
                "sample_rng": self.sample_rng.bit_generator.state}

    def load_state_dict(self, s: dict) -> None:
        self.global_state, self.version, self.synced = s["global_state"], s["version"], s["synced"]
        self.last_round, self.extra, self.cumulative = s["last_round"], s["extra"], s["cumulative"]
        self.sample_rng.bit_generator.state = s["sample_rng"]


def apply_download(state: ClientState, dl: Download) -> ClientState:
    shared, personal = dict(state.shared), dict(state.personal)
    for k, v in dl.tensors.items():
        (shared if k in shared else personal)[k] = v
    return ClientState(shared, personal)


def _fit_start(state: ClientState, dl: Download) -> ClientState:
    return apply_download(state, dl)


def _leaving(method: Method, state: ClientState, t: int) -> set[str]:
    """The keys whose trained values leave the model: uploaded ones and personal ones that trained.

    Anything else (a frozen shared factor, a personal key that did not train) is unchanged by training,
    so the client keeps referencing the tensor it already has: nothing is cloned for it."""
    uploaded, trainable = method.uploaded(t), method.trainable(t)
    return {k for k in state.full() if factor_of(k) in uploaded or (k in state.personal and factor_of(k) in trainable)}


def _fit_finish(method: Method, state: ClientState, dl: Download, trained: dict[str, torch.Tensor],
                stats: dict[str, float], n_examples: int) -> tuple[Upload, ClientState]:
    t = dl.round
    uploaded = method.uploaded(t)
    tensors = {k: v for k, v in trained.items() if factor_of(k) in uploaded}
    if method.cfg.privacy.dp != "none":  # issue 7: clip the delta from the start state (+ local DP noise)
        from .privacy.dp import privatize_upload

        start = state.full()
        tensors = privatize_upload(tensors, start, method.cfg.privacy, method.cfg.seed, dl.client, t)
    upload = Upload(dl.client, t, tensors, n_examples=n_examples, metrics=stats)
    new_state = ClientState(state.shared, {k: trained.get(k, v) for k, v in state.personal.items()})
    return upload, new_state


def _train_noise_seed(seed: int, t: int, cids: list[int]) -> int:
    return int(np.random.SeedSequence([seed, 103, *cids, t]).generate_state(1)[0]) if len(cids) == 1 \
        else torch_seed("pass_noise", seed, t, *cids)


def client_fit(am: AdaptedModel, method: Method, state: ClientState, dl: Download, data: Examples,
               stream: BatchStream, train: TrainConfig) -> tuple[Upload, ClientState]:
    """Apply the download, train locally, build the upload; returns the client's new state."""
    t = dl.round
    state = _fit_start(state, dl)
    am.set_state(state.full())
    # training noise (the base model's dropout) from a generator seeded by (seed, client, round), not by
    # whatever ran before in this process: the same result in process or on a Flower SuperNode
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_train_noise_seed(stream.seed, t, [stream.stream_id]))
        stats = local_train(am, data, stream, method.trainable(t), train, train.local_steps)
    trained = am.get_state(keys=_leaving(method, state, t))
    return _fit_finish(method, state, dl, trained, stats, len(data))


def clients_fit(am: AdaptedModel, method: Method, states: list[ClientState], dls: list[Download],
                datas: list[Examples], streams: list[BatchStream],
                train: TrainConfig) -> list[tuple[Upload, ClientState]]:
    """`client_fit` for K clients in one batched pass over the frozen base (see adapters/stacked.py).

    Same mathematics as K calls of client_fit; only the base model's and the adapters' dropout masks
    differ, drawn from one generator seeded by (seed, round, the pass's clients)."""
    if len(states) == 1:
        return [client_fit(am, method, states[0], dls[0], datas[0], streams[0], train)]
    t = dls[0].round
    starts = [_fit_start(s, dl) for s, dl in zip(states, dls, strict=True)]
    leaving = [_leaving(method, s, t) for s in starts]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_train_noise_seed(streams[0].seed, t, [s.stream_id for s in streams]))
        trained, stats = local_train_stacked(am, [s.full() for s in starts], datas, streams, method.trainable(t),
                                             train, train.local_steps, set().union(*leaving))
    out = []
    for s, dl, tr, st, keep, d in zip(starts, dls, trained, stats, leaving, datas, strict=True):
        # back where the client keeps its state (off the accelerator when the base model is on one)
        full = s.full()
        tr = {k: v.to(full[k].device) for k, v in tr.items() if k in keep}
        out.append(_fit_finish(method, s, dl, tr, st, len(d)))
    return out
