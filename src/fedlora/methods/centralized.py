"""Centralized reference: one trainer holding every client's training data (the quality upper bound).

Each round it takes `train.local_steps` steps on the pooled data; its model is evaluated on the
global test set and on every client's own test split, like the federated methods. Nothing is sent.
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

    def train_factors(self, t: int) -> set[str]:
        return {"A", "B"}

    def upload_factors(self, t: int) -> set[str]:
        return set()
