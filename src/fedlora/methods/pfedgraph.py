"""pFedGraph: personalized aggregation over a collaboration graph inferred from model similarity and data sizes.

Ye et al., "Personalized Federated Learning with Inferred Collaboration Graphs", ICML 2023.

    train A, B;  upload A, B;  personal: every factor (the server sends each client its own aggregate),
    and the head by default (`method.head: shared` averages it instead, FedAvg-style).
    Server, each round, over the accepted uploads j ∈ S (self included), p_j = n_j / Σ_S n:
      s_ij = cos(θ_i − θ_0, θ_j − θ_0)   (θ: the flattened uploaded A, B; θ_0: the seeded initial adapter)
      w_i = argmin_{w ∈ simplex}  α ‖w − p‖² − Σ_j w_j s_ij                (the paper's QP, per client)
          = proj_simplex(p + s_i / (2α))                                  (its exact solution)
      θ̄_i = Σ_j w_ij θ_j, sent to client i at its next round (it overwrites the client's A, B).
    α → ∞ gives w_i = p (FedAvg); small α lets similar clients collaborate more.
    A client never aggregated receives the FedAvg of the last aggregated round.

The paper's official code solves the QP with cvxpy, whose objective α xᵀx + (−s_i − 2αp)ᵀx is the one
above up to a constant; a Euclidean projection onto the simplex (Duchi et al., 2008) solves it exactly.
The paper's optional local regularizer toward θ̄_i is not implemented. Downlink: each participant's own
aggregate, r (d + k) per adapted matrix, the same as FedIT's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from pydantic import Field

from ..adapters import factor_of
from .base import Method, MethodContext, MethodOptions, register
from .similarity import cosine_matrix, project_simplex

if TYPE_CHECKING:
    from ..federation import Server, Upload


def collaboration_graph(sim: np.ndarray, p: np.ndarray, alpha: float) -> np.ndarray:
    """Row i: argmin over the simplex of α ‖w − p‖² − w · sim_i, (m, m), rows sum to 1."""
    p = np.asarray(p, dtype=np.float64)
    return project_simplex(p[None, :] + np.asarray(sim, dtype=np.float64) / (2.0 * alpha))


class Options(MethodOptions):
    """method.pfedgraph"""

    alpha: float = Field(0.8, gt=0)  # weight of ‖w_i − p‖² against the similarity term (the paper's α)


@register
class PFedGraph(Method):
    name = "pfedgraph"
    options = Options

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.federation.secure_aggregation:
            raise ValueError("federation.secure_aggregation: pfedgraph's collaboration graph needs the cosine "
                             "similarity of each pair of clients' uploads")
    default_head = "personal"
    server_factors = frozenset()  # A, B are personal; the server sends each client its own θ̄_i

    def __init__(self, cfg):
        super().__init__(cfg)
        self.init: dict[str, torch.Tensor] = {}
        self.last_graph: dict | None = None  # {"round", "clients", "graph", "similarity"}

    def train_factors(self, t: int) -> set[str]:
        return {"A", "B"}

    def upload_factors(self, t: int) -> set[str]:
        return {"A", "B"}

    def setup(self, ctx: MethodContext) -> None:
        self.init = ctx.am.get_state({"A", "B"})  # the seeded initial adapter, known to the server too

    @staticmethod
    def state(server: Server) -> dict:
        """server.extra["pfedgraph"]: models {cid: (round, {key: θ̄_i})}, fedavg (round, {key: θ}) or None."""
        return server.extra.setdefault("pfedgraph", {"models": {}, "fedavg": None})

    def download(self, server: Server, cid: int, t: int) -> dict[str, torch.Tensor]:
        out = super().download(server, cid, t)  # head keys, if the head is shared
        st = server.extra.get("pfedgraph")
        if not st:
            return out
        seen = server.synced.get(cid, 0)
        if cid in st["models"]:
            produced, model = st["models"][cid]
            if produced > seen:
                out.update(model)
        elif st["fedavg"] is not None and st["fedavg"][0] > seen:
            out.update(st["fedavg"][1])
        return out

    def aggregate(self, server: Server, t: int, uploads: list[Upload]) -> None:
        super().aggregate(server, t, uploads)  # the head, when shared
        st = self.state(server)
        keys = sorted(k for k in uploads[0].tensors if factor_of(k) in ("A", "B"))
        ids = [u.client for u in uploads]
        n = np.array([u.n_examples for u in uploads], dtype=np.float64)
        p = n / n.sum()
        x = torch.stack([torch.cat([u.tensors[k].double().flatten() for k in keys]) for u in uploads])  # (m, P)
        x0 = torch.cat([self.init[k].double().flatten() for k in keys]) if self.init else torch.zeros(x.shape[1])
        s = cosine_matrix(x - x0)
        w = collaboration_graph(s, p, self.opt.alpha)
        wt, pt = torch.from_numpy(w), torch.from_numpy(p)
        for row, i in enumerate(ids):
            st["models"][i] = (t, {k: self._mix(wt[row], uploads, k) for k in keys})
        st["fedavg"] = (t, {k: self._mix(pt, uploads, k) for k in keys})
        self.last_graph = {"round": t, "clients": ids, "graph": w, "similarity": s}

    @staticmethod
    def _mix(weights: torch.Tensor, uploads: list[Upload], key: str) -> torch.Tensor:
        stacked = torch.stack([u.tensors[key].to(torch.float64) for u in uploads])  # (m, ...)
        return torch.tensordot(weights, stacked, dims=1).to(uploads[0].tensors[key].dtype)
