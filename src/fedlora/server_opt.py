"""Server optimizers on the pseudo-gradient: FedAvg(M), FedAdagrad, FedAdam, FedYogi.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2); Hsu et al., "Measuring the
Effects of Non-Identical Data Distribution for Federated Visual Classification", 2019 (FedAvgM).

For every server-held key aggregated in round t, with x the server's value before the round and
x̄ the method's aggregate (FedAvg for FedIT), the pseudo-gradient is Δ = x̄ − x, and (η = server_lr):

    sgd      x ← x + η Δ                                  (η = 1: x ← x̄, today's FedAvg, exactly)
    avgm     m ← β m + Δ;                     x ← x + η m (β = server_momentum)
    adagrad  m ← β1 m + (1 − β1) Δ;  v ← v + Δ²;                                  x ← x + η m / (√v + τ)
    adam     m ← β1 m + (1 − β1) Δ;  v ← β2 v + (1 − β2) Δ²;                      x ← x + η m / (√v + τ)
    yogi     m ← β1 m + (1 − β1) Δ;  v ← v − (1 − β2) Δ² sign(v − Δ²);            x ← x + η m / (√v + τ)

m starts at 0, v at τ² (the paper's v₋₁ ≥ τ²); no bias correction, as in the paper. State per key,
kept in `server.extra["server_opt"]` (so it is checkpointed with the server) and updated only in the
rounds its key is aggregated. Computed in float64, cast to the key's dtype. A method's own tensors
(keys with '/', e.g. SCAFFOLD's control variate) are not touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .methods import is_adapter_key

if TYPE_CHECKING:
    from .config import FederationConfig
    from .federation import Server


def update(fed: FederationConfig, x: torch.Tensor, delta: torch.Tensor, st: dict) -> torch.Tensor:
    """One step on one key: x, delta float64; `st` (this key's m, v) is updated in place; returns the new x."""
    kind, lr = fed.server_optimizer, fed.server_lr
    if kind == "sgd":
        return x + lr * delta
    if kind == "avgm":
        st["m"] = fed.server_momentum * st.get("m", torch.zeros_like(delta)) + delta
        return x + lr * st["m"]
    b1, b2, tau = fed.server_beta1, fed.server_beta2, fed.server_eps
    m = b1 * st.get("m", torch.zeros_like(delta)) + (1 - b1) * delta
    v, d2 = st.get("v", torch.full_like(delta, tau * tau)), delta * delta
    if kind == "adagrad":
        v = v + d2
    elif kind == "adam":
        v = b2 * v + (1 - b2) * d2
    elif kind == "yogi":
        v = v - (1 - b2) * d2 * torch.sign(v - d2)
    else:
        raise ValueError(f"federation.server_optimizer: unknown value '{kind}'")
    st["m"], st["v"] = m, v
    return x + lr * m / (v.sqrt() + tau)


def server_step(server: Server, before: dict[str, torch.Tensor], t: int) -> None:
    """Replace each key the method aggregated in round t by the server optimizer's step from its old value."""
    fed = server.fed
    state = server.extra.setdefault("server_opt", {}) if fed.server_optimizer != "sgd" else {}
    for k, new in server.global_state.items():
        if not is_adapter_key(k) or k not in before or server.version.get(k) != t:
            continue
        x = before[k].to(torch.float64)
        st = state.setdefault(k, {}) if fed.server_optimizer != "sgd" else {}
        server.global_state[k] = update(fed, x, new.to(torch.float64) - x, st).to(new.dtype)
