"""FedIT: FedAvg of both LoRA factors.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024.

    train A, B;  upload A, B;  A <- Σ p_i A_i,  B <- Σ p_i B_i,  p_i = n_i / Σ n_j.

Inexact: Σ p_i B_i A_i != (Σ p_i B_i)(Σ p_i A_i). Uplink per adapted matrix: r (d + k) numbers.
"""

from .base import Method, register


@register
class FedIT(Method):
    name = "fedit"
    secure_sum = True  # its server step is a weighted mean of the uploads
    server_factors = frozenset({"A", "B"})

    def train_factors(self, t: int) -> set[str]:
        return {"A", "B"}

    def upload_factors(self, t: int) -> set[str]:
        return {"A", "B"}
