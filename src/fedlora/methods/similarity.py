"""Similarities and aggregation weights for CE-LoRA's personalized aggregation (pure torch / numpy).

Data space. Client i releases a descriptor of its training data, once, when it first takes part:
its normalized label histogram h_i and the frozen base model's mean-pooled last hidden states,
summarised as (`descriptor`)
    overall:   one mean μ_i and per-dimension variance σ²_i over all its examples (2 × hidden numbers);
    per_class: a mean μ_ic and variance σ²_ic for every class c it holds (2 × hidden per class).
The server computes
    JS_ij = Jensen–Shannon(h_i, h_j)                               (natural log, in [0, ln 2])
    overall:   F_ij = ||μ_i − μ_j||² + ||σ_i − σ_j||²               (Fréchet distance, diagonal Gaussians)
    per_class: F_ij = Σ_c ω_ijc (||μ_ic − μ_jc||² + ||σ_ic − σ_jc||²),  ω_ijc = min(h_ic, h_jc) / Σ_c' min(h_ic', h_jc')
               (the same class compared with the same class, weighted by label overlap; a pair with no
               class in common gets the largest F of the pairs that have one)
    D_ij  = JS_ij / med(JS) + F_ij / med(F),    S^data_ij = exp(−D_ij / med(D))   (med: over pairs i < j)

Parameter space (every round): S^param_ij = cosine(ΔC_i, ΔC_j), ΔC flattened over all layers
(optionally centered: ΔC minus the participants' mean ΔC, see `param_similarity`).

Weights (`combine_weights`). The self term is not scored: S_ii = 1 beats every other entry by
construction, and at a small τ it took all the weight. Each similarity is z-scored per row over the
others, ẑ_ij = (S_ij − mean_{k≠i} S_ik) / std_{k≠i} S_ik, and
    w_ii = λ_i,    w_ij = (1 − λ_i) · softmax_{j≠i}((β ẑ^data_ij + (1 − β) ẑ^param_ij) / τ + log p_j),
p_j the participants' example shares. λ (`self_weight`) is a number, or `auto`: client i scored as if it
were its most similar other, i.e. self is one more softmax candidate with logit max_{j≠i} ℓ_ij − log p_j
+ log p_i. τ → ∞ spreads 1 − λ over the others by example share.

`refine_others` (weights = learned) refines the others' part u_i = w_i,−i / (1 − λ_i) per row by
projected gradient descent on the simplex over j ≠ i of
    f_i(u) = ||g_i − Σ_{j≠i} u_j g_j||² / L + μ ||u − u_i^softmax||²,   g_j = ΔC_j / ||ΔC_j||,  L = λ_max(G G^T),
an alignment of the others' aggregate update with client i's own update direction, after FedAWA
(Shi et al., "FedAWA: Adaptive Optimization of Aggregation Weights in Federated Learning Using Client
Vectors", CVPR 2025), whose weights align the aggregate with the client vectors. The reconstruction
objective ||C_i − Σ_j w_ij C_j||² used before is minimised at w_i = e_i (local training); here e_i is
not in the feasible set, the self-weight stays λ_i, and the optimum moves weight onto the others whose
updates point where client i's does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

# ---------------------------------------------------------------- client side: the descriptor


@torch.inference_mode()
def pooled_features(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    batch_size: int = 64, pixel_values: Callable[[slice], torch.Tensor] | None = None) -> torch.Tensor:
    """Mean of the last hidden state over the attention mask, (n, hidden), float32 (rows right-padded).

    A VLM (`pixel_values`: rows -> their images' pixel values) pools over its image and question tokens alike.

    A Hugging Face model runs its backbone only (`model.base_model`: the encoder or decoder stack
    without the task head), so a causal LM never computes its (batch × length × vocab) logits.
    """
    was_training = model.training
    model.eval()
    backbone = getattr(model, "base_model", model)
    out = []
    for i in range(0, len(input_ids), batch_size):
        mask = attention_mask[i:i + batch_size]
        width = max(1, int(mask.sum(1).max()))
        ids, mask = input_ids[i:i + batch_size, :width], mask[:, :width]
        images = {} if pixel_values is None else {"pixel_values": pixel_values(slice(i, i + batch_size))}
        if backbone is not model:
            h = backbone(input_ids=ids, attention_mask=mask, **images).last_hidden_state
        else:
            h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **images).hidden_states[-1]
        m = mask.unsqueeze(-1).to(h.dtype)
        out.append(((h * m).sum(1) / m.sum(1).clamp_min(1)).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def data_descriptor(features: torch.Tensor, labels: torch.Tensor, num_labels: int, kind: str = "overall",
                    all_classes: bool = False) -> dict[str, torch.Tensor]:
    """What a client sends: hist (L,) normalized, and

    overall:   mean, var (hidden,) over all its examples;
    per_class: classes (m,) the labels present, mean, var (m, hidden) per present class.

    `labels` are the examples' classes (a causal LM task: their categories), one per row of `features`.
    `all_classes` (per_class): rows for every class (zeros for absent ones), so that which classes a client
    holds is not released in the clear (the private release below needs this).
    """
    labels = labels.long()
    counts = torch.bincount(labels, minlength=num_labels).double()
    feats = features.double()
    hist = (counts / counts.sum()).float()
    if kind == "overall":
        return {"hist": hist, "mean": feats.mean(0).float(), "var": feats.var(0, unbiased=False).float()}
    if kind != "per_class":
        raise ValueError(f"method.celora.descriptor: unknown value '{kind}' (overall, per_class)")
    classes = torch.arange(num_labels) if all_classes else torch.nonzero(counts > 0).flatten()
    zero = torch.zeros(feats.shape[1], dtype=torch.float64)
    mean = torch.stack([feats[labels == c].mean(0) if counts[c] > 0 else zero for c in classes])
    var = torch.stack([feats[labels == c].var(0, unbiased=False) if counts[c] > 0 else zero for c in classes])
    return {"hist": hist, "classes": classes, "mean": mean.float(), "var": var.float()}


def privatize(desc: dict[str, torch.Tensor], sigma: float, clip: float,
              rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """The Gaussian mechanism on the descriptor (per_class: built with `all_classes`): clip every released
    number (histogram, means, variances, as one vector) to L2 norm `clip`, add N(0, (sigma · clip)²) to each.
    `sigma` is the noise multiplier that `privacy.dp.run_epsilon` composes into the run's budget.

    Post-processing keeps the descriptor valid: the histogram is clipped at 0 and renormalized (uniform
    if nothing is left), variances are clipped at 0.
    """
    if sigma <= 0:
        return desc
    flat = torch.cat([desc[k].double().flatten() for k in ("hist", "mean", "var")])
    scale = min(1.0, clip / max(float(flat.norm()), 1e-12))

    def noisy(x: torch.Tensor) -> torch.Tensor:
        return x * scale + torch.from_numpy(rng.normal(0.0, sigma * clip, size=tuple(x.shape))).to(x.dtype)

    hist = noisy(desc["hist"]).clamp_min(0)
    hist = hist / hist.sum() if hist.sum() > 0 else torch.full_like(hist, 1.0 / len(hist))
    return {**desc, "hist": hist, "mean": noisy(desc["mean"]), "var": noisy(desc["var"]).clamp_min(0)}


def descriptor_nbytes(desc: dict[str, torch.Tensor]) -> int:
    """Raw bytes the client sends: numel × element size of every descriptor tensor."""
    return sum(t.numel() * t.element_size() for t in desc.values())


# ---------------------------------------------------------------- server side: data similarity


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence (natural log) of two distributions, in [0, ln 2]."""
    return float(js_matrix(np.stack([p, q]))[0, 1])


def js_matrix(h: np.ndarray) -> np.ndarray:
    """Pairwise Jensen–Shannon divergences of the rows of h (n, L), (n, n)."""
    h = np.asarray(h, dtype=np.float64)
    h = h / h.sum(1, keepdims=True)
    m = 0.5 * (h[:, None, :] + h[None, :, :])  # (n, n, L)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(h[:, None, :] > 0, h[:, None, :] * np.log(h[:, None, :] / m), 0.0).sum(-1)  # KL(h_i || m_ij)
    return np.clip(0.5 * (kl + kl.T), 0.0, None)


def gauss_distance(mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Pairwise squared 2-Wasserstein distances of diagonal Gaussians N(mu_i, diag sd_i²), rows (n, hidden)."""
    x = np.concatenate([mu, sd], axis=1)
    sq = np.sum(x**2, axis=1)
    return np.clip(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0, None)


def pair_median(d: np.ndarray) -> float:
    """Median of the off-diagonal upper triangle (each unordered pair once)."""
    n = d.shape[0]
    if n < 2:
        return 0.0
    return float(np.median(d[np.triu_indices(n, 1)]))


def median_normalize(d: np.ndarray) -> np.ndarray:
    """d / median over pairs; if the median is 0, d / mean over pairs; all zeros stay zeros."""
    med = pair_median(d)
    if med <= 1e-12:
        n = d.shape[0]
        med = float(np.mean(d[np.triu_indices(n, 1)])) if n > 1 else 0.0
    return d / med if med > 1e-12 else np.zeros_like(d)


def feature_distance(descs: list[dict[str, torch.Tensor]]) -> np.ndarray:
    """F (n, n): overall Fréchet distance, or the label-overlap-weighted per-class one (see the module doc)."""
    if "classes" not in descs[0]:
        mu = np.stack([d["mean"].double().numpy() for d in descs])
        sd = np.sqrt(np.clip(np.stack([d["var"].double().numpy() for d in descs]), 0.0, None))
        return gauss_distance(mu, sd)
    n, num_labels = len(descs), len(descs[0]["hist"])
    hidden = descs[0]["mean"].shape[1]
    h = np.stack([d["hist"].double().numpy() for d in descs])  # (n, L)
    mu, sd = np.zeros((num_labels, n, hidden)), np.zeros((num_labels, n, hidden))
    for i, d in enumerate(descs):
        cls = d["classes"].numpy()
        mu[cls, i] = d["mean"].double().numpy()
        sd[cls, i] = np.sqrt(np.clip(d["var"].double().numpy(), 0.0, None))
    overlap = np.minimum(h[:, None, :], h[None, :, :])  # (n, n, L)
    total = overlap.sum(-1)
    f = np.zeros((n, n))
    for c in range(num_labels):
        if overlap[:, :, c].any():
            f += overlap[:, :, c] * gauss_distance(mu[c], sd[c])
    has = total > 1e-12
    f = np.where(has, f / np.where(has, total, 1.0), 0.0)
    off = has & ~np.eye(n, dtype=bool)
    f[~has] = f[off].max() if off.any() else 0.0
    np.fill_diagonal(f, 0.0)
    return f


def data_distances(descs: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """The two distance matrices and their median-normalized sum D."""
    js = js_matrix(np.stack([d["hist"].double().numpy() for d in descs]))
    fd = feature_distance(descs)
    return {"js": js, "fd": fd, "d": median_normalize(js) + median_normalize(fd)}


def data_similarity(descs: list[dict[str, torch.Tensor]]) -> np.ndarray:
    """S^data = exp(−D / med(D)), (n, n), ones on the diagonal."""
    d = data_distances(descs)["d"]
    return np.exp(-median_normalize(d))


# ---------------------------------------------------------------- parameter similarity and weights


def cosine_matrix(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Cosine similarity of the rows of x (m, n); a zero row has cosine 0 with others, 1 with itself."""
    x = np.asarray(x.double() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1)
    safe = np.where(norm > 0, norm, 1.0)
    s = (x @ x.T) / np.outer(safe, safe)
    s[np.outer(norm, norm) == 0] = 0.0
    np.fill_diagonal(s, 1.0)
    return np.clip(s, -1.0, 1.0)


def param_similarity(delta: torch.Tensor | np.ndarray, center: bool = False) -> np.ndarray:
    """S^param = cosine of the rows of ΔC (m, n). `center`: subtract the participants' mean ΔC first,
    so that a drift every client shares (it dominates the raw cosine after round 1) does not count."""
    x = np.asarray(delta.double() if isinstance(delta, torch.Tensor) else delta, dtype=np.float64)
    return cosine_matrix(x - x.mean(axis=0, keepdims=True) if center else x)


def zscore_others(s: np.ndarray) -> np.ndarray:
    """Per row i, (s_ij − mean_{k≠i} s_ik) / std_{k≠i} s_ik over j ≠ i; 0 on the diagonal, for NaN entries
    (an unknown similarity counts as average) and for a row whose others are all alike."""
    s = np.array(s, dtype=np.float64)
    m = s.shape[0]
    other = ~np.eye(m, dtype=bool) & np.isfinite(s)
    cnt = other.sum(1, keepdims=True)
    vals = np.where(other, s, 0.0)
    mean = vals.sum(1, keepdims=True) / np.maximum(cnt, 1)
    var = np.where(other, (s - mean) ** 2, 0.0).sum(1, keepdims=True) / np.maximum(cnt, 1)
    sd = np.sqrt(var)
    z = np.where(other & (sd > 1e-12), (s - mean) / np.where(sd > 1e-12, sd, 1.0), 0.0)
    return z


def other_logits(s_data: np.ndarray, s_param: np.ndarray, beta: float, tau: float,
                 n_examples: list[int] | np.ndarray) -> np.ndarray:
    """ℓ_ij = (β ẑ^data_ij + (1 − β) ẑ^param_ij) / τ + log p_j for j ≠ i, −inf on the diagonal, (m, m)."""
    p = np.asarray(n_examples, dtype=np.float64)
    p = p / p.sum()
    z = beta * zscore_others(s_data) + (1.0 - beta) * zscore_others(s_param)
    logits = z / tau + np.log(p)[None, :]
    np.fill_diagonal(logits, -np.inf)
    return logits


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=1, keepdims=True)
    e = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    return e / e.sum(axis=1, keepdims=True)


def self_weights(logits: np.ndarray, n_examples: list[int] | np.ndarray, self_weight: float | str) -> np.ndarray:
    """λ_i per row: the configured number, or `auto` (self scored as its most similar other)."""
    m = logits.shape[0]
    if self_weight != "auto":
        return np.full(m, float(self_weight))
    p = np.asarray(n_examples, dtype=np.float64)
    logp = np.log(p / p.sum())
    off = np.where(np.isfinite(logits), logits, -np.inf)
    best = (off - logp[None, :]).max(axis=1) + logp  # (m,) max_j (ℓ_ij − log p_j) + log p_i
    top = np.maximum(off.max(axis=1), best)
    num = np.exp(best - top)
    return num / (num + np.exp(off - top[:, None]).sum(axis=1))


def combine_weights(s_data: np.ndarray, s_param: np.ndarray, beta: float, tau: float,
                    n_examples: list[int] | np.ndarray, self_weight: float | str = 0.5) -> np.ndarray:
    """w_ii = λ_i, w_ij = (1 − λ_i) softmax_{j≠i}(ℓ_ij) (see the module doc); rows sum to 1. One client: [[1]]."""
    m = len(n_examples)
    if m == 1:
        return np.ones((1, 1))
    logits = other_logits(s_data, s_param, beta, tau, n_examples)
    lam = self_weights(logits, n_examples, self_weight)
    w = (1.0 - lam)[:, None] * softmax_rows(logits)
    w[np.arange(m), np.arange(m)] = lam
    return w


def fedavg_weights(n_examples: list[int] | np.ndarray) -> np.ndarray:
    """Every row the example shares p_j: the plain (non-personalized) FedAvg of C."""
    p = np.asarray(n_examples, dtype=np.float64)
    return np.tile(p / p.sum(), (len(p), 1))


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of v onto the probability simplex (Duchi et al., 2008)."""
    v = np.atleast_2d(np.asarray(v, dtype=np.float64))
    n = v.shape[1]
    u = -np.sort(-v, axis=1)
    css = np.cumsum(u, axis=1) - 1.0
    idx = np.arange(1, n + 1)
    rho = np.sum(u - css / idx > 0, axis=1)  # number of positive entries, >= 1
    theta = css[np.arange(len(v)), rho - 1] / rho
    return np.clip(v - theta[:, None], 0.0, None)


def gram_scale(g: np.ndarray, iters: int = 50) -> float:
    """Largest eigenvalue of a Gram matrix (the curvature of the alignment term), by power iteration from
    the all-ones vector: O(iters · m²) instead of a full eigendecomposition; an error only rescales the step."""
    if not g.size:
        return 0.0
    v = np.ones(g.shape[0]) / np.sqrt(g.shape[0])
    lam = 0.0
    for _ in range(iters):
        gv = g @ v
        lam = float(np.linalg.norm(gv))
        if lam <= 1e-300:
            return 0.0
        v = gv / lam
    return float(v @ g @ v)


def unit_rows(x: torch.Tensor | np.ndarray) -> np.ndarray:
    x = np.asarray(x.double() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def align_objective(u: np.ndarray, delta: torch.Tensor | np.ndarray, u0: np.ndarray, mu: float) -> np.ndarray:
    """f_i(u_i) for every row (what `refine_others` decreases); u rows live on the simplex over j ≠ i."""
    g = unit_rows(delta)
    scale = gram_scale(g @ g.T)
    resid = g - u @ g
    return np.sum(resid**2, axis=1) / (scale if scale > 0 else 1.0) + mu * np.sum((u - u0) ** 2, axis=1)


def refine_others(w0: np.ndarray, delta: torch.Tensor | np.ndarray, mu: float, steps: int, lr: float) -> np.ndarray:
    """weights = learned: keep each w_ii, refine the others' part by projected gradient descent on f_i."""
    w0 = np.asarray(w0, dtype=np.float64)
    m = w0.shape[0]
    if m < 3:  # one other at most: nothing to choose between
        return w0.copy()
    eye = np.eye(m, dtype=bool)
    lam = np.diag(w0).copy()
    rest = np.where(eye, 0.0, w0)
    u0 = rest / np.maximum(rest.sum(1, keepdims=True), 1e-300)
    g = unit_rows(delta)
    gram = g @ g.T
    scale = gram_scale(gram)
    gram = gram / scale if scale > 0 else np.zeros_like(gram)
    u = u0.copy()
    for _ in range(steps):
        # row i: ∇ = 2 (G u_i − G e_i) / L + 2 μ (u_i − u0_i), restricted to j ≠ i
        grad = 2.0 * (u @ gram - gram) + 2.0 * mu * (u - u0)
        u = project_simplex(np.where(eye, -1e9, u - lr * grad))  # self pushed far below: projected to 0
    w = (1.0 - lam)[:, None] * u
    w[eye] = lam
    return w
