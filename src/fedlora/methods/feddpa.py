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

from pydantic import Field

from .base import Method, MethodContext, MethodOptions, register


class Options(MethodOptions):
    """method.feddpa"""

    local_weight: float = Field(1.0, ge=0)  # the local adapter's weight w in the mixed model at inference


@register
class FedDPA(Method):
    name = "feddpa"
    secure_sum = True  # A, B: a weighted mean of the uploads (the local pair never leaves the client)
    options = Options
    batchable = False  # one client at a time: its state (rank, W or a dual pair) is not a plain stacked pair
    dual = True
    default_head = "personal"
    server_factors = frozenset({"A", "B"})

    def train_factors(self, t: int) -> set[str]:
        return {"A", "B", "LA", "LB"}

    def upload_factors(self, t: int) -> set[str]:
        return {"A", "B"}

    def setup(self, ctx: MethodContext) -> None:
        for layer in ctx.am.layers.values():
            layer.local_weight = self.opt.local_weight
