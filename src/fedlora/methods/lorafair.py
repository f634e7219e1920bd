"""LoRA-FAIR: FedAvg of A and B, then a server-side correction of B towards the average product.

Bian, Wang, Zhang, Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", ICCV 2025 (arXiv 2411.14961).

FedIT's B̄ Ā is not the ideal update P = Σ p_i B_i A_i (the average of products is not the product
of averages). LoRA-FAIR keeps the averaged Ā and corrects B̄ on the server, so that every client
starts the next round from the same refined pair (its "initialization refinement"):

    train:     A, B;  upload: A_i, B_i  (FedIT's bytes)
    aggregate: Ā = Σ p_i A_i,  B̄ = Σ p_i B_i,  p_i = n_i / Σ n_j, and
                 B' = B̄ + ΔB,  ΔB = argmin_ΔB ‖P − (B̄ + ΔB) Ā‖_F² + ρ ‖ΔB‖_F²
                    = (Σ p_i B_i (A_i Āᵀ) − B̄ G)(G + ρ I)⁻¹,   G = Ā Āᵀ  (r × r)
               with ρ = λ · tr(G) / r (`method.lorafair.lam`, scale-free); no k × d matrix is formed.
    download:  Ā, B' (FedIT's bytes: the correction costs the clients nothing).
    personal:  nothing (the head follows `method.head`).

The paper states the correction as maximising a similarity between P and (B̄ + ΔB) Ā under a penalty
on ΔB, solved on the server; we take the squared Frobenius distance as that measure, which has the
closed form above. λ → ∞ gives FedIT; λ = 0 the least-squares fit of P in the row space of Ā.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import Field

from ..adapters import factor_of
from .base import MethodOptions, register
from .fedit import FedIT

if TYPE_CHECKING:
    from ..federation import Server, Upload


class Options(MethodOptions):
    """method.lorafair"""

    # ridge on the server's correction ΔB, relative to the mean eigenvalue of Ā Āᵀ; 0: plain least squares
    lam: float = Field(0.01, ge=0)


@register
class LoRAFAIR(FedIT):
    """FedIT's factors, uploads and downloads; only the server's aggregation differs."""

    name = "lorafair"
    options = Options
    secure_sum = False

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.federation.secure_aggregation:
            raise ValueError("federation.secure_aggregation: lorafair's correction needs each client's product "
                             "B_i A_i (a secure sum of them would upload k x d per layer); use fedit or ffa")

    def aggregate(self, server: Server, t: int, uploads: list[Upload]) -> None:
        super().aggregate(server, t, uploads)  # Ā, B̄ (and the head)
        n = torch.tensor([float(u.n_examples) for u in uploads], dtype=torch.float64)
        p = n / n.sum()
        for layer in sorted(k[:-2] for k in uploads[0].tensors if factor_of(k) == "A"):
            a_bar = server.global_state[f"{layer}.A"].double()  # (r, d)
            b_bar = server.global_state[f"{layer}.B"]
            g = a_bar @ a_bar.T  # (r, r)
            target = sum(pi * u.tensors[f"{layer}.B"].double() @ (u.tensors[f"{layer}.A"].double() @ a_bar.T)
                         for pi, u in zip(p.tolist(), uploads, strict=True))  # (k, r): P Āᵀ
            ridge = self.opt.lam * torch.trace(g) / g.shape[0]
            rhs = target - b_bar.double() @ g  # (k, r): (P − B̄ Ā) Āᵀ
            eye = torch.eye(g.shape[0], dtype=torch.float64)
            delta = torch.linalg.lstsq(g + ridge * eye, rhs.T).solution.T  # (k, r); G symmetric
            server.global_state[f"{layer}.B"] = (b_bar.double() + delta).to(b_bar.dtype)
            server.version[f"{layer}.B"] = t
