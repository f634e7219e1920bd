"""CE-LoRA: tri-matrix adapters, C-only upload, personalized aggregation of C.

Li et al., "Communication-Efficient and Personalized Federated Foundation Model Fine-Tuning via
Tri-Matrix Adaptation", arXiv 2503.23869. The body of the paper is not public; every choice the
abstract leaves open is a named option (`method.celora.*`, see /work/shared/methods.md).

    ΔW = s · B C A,  C ∈ R^{r×r}, C = 0 at round 0 (ΔW = 0), A and B non-zero:
      ab_init = svd:    A = top-r right singular vectors of W0 (rows), B = top-r left singular
                        vectors, signs fixed (largest-|entry| of each left vector positive, the
                        paired right vector flipped with it), so every client computes the same.
      ab_init = random: A, B random orthonormal from the run seed.
      ab_train = frozen: A, B never change (C aggregation exact); local: A, B train, stay personal.
    train C (+ A, B if local);  upload C only (r² numbers per adapted matrix; + head if shared).

    Server, once before round 1: S^data from the clients' data descriptors (similarity.py).
    Every round, over the accepted uploads j (self included):
      ΔC_j = C_j − the C client j started the round with (its C̄ from the server, or the FedAvg C
             for a newcomer, or the initial C = 0);
      S^param_ij = cosine(ΔC_i, ΔC_j) (flattened over all layers);
      z_ij = β S^data_ij + (1 − β) S^param_ij;   w_ij = softmax_j(z_ij / τ + log p_j);
      weights = learned: each row refined by projected gradient descent on the simplex of
                ||C_i − Σ_j w_ij C_j||² / L + λ ||w_i − w_i^softmax||²;
      C̄_i = Σ_j w_ij C_j, sent to client i at its next round (it overwrites the client's C).
    τ → ∞ gives the example-weighted FedAvg of C (the non-personalized variant); β = 1 data
    similarity only, β = 0 parameter similarity only. A client that never had an upload accepted
    receives the example-weighted FedAvg of the last aggregated round's C instead.

Uplink: r² per adapted matrix per round, plus the data descriptor once (`descriptor_bytes[cid]`:
label histogram + per-class feature mean and variance, hidden size numbers each).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..adapters import AdaptedModel, factor_of
from .base import Method, register
from .similarity import (
    combine_weights,
    data_descriptor,
    data_similarity,
    descriptor_nbytes,
    param_similarity,
    pooled_features,
    privatize,
    refine_weights,
)

if TYPE_CHECKING:
    from ..federation import Server, Upload
    from ..runtime.simulation import Simulation


# ---------------------------------------------------------------- A, B initialization


def svd_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r×d) = top-r right singular vectors of W0 (k×d) as rows, B (k×r) = top-r left singular vectors.

    Computed in float64 and cast to W0's dtype. Signs: the largest-|entry| of each left singular vector
    u_i (first one on ties) is made positive, and v_i is flipped with it, so that B diag(S) A stays the
    rank-r truncated SVD of W0 and every client computes the same factors from the same W0.
    """
    w = weight.detach().to(torch.float64)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    u, vh = u[:, :r], vh[:r, :]
    pivot = u.abs().argmax(dim=0)
    sign = torch.sign(u[pivot, torch.arange(r)])
    sign[sign == 0] = 1.0
    return (vh * sign[:, None]).to(weight.dtype).contiguous(), (u * sign[None, :]).to(weight.dtype).contiguous()


def random_orthonormal(rows: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """(rows × r) with orthonormal columns, from a Gaussian via QR (sign-fixed by diag(R) > 0), float64."""
    q, rr = torch.linalg.qr(torch.randn(rows, r, generator=gen, dtype=torch.float64))
    d = torch.sign(torch.diagonal(rr))
    d[d == 0] = 1.0
    return q * d[None, :]


@torch.no_grad()
def init_tri_factors(am: AdaptedModel, mode: str, seed: int) -> None:
    """Set every adapted layer's A, B (C stays 0, so ΔW = 0)."""
    gen = torch.Generator().manual_seed(seed)
    for layer in am.layers.values():
        k, d = layer.base.weight.shape
        if mode == "svd":
            a, b = svd_factors(layer.base.weight, layer.r)
        elif mode == "random":
            a = random_orthonormal(d, layer.r, gen).t()
            b = random_orthonormal(k, layer.r, gen)
        else:
            raise ValueError(f"method.celora.ab_init: unknown value '{mode}'")
        layer.A.copy_(a)
        layer.B.copy_(b)
        if layer.C is not None:
            layer.C.zero_()


# ---------------------------------------------------------------- the method


@register
class CELoRA(Method):
    name = "celora"
    tri = True
    default_head = "personal"
    server_factors = frozenset()  # C, A, B are all personal; the server sends each client its own C̄

    def __init__(self, cfg):
        super().__init__(cfg)
        self.opt = cfg.method.celora
        self.descriptors: list[dict[str, torch.Tensor]] = []
        self.descriptor_bytes: dict[int, int] = {}
        self.s_data: np.ndarray | None = None  # (num_clients, num_clients), computed once in setup
        self.init_c: dict[str, torch.Tensor] = {}
        self.run_dir: Path | None = None
        self.last_weights: dict | None = None  # {"round", "clients", "weights", "s_data", "s_param"}

    def train_factors(self, t: int) -> set[str]:
        return {"C"} | ({"A", "B"} if self.opt.ab_train == "local" else set())

    def upload_factors(self, t: int) -> set[str]:
        return {"C"}

    # ---- before round 1 ----
    def setup(self, sim: Simulation) -> None:
        am = sim.am
        init_tri_factors(am, self.opt.ab_init, self.cfg.seed)
        self.init_c = am.get_state({"C"})
        self.run_dir = Path(sim.run_dir)
        # descriptors: the base model (C = 0, so ΔW = 0 exactly) over each client's training data;
        # with beta = 0 the data similarity is unused, so nothing is computed or sent
        self.descriptors, self.descriptor_bytes = [], {}
        if self.opt.beta == 0:
            self.s_data = None
            return
        labels = torch.as_tensor(np.asarray(sim.task.labels, dtype=np.int64))  # classes; a causal LM's categories
        for cid, data in enumerate(sim.client_train):
            feats = pooled_features(am.model, data.input_ids, data.attention_mask, self.cfg.eval.batch_size)
            private = self.opt.descriptor_sigma > 0
            desc = data_descriptor(feats, labels[torch.as_tensor(sim.split.clients[cid][0])], sim.task.num_labels,
                                   all_classes=private)
            desc = privatize(desc, self.opt.descriptor_sigma, self.opt.descriptor_clip,
                             np.random.default_rng([self.cfg.seed, 7919, cid]))
            self.descriptors.append(desc)
            self.descriptor_bytes[cid] = descriptor_nbytes(desc)
        self.s_data = data_similarity(self.descriptors)  # server side, cached

    def extra_upload_bytes(self, cid: int, t: int) -> int:
        """Raw bytes sent outside the adapter upload: the descriptor, once, charged to round 1."""
        return self.descriptor_bytes.get(cid, 0) if t == 1 else 0

    # ---- server state ----
    @staticmethod
    def state(server: Server) -> dict:
        """server.extra["celora"]: cbar {cid: (round, {key: C̄})}, fedavg (round, {key: C}) or None."""
        return server.extra.setdefault("celora", {"cbar": {}, "fedavg": None})

    def reference(self, server: Server, cid: int) -> dict[str, torch.Tensor]:
        """The C client `cid` started this round with, as the server knows it."""
        st = self.state(server)
        if cid in st["cbar"]:
            return st["cbar"][cid][1]
        if st["fedavg"] is not None:
            return st["fedavg"][1]
        return self.init_c

    # ---- per round ----
    def download(self, server: Server, cid: int, t: int) -> dict[str, torch.Tensor]:
        out = super().download(server, cid, t)  # head keys, if the head is shared
        st = server.extra.get("celora")
        if not st:
            return out
        seen = server.synced.get(cid, 0)
        if cid in st["cbar"]:
            produced, cbar = st["cbar"][cid]
            if produced > seen:
                out.update(cbar)
        elif st["fedavg"] is not None and st["fedavg"][0] > seen:
            out.update(st["fedavg"][1])
        return out

    def aggregate(self, server: Server, t: int, uploads: list[Upload]) -> None:
        super().aggregate(server, t, uploads)  # the head, when shared (keys in server.global_state)
        st = self.state(server)
        keys = sorted(k for k in uploads[0].tensors if factor_of(k) == "C")
        ids = [u.client for u in uploads]
        n = np.array([u.n_examples for u in uploads], dtype=np.float64)
        cs = [{k: u.tensors[k] for k in keys} for u in uploads]
        x = torch.stack([torch.cat([c[k].double().flatten() for k in keys]) for c in cs])  # (m, Σ r²)
        ref = torch.stack([torch.cat([self.reference(server, i)[k].double().flatten() for k in keys])
                           for i in ids])
        s_param = param_similarity(x - ref, center=self.opt.param_center)
        s_data = self.s_data[np.ix_(ids, ids)] if self.s_data is not None else np.eye(len(ids))
        w = combine_weights(s_data, s_param, self.opt.beta, self.opt.tau, n)
        if self.opt.weights == "learned":
            w = refine_weights(w, x, self.opt.learned_lambda, self.opt.learned_steps, self.opt.learned_lr)
        wt = torch.from_numpy(w)  # float64
        p = torch.from_numpy(n / n.sum())
        for row, i in enumerate(ids):
            st["cbar"][i] = (t, {k: self._mix(wt[row], cs, k) for k in keys})
        st["fedavg"] = (t, {k: self._mix(p, cs, k) for k in keys})
        self.last_weights = {"round": t, "clients": ids, "weights": w, "s_data": s_data, "s_param": s_param}
        self._save(server, t)

    @staticmethod
    def _mix(weights: torch.Tensor, cs: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
        stacked = torch.stack([c[key].to(torch.float64) for c in cs])  # (m, r, r)
        return torch.tensordot(weights, stacked, dims=1).to(cs[0][key].dtype)

    def _save(self, server: Server, t: int) -> None:
        run_dir = server.extra.get("run_dir") or self.run_dir
        if run_dir is None:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        lw = self.last_weights
        np.savez(run_dir / f"weights_round_{t}.npz", weights=lw["weights"], clients=np.array(lw["clients"]),
                 s_data=lw["s_data"], s_param=lw["s_param"])
        if self.s_data is not None and not (run_dir / "data_similarity.npy").exists():
            np.save(run_dir / "data_similarity.npy", self.s_data)
