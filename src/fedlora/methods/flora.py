"""FLoRA: stacking, an exact aggregate of heterogeneous-rank LoRA, merged into the base weights.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024.

Client i has rank r_i (`adapter.client_ranks`; one rank for all works too). Every adapted layer
carries W (k × d), the global update merged so far, so the layer computes (W0 + W) x + s B A x.

    train:     A_i (r_i × d), B_i (k × r_i), each round from the run's seeded initial LoRA (B = 0)
    upload:    A_i, B_i
    aggregate: stack, with p_i = n_i / Σ n_j:
                 A_s = [p_1 A_1; p_2 A_2; ...]   (Σ r_i × d)
                 B_s = [B_1, B_2, ...]           (k × Σ r_i)
                 B_s A_s = Σ p_i B_i A_i  exactly, so   W ← W + s B_s A_s
    download:  A_s and B_s: Σ r_i (d + k) numbers per layer, growing with the sum of the ranks of
               the round's clients; the client merges s B_s A_s into its base weights and restarts
               its LoRA. A client that missed rounds receives every stack since it last synced, or
               W itself (k × d) where that is smaller.
    personal:  nothing (the head follows `method.head`).

In this simulation W is one server-held tensor that every client references (the merged update is
the same for all), and the frozen W0 is never modified; the download's byte count is that of the
stacks the client would receive (`download_wire`), while the tensor applied is the W the server
computed from them. The restart costs nothing: A and B are server-held factors that never change
on the server, so every client starts each round from the seeded init and nothing is sent for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..adapters import factor_of
from .base import Method, register, weighted_mean
from .capabilities import DownloadWire

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..federation import Server, Upload


@register
class FLoRA(DownloadWire, Method):
    name = "flora"
    batchable = False  # one client at a time: its state (rank, W or a dual pair) is not a plain stacked pair
    mixed_ranks = True
    full_update = True
    # A, B: the seeded init, never changed on the server, so every round restarts from it at no cost
    server_factors = frozenset({"A", "B", "W"})

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if cfg.federation.secure_aggregation:
            raise ValueError("federation.secure_aggregation: flora stacks each client's A_i, B_i, which a sum hides")
        if cfg.privacy.dp == "central":
            raise ValueError("privacy.dp: central DP is not supported for flora (it would perturb the LoRA restart "
                             "point, not the merged update); use local")

    def train_factors(self, t: int) -> set[str]:
        return {"A", "B"}

    def upload_factors(self, t: int) -> set[str]:
        return {"A", "B"}

    def aggregate(self, server: Server, t: int, uploads: list[Upload]) -> None:
        weights = [float(u.n_examples) for u in uploads]
        for k in uploads[0].tensors:
            if factor_of(k) == "head" and k in server.global_state:
                server.global_state[k] = weighted_mean([u.tensors[k] for u in uploads], weights)
                server.version[k] = t
        total, scale = sum(weights), self.cfg.adapter.alpha / self.cfg.adapter.r
        for ka in sorted(k for k in uploads[0].tensors if factor_of(k) == "A"):
            layer = ka[:-2]
            a_s = torch.cat([(w / total) * u.tensors[ka].double() for w, u in zip(weights, uploads, strict=True)])
            b_s = torch.cat([u.tensors[f"{layer}.B"].double() for u in uploads], dim=1)
            w_old = server.global_state[f"{layer}.W"]
            server.global_state[f"{layer}.W"] = (w_old.double() + scale * (b_s @ a_s)).to(w_old.dtype)  # (k, d)
            server.version[f"{layer}.W"] = t
        stacks = server.extra.setdefault("flora", {"stack_rank": {}})["stack_rank"]
        stacks[t] = sum(int(u.tensors[ka].shape[0]) for u in uploads)  # Σ r_i of this round

    def download_wire(self, server: Server, cid: int, t: int,
                      tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The stacks of every aggregated round since the client last synced (or W, where smaller), plus the rest."""
        seen = server.synced.get(cid, 0)
        ranks = [r for u, r in server.extra.get("flora", {"stack_rank": {}})["stack_rank"].items() if u > seen]
        wire = {k: v for k, v in tensors.items() if factor_of(k) != "W"}
        for k, w in tensors.items():
            if factor_of(k) != "W":
                continue
            (rows, cols), layer = w.shape, k[:-2]
            if sum(ranks) * (rows + cols) >= rows * cols:
                wire[k] = w
                continue
            for i, r in enumerate(ranks):  # same shapes and dtype as the stacks, so the same bytes
                wire[f"{layer}.stack{i}.A"] = w.new_zeros(r, cols)
                wire[f"{layer}.stack{i}.B"] = w.new_zeros(rows, r)
        return wire
