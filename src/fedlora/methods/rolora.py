"""RoLoRA: alternating minimization of the LoRA factors, one factor per round.

Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA",
arXiv 2409.02346 (v2: 2502.01755).

    odd rounds  (1, 3, ...): A frozen, identical on all clients; train B, upload B, B <- Σ p_i B_i
    even rounds (2, 4, ...): B frozen, identical on all clients; train A, upload A, A <- Σ p_i A_i

Exact, because the frozen factor is the same everywhere: Σ p_i B_i A = (Σ p_i B_i) A. B-rounds
come first: with B = 0 the gradient of A is zero, so an A-round first would be wasted. Uplink per
round: one factor, about half of FedIT's; the download is the factor just averaged.
"""

from .base import Method, register


@register
class RoLoRA(Method):
    name = "rolora"
    secure_sum = True  # its server step is a weighted mean of the uploads
    server_factors = frozenset({"A", "B"})

    def train_factors(self, t: int) -> set[str]:
        return {"B"} if t % 2 == 1 else {"A"}

    def upload_factors(self, t: int) -> set[str]:
        return self.train_factors(t)
