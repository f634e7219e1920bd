"""The low-rank layer: y = W0 x + s · B (C) A x, with s = alpha / r.

LoRA keeps A (r×d, down) and B (k×r, up); the tri-matrix form adds a dense core C (r×r) between
them (CE-LoRA). W0 stays frozen; which of A, B, C train is set per round by the method.
Methods that fold updates into the base weights (FLoRA, FedEx-LoRA) get W (k×d), a frozen full
update held by the server: y = (W0 + W) x + s · B A x, with W0 itself never modified.
`dual` adds a second, local pair (FedDPA): y = W0 x + s · B A x + s · w · LB LA x, where the local
weight w is 1 while training and `local_weight` in eval mode (the mixing at inference).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LowRankLinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, tri: bool = False,
                 scale: float | None = None, full_update: bool = False, dual: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        k, d = base.weight.shape  # (out, in)
        if r > min(k, d):
            raise ValueError(f"adapter rank r={r} is larger than the layer ({k}×{d})")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.r, self.scale = r, alpha / r if scale is None else scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, dt = base.weight.device, base.weight.dtype
        self.A = nn.Parameter(torch.empty(r, d, device=dev, dtype=dt))  # (r, in)
        self.B = nn.Parameter(torch.zeros(k, r, device=dev, dtype=dt))  # (out, r)
        self.C = nn.Parameter(torch.zeros(r, r, device=dev, dtype=dt)) if tri else None  # (r, r)
        self.W = nn.Parameter(torch.zeros(k, d, device=dev, dtype=dt), requires_grad=False) if full_update else None
        # PEFT's LoRA init; B = 0 -> ΔW = 0. A comes from the run's own generator, not torch's global one
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.LA = self.LB = None
        self.local_weight = 1.0
        if dual:  # the local pair, initialized like the global one (LB = 0: no change at the start)
            self.LA = nn.Parameter(torch.empty(r, d, device=dev, dtype=dt))  # (r, in)
            self.LB = nn.Parameter(torch.zeros(k, r, device=dev, dtype=dt))  # (out, r)
            nn.init.kaiming_uniform_(self.LA, a=math.sqrt(5), generator=generator)
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B C A (or s · B A), shape (out, in)."""
        up = self.B @ self.C if self.C is not None else self.B
        dw = self.scale * (up @ self.A)
        if self.LA is not None:
            dw = dw + self.scale * self._local_w() * (self.LB @ self.LA)
        return dw

    def _local_w(self) -> float:
        return 1.0 if self.training else self.local_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.W is None:
            y = self.base(x)
        else:  # (W0 + W) x: the sum costs k·d adds, small beside the product
            y = nn.functional.linear(x, self.base.weight + self.W, self.base.bias)
        if self.merged:
            return y
        h = self.dropout(x) @ self.A.t()  # (..., r)
        if self.C is not None:
            h = h @ self.C.t()  # (..., r)
        y = y + self.scale * (h @ self.B.t())
        if self.LA is not None:
            y = y + self.scale * self._local_w() * ((self.dropout(x) @ self.LA.t()) @ self.LB.t())
        return y

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into W0 for inference; forward then costs what the base layer costs."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, tri={self.C is not None}, dual={self.LA is not None}"
