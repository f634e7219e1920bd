"""Similarities and aggregation weights for CE-LoRA's personalized aggregation (pure torch / numpy).

Data space (computed once, before round 1). Client i releases a descriptor of its training data:
its normalized label histogram h_i and, for every class c it holds, the mean μ_ic and per-dimension
variance σ²_ic of the frozen base model's mean-pooled last hidden states. The server computes

    JS_ij = Jensen–Shannon(h_i, h_j)                         (natural log, in [0, ln 2])
    FD_ij = ||μ_i − μ_j||² + ||σ_i − σ_j||²                   (Fréchet distance of diagonal Gaussians)
    D_ij  = JS_ij / med(JS) + FD_ij / med(FD)                 (med: median over pairs i < j)
    S^data_ij = exp(−D_ij / med(D))

where (μ_i, σ²_i) is client i's feature distribution as one diagonal Gaussian, moment-matched from
its per-class statistics: μ_i = Σ_c h_ic μ_ic, σ²_i = Σ_c h_ic (σ²_ic + μ²_ic) − μ²_i.

Parameter space (every round): S^param_ij = cosine(ΔC_i, ΔC_j), ΔC flattened over all layers
(optionally centered: ΔC minus the participants' mean ΔC, see `param_similarity`).

Weights: z_ij = β S^data_ij + (1 − β) S^param_ij;  w_ij = softmax_j(z_ij / τ + log p_j).
`refine_weights` optionally refines each row by projected gradient descent on the simplex of
||C_i − Σ_j w_ij C_j||² / L + λ ||w_i − w_i^softmax||², L = λ_max(Gram of the C_j), so that the step
size and λ mean the same in every round whatever the scale of C (and a step of lr < 1 / (1 + λ) is stable).
"""

from __future__ import annotations

import numpy as np
import torch

# ---------------------------------------------------------------- client side: the descriptor


@torch.inference_mode()
def pooled_features(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    batch_size: int = 64) -> torch.Tensor:
    """Mean of the last hidden state over the attention mask, (n, hidden), float32 (rows right-padded).

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
        if backbone is not model:
            h = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        m = mask.unsqueeze(-1).to(h.dtype)
        out.append(((h * m).sum(1) / m.sum(1).clamp_min(1)).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def data_descriptor(features: torch.Tensor, labels: torch.Tensor, num_labels: int,
                    all_classes: bool = False) -> dict[str, torch.Tensor]:
    """hist (L,) normalized; classes (m,) the labels present; mean, var (m, hidden) per present class.

    `labels` are the examples' classes (a causal LM task: their categories), one per row of `features`.
    `all_classes`: rows for every class (zeros for absent ones), so that which classes a client holds is
    not released in the clear (the private release below needs this).
    """
    labels = labels.long()
    counts = torch.bincount(labels, minlength=num_labels).double()
    classes = torch.arange(num_labels) if all_classes else torch.nonzero(counts > 0).flatten()
    feats = features.double()
    zero = torch.zeros(feats.shape[1], dtype=torch.float64)
    mean = torch.stack([feats[labels == c].mean(0) if counts[c] > 0 else zero for c in classes])
    var = torch.stack([feats[labels == c].var(0, unbiased=False) if counts[c] > 0 else zero for c in classes])
    return {"hist": (counts / counts.sum()).float(), "classes": classes, "mean": mean.float(), "var": var.float()}


def privatize(desc: dict[str, torch.Tensor], sigma: float, clip: float,
              rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """The Gaussian mechanism on the descriptor (built with `all_classes`): clip every released number
    (histogram, means, variances, as one vector) to L2 norm `clip`, add N(0, (sigma · clip)²) to each.
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
    return {"hist": hist, "classes": desc["classes"], "mean": noisy(desc["mean"]),
            "var": noisy(desc["var"]).clamp_min(0)}


def descriptor_nbytes(desc: dict[str, torch.Tensor]) -> int:
    """Raw bytes the client sends: numel × element size of every descriptor tensor."""
    return sum(t.numel() * t.element_size() for t in desc.values())


# ---------------------------------------------------------------- server side: data similarity


def marginal_gaussian(desc: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """The client's feature distribution as one diagonal Gaussian, moment-matched from its class statistics."""
    h = desc["hist"].double().numpy()[desc["classes"].numpy()]
    h = h / h.sum() if h.sum() > 0 else np.full(len(h), 1.0 / len(h))
    mean, var = desc["mean"].double().numpy(), desc["var"].double().numpy()
    mu = h @ mean
    second = h @ (var + mean**2)
    return mu, np.clip(second - mu**2, 0.0, None)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence (natural log) of two distributions, in [0, ln 2]."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def frechet_diag(mu1: np.ndarray, var1: np.ndarray, mu2: np.ndarray, var2: np.ndarray) -> float:
    """Squared 2-Wasserstein (Fréchet) distance between N(mu1, diag var1) and N(mu2, diag var2)."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2))


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


def pairwise(values: list, fn) -> np.ndarray:
    n = len(values)
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            d[i, j] = d[j, i] = fn(values[i], values[j])
    return d


def data_distances(descs: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """The two distance matrices and their median-normalized sum D."""
    js = pairwise([d["hist"].double().numpy() for d in descs], js_divergence)
    fd = pairwise([marginal_gaussian(d) for d in descs], lambda a, b: frechet_diag(a[0], a[1], b[0], b[1]))
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


def combine_weights(s_data: np.ndarray, s_param: np.ndarray, beta: float, tau: float,
                    n_examples: list[int] | np.ndarray) -> np.ndarray:
    """w_ij = softmax_j(z_ij / τ + log p_j), z = β S^data + (1 − β) S^param; rows sum to 1."""
    p = np.asarray(n_examples, dtype=np.float64)
    p = p / p.sum()
    z = beta * np.asarray(s_data, dtype=np.float64) + (1.0 - beta) * np.asarray(s_param, dtype=np.float64)
    logits = z / tau + np.log(p)[None, :]
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(axis=1, keepdims=True)


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


def gram_scale(g: np.ndarray) -> float:
    """Largest eigenvalue of a Gram matrix (the curvature of the reconstruction term)."""
    return float(np.linalg.eigvalsh(g)[-1]) if g.size else 0.0


def refine_weights(w0: np.ndarray, x: torch.Tensor | np.ndarray, lam: float, steps: int, lr: float) -> np.ndarray:
    """Per row i, projected gradient descent on the simplex of
    f_i(w) = ||x_i − Σ_j w_j x_j||² / L + λ ||w − w0_i||²,   L = λ_max(X Xᵀ),
    starting at w0_i (x: one flattened C per participant, rows in the order of w0's columns)."""
    x = np.asarray(x.double() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    g = x @ x.T
    scale = gram_scale(g)
    g = g / scale if scale > 0 else np.zeros_like(g)
    w0 = np.asarray(w0, dtype=np.float64)
    w = w0.copy()
    for _ in range(steps):
        # row i: grad = 2 (G w_i − G e_i) + 2 λ (w_i − w0_i); G symmetric
        grad = 2.0 * (w @ g - g) + 2.0 * lam * (w - w0)
        w = project_simplex(w - lr * grad)
    return w


def objective(w: np.ndarray, x: np.ndarray, w0: np.ndarray, lam: float) -> np.ndarray:
    """f_i(w_i) for every row (what `refine_weights` decreases), for tests and diagnostics."""
    x = np.asarray(x, dtype=np.float64)
    scale = gram_scale(x @ x.T)
    resid = x - w @ x
    rec = np.sum(resid**2, axis=1) / (scale if scale > 0 else 1.0)
    return rec + lam * np.sum((w - w0) ** 2, axis=1)
