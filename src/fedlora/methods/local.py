"""Local-only reference: every client trains its own adapter and head on its own data, nothing is sent.

The personalization lower bound that a federated method must beat to be worth its bytes (zero).
"""

from .base import Method, register


@register
class LocalOnly(Method):
    name = "local"
    default_head = "personal"
    mixed_ranks = True  # nothing is aggregated, so each client may have its own rank

    def __init__(self, cfg):
        super().__init__(cfg)
        self.head = "personal"  # nothing leaves a client, whatever the config says

    def train_factors(self, t: int) -> set[str]:
        return {"A", "B"}

    def upload_factors(self, t: int) -> set[str]:
        return set()
