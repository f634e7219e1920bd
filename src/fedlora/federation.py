"""The core of a round, transport-free: the Server and the client's fit, driven by every runtime.

    Server.download(cid, t)        -> Download (per client; a method may personalize it)
    client_fit(...)                -> Upload, the client's new state
    Server.validate(upload, t)     -> None, or the reason it is rejected
    Server.aggregate(t, accepted)  -> new global / per-client state, via the method
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .adapters import AdaptedModel, factor_of
from .config import FederationConfig, TrainConfig
from .data import BatchStream, Examples
from .methods import Method
from .train import local_train


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
    def __init__(self, method: Method, init_state: dict[str, torch.Tensor], fed: FederationConfig):
        self.method, self.fed = method, fed
        shared = method.shared()
        self.global_state = {k: v for k, v in init_state.items() if factor_of(k) in shared}
        self.version = dict.fromkeys(self.global_state, 0)  # round in which each key last changed
        self.synced: dict[int, int] = {}  # client -> last aggregated round it has downloaded
        self.last_round = 0  # last round that was aggregated
        self.spec = {k: (tuple(v.shape), v.dtype) for k, v in init_state.items()}  # for validation
        self.extra: dict = {}  # method-specific server state

    def initial_client_state(self, init_state: dict[str, torch.Tensor]) -> ClientState:
        # the seeded initial adapter, identical on every client; shared keys reference the server's
        return ClientState(shared=dict(self.global_state),
                           personal={k: v.clone() for k, v in init_state.items() if k not in self.global_state})

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
        self.last_round = t


def apply_download(state: ClientState, dl: Download) -> ClientState:
    shared, personal = dict(state.shared), dict(state.personal)
    for k, v in dl.tensors.items():
        (shared if k in shared else personal)[k] = v
    return ClientState(shared, personal)


def client_fit(am: AdaptedModel, method: Method, state: ClientState, dl: Download, data: Examples,
               stream: BatchStream, train: TrainConfig) -> tuple[Upload, ClientState]:
    """Apply the download, train locally, build the upload; returns the client's new state."""
    t = dl.round
    state = apply_download(state, dl)
    am.set_state(state.full())
    stats = local_train(am, data, stream, method.trainable(t), train, train.local_steps)
    trained = am.get_state()
    uploaded = method.uploaded(t)
    upload = Upload(dl.client, t, {k: v for k, v in trained.items() if factor_of(k) in uploaded},
                    n_examples=len(data), metrics=stats)
    new_state = ClientState(state.shared, {k: trained[k] for k in state.personal})
    return upload, new_state
