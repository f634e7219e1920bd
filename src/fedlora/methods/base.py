"""The method interface: four answers per round, everything else is shared.

A method says which adapter factors train in round t, which are uploaded, how the server
aggregates the uploads, and what stays personal (every factor the server does not hold). The task
head follows `method.head` (shared: uploaded and averaged; personal: never leaves the client).

A method file holds everything about its method: the class (registered with `@register`), its options
(`Options`, a pydantic model: the config section `method.<name>`, validated through the registry by
config.py) and its cross-section checks (`check`). Hooks that serve one method or a few are optional
capabilities (capabilities.py). A method sees the run through `MethodContext` at set-up, never the run.

Server-side state lives in the `Server` (global tensors, their versions, per-client sync marks);
a method that needs more (CE-LoRA's per-client C̄) keeps it in `server.extra`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from ..adapters import factor_of
from ..config import ConfigError, RunConfig
from ..ranks import client_ranks

if TYPE_CHECKING:  # imported for type hints only: federation imports methods, not the reverse
    from ..adapters import AdaptedModel
    from ..federation import Server, Upload


class ServerView(Protocol):
    """What a method may read and change on the server (`federation.Server` is one)."""

    global_state: dict[str, torch.Tensor]  # the server-held tensors, one copy
    version: dict[str, int]  # round in which each key last changed
    synced: dict[int, int]  # client -> last aggregated round it has downloaded
    last_round: int
    num_clients: int
    extra: dict  # method-specific server state (checkpointed with the server)


class MethodOptions(BaseModel):
    """A method's options, the config section `method.<name>`: a misspelled key fails with one line naming it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class MethodContext:
    """What a method's `setup` may use: the adapted model and a few facts about the run, never the run itself."""

    am: AdaptedModel  # the one adapted model, built, before the initial state is taken
    seed: int  # the run's training seed
    run_dir: Path  # where the run writes (a method may add files of its own)
    num_labels: int  # the task's labels (a causal LM: its categories)
    client_labels: list[np.ndarray]  # each client's training examples' labels (int64), in client order
    options: MethodOptions | None = None  # the method's section `method.<name>` (None: it has none)


METHODS: dict[str, type[Method]] = {}
RESERVED = frozenset({"name", "head"})  # MethodConfig's own fields: no method's section may take these names


def register(cls: type[Method]) -> type[Method]:
    """Register a method under `cls.name`; its `options` (if any) become the config section `method.<name>`,
    validated whenever a config is built from then on."""
    if not cls.name.isidentifier() or cls.name in RESERVED:
        raise ValueError(f"method name {cls.name!r} must be an identifier other than {sorted(RESERVED)}")
    if cls.options is not None and not issubclass(cls.options, BaseModel):
        raise TypeError(f"method {cls.name}: options must be a pydantic model (subclass MethodOptions)")
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
    """The base every method derives from, kept small: class flags, the four answers (`train_factors`,
    `upload_factors`, `download`, `aggregate`: FedAvg by default) and the few hooks every runtime calls.
    Anything serving one method is an optional capability (capabilities.py)."""

    name: ClassVar[str] = ""
    options: ClassVar[type[MethodOptions] | None] = None  # the section `method.<name>` (None: no options)
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
    # the server step needs only the example-weighted mean of the uploads (federation.secure_aggregation can hide
    # each one); such a method's `aggregate_mean` is its server step. A method that needs individual uploads keeps
    # False and says why in `check` when secure aggregation is asked for
    secure_sum: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.opt = getattr(cfg.method, self.name) if self.options is not None else None  # method.<name>
        self.head = cfg.method.head or self.default_head
        self.ranks = client_ranks(cfg)  # each client's adapter rank
        if len(set(self.ranks)) > 1 and not self.mixed_ranks:
            raise ConfigError(f"adapter.client_ranks: method {self.name} cannot take mixed ranks "
                              f"{sorted(set(self.ranks))}; use hetlora, flexlora, flora or local")

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Checks across config sections for a run of this method, at validation (config.py): raise
        ValueError with one line naming the field. Its own section is already valid (`options`)."""

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

    def setup(self, ctx: MethodContext) -> None:
        """Called once before round 1 with the adapted model built (e.g. to initialise factors)."""

    def client_rank(self, server: Server, cid: int) -> int:
        """The adapter rank client `cid` holds now (its uploads are validated at this rank)."""
        return self.ranks[cid]

    def needs_descriptor(self, server: Server, cid: int) -> bool:
        """Whether client `cid` must send a one-time message before its download (capabilities.SendsDescriptor:
        `client_descriptor`, `receive_descriptor`). Default: never."""
        return False

    def upload_reference(self, server: Server, cid: int) -> dict[str, torch.Tensor]:
        """What client `cid` started this round with, as the server knows it, for keys the server does not hold
        (the update it is checked against is upload − start). Default: none; the server's own tensors and the
        seeded initial state cover every other key."""
        return {}

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

    def aggregate_mean(self, server: Server, t: int, mean: Upload, count: int) -> None:
        """The server step from the round's example-weighted mean alone (secure aggregation): `mean.tensors` =
        Σ p_i x_i (zero-padded to the server's rank), `mean.n_examples` = Σ n_i, over `count` clients. For a
        method whose `aggregate` is a weighted mean, that mean is one upload of weight Σ n_i."""
        self.aggregate(server, t, [mean])

    def aggregate(self, server: Server, t: int, uploads: list[Upload]) -> None:
        """Example-weighted FedAvg of every uploaded server-held key."""
        weights = [u.n_examples for u in uploads]
        for k in uploads[0].tensors:
            if k in server.global_state:
                server.global_state[k] = weighted_mean([u.tensors[k] for u in uploads], weights)
                server.version[k] = t
