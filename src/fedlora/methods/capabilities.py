"""Optional capabilities: hooks that serve one method or a few, beside the small `Method` base.

A method that needs one inherits it next to `Method` (`class CELoRA(SendsDescriptor, UploadCodec, Method)`);
the shared machinery tests it with `isinstance` and does nothing for the others.

    SendsDescriptor  a client's one-time message before its first download (CE-LoRA's data descriptor)
    UploadCodec      the uploaded / downloaded tensors in another form than the client stores them
                     (CE-LoRA's common basis, RAVAN's packed blocks)
    KeepsClientState tensors a client sends and keeps besides its factors (SCAFFOLD's control variates)
    TrainsWithHook   an addition to local training: a loss term or a per-step correction
                     (FedProx, SCAFFOLD, RAVAN)
    DownloadWire     what crosses the network differs from what the client ends up with (FLoRA's stacks)
    RoundMetrics     extra columns for a round's metrics row (CE-LoRA's sharing statistics)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..adapters import AdaptedModel
    from ..config import RunConfig
    from ..data import Examples
    from ..federation import ClientState, Server
    from ..train import LocalHook


class SendsDescriptor:
    """A message a client sends once, when it first takes part, before its first download.

    `needs_descriptor` (on every method, False by default) is the gate: the runtimes call the other two
    only where it said True."""

    def needs_descriptor(self, server: Server, cid: int) -> bool:
        """Server side: whether client `cid` must send its descriptor before its download."""
        raise NotImplementedError

    def client_descriptor(self, am: AdaptedModel, data: Examples, classes: torch.Tensor,
                          cid: int) -> dict[str, torch.Tensor]:
        """Client side: the descriptor of the client's own training data (`classes`: one label per example)."""
        raise NotImplementedError

    def receive_descriptor(self, server: Server, cid: int, desc: dict[str, torch.Tensor], t: int) -> None:
        """Server side: store a descriptor received in round t (charged by `extra_upload_bytes`)."""
        raise NotImplementedError

    def extra_upload_bytes(self, cid: int, t: int) -> int:
        """Bytes client `cid` sent besides its tensors in round t (the descriptor, in the round it came)."""
        raise NotImplementedError

    @classmethod
    def descriptor_release(cls, cfg: RunConfig) -> tuple[float, int] | None:
        """(noise multiplier, releases per client) of the descriptor under privacy.dp, composed into the run's
        epsilon (privacy/dp.py); None when no descriptor is sent with this config."""
        raise NotImplementedError


class UploadCodec:
    """The uploaded tensors are sent in another form than trained, and downloads decoded back."""

    @property
    def encodes_upload(self) -> bool:
        """Whether `encode_upload` maps the trained tensors (with this config) before they are sent."""
        return True

    def encode_upload(self, tensors: dict[str, torch.Tensor],
                      model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The uploaded `tensors` as they are sent, given the client's whole adapter state `model`."""
        raise NotImplementedError

    def decode_download(self, tensors: dict[str, torch.Tensor],
                        model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The downloaded `tensors` as the client stores them, given its adapter state `model` before the
        download (the inverse of `encode_upload`)."""
        raise NotImplementedError


class KeepsClientState:
    """Tensors of the method's own, sent and kept by the client besides its adapter factors."""

    def after_local(self, state: ClientState, trained: dict[str, torch.Tensor], t: int,
                    stats: dict[str, float]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """On the client after training: (tensors sent besides the uploaded factors, client state to keep),
        both keyed '<method>/...'. Sent tensors are counted like any upload (and listed in `upload_spec`)."""
        raise NotImplementedError


class TrainsWithHook:
    """An addition to client-side local training (such a method sets `batchable = False`)."""

    def local_hook(self, state: ClientState, t: int) -> LocalHook | None:
        """The hook for client `state`'s training in round t; None: plain training this time."""
        raise NotImplementedError


class DownloadWire:
    """What crosses the network for a download differs from the tensors the client ends up with."""

    def download_wire(self, server: Server, cid: int, t: int,
                      tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The tensors sent and counted for this download (None: `tensors` themselves)."""
        raise NotImplementedError


class RoundMetrics:
    """Extra columns for a round's metrics row."""

    def round_metrics(self, server: Server, t: int) -> dict:
        """Columns for round t's row, after aggregation."""
        raise NotImplementedError
