"""The low-rank layer: y = W0 x + s · B (C) A x, with s = alpha / r.

LoRA keeps A (r×d, down) and B (k×r, up); the tri-matrix form adds a dense core C (r×r) between
them (CE-LoRA). W0 stays frozen; which of A, B, C train is set per round by the method.
Methods that fold updates into the base weights (FLoRA, FedEx-LoRA) get W (k×d), a frozen full
update held by the server: y = (W0 + W) x + s · B A x, with W0 itself never modified.
`dual` adds a second, local pair (FedDPA): y = W0 x + s · B A x + s · w · LB LA x, where the local
weight w is 1 while training and `local_weight` in eval mode (the mixing at inference).
The factors are fp32 whatever W0's dtype (bf16, or a bitsandbytes 4/8-bit layer): they are the master copies.
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
        k, d = base.out_features, base.in_features  # a 4-bit base packs its weight: not (out, in)
        if r > min(k, d):
            raise ValueError(f"adapter rank r={r} is larger than the layer ({k}×{d})")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.r, self.scale = r, alpha / r if scale is None else scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.A = nn.Parameter(torch.empty(r, d))  # (r, in)
        self.B = nn.Parameter(torch.zeros(k, r))  # (out, r)
        self.C = nn.Parameter(torch.zeros(r, r)) if tri else None  # (r, r)
        self.W = nn.Parameter(torch.zeros(k, d), requires_grad=False) if full_update else None
        # PEFT's LoRA init; B = 0 -> ΔW = 0. A comes from the run's own generator, not torch's global one, and is
        # drawn on the CPU, so a CUDA run starts from the same A
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.LA = self.LB = None
        self.local_weight = 1.0
        if dual:  # the local pair, initialized like the global one (LB = 0: no change at the start)
            self.LA = nn.Parameter(torch.empty(r, d))  # (r, in)
            self.LB = nn.Parameter(torch.zeros(k, r))  # (out, r)
            nn.init.kaiming_uniform_(self.LA, a=math.sqrt(5), generator=generator)
        for p in (self.A, self.B, self.C, self.W, self.LA, self.LB):
            if p is not None:
                p.data = p.data.to(base.weight.device)
        self.merged = False
        self._w0: torch.Tensor | None = None  # W0 itself while merged, so that unmerge restores it exactly

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
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # a bf16 / quantized base outside autocast
            x = x.to(self.A.dtype)
        h = x @ self.A.t()  # (..., r)
        if self.C is not None:
            h = h @ self.C.t()  # (..., r)
        y = y + (self.scale * (h @ self.B.t())).to(y.dtype)
        if self.LA is not None:
            y = y + (self.scale * self._local_w() * ((self.dropout(x) @ self.LA.t()) @ self.LB.t())).to(y.dtype)
        return y

    @property
    def mergeable(self) -> bool:
        """A plain fp32 W0: folding ΔW into a bf16 or quantized one would round the adapter away."""
        return type(self.base) is nn.Linear and self.base.weight.dtype == torch.float32

    @torch.no_grad()
    def merge(self) -> None:
        """Use W0 + ΔW as the layer's weight for inference; forward then costs what the base layer costs.

        W0 is kept aside (one extra weight per layer while merged) rather than recovered by subtraction,
        which would not give back W0 bit for bit."""
        if not self.merged:
            self._w0 = self.base.weight.data
            self.base.weight.data = self._w0 + self.delta_weight().to(self._w0.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.data, self._w0 = self._w0, None
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, tri={self.C is not None}, dual={self.LA is not None}"
