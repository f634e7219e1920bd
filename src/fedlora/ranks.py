"""Heterogeneous client ranks: which rank each client's adapter has, and states cut to a rank.

`adapter.client_ranks` is a list (one rank per client) or tiers `{rank: fraction}`, e.g.
{4: 0.5, 8: 0.3, 16: 0.2}: the counts are the fractions of `partition.num_clients` rounded by
largest remainder, and which client gets which rank is a permutation from the seeded generator
`rng("client_ranks", seed)`. Without it every client has rank `adapter.r`.

The simulation keeps one base model whose layers are built at R = max r_i. A rank-r_i state is
applied with its A (r_i × d) in the first r_i rows of the layer's A (R × d) and its B (k × r_i) in
the first r_i columns of B (k × R), the rest set to 0. That is exact, in training too: a zero row
j of A and zero column j of B give each other a zero gradient (∂L/∂A_j = s B_jᵀ G xᵀ, ∂L/∂B_j =
s G (A_j x)), and AdamW keeps a parameter with zero gradient at 0, so the padded part stays 0.
The scale s = alpha / adapter.r is the same on every client, so the same factors mean the same ΔW
wherever they are applied (zero-padded aggregation and truncated downloads rely on it).
"""

from __future__ import annotations

import numpy as np
import torch

from .config import RunConfig
from .seeding import rng


def client_ranks(cfg: RunConfig) -> list[int]:
    """Each client's adapter rank (all `adapter.r` when `adapter.client_ranks` is not set)."""
    n, spec = cfg.partition.num_clients, cfg.adapter.client_ranks
    if spec is None:
        return [cfg.adapter.r] * n
    if isinstance(spec, list):
        return [int(r) for r in spec]
    ranks = sorted(spec)
    exact = np.array([spec[r] for r in ranks]) * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:  # largest remainder
        counts[i] += 1
    pool = np.repeat(ranks, counts)
    return [int(r) for r in pool[rng("client_ranks", cfg.seed).permutation(n)]]


def rank_shape(key: str, shape: tuple[int, ...], r: int) -> tuple[int, ...]:
    """The shape of adapter key `key` at rank r (A: (r, d), B: (k, r)); other keys unchanged."""
    if key.endswith(".A"):
        return (r, *shape[1:])
    if key.endswith(".B"):
        return (shape[0], r)
    return tuple(shape)


def truncate(state: dict[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    """The leading r components of every A (rows) and B (columns); a tensor already at rank r is kept as is."""
    out = {}
    for k, v in state.items():
        if k.endswith(".A") and v.shape[0] != r:
            v = v[:r].clone()
        elif k.endswith(".B") and v.shape[1] != r:
            v = v[:, :r].contiguous()
        out[k] = v
    return out


def pad(v: torch.Tensor, key: str, r: int) -> torch.Tensor:
    """A (r_i × d) or B (k × r_i) zero-padded to rank r, in float64."""
    v = v.to(torch.float64)
    if key.endswith(".A"):
        return torch.cat([v, v.new_zeros(r - v.shape[0], v.shape[1])], dim=0)
    return torch.cat([v, v.new_zeros(v.shape[0], r - v.shape[1])], dim=1)


def leading_download(server, name: str, cid: int, r: int) -> dict[str, torch.Tensor]:
    """The leading r components of the factors a rank-aware method keeps in `server.extra[name]`, if they changed
    since client `cid` last synced; else nothing (HetLoRA, FlexLoRA)."""
    st = server.extra.get(name)
    return truncate(st["factors"], r) if st and st["round"] > server.synced.get(cid, 0) else {}
