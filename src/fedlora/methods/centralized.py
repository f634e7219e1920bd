"""Centralized reference: one trainer holding every client's training data (the quality upper bound).

Each round it takes as many optimizer steps as the whole federation does: `train.local_steps` times the
number of clients per round, so that a comparison gives every method the same compute. Its model is
evaluated on the global test set and on every client's own test split, like the federated methods.
Nothing is sent.
"""

from .base import Method, register


@register
class Centralized(Method):
    name = "centralized"
    default_head = "personal"
    pooled = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.head = "personal"

    def local_steps(self) -> int:
        per_round = self.cfg.federation.clients_per_round or self.cfg.partition.num_clients
        return self.cfg.train.local_steps * per_round

    def train_factors(self, t: int) -> set[str]:
        return {"A", "B"}

    def upload_factors(self, t: int) -> set[str]:
        return set()
