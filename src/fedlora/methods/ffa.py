"""FFA-LoRA: freeze A at its shared random init, train and average only B.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024.

    A random from the run seed (identical on every client), never trained nor sent;
    train B;  upload B;  B <- Σ p_i B_i.   Exact: Σ p_i B_i A = (Σ p_i B_i) A.  Uplink r·k.
"""

from .base import Method, register


@register
class FFALoRA(Method):
    name = "ffa"
    secure_sum = True  # its server step is a weighted mean of the uploads
    server_factors = frozenset({"A", "B"})  # A is held too, but never changes, so it is never sent

    def train_factors(self, t: int) -> set[str]:
        return {"B"}

    def upload_factors(self, t: int) -> set[str]:
        return {"B"}
