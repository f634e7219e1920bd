"""FedProx: FedIT plus a proximal term that keeps each client near the global factors.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.

    train A, B;  upload A, B;  A <- Σ p_i A_i,  B <- Σ p_i B_i,  p_i = n_i / Σ n_j   (as FedIT)
    personal: nothing but a personal head, if `method.head` says so.
    local objective:  h_i(θ) = F_i(θ) + μ/2 ‖θ − θ^t‖²,
      θ = the client's trained server-held factors (A, B and a shared head), θ^t = their values as
      downloaded at the start of round t. μ = `method.fedprox.mu`; μ = 0 is FedIT exactly.

The term is added to the task loss, so its gradient μ (θ − θ^t) goes through the local optimizer
(the paper's analysis assumes SGD: `train.optimizer: sgd`). Nothing is sent besides FedIT's payload.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import Field

from ..train import LocalHook
from .base import MethodOptions, register
from .capabilities import TrainsWithHook
from .fedit import FedIT

if TYPE_CHECKING:
    from ..federation import ClientState


class ProximalTerm(LocalHook):
    def __init__(self, mu: float, anchor: dict[str, torch.Tensor]):
        self.mu, self.anchor = mu, anchor

    def loss(self, params: dict[str, torch.nn.Parameter]) -> torch.Tensor | None:
        keys = [k for k in params if k in self.anchor]
        if not keys:
            return None
        sq = sum((params[k] - self.anchor[k].to(params[k].dtype)).pow(2).sum() for k in keys)
        return 0.5 * self.mu * sq


class Options(MethodOptions):
    """method.fedprox"""

    mu: float = Field(0.01, ge=0)  # weight of the proximal term μ/2 ‖θ − θ_global‖²


@register
class FedProx(TrainsWithHook, FedIT):
    name = "fedprox"
    options = Options
    batchable = False  # its local training has a hook (a loss term / a correction), not plain local_train

    def local_hook(self, state: ClientState, t: int) -> LocalHook | None:
        # state.shared holds the server's values as downloaded: the anchor θ^t (never trained in place)
        return ProximalTerm(self.opt.mu, state.shared)
