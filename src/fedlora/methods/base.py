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

from ..config import RunConfig

if TYPE_CHECKING:  # imported for type hints only: federation imports methods, not the reverse
    from ..adapters import AdaptedModel
    from ..data import Examples
    from ..federation import Server, Upload
    from ..runtime.simulation import Simulation


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
    default_head: ClassVar[str] = "shared"
    server_factors: ClassVar[frozenset[str]] = frozenset()  # adapter factors held by the server, one copy
    pooled: ClassVar[bool] = False  # centralized: one trainer holds every client's training data

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.head = cfg.method.head or self.default_head

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
    def setup(self, sim: Simulation) -> None:
        """Called once before round 1 with the adapted model built (e.g. to initialise factors)."""

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
