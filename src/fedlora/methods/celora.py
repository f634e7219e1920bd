"""CE-LoRA: tri-matrix adapters, C-only upload, personalized aggregation of C.

Li et al., "Communication-Efficient and Personalized Federated Foundation Model Fine-Tuning via
Tri-Matrix Adaptation", arXiv 2503.23869. The body of the paper is not public; every choice the
abstract leaves open is a named option (`method.celora.*`, see the project's methods notes).

    ΔW = s · B C A,  C ∈ R^{r×r}, C = 0 at round 0 (ΔW = 0), A and B non-zero:
      ab_init = svd:    A = top-r right singular vectors of W0 (rows), B = top-r left singular
                        vectors, signs fixed (largest-|entry| of each left vector positive, the
                        paired right vector flipped with it), so every client computes the same.
      ab_init = random: A, B random orthonormal from the run seed.
      ab_train = frozen: A, B never change (C aggregation exact: every C_j is in the same basis);
                 local:  A, B train, stay personal (C_i and C_j drift into different bases);
                 warmup: A, B train in rounds 1..ab_warmup_rounds, then freeze.
    train C (+ A, B while they train);  upload C only (r² numbers per adapted matrix; + head if shared).
      c_basis = own:    C_i is sent as trained, in client i's own A_i, B_i.
      c_basis = common: C_i is sent in the shared initial basis A0, B0 (orthonormal, known to every
                        client), the least-squares C whose B0 C A0 is closest to B_i C_i A_i:
                          C̃_i = B0ᵀ B_i C_i A_i A0ᵀ                      (r×r, the same bytes),
                        and a received C̄ (common basis) is stored as the C_i whose B_i C_i A_i is
                        closest to B0 C̄ A0:  C_i = B_i⁺ B0 C̄ A0 A_i⁺.
                        Σ_j w_ij C̃_j then adds coordinates that mean the same on every client; with
                        A_i = A0, B_i = B0 (ab_train = frozen) both maps are the identity.

    Client i, when it first takes part (before its first download): its data descriptor
    (`client_descriptor`, from its own training data through the base model, ΔW = 0), sent once and
    charged to that round. The server's S^data covers the clients that sent one (similarity.py).
    Every round, over the accepted uploads j:
      ΔC_j = C_j − the C client j started the round with (its C̄, or its newcomer C̄, or C = 0);
      S^param_ij = cosine(ΔC_i, ΔC_j) (flattened over all layers);
      w_ii = λ (`self_weight`),  w_ij = (1 − λ) softmax_{j≠i}((β ẑ^data_ij + (1 − β) ẑ^param_ij) / τ + log p_j),
        ẑ: each similarity z-scored per row over the others (j ≠ i);
      weights = learned: the others' part refined by alignment with client i's update (similarity.py);
      weights = fedavg: w_ij = p_j (the non-personalized variant; no descriptor is sent);
      weights = shrink: w = λ I, C̄_i = λ C_i (a control, no descriptor: C_i pulled towards C = 0, the
                        init, with nobody else's C: does mixing add more than that shrinkage?);
      C̄_i = Σ_j w_ij C_j: one (m × m) weight-matrix product for all keys, sent to client i at its next round.
    A newcomer with a descriptor receives Σ_j w_j C_j over the clients already seen (their last
    accepted C), w_j = softmax_j(ẑ^data_j / τ + log p_j); without one, the last FedAvg C.

Uplink: r² per adapted matrix per round, plus the data descriptor once: the label histogram and the
overall feature mean and variance (`descriptor: overall`, 2 × hidden numbers), or per class.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from ..adapters import AdaptedModel, factor_of
from ..adapters.tri_init import init_tri_factors
from ..seeding import rng
from .base import Method, MethodContext, MethodOptions, register
from .capabilities import RoundMetrics, SendsDescriptor, UploadCodec
from .similarity import (
    combine_weights,
    data_descriptor,
    data_similarity,
    descriptor_nbytes,
    fedavg_weights,
    param_similarity,
    pooled_features,
    privatize,
    refine_others,
    zscore_others,
)

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..data import Examples
    from ..federation import Server, Upload


# ---------------------------------------------------------------- options


class Options(MethodOptions):
    """method.celora: every choice the paper's abstract leaves open."""

    ab_init: Literal["svd", "random"] = "svd"
    # frozen: A, B never train (C means the same on every client); local: they train and stay personal;
    # warmup: they train in rounds 1..ab_warmup_rounds of the run, then freeze
    ab_train: Literal["frozen", "local", "warmup"] = "local"
    ab_warmup_rounds: int = Field(2, ge=0)
    beta: float = Field(0.5, ge=0, le=1)  # weight of data-space vs parameter-space similarity
    # the others' softmax temperature, on z-scored similarities (unit spread per row); large -> by example share
    tau: float = Field(1.0, gt=0)
    # w_ii: a number (untuned default 0.5), or auto (self scored as its most similar other)
    self_weight: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = 0.5
    # softmax; learned: the others' weights refined by alignment with the client's update; fedavg: plain FedAvg of C;
    # shrink: C̄_i = self_weight · C_i, no other client's C (a control: is what mixing adds only shrinkage to C = 0?)
    weights: Literal["softmax", "learned", "fedavg", "shrink"] = "softmax"
    learned_steps: int = Field(20, ge=0)
    learned_lambda: float = Field(1.0, ge=0)  # pull towards the softmax weights
    learned_lr: float = Field(0.1, gt=0)
    # what the data descriptor holds: overall feature mean and variance (2 x hidden numbers), or per class
    descriptor: Literal["overall", "per_class"] = "overall"
    # the data descriptor's private release: clip it to L2 norm descriptor_clip, add N(0, (sigma·clip)²);
    # with privacy.dp on, its (sigma, 1 release) is composed into the run's epsilon
    descriptor_sigma: float = Field(0.0, ge=0)
    descriptor_clip: float = Field(1.0, gt=0)
    param_center: bool = False  # subtract the round's mean ΔC before the cosine (removes the drift all share)
    # the basis C is sent and aggregated in: own (each client's A_i, B_i: the paper's) or common (the shared
    # initial A0, B0, into which each client maps its B_i C_i A_i and back; exact with ab_train frozen)
    c_basis: Literal["own", "common"] = "own"

    @model_validator(mode="after")
    def _check_shrink(self) -> Options:
        if self.weights == "shrink" and self.self_weight == "auto":
            raise ValueError("method.celora.self_weight: weights 'shrink' needs a number (the shrinkage factor), "
                             "not auto")
        return self

    @property
    def uses_descriptor(self) -> bool:
        """Whether clients send a data descriptor (fedavg and shrink weights use no similarity)."""
        return self.beta > 0 and self.weights not in ("fedavg", "shrink")


# ---------------------------------------------------------------- the method


def flat_c(tensors: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([tensors[k].flatten() for k in keys])


@register
class CELoRA(SendsDescriptor, UploadCodec, RoundMetrics, Method):
    name = "celora"
    options = Options
    tri = True
    default_head = "personal"
    server_factors = frozenset()  # C, A, B are all personal; the server sends each client its own C̄

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if cfg.federation.secure_aggregation:  # beta 1 too: the m personalized sums C̄ = W C solve for every C_j
            raise ValueError("federation.secure_aggregation: celora needs each client's C_i (its similarity "
                             "and personalized C̄_i; m such sums with known weights reveal every C_j)")
        if cfg.privacy.dp == "central":
            raise ValueError("privacy.dp: central DP is not supported for celora (personalized C̄); use local")
        c = cfg.method.celora
        if cfg.privacy.dp != "none" and c.beta > 0 and c.descriptor_sigma == 0:
            raise ValueError("privacy.dp is on but CE-LoRA's data descriptor (used when method.celora.beta > 0) "
                             "would be released without noise: set method.celora.descriptor_sigma > 0 or beta 0")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.opt: Options
        self.num_labels = 0
        self.dominant: list[int] = []  # each client's most frequent label: for the report's heatmap only
        self.init_c: dict[str, torch.Tensor] = {}
        self.init_ab: dict[str, torch.Tensor] = {}
        self.run_dir: Path | None = None
        self.charged: dict[int, tuple[int, int]] = {}  # cid -> (round its descriptor was received, bytes)
        self._s_data: tuple[tuple[int, ...], np.ndarray] | None = None  # cache: (described ids, S^data)
        self.last_weights: dict | None = None  # {"round", "clients", "weights", "s_data", "s_param"}

    def train_factors(self, t: int) -> set[str]:
        ab = self.opt.ab_train == "local" or (self.opt.ab_train == "warmup" and t <= self.opt.ab_warmup_rounds)
        return {"C"} | ({"A", "B"} if ab else set())

    def upload_factors(self, t: int) -> set[str]:
        return {"C"}

    def setup(self, ctx: MethodContext) -> None:
        init_tri_factors(ctx.am, self.opt.ab_init, ctx.seed)
        self.init_c = ctx.am.get_state({"C"})
        self.init_ab = ctx.am.get_state({"A", "B"})  # the common basis A0, B0 (c_basis: common)
        self.run_dir = Path(ctx.run_dir)
        self.num_labels = ctx.num_labels
        self.dominant = [int(np.bincount(lab, minlength=self.num_labels).argmax()) if len(lab) else -1
                         for lab in ctx.client_labels]

    # ---- the basis C travels in (client side) ----
    @property
    def encodes_upload(self) -> bool:
        return self.opt.c_basis == "common"

    def _map_c(self, tensors: dict[str, torch.Tensor], model: dict[str, torch.Tensor], maps) -> dict[str, torch.Tensor]:
        """Each C key as L C R, (L, R) = maps(A_i, B_i, A0, B0) in float64 (the client's and the common factors)."""
        if not self.encodes_upload:
            return tensors
        out = dict(tensors)
        for k in (k for k in tensors if factor_of(k) == "C"):
            p = k[:-1]  # "<module path>."
            left, right = maps(*(x.to(tensors[k].device, torch.float64) for x in (
                model[p + "A"], model[p + "B"], self.init_ab[p + "A"], self.init_ab[p + "B"])))
            out[k] = (left @ tensors[k].double() @ right).to(tensors[k])  # (r, r)
        return out

    def encode_upload(self, tensors: dict[str, torch.Tensor],
                      model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """c_basis common: each C_i as C̃_i = B0ᵀ B_i C_i A_i A0ᵀ."""
        return self._map_c(tensors, model, lambda a, b, a0, b0: (b0.T @ b, a @ a0.T))

    def decode_download(self, tensors: dict[str, torch.Tensor],
                        model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """c_basis common: a received C̄ stored as C_i = B_i⁺ B0 C̄ A0 A_i⁺ (least squares)."""
        return self._map_c(tensors, model, lambda a, b, a0, b0: (torch.linalg.lstsq(b, b0).solution,  # B_i⁺ B0
                                                                 torch.linalg.lstsq(a.T, a0.T).solution.T))  # A0 A_i⁺

    # ---- the data descriptor: computed on the client, released once, stored by the server ----
    def needs_descriptor(self, server: Server, cid: int) -> bool:
        # weights = fedavg uses no similarity (newcomers too get the plain FedAvg C): nothing to send
        return self.opt.uses_descriptor and cid not in self.state(server)["descriptors"]

    def client_descriptor(self, am: AdaptedModel, data: Examples, classes: torch.Tensor,
                          cid: int) -> dict[str, torch.Tensor]:
        """The client's released descriptor: base-model features (every C zeroed, so ΔW = 0) of its own data."""
        saved = am.get_state({"C"})
        am.set_state({k: torch.zeros_like(v) for k, v in saved.items()})
        try:
            feats = pooled_features(am.model, data.input_ids, data.attention_mask, self.cfg.eval.batch_size,
                                    None if data.images is None else data.pixel_values)
        finally:
            am.set_state(saved)
        sigma = self.opt.descriptor_sigma
        desc = data_descriptor(feats, classes, self.num_labels, self.opt.descriptor, all_classes=sigma > 0)
        return privatize(desc, sigma, self.opt.descriptor_clip, rng("descriptor_noise", self.cfg.seed, cid))

    def receive_descriptor(self, server: Server, cid: int, desc: dict[str, torch.Tensor], t: int) -> None:
        st = self.state(server)
        if cid in st["descriptors"]:
            raise ValueError(f"client {cid} sent its data descriptor twice (rounds {st['descriptors'][cid][0]}, {t})")
        st["descriptors"][cid] = (t, desc)
        self.charged[cid] = (t, descriptor_nbytes(desc))

    def extra_upload_bytes(self, cid: int, t: int) -> int:
        """Raw bytes sent outside the adapter upload: the descriptor, in the round it was received."""
        r, nbytes = self.charged.get(cid, (0, 0))
        return nbytes if r == t else 0

    @classmethod
    def descriptor_release(cls, cfg: RunConfig) -> tuple[float, int] | None:
        """One release per client at noise multiplier descriptor_sigma, whenever beta > 0."""
        c = cfg.method.celora
        return (c.descriptor_sigma, 1) if c.beta > 0 else None

    def s_data(self, server: Server, ids: list[int]) -> np.ndarray:
        """S^data over `ids` (m, m), from the descriptors received so far; NaN where one is missing."""
        desc = self.state(server)["descriptors"]
        have = tuple(sorted(desc))
        if not have:
            return np.full((len(ids), len(ids)), np.nan)
        if self._s_data is None or self._s_data[0] != have:
            self._s_data = (have, data_similarity([desc[c][1] for c in have]))
        pos = {c: i for i, c in enumerate(have)}
        idx = np.array([pos.get(c, -1) for c in ids])
        s = self._s_data[1][np.ix_(np.maximum(idx, 0), np.maximum(idx, 0))].copy()
        s[idx < 0, :] = np.nan
        s[:, idx < 0] = np.nan
        return s

    # ---- server state ----
    @staticmethod
    def state(server: Server) -> dict:
        """server.extra["celora"]: keys (the C keys in flattening order), shapes {key: shape},
        cbar {cid: (round, C̄ flat)}, fedavg (round, C flat) or None, last {cid: (n_examples, last accepted C flat)},
        descriptors {cid: (round received, descriptor)}."""
        return server.extra.setdefault("celora", {"keys": [], "shapes": {}, "cbar": {}, "fedavg": None, "last": {},
                                                  "descriptors": {}})

    @staticmethod
    def unflatten(st: dict, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for k in st["keys"]:
            shape = st["shapes"][k]
            n = int(np.prod(shape))
            out[k] = flat[i:i + n].view(shape)
            i += n
        return out

    def newcomer_c(self, server: Server, cid: int) -> torch.Tensor | None:
        """A described client without a C̄ of its own: Σ_j w_j C_j over the clients already seen, by data similarity."""
        st = self.state(server)
        seen = [j for j in sorted(st["last"]) if j != cid and j in st["descriptors"]]
        if cid not in st["descriptors"] or not seen:
            return None
        s = self.s_data(server, [cid, *seen])  # row 0: the newcomer
        n = np.array([st["last"][j][0] for j in seen], dtype=np.float64)
        z = zscore_others(s)[0, 1:]
        logits = z / self.opt.tau + np.log(n / n.sum())
        w = np.exp(logits - logits.max())
        w = torch.from_numpy(w / w.sum())  # (seen,)
        x = torch.stack([st["last"][j][1] for j in seen])  # (seen, D)
        return (w @ x.double()).to(x.dtype)

    def start_c(self, server: Server, cid: int) -> torch.Tensor:
        """The C client `cid` started this round with (flat), as the server knows it."""
        st = self.state(server)
        if cid in st["cbar"]:
            return st["cbar"][cid][1]
        if st["fedavg"] is not None:
            new = self.newcomer_c(server, cid)
            return new if new is not None else st["fedavg"][1]
        return flat_c(self.init_c, st["keys"])

    def upload_reference(self, server: Server, cid: int) -> dict[str, torch.Tensor]:
        st = self.state(server)
        return self.unflatten(st, self.start_c(server, cid)) if st["keys"] else dict(self.init_c)

    # ---- per round ----
    def download(self, server: Server, cid: int, t: int) -> dict[str, torch.Tensor]:
        out = super().download(server, cid, t)  # head keys, if the head is shared
        st = server.extra.get("celora")
        if not st or st["fedavg"] is None:
            return out
        seen = server.synced.get(cid, 0)
        if cid in st["cbar"]:
            produced, cbar = st["cbar"][cid]
            if produced > seen:
                out.update(self.unflatten(st, cbar))
        elif st["fedavg"][0] > seen:
            out.update(self.unflatten(st, self.start_c(server, cid)))
        return out

    def weights(self, s_data: np.ndarray, s_param: np.ndarray, n: np.ndarray, delta: torch.Tensor) -> np.ndarray:
        o = self.opt
        if o.weights == "fedavg":
            return fedavg_weights(n)
        if o.weights == "shrink":  # rows sum to λ: the rest of the mass goes to C = 0
            return float(o.self_weight) * np.eye(len(n))
        w = combine_weights(s_data, s_param, o.beta, o.tau, n, o.self_weight)
        if o.weights == "learned":
            w = refine_others(w, delta, o.learned_lambda, o.learned_steps, o.learned_lr)
        return w

    def aggregate(self, server: Server, t: int, uploads: list[Upload]) -> None:
        super().aggregate(server, t, uploads)  # the head, when shared (keys in server.global_state)
        st = self.state(server)
        keys = sorted(k for k in uploads[0].tensors if factor_of(k) == "C")
        if not st["keys"]:
            st["keys"], st["shapes"] = keys, {k: tuple(uploads[0].tensors[k].shape) for k in keys}
        ids = [u.client for u in uploads]
        n = np.array([u.n_examples for u in uploads], dtype=np.float64)
        dtype = uploads[0].tensors[keys[0]].dtype
        # one stack per key, one (m × m) @ (m × r²) product per key
        x = torch.cat([torch.stack([u.tensors[k] for u in uploads]).flatten(1) for k in keys], 1).double()  # (m, D)
        ref = torch.stack([self.start_c(server, i) for i in ids]).double()  # (m, D)
        s_param = param_similarity(x - ref, center=self.opt.param_center)
        s_data = self.s_data(server, ids) if self.opt.beta > 0 else np.full((len(ids), len(ids)), np.nan)
        w = self.weights(s_data, s_param, n, x - ref)
        wt = torch.from_numpy(w)  # float64
        cbar = (wt @ x).to(dtype).unbind(0)  # m rows (D,), views of one (m, D) product
        last = x.to(dtype).unbind(0)
        for row, i in enumerate(ids):
            st["cbar"][i] = (t, cbar[row])
            st["last"][i] = (int(n[row]), last[row])
        st["fedavg"] = (t, (torch.from_numpy(n / n.sum()) @ x).to(dtype))
        self.last_weights = {"round": t, "clients": ids, "weights": w, "s_data": s_data, "s_param": s_param}
        self._save(server, t)

    def round_metrics(self, server: Server, t: int) -> dict:
        """The sharing this round: mean w_ii and mean effective number of collaborators 1 / Σ_j w_ij²; and
        whether C̄ can mean anything: the mean ΔC cosine between distinct clients (S^param off the diagonal),
        the mean data similarity, and their Pearson correlation over the client pairs (near 0: the two
        signals disagree on who is alike, as when each C lives in its own drifting A, B basis)."""
        lw = self.last_weights
        if lw is None or lw["round"] != t:
            return {}
        w = lw["weights"]
        share = w / w.sum(axis=1, keepdims=True)  # the rows as shares (shrink's rows sum to λ, the others' to 1)
        out = {"celora_self_weight": float(np.mean(np.diag(w))),
               "celora_collaborators": float(np.mean(1.0 / np.sum(share**2, axis=1))),
               "celora_descriptors": len(self.state(server)["descriptors"])}
        pairs = np.triu(np.ones_like(w, dtype=bool), 1)
        sp, sd = lw["s_param"][pairs], lw["s_data"][pairs]
        if np.isfinite(sp).any():
            out["celora_param_similarity"] = float(np.nanmean(sp))
        if np.isfinite(sd).any():
            out["celora_data_similarity"] = float(np.nanmean(sd))
        both = np.isfinite(sp) & np.isfinite(sd)
        if both.sum() >= 3 and sp[both].std() > 0 and sd[both].std() > 0:
            out["celora_similarity_agreement"] = float(np.corrcoef(sp[both], sd[both])[0, 1])
        return out

    def _save(self, server: Server, t: int) -> None:
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lw = self.last_weights
        ids = np.array(lw["clients"])
        dominant = np.array([self.dominant[i] if i < len(self.dominant) else -1 for i in ids])
        np.savez(self.run_dir / f"weights_round_{t}.npz", weights=lw["weights"], clients=ids,
                 s_data=lw["s_data"], s_param=lw["s_param"], dominant_label=dominant)
