"""Initial A, B of a tri-matrix adapter (ΔW = s · B C A), shared by the methods that freeze or share a basis
(CE-LoRA's `ab_init`, RAVAN's random heads): the same factors on every client, from W0 or the run's seed."""

from __future__ import annotations

import torch

from ..seeding import torch_generator
from .model import AdaptedModel


def svd_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r×d) = top-r right singular vectors of W0 (k×d) as rows, B (k×r) = top-r left singular vectors.

    Computed in float64 and cast to W0's dtype. Signs: the largest-|entry| of each left singular vector
    u_i (first one on ties) is made positive, and v_i is flipped with it, so that B diag(S) A stays the
    rank-r truncated SVD of W0 and every client computes the same factors from the same W0.
    """
    w = weight.detach().to(torch.float64)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    u, vh = u[:, :r], vh[:r, :]
    pivot = u.abs().argmax(dim=0)
    sign = torch.sign(u[pivot, torch.arange(r)])
    sign[sign == 0] = 1.0
    return (vh * sign[:, None]).to(weight.dtype).contiguous(), (u * sign[None, :]).to(weight.dtype).contiguous()


def random_orthonormal(rows: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """(rows × r) with orthonormal columns, from a Gaussian via QR (sign-fixed by diag(R) > 0), float64."""
    q, rr = torch.linalg.qr(torch.randn(rows, r, generator=gen, dtype=torch.float64))
    d = torch.sign(torch.diagonal(rr))
    d[d == 0] = 1.0
    return q * d[None, :]


@torch.no_grad()
def init_tri_factors(am: AdaptedModel, mode: str, seed: int) -> None:
    """Set every adapted layer's A, B (C stays 0, so ΔW = 0)."""
    gen = torch_generator("adapter_init", seed, 2)
    for layer in am.layers.values():
        k, d = layer.base.weight.shape
        if mode == "svd":
            a, b = svd_factors(layer.base.weight, layer.r)
        elif mode == "random":
            a = random_orthonormal(d, layer.r, gen).t()
            b = random_orthonormal(k, layer.r, gen)
        else:
            raise ValueError(f"ab_init: unknown mode {mode!r} (svd, random)")
        layer.A.copy_(a)
        layer.B.copy_(b)
        if layer.C is not None:
            layer.C.zero_()


