"""FlexLoRA: the full-size aggregate, sent to each client as its best rank-r_i approximation.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", NeurIPS 2024.

Client i has rank r_i (`adapter.client_ranks`), R = max r_i.

    train:     A_i (r_i × d), B_i (k × r_i);  upload: A_i, B_i
    aggregate: per adapted layer, at full size (k × d):
                 P = Σ p_i B_i A_i,   p_i = n_i / Σ n_j      (ΔW = s P; s is the same on every client)
                 P = U Σ Vᵀ (SVD),   B ← U_R Σ_R^{1/2} (k × R),   A ← Σ_R^{1/2} V_Rᵀ (R × d)
    download:  client i receives A[:r_i], B[:, :r_i], whose product U_{r_i} Σ_{r_i} V_{r_i}ᵀ is the
               best rank-r_i approximation of P in Frobenius and spectral norm (Eckart–Young):
               r_i (d + k) numbers per layer, never the k × d aggregate itself.
    personal:  nothing but the client's copy at its rank (the head follows `method.head`).

The server pays one SVD of a k × d matrix per layer per round; the split Σ^{1/2} on both factors
keeps A and B at the same scale for the next round's training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..adapters import factor_of
from ..ranks import leading_download
from .base import Method, register

if TYPE_CHECKING:
    from ..federation import Server, Upload


@register
class FlexLoRA(Method):
    name = "flexlora"

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.federation.secure_aggregation:
            raise ValueError("federation.secure_aggregation: flexlora's SVD needs each client's product B_i A_i, "
                             "which a sum of A_i and B_i does not give")
    batchable = False  # one client at a time: its state (rank, W or a dual pair) is not a plain stacked pair
    mixed_ranks = True
    server_factors = frozenset()  # the SVD factors live in server.extra at rank R; each client holds its own rank

    def train_factors(self, t: int) -> set[str]:
        return {"A", "B"}

    def upload_factors(self, t: int) -> set[str]:
        return {"A", "B"}

    def download(self, server: Server, cid: int, t: int) -> dict[str, torch.Tensor]:
        out = super().download(server, cid, t)  # the head, when shared
        # the leading r_i singular triplets
        out.update(leading_download(server, "flexlora", cid, self.client_rank(server, cid)))
        return out

    def aggregate(self, server: Server, t: int, uploads: list[Upload]) -> None:
        super().aggregate(server, t, uploads)  # the head, when shared
        n = [float(u.n_examples) for u in uploads]
        total, rmax, factors = sum(n), max(self.ranks), {}
        for ka in sorted(k for k in uploads[0].tensors if factor_of(k) == "A"):
            kb = ka[:-2] + ".B"
            p = sum((ni / total) * (u.tensors[kb].double() @ u.tensors[ka].double())
                    for ni, u in zip(n, uploads, strict=True))  # (k, d)
            u_, s, vh = torch.linalg.svd(p, full_matrices=False)
            root = s[:rmax].sqrt()
            dtype = uploads[0].tensors[ka].dtype
            factors[kb] = (u_[:, :rmax] * root[None, :]).to(dtype).contiguous()  # (k, R)
            factors[ka] = (root[:, None] * vh[:rmax]).to(dtype).contiguous()  # (R, d)
        server.extra["flexlora"] = {"round": t, "factors": factors}
