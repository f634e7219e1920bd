"""The method interface: four answers per round, everything else is shared.

A method says which adapter factors train in round t, which are uploaded, how the server
aggregates the uploads, and what stays personal (every factor the server does not hold). The task
head follows `method.head` (shared: uploaded and averaged; personal: never leaves the client).

Server-side state lives in the `Server` (global tensors, their versions, per-client sync marks);
a method that needs more (CE-LoRA's per-client C̄) keeps it in `server.extra`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from ..adapters import factor_of
from ..config import ConfigError, RunConfig
from ..ranks import client_ranks

if TYPE_CHECKING:  # imported for type hints only: federation imports methods, not the reverse
    from ..adapters import AdaptedModel
    from ..data import Examples
    from ..federation import ClientState, Server, Upload
    from ..run import Run
    from ..train import LocalHook


class ServerView(Protocol):
    """What a method may read and change on the server (`federation.Server` is one)."""

    global_state: dict[str, torch.Tensor]  # the server-held tensors, one copy
    version: dict[str, int]  # round in which each key last changed
    synced: dict[int, int]  # client -> last aggregated round it has downloaded
    last_round: int
    num_clients: int
    extra: dict  # method-specific server state (checkpointed with the server)


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def is_adapter_key(key: str) -> bool:
    """Adapter keys are module paths; a method's own tensors are named '<method>/<what>/<adapter key>'."""
    return "/" not in key


def weighted_mean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ p_i x_i with p_i = w_i / Σ w_j, accumulated in float64 for an exact-as-possible average."""
    total = float(sum(weights))
    out = torch.zeros_like(tensors[0], dtype=torch.float64)
    for x, w in zip(tensors, weights, strict=True):
        out += (w / total) * x.to(torch.float64)
    return out.to(tensors[0].dtype)


class Method:
    name: ClassVar[str] = ""
    tri: ClassVar[bool] = False  # the adapter has the core C (B C A)
    dual: ClassVar[bool] = False  # the adapter has a second, local pair LB LA (FedDPA)
    default_head: ClassVar[str] = "shared"
    server_factors: ClassVar[frozenset[str]] = frozenset()  # adapter factors held by the server, one copy
    pooled: ClassVar[bool] = False  # centralized: one trainer holds every client's training data
    mixed_ranks: ClassVar[bool] = False  # clients may have different adapter ranks (adapter.client_ranks)
    full_update: ClassVar[bool] = False  # layers carry W (k×d), a server-held update folded into W0
    # clients can train together in one batched pass (train.clients_per_pass); False for a method whose
    # local training is not plain `local_train` (e.g. a per-client loss term or gradient correction)
    batchable: ClassVar[bool] = True

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.head = cfg.method.head or self.default_head
        self.ranks = client_ranks(cfg)  # each client's adapter rank
        if len(set(self.ranks)) > 1 and not self.mixed_ranks:
            raise ConfigError(f"adapter.client_ranks: method {self.name} cannot take mixed ranks "
                              f"{sorted(set(self.ranks))}; use hetlora, flexlora, flora or local")

    # --- the four answers (adapter factors; the head is added below from `self.head`) ---
    def train_factors(self, t: int) -> set[str]:
        raise NotImplementedError

    def upload_factors(self, t: int) -> set[str]:
        raise NotImplementedError

    # --- derived sets, used by the shared machinery ---
    def shared(self) -> set[str]:
        """Factors whose single copy lives on the server; all others are personal to each client."""
        return set(self.server_factors) | ({"head"} if self.head == "shared" else set())

    def trainable(self, t: int) -> set[str]:
        return self.train_factors(t) | {"head"}

    def uploaded(self, t: int) -> set[str]:
        return self.upload_factors(t) | ({"head"} if self.head == "shared" else set())

    # --- hooks with defaults that fit FedAvg-style methods ---
    def local_steps(self) -> int:
        """Optimizer steps a client takes in one round."""
        return self.cfg.train.local_steps

    def setup(self, sim: Run) -> None:
        """Called once before round 1 with the adapted model built (e.g. to initialise factors)."""

    def client_rank(self, server: Server, cid: int) -> int:
        """The adapter rank client `cid` holds now (its uploads are validated at this rank)."""
        return self.ranks[cid]

    def download_wire(self, server: Server, cid: int, t: int,
                      tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """What crosses the network for this download when it differs from the tensors the client ends up
        with (FLoRA sends stacked factors, the client folds them into W); None: the tensors themselves."""
        return None

    def extra_upload_bytes(self, cid: int, t: int) -> int:
        """Bytes a client sends besides its tensors this round (CE-LoRA: its data descriptor, when first sent)."""
        return 0

    # --- a message a client sends once, when it first takes part, before its first download ---
    def needs_descriptor(self, server: Server, cid: int) -> bool:
        """Server side: whether client `cid` must send its data descriptor before its download."""
        return False

    def client_descriptor(self, am: AdaptedModel, data: Examples, classes: torch.Tensor,
                          cid: int) -> dict[str, torch.Tensor]:
        """Client side: the descriptor of the client's own training data (`classes`: one label per example)."""
        raise NotImplementedError

    def receive_descriptor(self, server: Server, cid: int, desc: dict[str, torch.Tensor], t: int) -> None:
        """Server side: store a descriptor received in round t (charged by `extra_upload_bytes`)."""

    def round_metrics(self, server: Server, t: int) -> dict:
        """Extra columns for round t's metrics row (after aggregation)."""
        return {}

    # --- client side: what the uploaded and downloaded tensors mean in the client's own model ---
    @property
    def encodes_upload(self) -> bool:
        """Whether `encode_upload` maps the trained tensors before they are sent."""
        return False

    def encode_upload(self, tensors: dict[str, torch.Tensor],
                      model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The uploaded `tensors` as they are sent, given the client's whole adapter state `model`
        (CE-LoRA's common basis maps C into the shared initial A, B). Default: sent as trained."""
        return tensors

    def decode_download(self, tensors: dict[str, torch.Tensor],
                        model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The downloaded `tensors` as the client stores them, given its adapter state `model` before the
        download (the inverse of `encode_upload`). Default: stored as received."""
        return tensors

    def upload_reference(self, server: Server, cid: int) -> dict[str, torch.Tensor]:
        """What client `cid` started this round with, as the server knows it, for keys the server does not hold
        (the update it is checked against is upload − start). Default: none; the server's own tensors and the
        seeded initial state cover every other key."""
        return {}

    def local_hook(self, state: ClientState, t: int) -> LocalHook | None:
        """An addition to client-side local training (a loss term, a per-step correction); None: plain."""
        return None

    def after_local(self, state: ClientState, trained: dict[str, torch.Tensor], t: int,
                    stats: dict[str, float]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """On the client after training: (tensors sent besides the uploaded factors, client state to keep),
        both keyed '<method>/...' (SCAFFOLD: Δc_i sent, c_i kept). Sent tensors are counted like any upload."""
        return {}, {}

    def upload_spec(self, t: int, spec: dict[str, tuple]) -> dict[str, tuple]:
        """{key: (shape, dtype)} of every tensor a valid upload in round t holds (`spec`: the adapter's)."""
        up = self.uploaded(t)
        return {k: s for k, s in spec.items() if factor_of(k) in up}

    def download(self, server: Server, cid: int, t: int) -> dict[str, torch.Tensor]:
        """What client `cid` receives at the start of round t. Must not change any state.

        Default: the server's tensors that changed since this client last synced; round 1 sends
        nothing, since every client builds the same initial adapter from the run's seed.
        """
        seen = server.synced.get(cid, 0)
        return {k: v for k, v in server.global_state.items() if server.version[k] > seen}

    def aggregate(self, server: Server, t: int, uploads: list[Upload]) -> None:
        """Example-weighted FedAvg of every uploaded server-held key."""
        weights = [u.n_examples for u in uploads]
        for k in uploads[0].tensors:
            if k in server.global_state:
                server.global_state[k] = weighted_mean([u.tensors[k] for u in uploads], weights)
                server.version[k] = t
