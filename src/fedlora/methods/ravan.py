"""RAVAN: multi-head LoRA on frozen bases; only the small cores travel, and their average is exact.

Raje, Askin, Jhunjhunwala, Joshi, "Ravan: Multi-Head Low-Rank Adaptation for Federated Fine-Tuning",
NeurIPS 2025 (arXiv 2506.05568).

    ΔW = s Σ_{j=1..h} B_j H_j A_j = s B C A,   B = [B_1 … B_h] (k × R),  A = [A_1; …; A_h] (R × d),
         C = blockdiag(H_1, …, H_h) (R × R),   R = adapter.r,  each head of rank q = R / h (`method.ravan.heads`)
    init:      A, B random orthonormal (the heads span orthogonal subspaces), seeded, the same on every
               client, frozen for the whole run; C = 0 (ΔW = 0)
    train:     the h blocks H_j (C's off-diagonal blocks stay 0)
    upload:    the blocks, (h, q, q): h q² numbers per layer (CE-LoRA's r² at h = 1)
    aggregate: H_j <- Σ p_i H_j^(i),  p_i = n_i / Σ n_j.  Exact, since A and B are shared:
               B (Σ p_i C_i) A = Σ p_i B C_i A
    download:  the averaged blocks.  personal: nothing (the head follows `method.head`).

With h heads the update reaches rank R at h q² numbers per layer, where one head of rank R would send
R² = h² q². Two simplifications, said plainly: the paper trains a scalar s_j per head beside H_j and
uploads s_j H_j; here the product is the one trainable block (the same updates are reachable; the
optimisation path differs). Its per-client choice of heads to train (for compute heterogeneity) is
not implemented: every client trains every head. The off-diagonal blocks' gradients are zeroed before
gradient clipping and every optimizer step, so they stay at their initial 0 (masked training).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import Field

from ..adapters import factor_of
from ..adapters.tri_init import init_tri_factors
from ..train import LocalHook
from .base import Method, MethodContext, MethodOptions, register
from .capabilities import TrainsWithHook, UploadCodec

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..federation import ClientState, Server, Upload


def pack(c: torch.Tensor, heads: int) -> torch.Tensor:
    """The diagonal blocks of C (R, R) -> (h, q, q)."""
    q = c.shape[0] // heads
    return torch.stack([c[j * q:(j + 1) * q, j * q:(j + 1) * q] for j in range(heads)])


def unpack(blocks: torch.Tensor) -> torch.Tensor:
    """(h, q, q) -> blockdiag (R, R)."""
    return torch.block_diag(*blocks.unbind(0))


class BlockDiagonal(LocalHook):
    """Zero the gradient of C's off-diagonal blocks before clipping and each optimizer step."""

    def __init__(self, heads: int):
        self.heads, self.masks = heads, {}

    def before_step(self, params: dict[str, torch.nn.Parameter]) -> None:
        for k, p in params.items():
            if factor_of(k) == "C" and p.grad is not None:
                if k not in self.masks:
                    q = p.shape[0] // self.heads
                    self.masks[k] = ~unpack(torch.ones(self.heads, q, q, dtype=torch.bool, device=p.device))
                p.grad.masked_fill_(self.masks[k], 0.0)


class Options(MethodOptions):
    """method.ravan"""

    heads: int = Field(4, gt=0)  # h: adapter.r is split into h heads of rank r / h


@register
class RAVAN(TrainsWithHook, UploadCodec, Method):
    name = "ravan"
    secure_sum = True  # the blocks' weighted mean
    options = Options
    tri = True
    server_factors = frozenset({"C"})
    batchable = False  # its local training has a per-step hook

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        heads = cfg.method.ravan.heads
        if cfg.adapter.r % heads:
            raise ValueError(f"method.ravan.heads: adapter.r {cfg.adapter.r} is not a multiple of {heads} heads")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.heads = self.opt.heads

    def train_factors(self, t: int) -> set[str]:
        return {"C"}

    def upload_factors(self, t: int) -> set[str]:
        return {"C"}

    def setup(self, ctx: MethodContext) -> None:
        init_tri_factors(ctx.am, "random", ctx.seed)

    def local_hook(self, state: ClientState, t: int) -> LocalHook | None:
        return BlockDiagonal(self.heads)

    # ---- C travels as its blocks, both ways ----
    def _packed(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: pack(v, self.heads) if factor_of(k) == "C" and v.dim() == 2 else v for k, v in tensors.items()}

    def encode_upload(self, tensors: dict[str, torch.Tensor],
                      model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._packed(tensors)

    def decode_download(self, tensors: dict[str, torch.Tensor],
                        model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: unpack(v) if factor_of(k) == "C" and v.dim() == 3 else v for k, v in tensors.items()}

    def upload_spec(self, t: int, spec: dict[str, tuple]) -> dict[str, tuple]:
        out = super().upload_spec(t, spec)
        for k, (shape, dtype) in out.items():
            if factor_of(k) == "C":
                q = shape[0] // self.heads
                out[k] = ((self.heads, q, q), dtype)
        return out

    def upload_reference(self, server: Server, cid: int) -> dict[str, torch.Tensor]:
        """The blocks the client started from (the update is checked and clipped in the packed form)."""
        return self._packed({k: v for k, v in server.global_state.items() if factor_of(k) == "C"})

    def download(self, server: Server, cid: int, t: int) -> dict[str, torch.Tensor]:
        return self._packed(super().download(server, cid, t))

    def aggregate(self, server: Server, t: int, uploads: list[Upload]) -> None:
        super().aggregate(server, t, uploads)  # Σ p_i of the blocks (and of the head, when shared)
        for k in [k for k in uploads[0].tensors if factor_of(k) == "C"]:
            server.global_state[k] = unpack(server.global_state[k])  # (R, R), off-diagonal 0
