"""FedEx-LoRA: FedAvg of A and B, with the residual folded into the frozen weights (exact).

Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation
Models", arXiv 2410.09432 (2024).

Every adapted layer carries W (k × d), the residuals folded so far: the layer computes
(W0 + W) x + s B A x. All clients have the same rank r (mixed ranks are refused).

    train:     A, B;  upload: A_i, B_i
    aggregate: Ā = Σ p_i A_i,  B̄ = Σ p_i B_i,  p_i = n_i / Σ n_j   (as FedIT), and
                 W ← W + s (Σ p_i B_i A_i − B̄ Ā)
               so that W0 + W + s B̄ Ā = Σ p_i (W0 + W_before + s B_i A_i): the effective weight is
               the average of the clients' effective weights, exactly.
    download:  Ā, B̄ (r (d + k) numbers per layer) and W, a full k × d matrix per layer every round:
               the price of exactness, counted in the adapter byte columns.
    personal:  nothing (the head follows `method.head`).

W is one server-held tensor that every client references, added to the frozen W0 in the forward
pass; W0 itself is never modified, so the base model is shared safely.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..adapters import factor_of
from .base import Method, register

if TYPE_CHECKING:
    from ..federation import Server, Upload


@register
class FedExLoRA(Method):
    name = "fedex"
    batchable = False  # one client at a time: its state (rank, W or a dual pair) is not a plain stacked pair
    full_update = True
    server_factors = frozenset({"A", "B", "W"})

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.federation.secure_aggregation:
            raise ValueError("federation.secure_aggregation: fedex's residual needs each client's product B_i A_i "
                             "(a secure sum of them would upload k x d per layer); use fedit or ffa")

    def train_factors(self, t: int) -> set[str]:
        return {"A", "B"}

    def upload_factors(self, t: int) -> set[str]:
        return {"A", "B"}

    def aggregate(self, server: Server, t: int, uploads: list[Upload]) -> None:
        n = [float(u.n_examples) for u in uploads]
        total, scale = sum(n), self.cfg.adapter.alpha / self.cfg.adapter.r
        layers = sorted(k[:-2] for k in uploads[0].tensors if factor_of(k) == "A")
        mean_product = {layer: sum((ni / total) * (u.tensors[f"{layer}.B"].double() @ u.tensors[f"{layer}.A"].double())
                                   for ni, u in zip(n, uploads, strict=True)) for layer in layers}  # (k, d)
        super().aggregate(server, t, uploads)  # Ā, B̄ (and the head)
        for layer in layers:
            a, b = server.global_state[f"{layer}.A"].double(), server.global_state[f"{layer}.B"].double()
            w_old = server.global_state[f"{layer}.W"]
            residual = mean_product[layer] - b @ a  # from the averages as they are sent
            server.global_state[f"{layer}.W"] = (w_old.double() + scale * residual).to(w_old.dtype)
            server.version[f"{layer}.W"] = t
