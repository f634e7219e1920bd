"""FedSA-LoRA: share A, keep B (and the head) personal.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025.

    train A, B;  upload A;  A <- Σ p_i A_i;  B_i stays on client i (A learns what is general,
    B what is client-specific).
"""

from .base import Method, register


@register
class FedSALoRA(Method):
    name = "fedsa"
    secure_sum = True  # its server step is a weighted mean of the uploads
    default_head = "personal"
    server_factors = frozenset({"A"})

    def train_factors(self, t: int) -> set[str]:
        return {"A", "B"}

    def upload_factors(self, t: int) -> set[str]:
        return {"A"}
