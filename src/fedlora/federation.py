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
from .methods import Method, is_adapter_key
from .methods.capabilities import (
    DownloadWire,
    KeepsClientState,
    RoundMetrics,
    SendsDescriptor,
    TrainsWithHook,
    UploadCodec,
)
from .ranks import rank_shape, truncate
from .secagg import UP, SecAggServer
from .seeding import rng, torch_seed
from .server_opt import server_step
from .train import local_train, local_train_stacked

log = logging.getLogger("fedlora")
BYTE_KEYS = ("raw", "raw_adapter", "raw_head", "serialized")


@dataclass
class Download:
    client: int
    round: int
    tensors: dict[str, torch.Tensor]
    wire: dict[str, torch.Tensor] | None = None  # what is sent and counted, when not `tensors` (FLoRA)


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
    never its own trained values) and its personal keys (as last trained or downloaded). Keys with a
    '/' are a method's own client state (SCAFFOLD's control variates): kept and checkpointed with the
    personal keys, never loaded into the model."""

    shared: dict[str, torch.Tensor]
    personal: dict[str, torch.Tensor]

    def full(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in {**self.shared, **self.personal}.items() if is_adapter_key(k)}


class Server:
    def __init__(self, method: Method, init_state: dict[str, torch.Tensor], fed: FederationConfig,
                 num_clients: int, seed: int = 0):
        self.method, self.fed, self.num_clients = method, fed, num_clients
        self.sample_rng = rng("sampling", seed)
        self.cumulative = {f"{d}_{k}": 0 for d in ("up", "down") for k in BYTE_KEYS}
        shared = method.shared()
        self.global_state = {k: v for k, v in init_state.items() if factor_of(k) in shared}
        self.version = dict.fromkeys(self.global_state, 0)  # round in which each key last changed
        self.synced: dict[int, int] = {}  # client -> last aggregated round it has downloaded
        self.last_round = 0  # last round that was aggregated
        self.spec = {k: (tuple(v.shape), v.dtype) for k, v in init_state.items()}  # for validation
        self.init_state = init_state  # every client's seeded start; the reference for keys the server never sent
        self.extra: dict = {}  # method-specific server state
        if (fed.server_optimizer != "sgd" or fed.server_lr != 1.0) and not self.global_state:
            raise ValueError(f"federation.server_optimizer: method '{method.name}' holds no factor on the server "
                             f"(with head {method.head}); a server optimizer needs one")
        self.participants: list[int] = []  # the clients sampled for the current round

    def initial_client_state(self, init_state: dict[str, torch.Tensor], cid: int | None = None) -> ClientState:
        """The seeded initial adapter, identical on every client: shared keys reference the server's, personal
        keys reference `init_state` itself (copy-on-write: a client's personal tensor is replaced, never
        written in place, when it trains), so N clients that never trained cost no memory. With
        heterogeneous ranks, client `cid` starts from the leading r_cid components of it."""
        personal = {k: v for k, v in init_state.items() if k not in self.global_state}
        if cid is None:
            return ClientState(shared=dict(self.global_state), personal=personal)
        r = self.method.client_rank(self, cid)
        return ClientState(shared=truncate(self.global_state, r), personal=truncate(personal, r))

    def sample(self) -> list[int]:
        k = self.fed.clients_per_round
        if k is None or k >= self.num_clients:
            self.participants = list(range(self.num_clients))
        else:
            self.participants = sorted(self.sample_rng.choice(self.num_clients, size=k, replace=False).tolist())
        return self.participants

    def download(self, cid: int, t: int) -> Download:
        dl = Download(cid, t, self.method.download(self, cid, t))
        if isinstance(self.method, DownloadWire):
            dl.wire = self.method.download_wire(self, cid, t, dl.tensors)
        self.synced[cid] = self.last_round
        return dl

    def expected_keys(self, t: int) -> set[str]:
        return set(self.method.upload_spec(t, self.spec))

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
        start = {**self.init_state, **self.global_state, **self.method.upload_reference(self, up.client)}
        rank = self.method.client_rank(self, up.client)  # each client's uploads are checked at its own rank
        spec = self.method.upload_spec(t, self.spec)
        for k, v in up.tensors.items():
            shape, dtype = spec[k]
            shape = rank_shape(k, shape, rank)
            if tuple(v.shape) != shape:
                return f"{k}: shape {tuple(v.shape)} != {shape}"
            if v.dtype != dtype:
                return f"{k}: dtype {v.dtype} != {dtype}"
            if not torch.isfinite(v).all():
                return f"{k}: contains NaN or Inf"
            ref = start.get(k)  # None: a key only this method sends (e.g. a control variate): its raw norm
            if ref is not None and tuple(ref.shape) != shape:
                ref = truncate({k: ref}, rank)[k]
            sq += float((v.double() - (0 if ref is None else ref.double())).pow(2).sum())
        if self.fed.max_update_norm is not None and math.sqrt(sq) > self.fed.max_update_norm:
            return f"update norm ‖upload − round start‖ = {math.sqrt(sq):.4g} > max_update_norm " \
                   f"{self.fed.max_update_norm}"
        return None

    def aggregate(self, t: int, uploads: list[Upload], count: int | None = None) -> None:
        """The method's server step on the accepted uploads; with `count`, `uploads` is the one example-weighted
        mean of that many clients' uploads (secure aggregation: `Method.aggregate_mean`)."""
        if uploads and uploads[0].tensors:
            before = {k: v.clone() for k, v in self.global_state.items()}
            if count is None:
                self.method.aggregate(self, t, uploads)
            else:
                self.method.aggregate_mean(self, t, uploads[0], count)
            pr = self.method.cfg.privacy  # central DP: noise on the aggregated server-held keys
            if pr.dp == "central" and pr.noise_multiplier > 0:
                from .privacy.dp import central_noise

                keys = [k for k in uploads[0].tensors if k in self.global_state]
                noise = central_noise({k: self.global_state[k] for k in keys}, [u.n_examples for u in uploads], pr,
                                      self.method.cfg.seed, t)
                for k in keys:
                    self.global_state[k] = self.global_state[k] + noise[k]
            server_step(self, before, t)  # after the DP noise: the server optimizer is post-processing
        self.last_round = t

    def finish_round(self, t: int, downloads: dict[int, Download], uploads: dict[int, Upload | None]) -> dict:
        """Validate, aggregate and count one round; `uploads[cid]` is None for a client that never returned."""
        up, down = dict.fromkeys(BYTE_KEYS, 0), dict.fromkeys(BYTE_KEYS, 0)
        for dl in downloads.values():
            for k, v in payload_bytes(dl.tensors if dl.wire is None else dl.wire).items():
                down[k] += v
        accepted, rejected, losses = [], [], []
        dropped = [cid for cid in downloads if uploads.get(cid) is None]
        # bytes sent besides the tensors (CE-LoRA's descriptor, sent before the download): every client asked
        extra = sum(self.method.extra_upload_bytes(cid, t) for cid in downloads) \
            if isinstance(self.method, SendsDescriptor) else 0
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
        return self._row(t, downloads, up, down, dropped, rejected, skipped, losses) | {"up_raw_other": extra}

    def _row(self, t: int, downloads: dict[int, Download], up: dict, down: dict, dropped: list[int],
             rejected: list[dict], skipped: bool, losses: list[float]) -> dict:
        for k in BYTE_KEYS:
            self.cumulative[f"up_{k}"] += up[k]
            self.cumulative[f"down_{k}"] += down[k]
        n_up = max(1, len(downloads) - len(dropped))
        from .privacy.dp import run_epsilon  # (epsilon, delta) spent after t rounds; None without DP

        return {"round": t, "clients": sorted(downloads), "dropped": dropped, "rejected": rejected,
                "skipped": skipped, "train_loss": float(np.mean(losses)) if losses else None,
                "up_raw_other": 0,
                **{f"up_{k}": v for k, v in up.items()}, **{f"down_{k}": v for k, v in down.items()},
                "up_raw_adapter_per_client": up["raw_adapter"] / n_up, "up_raw_per_client": up["raw"] / n_up,
                **{f"cum_{k}": v for k, v in self.cumulative.items()}, "epsilon": run_epsilon(self.method.cfg, t),
                **(self.method.round_metrics(self, t) if isinstance(self.method, RoundMetrics) and not skipped
                   else {})}

    def finish_secure_round(self, t: int, downloads: dict[int, Download], sa: SecAggServer,
                            metrics: dict[int, dict[str, float]], withheld: dict[int, str]) -> dict:
        """A round under secure aggregation, once stage 3 is over: the server unmasks the sum (or skips the round:
        fewer than the threshold, never unmasked in part), checks it, aggregates it through the method and counts
        every byte of the protocol. `metrics`: the clients' training statistics (sent in clear); `withheld`:
        clients whose own check refused their upload, with the reason they gave."""
        result = sa.unmask_result
        rejected = [{"client": c, "reason": r} for c, r in sorted(withheld.items())]
        for c, r in sorted(withheld.items()):
            log.warning("round %d: client %d withheld its upload: %s", t, c, r)
        reason = sa.reason
        spec = self.method.upload_spec(t, self.spec)
        if result is not None:
            mean, n_total = result
            tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(spec[k][1]) for k, v in mean.items()}
            if set(tensors) != set(spec) or any(tuple(v.shape) != tuple(spec[k][0]) for k, v in tensors.items()):
                reason = "the unmasked sum does not have the upload's keys and shapes"
            elif not all(torch.isfinite(v).all() for v in tensors.values()):
                reason = "the unmasked sum contains NaN or Inf"
            elif len(sa.survivors) < self.fed.min_clients:
                reason = f"{len(sa.survivors)} uploads < min_clients {self.fed.min_clients}"
        skipped = result is None or reason is not None
        if skipped:
            log.warning("round %d: secure aggregation: %s; round skipped", t, reason)
        else:
            self.aggregate(t, [Upload(-1, t, tensors, n_total)], count=len(sa.survivors))
        down = dict.fromkeys(BYTE_KEYS, 0)
        for dl in downloads.values():
            for k, v in payload_bytes(dl.tensors).items():
                down[k] += v
        cols = sa.byte_columns()
        heads = {k for k in spec if factor_of(k) == "head"}
        head_bytes = sum(sa.bytes_masked_head.values())  # the masked vector's head part (8 bytes a coordinate)
        protocol_up = sum(cols[f"up_secagg_{s}"] for s in UP)
        protocol_down = sum(cols[f"down_secagg_{s}"] for s in UP)
        up = {"raw": protocol_up, "raw_head": head_bytes if heads else 0,
              "raw_adapter": cols["up_secagg_masked"] - (head_bytes if heads else 0), "serialized": protocol_up}
        down["raw"] += protocol_down
        down["serialized"] += protocol_down
        dropped = [c for c in downloads if c not in sa.survivors and c not in withheld]
        losses = [m["train_loss"] for c, m in sorted(metrics.items()) if "train_loss" in m]
        for k, v in cols.items():  # cum_up_secagg_* and cum_down_secagg_* in the row
            if k != "up_secagg_per_client":
                self.cumulative[k] = self.cumulative.get(k, 0) + v
        row = self._row(t, downloads, up, down, dropped, rejected, skipped, losses)
        return row | cols | {"secagg_survivors": len(sa.survivors), "secagg_threshold": sa.t_min,
                             "secagg_step": sa.params.step, "secagg_skipped_reason": reason if skipped else None}

    def final_download_bytes(self, cids: list[int]) -> dict[str, int]:
        """The bytes of the last download every client receives after the final round: the model it is evaluated
        and saved with (the global tensors, or its own C̄). Counted once, whichever runtime moves it."""
        total = dict.fromkeys(BYTE_KEYS, 0)
        t = self.last_round + 1
        for cid in cids:
            for k, v in payload_bytes(self.method.download(self, cid, t)).items():
                total[k] += v
        return total

    def state_dict(self) -> dict:
        return {"global_state": self.global_state, "version": self.version, "synced": self.synced,
                "last_round": self.last_round, "extra": self.extra, "cumulative": self.cumulative,
                "sample_rng": self.sample_rng.bit_generator.state}

    def load_state_dict(self, s: dict) -> None:
        self.global_state, self.version, self.synced = s["global_state"], s["version"], s["synced"]
        self.last_round, self.extra, self.cumulative = s["last_round"], s["extra"], s["cumulative"]
        self.sample_rng.bit_generator.state = s["sample_rng"]


def apply_download(state: ClientState, dl: Download, method: Method) -> ClientState:
    """The client's state once it has stored the download (as an UploadCodec's `decode_download` reads it)."""
    shared, personal = dict(state.shared), dict(state.personal)
    tensors = dl.tensors
    if tensors and isinstance(method, UploadCodec):
        tensors = method.decode_download(tensors, state.full())
    for k, v in tensors.items():
        (shared if k in shared else personal)[k] = v
    return ClientState(shared, personal)


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
    start = state.full()
    codec = isinstance(method, UploadCodec)
    tensors = {k: v for k, v in trained.items() if factor_of(k) in uploaded}
    if codec:
        tensors = method.encode_upload(tensors, {**start, **trained})
    if method.cfg.privacy.dp != "none":  # clip the delta from the start state (+ local DP noise)
        from .privacy.dp import privatize_upload

        if codec:
            start = {**start, **method.encode_upload({k: start[k] for k in tensors if k in start}, start)}
        tensors = privatize_upload(tensors, start, method.cfg.privacy, method.cfg.seed, dl.client, t)
    sent, kept = {}, {}
    if isinstance(method, KeepsClientState):  # a method's own tensors (SCAFFOLD's Δc_i, c_i)
        sent, kept = method.after_local(state, trained, t, stats)
    upload = Upload(dl.client, t, {**tensors, **sent}, n_examples=n_examples, metrics=stats)
    personal = {k: (trained.get(k, v) if is_adapter_key(k) else v) for k, v in state.personal.items()}
    new_state = ClientState(state.shared, {**personal, **kept})
    return upload, new_state


def _train_noise_seed(seed: int, t: int, cids: list[int]) -> int:
    return torch_seed("train_noise", seed, cids[0], t) if len(cids) == 1 else torch_seed("pass_noise", seed, t, *cids)


def client_fit(am: AdaptedModel, method: Method, state: ClientState, dl: Download, data: Examples,
               stream: BatchStream, train: TrainConfig) -> tuple[Upload, ClientState]:
    """Apply the download, train locally, build the upload; returns the client's new state."""
    t = dl.round
    state = apply_download(state, dl, method)
    am.set_state(state.full())
    # training noise (the base model's dropout) from a generator seeded by (seed, client, round), not by
    # whatever ran before in this process: the same result in process or on a Flower SuperNode
    with torch.random.fork_rng(devices=[am.device] if am.device.type == "cuda" else []):
        torch.manual_seed(_train_noise_seed(method.cfg.seed, t, [dl.client]))
        stats = local_train(am, data, stream, method.trainable(t), train, method.local_steps(),
                            hook=method.local_hook(state, t) if isinstance(method, TrainsWithHook) else None)
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
    starts = [apply_download(s, dl, method) for s, dl in zip(states, dls, strict=True)]
    leaving = [_leaving(method, s, t) for s in starts]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_train_noise_seed(method.cfg.seed, t, [dl.client for dl in dls]))
        trained, stats = local_train_stacked(am, [s.full() for s in starts], datas, streams, method.trainable(t),
                                             train, method.local_steps(), set().union(*leaving))
    out = []
    for s, dl, tr, st, keep, d in zip(starts, dls, trained, stats, leaving, datas, strict=True):
        # back where the client keeps its state (off the accelerator when the base model is on one)
        full = s.full()
        tr = {k: v.to(full[k].device) for k, v in tr.items() if k in keep}
        out.append(_fit_finish(method, s, dl, tr, st, len(d)))
    return out


def secure_vector(method: Method, state: ClientState, dl: Download, upload: Upload, spec: dict[str, tuple],
                  fed: FederationConfig) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """On the client, under secure aggregation: its own check of the upload it is about to mask (the server will
    never see it), the update clipped to `federation.max_update_norm`, the factors zero-padded to the server's
    rank (`spec`: the round's upload spec at full rank). (the float64 arrays to mask, None) or (None, why not)."""
    from .secagg import check_and_clip, upload_vector

    start = apply_download(state, dl, method).full()
    if isinstance(method, UploadCodec) and method.encodes_upload:  # compared in the form it is sent
        start = {**start, **method.encode_upload({k: start[k] for k in upload.tensors if k in start}, start)}
    if upload.round != dl.round:
        return None, f"upload for round {upload.round}, expected {dl.round}"
    tensors, reason = check_and_clip(upload.tensors, spec, start, fed.max_update_norm, fed.secagg_clip_range)
    if tensors is None:
        return None, reason
    return upload_vector(tensors, spec), None
