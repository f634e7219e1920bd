"""FedDPA: a global adapter learned by FedAvg plus a local adapter per client, mixed at inference.

Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models", NeurIPS 2024.

    every adapted layer: y = W0 x + s · B A x + s · w · LB LA x   (A, B global; LA, LB local)
    train A, B, LA, LB (together, each round);  upload A, B;  A <- Σ p_i A_i,  B <- Σ p_i B_i
    personal: LA, LB (never leave the client) and the head by default.
    inference: the local weight w = `method.feddpa.local_weight` (w = 1 while training; w = 0 is the
    global adapter alone, the model that serves unseen distributions).

The paper trains the local adapter with the global one frozen (FedDPA-F: after federation; FedDPA-T:
in turn each round) and sets w per test instance from its similarity to the client's training data;
here both pairs train together each round and w is one fixed number: the instance-wise weighting is
not implemented. Uplink and downlink: FedIT's, r (d + k) per adapted matrix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Method, register

if TYPE_CHECKING:
    from ..run import Run


@register
class FedDPA(Method):
    name = "feddpa"
    batchable = False  # one client at a time: its state (rank, W or a dual pair) is not a plain stacked pair
    dual = True
    default_head = "personal"
    server_factors = frozenset({"A", "B"})

    def train_factors(self, t: int) -> set[str]:
        return {"A", "B", "LA", "LB"}

    def upload_factors(self, t: int) -> set[str]:
        return {"A", "B"}

    def setup(self, sim: Run) -> None:
        for layer in sim.am.layers.values():
            layer.local_weight = self.cfg.method.feddpa.local_weight
