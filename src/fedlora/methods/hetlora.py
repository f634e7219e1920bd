"""HetLoRA: heterogeneous ranks, zero-padded aggregation, rank self-pruning.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024.

Client i has rank r_i (`adapter.client_ranks`); R = max r_i. The server holds A (R × d) and
B (k × R) for every adapted layer.

    train:     A_i, B_i (client i's own rank r_i)
    upload:    A_i (r_i × d), B_i (k × r_i)
    aggregate: zero-pad each upload to rank R, then
                 A ← Σ p_i pad(A_i),  B ← Σ p_i pad(B_i),
               p_i = n_i / Σ n_j (`aggregation: zero_pad`), or per layer
               p_i = ||B_i A_i||_F / Σ_j ||B_j A_j||_F (`aggregation: sparsity`: clients whose
               update is larger count more).
               A component j is averaged with zeros from the clients whose rank is below j.
    download:  client i receives the leading r_i components: A[:r_i] (r_i × d), B[:, :r_i]
               (k × r_i), i.e. r_i (d + k) numbers per layer; it overwrites its own A_i, B_i.
    personal:  nothing but the client's copy at its rank (the head follows `method.head`).

Rank self-pruning (`prune_gamma` γ < 1; 1 turns it off): with c = max(min_rank, ⌊γ r_i⌋), the
tail of client i's update is τ_i = ||B_i[:, c:] A_i[c:]||_F (over all layers). When τ_i is
smaller than at the client's previous upload, its rank becomes c: from then on it receives and
uploads rank c (and pays r_i (d + k) less per layer). The paper also adds a penalty on the tail
to the local loss, which pushes it down; that penalty is not applied here (the local loss is the
task loss for every method). The decision uses only the upload, so the server takes it, and the
client learns its new rank from the shape of its next download.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from ..adapters import factor_of
from ..ranks import leading_download, pad
from .base import Method, MethodOptions, register

if TYPE_CHECKING:
    from ..federation import Server, Upload


def tail_norm(tensors: dict[str, torch.Tensor], cut: int) -> float:
    """||B[:, cut:] A[cut:]||_F over every layer of an upload (the components a pruning would drop)."""
    sq = 0.0
    for k, a in tensors.items():
        if k.endswith(".A"):
            b = tensors[k[:-2] + ".B"]
            sq += float((b[:, cut:].double() @ a[cut:].double()).pow(2).sum())
    return math.sqrt(sq)


class Options(MethodOptions):
    """method.hetlora"""

    aggregation: Literal["zero_pad", "sparsity"] = "zero_pad"  # sparsity: weights ∝ ||B_i A_i||_F per layer
    prune_gamma: float = Field(1.0, gt=0, le=1)  # self-pruning: r_i <- floor(gamma r_i) when the tail shrinks; 1: off
    min_rank: int = Field(1, gt=0)  # self-pruning never goes below this rank


@register
class HetLoRA(Method):
    name = "hetlora"
    secure_sum = True  # zero_pad: the weighted mean of the uploads padded to rank R (clients pad before masking)

    @classmethod
    def check(cls, cfg) -> None:
        o = cfg.method.hetlora
        if cfg.federation.secure_aggregation and o.aggregation == "sparsity":
            raise ValueError("federation.secure_aggregation: hetlora's sparsity weights need each client's "
                             "||B_i A_i||; use method.hetlora.aggregation zero_pad")
        if cfg.federation.secure_aggregation and o.prune_gamma < 1:
            raise ValueError("federation.secure_aggregation: hetlora's rank self-pruning reads each client's "
                             "tail norm; set method.hetlora.prune_gamma 1")
    options = Options
    batchable = False  # one client at a time: its state (rank, W or a dual pair) is not a plain stacked pair
    mixed_ranks = True
    server_factors = frozenset()  # A, B live in server.extra at rank R; each client holds its own rank

    def train_factors(self, t: int) -> set[str]:
        return {"A", "B"}

    def upload_factors(self, t: int) -> set[str]:
        return {"A", "B"}

    @staticmethod
    def state(server: Server) -> dict:
        """server.extra["hetlora"]: round, factors {key: rank-R tensor}, ranks {cid: r}, tail {cid: τ}."""
        return server.extra.setdefault("hetlora", {"round": 0, "factors": {}, "ranks": {}, "tail": {}})

    def client_rank(self, server: Server, cid: int) -> int:
        return server.extra.get("hetlora", {}).get("ranks", {}).get(cid, self.ranks[cid])

    def download(self, server: Server, cid: int, t: int) -> dict[str, torch.Tensor]:
        out = super().download(server, cid, t)  # the head, when shared
        out.update(leading_download(server, "hetlora", cid, self.client_rank(server, cid)))  # the leading r_i
        return out

    def weights(self, uploads: list[Upload], layer: str) -> list[float]:
        if self.opt.aggregation == "zero_pad":
            return [float(u.n_examples) for u in uploads]
        norms = [float((u.tensors[f"{layer}.B"].double() @ u.tensors[f"{layer}.A"].double()).norm())
                 for u in uploads]
        return norms if sum(norms) > 0 else [float(u.n_examples) for u in uploads]

    def aggregate(self, server: Server, t: int, uploads: list[Upload]) -> None:
        super().aggregate(server, t, uploads)  # the head, when shared
        st = self.state(server)
        rmax = max(self.ranks)
        for k in sorted(k for k in uploads[0].tensors if factor_of(k) in ("A", "B")):
            w = self.weights(uploads, k[:-2])
            total = sum(w)
            agg = sum((wi / total) * pad(u.tensors[k], k, rmax) for wi, u in zip(w, uploads, strict=True))
            st["factors"][k] = agg.to(uploads[0].tensors[k].dtype)  # (R, d) or (k, R)
        st["round"] = t
        if self.opt.prune_gamma < 1:
            for u in uploads:
                r = self.client_rank(server, u.client)
                cut = max(self.opt.min_rank, math.floor(self.opt.prune_gamma * r))
                if cut >= r:
                    continue
                tau, prev = tail_norm(u.tensors, cut), st["tail"].get(u.client)
                if prev is not None and tau < prev:
                    st["ranks"][u.client] = cut
                    st["tail"].pop(u.client)  # a new tail from the next upload on
                else:
                    st["tail"][u.client] = tau
