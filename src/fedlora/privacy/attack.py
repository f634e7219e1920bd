"""The honest-but-curious server's gradient-inversion attack on exactly what a method uploads.

Threat model (stated assumptions): the server knows the base model (architecture and tokenizer), the
round's download (hence the client's starting state of every key it uploads), the learning rate of each
factor, the batch size, the padded sequence length and each row's attention mask (the number of real
tokens), and that the client took ONE local step on ONE batch. It observes ΔU = upload − download for
the uploaded keys only (FedIT: A, B [+ head]; FFA / RoLoRA B-round: B [+ head]; FedSA: A; CE-LoRA: C) —
or, as the most leaky reference, the full fine-tuning update of every base weight, word embeddings
included.

    client step (the attack experiment): "sgd":   ΔU = −lr · g               -> target g = −ΔU / lr
                                         "adamw": ΔU ≈ −lr · g / (|g| + eps) (AdamW's first step)
    closed form (what the upload gives away without optimisation):
        bag of tokens: the non-zero rows of the word-embedding update (full fine-tuning; exact)
        placement: word rows = C · position rows (both gradients of the embedding sum), C by least squares
        label (iDLG): at batch 1 the head bias's gradient softmax(z) − onehot(y) is negative only at y
    inversion (DLG / TAG style): optimize dummy input embeddings x (b × L × hidden, fed via
        `inputs_embeds`; initialised from the bag when known) and soft labels y so that the update they
        induce through the same step rule matches the observed one:
        Σ (1 − cos) + λ_l2 ‖u(x, y) − u_obs‖² / ‖u_obs‖²
    decoding: each position goes to the token whose embedding-layer output (word + position + type,
        LayerNorm) is nearest in cosine to the dummy's — among the bag, each bag token placed at least
        once, when the bag is known; then (LAMP style) the candidates are scored by the same objective
        on real tokens and the best is refined by discrete swap / replace proposals.
Metrics: bag-of-tokens precision / recall / F1 (special and pad tokens excluded) and ROUGE-L of the
decoded text against the true text. Classification models only (a causal LM is not supported here).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..adapters import AdaptedModel, factor_of
from ..federation import ClientState, Download, apply_download
from ..methods import Method
from ..methods.capabilities import UploadCodec
from ..seeding import rng, torch_generator
from ..train import factor_lr

FULL = "full"  # the full fine-tuning reference "method"


@dataclass
class Observation:
    """What the server sees of one client's round: the update of each uploaded key and the step rule."""

    delta: dict[str, torch.Tensor]  # upload − download, per uploaded key
    lr: dict[str, float]  # per key
    optimizer: str  # "sgd" | "adamw"
    attention_mask: torch.Tensor  # (b, L): assumed known (batch size, length, real tokens)
    num_labels: int
    true_ids: torch.Tensor | None = None  # kept for scoring only; the attack never reads it
    true_labels: torch.Tensor | None = None
    method: str = ""
    round: int = 1


@dataclass
class AttackResult:
    ids: torch.Tensor  # (b, L) decoded token ids
    labels: torch.Tensor  # (b,) recovered labels (argmax of the soft labels)
    loss: float  # final matching objective
    metrics: dict[str, float] = field(default_factory=dict)
    steps_run: list[int] = field(default_factory=list)  # continuous steps taken, per restart (early stop)
    inversion_s: float = 0.0  # wall seconds of the continuous stage (every restart's steps together)
    trace: list[list[float]] = field(default_factory=list)  # the continuous objective at each step, per restart


# ------------------------------------------------------------------ which tensors are observed


def word_embedding_key(am: AdaptedModel) -> str:
    emb = am.model.get_input_embeddings().weight
    return next(n for n, p in am.model.named_parameters() if p is emb)


def full_params(am: AdaptedModel) -> dict[str, torch.nn.Parameter]:
    """Every base weight, the word embeddings included, except the adapters' own factors."""
    return {n: p for n, p in am.model.named_parameters() if not n.endswith((".A", ".B", ".C"))}


def observed_params(am: AdaptedModel, method: Method | None, t: int) -> dict[str, torch.nn.Parameter]:
    """The parameters whose update the server sees: the method's uploaded keys of round t, or FULL."""
    if method is None:
        return full_params(am)
    return {k: am._params[k] for k in am.keys(method.uploaded(t))}


def check_keys(am: AdaptedModel, method: Method | None, t: int, keys) -> None:
    """The attack may only consume what the method uploads in round t."""
    allowed = set(observed_params(am, method, t))
    extra = sorted(set(keys) - allowed)
    if extra:
        name = method.name if method is not None else FULL
        raise ValueError(f"attack: key(s) {extra[:3]} are never uploaded by method '{name}' in round {t}")


# ------------------------------------------------------------------ the client's step


def _soft_ce(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    return -(soft * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def client_step(am: AdaptedModel, method: Method | None, state: ClientState, dl: Download, batch: dict,
                train_cfg, optimizer: str = "sgd") -> Observation:
    """One local step of the client on one batch, with the method's trainable factors (FULL: every base
    weight); returns the server's observation of the upload. `optimizer`: "sgd" (plain, no clipping, no
    weight decay) or "adamw" (torch AdamW, first step, no clipping, no weight decay)."""
    t = dl.round
    st = apply_download(state, dl, method) if method is not None else state  # full: nothing is downloaded
    am.set_state(st.full())
    if method is None:
        train = full_params(am)
        lrs = dict.fromkeys(train, train_cfg.lr)
    else:
        train = {k: am._params[k] for k in am.keys(method.trainable(t))}
        lrs = {k: factor_lr(factor_of(k), train_cfg) for k in train}
    observed = observed_params(am, method, t)
    start = {k: p.detach().clone() for k, p in observed.items()}
    backup = {k: p.detach().clone() for k, p in train.items()}
    cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"attack: optimizer must be 'sgd' or 'adamw', got '{optimizer}'")
    opt = cls([{"params": [p], "lr": lrs[k]} for k, p in train.items()], weight_decay=0.0)
    for p in train.values():
        p.requires_grad_(True)
    am.model.eval()  # no dropout: the server's replay must be deterministic
    opt.zero_grad(set_to_none=True)  # a stale .grad would be added to this step's gradient
    am.model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    delta = {k: (p.detach() - start[k]).clone() for k, p in observed.items()}
    with torch.no_grad():  # restore the model for the attacker (it knows the download, not the step)
        for k, p in train.items():
            p.copy_(backup[k])
            p.requires_grad_(False)
    num_labels = am.model.config.num_labels
    return Observation(delta, {k: lrs[k] for k in observed}, optimizer, batch["attention_mask"].clone(),
                       num_labels, batch["input_ids"].clone(), batch["labels"].clone(),
                       method.name if method is not None else FULL, t)


# ------------------------------------------------------------------ what the upload gives away in closed form


def bag_of_tokens(am: AdaptedModel, obs: Observation) -> torch.Tensor | None:
    """The set of token ids in the batch: the non-zero rows of the word-embedding update. Exact under SGD and
    AdamW's first step (a row that no token of the batch uses has gradient exactly 0, so its update is exactly
    0). None when the word embeddings are not uploaded (every adapter method)."""
    d = obs.delta.get(word_embedding_key(am))
    if d is None:
        return None
    return torch.nonzero(d.abs().sum(-1) > 0).flatten()


def position_scores(am: AdaptedModel, obs: Observation, bag: torch.Tensor) -> torch.Tensor | None:
    """(L, |bag|): how much of each bag token's word-embedding update each position's update explains. Both are
    gradients of the same embedding sum (word + position + type): token v's word row is the sum of the
    gradients at the positions where v sits, position p's row the sum over the batch's rows at p. At batch 1
    under SGD, word rows = C · position rows with C (|bag| × L) 0/1 and one 1 per real position, so the
    least-squares C is that placement exactly (repeats included); otherwise it is a score. None without an
    uploaded absolute position embedding."""
    key = next((k for k in obs.delta if k.endswith("position_embeddings.weight")), None)
    if key is None:
        return None
    seq = obs.attention_mask.shape[1]
    pos = obs.delta[key][:seq].double()  # (L, h)
    word = obs.delta[word_embedding_key(am)][bag].double()  # (|bag|, h)
    return torch.linalg.lstsq(pos.T, word.T, driver="gelsd").solution.float()  # (L, |bag|)


def head_label(am: AdaptedModel, obs: Observation) -> int | None:
    """iDLG: at batch 1 the gradient of the classifier's output bias is softmax(z) − onehot(y), negative only
    at the label, and the update is −lr times it (SGD) or its sign (AdamW): the label is the bias entry that
    grew most. None at batch > 1 or when no head bias is uploaded."""
    if obs.attention_mask.shape[0] != 1:
        return None
    heads = set(am.keys({"head"}))
    for k, d in obs.delta.items():
        if k in heads and k.endswith("bias") and d.numel() == obs.num_labels:
            return int(d.argmax())
    return None


# ------------------------------------------------------------------ the inversion


def _embedding_out(model, x: torch.Tensor) -> torch.Tensor:
    """The embedding layer's output for inputs_embeds x (BERT: + position + type, LayerNorm), or x itself."""
    emb = getattr(getattr(model, "base_model", model), "embeddings", None)
    if emb is None:
        return x
    return emb(inputs_embeds=x)


@torch.no_grad()
def similarity(am: AdaptedModel, x: torch.Tensor, cand: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(b, L, n) cosine, in the embedding layer's output space, between the dummy x (b × L × h) at each
    position and each candidate token placed at that position; for a model whose embedding layer is the word
    embedding alone, cosine between word embeddings."""
    model = am.model
    words = model.get_input_embeddings().weight
    seq = x.shape[1]
    target = F.normalize(_embedding_out(model, x), dim=-1)  # (b, L, h)
    sims = []
    for i in range(0, len(cand), chunk):
        e = words[cand[i:i + chunk]][:, None, :].expand(-1, seq, -1)  # each candidate at every position
        out = F.normalize(_embedding_out(model, e), dim=-1)  # (n, L, h)
        sims.append(torch.einsum("blh,nlh->bln", target, out))
    return torch.cat(sims, dim=-1)


def decode(am: AdaptedModel, x: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest token (cosine, in the embedding layer's output space) at each position of x (b × L × h)."""
    cand = torch.arange(am.model.get_input_embeddings().weight.shape[0]) if vocab is None else vocab
    return cand[similarity(am, x, cand).argmax(-1)]


def place_bag(score: torch.Tensor, bag: torch.Tensor, mask: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Token ids (b, L) from per-position scores of the bag's tokens (b, L, |bag|): the bag is exact, so every
    token is placed at least once (a maximum-score matching of tokens to positions), and each remaining
    position takes its best-scoring token (the repeats). Padding positions get `pad_id`."""
    from scipy.optimize import linear_sum_assignment

    real = mask.bool()
    s = score[real]  # (P, |bag|), positions in row-major order
    choice = s.argmax(-1)
    rows, cols = linear_sum_assignment(s.double().numpy(), maximize=True)
    choice[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    ids = torch.full(mask.shape, pad_id, dtype=torch.long)
    ids[real] = bag[choice]
    return ids


def _induced(grads: list[torch.Tensor], lrs: list[float], optimizer: str, eps: float) -> list[torch.Tensor]:
    if optimizer == "sgd":
        return [-lr * g for g, lr in zip(grads, lrs, strict=True)]
    return [-lr * g / (g.abs() + eps) for g, lr in zip(grads, lrs, strict=True)]


def _mismatch(ind: list[torch.Tensor], target: list[torch.Tensor], l2_weight: float,
              key_weight: float) -> torch.Tensor:
    """Σ (1 − cos) over all keys together and per key, + λ_l2 ‖u − u_obs‖² / ‖u_obs‖²."""
    d_flat = torch.cat([v.flatten() for v in ind])
    t_flat = torch.cat([v.flatten() for v in target])
    cos = F.cosine_similarity(d_flat, t_flat, dim=0)
    per_key = sum(1 - F.cosine_similarity(a.flatten(), c.flatten(), dim=0, eps=1e-12)
                  for a, c in zip(ind, target, strict=True)) / len(ind)
    l2 = (d_flat - t_flat).pow(2).sum() / t_flat.pow(2).sum().clamp_min(1e-30)
    return (1 - cos) + key_weight * per_key + l2_weight * l2


def real_width(mask: torch.Tensor) -> int:
    """The batch's real width: one past the last column any row attends to (rows are right-padded)."""
    cols = torch.nonzero(mask.bool().any(0)).flatten()
    return int(cols.max()) + 1 if len(cols) else mask.shape[1]


def _autocast(precision: str):
    """The autocast context of the continuous stage: fp32 (none), bf16, or auto (bf16 where it is native)."""
    import contextlib

    if precision == "auto":
        from ..compute import native_bf16_cpu

        precision = "bf16" if native_bf16_cpu() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext
    if precision != "bf16":
        raise ValueError(f"attack: precision must be 'fp32', 'bf16' or 'auto', got '{precision}'")
    return lambda: torch.autocast("cpu", dtype=torch.bfloat16)


def dummy_gradients(model, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, ps: list[torch.Tensor],
                    autocast=None, create_graph: bool = True) -> list[torch.Tensor]:
    """The gradients, fp32, of the uploaded keys `ps` (and of nothing else) that dummy input embeddings x with
    soft-label logits y induce: the client's loss on them, differentiated once (`create_graph` keeps the graph
    for the dummies' own gradient)."""
    import contextlib

    with (autocast or contextlib.nullcontext)():
        out = model(inputs_embeds=x, attention_mask=mask).logits
        ce = _soft_ce(out.float(), F.softmax(y, -1))
        grads = torch.autograd.grad(ce, ps, create_graph=create_graph)
    return [g.float() for g in grads]


def _dummy_objective(model, x, y, mask, ps, lrs, target, optimizer, eps, l2_weight, key_weight, autocast):
    grads = dummy_gradients(model, x, y, mask, ps, autocast)
    return _mismatch(_induced(grads, lrs, optimizer, eps), target, l2_weight, key_weight)


def invert(am: AdaptedModel, obs: Observation, method: Method | None = None, steps: int = 500, lr: float = 0.1,
           l2_weight: float = 1.0, key_weight: float = 1.0, min_rel_update: float = 0.0, restarts: int = 1,
           seed: int = 0, vocab: torch.Tensor | None = None, init_scale: float | None = None,
           search: int = 30, use_bag: bool = True, trim: bool = True, patience: int = 0, tol: float = 1e-3,
           precision: str = "fp32") -> AttackResult:
    """Reconstruct the batch from `obs` (only the keys the method uploads). The model must hold the
    client's starting state (the download applied), as after `client_step`.

    1. closed form: the bag of tokens from the word-embedding update (FULL only), the batch-1 label from the
       head's bias (when uploaded), position-to-token scores from the position-embedding update (FULL);
    2. TAG-style continuous matching of dummy input embeddings, `restarts` times (initialised from the bag
       when known), each decoded — among the bag, every bag token placed once at least — to token ids;
    3. the decoded candidates (and the position-score placement) are scored by the gradient-matching
       objective of the real tokens (now the word-embedding update is matched too); the best is improved by
       `search` LAMP-style discrete proposals (swap two positions, or replace one token from the alphabet),
       each kept if it lowers that objective. The result is the lowest objective found.

    Speed-ups that leave the matched observation as it is (tests/test_privacy.py checks each):
    `trim` runs the dummies and the candidates on the batch's real width only (the longest row; the
    padding columns after it are known from the mask and, masked out as keys, add exactly nothing to any
    weight's gradient); `patience` > 0 stops a restart once its objective has not fallen below
    (1 − `tol`) × its best for that many steps, and keeps the dummies of its best step; `precision` "bf16"
    runs the continuous stage's forward and backward under bf16 autocast (the gradients and the objective
    stay fp32, the target is the fp32 observation), "auto" only where the CPU has native bf16 (AVX512-BF16
    or AMX) or on a GPU. Only the uploaded keys' gradients are ever formed (`torch.autograd.grad` on
    them alone)."""
    check_keys(am, method, obs.round, obs.delta)
    params = dict(am.model.named_parameters()) | am._params
    emb_key = word_embedding_key(am)
    # keys whose update is below float32 resolution of the weight carry rounding noise, not signal
    # (e.g. attention key biases, whose gradient is exactly 0): left out of the objective
    keys = [k for k in sorted(obs.delta)
            if float(obs.delta[k].norm()) > min_rel_update * max(float(params[k].detach().norm()), 1e-12)]
    # dummies enter through `inputs_embeds`, so the continuous stage cannot match the word-embedding update
    cont_keys = [k for k in keys if k != emb_key]
    if not cont_keys:
        raise ValueError("attack: every observed update is below the weights' float32 resolution")
    eps = 1e-3  # AdamW: a smooth sign
    full_mask = obs.attention_mask
    b, full_seq = full_mask.shape
    seq = real_width(full_mask) if trim else full_seq
    mask = full_mask[:, :seq]
    words = am.model.get_input_embeddings().weight.detach()
    scale = float(words.std()) if init_scale is None else init_scale
    hidden = words.shape[1]
    pad_id = getattr(am.model.config, "pad_token_id", None) or 0
    bag = bag_of_tokens(am, obs) if use_bag else None
    alphabet = bag if bag is not None else (vocab if vocab is not None else torch.arange(words.shape[0]))
    label = head_label(am, obs)
    autocast = _autocast(precision)
    am.model.eval()
    # double backward (the gradient of a gradient) is not implemented for the fused SDPA kernels
    attn = getattr(am.model.config, "_attn_implementation", None)
    if attn not in (None, "eager"):
        am.model.set_attn_implementation("eager")
    all_ps = [params[k] for k in keys]
    saved_rg = [p.requires_grad for p in all_ps]
    for p in all_ps:
        p.requires_grad_(True)
    ps = [params[k] for k in cont_keys]
    lrs = [obs.lr[k] for k in cont_keys]
    target = [obs.delta[k] for k in cont_keys]

    def discrete(ids: torch.Tensor, soft: torch.Tensor) -> float:
        """The matching objective of real tokens ids, on every usable observed key."""
        out = am.model(input_ids=ids, attention_mask=mask).logits
        grads = torch.autograd.grad(_soft_ce(out, soft), all_ps, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, all_ps, strict=True)]
        ind = _induced(grads, [obs.lr[k] for k in keys], obs.optimizer, eps)
        return float(_mismatch(ind, [obs.delta[k] for k in keys], l2_weight, key_weight))

    candidates = []  # (ids, soft labels)
    steps_run, inversion_s, trace = [], 0.0, []
    try:
        for r in range(restarts):
            gen = torch_generator("attack", seed, r)
            if bag is not None:  # start from the exact tokens in a random arrangement
                x0 = words[bag[torch.randint(len(bag), (b, full_seq), generator=gen)]].clone()
            else:
                x0 = torch.randn(b, full_seq, hidden, generator=gen) * scale
            x = x0[:, :seq].clone().requires_grad_(True)  # the same draw, trimmed or not
            y = torch.zeros(b, obs.num_labels)
            if label is not None:
                y[0, label] = 30.0  # known: a fixed one-hot
            y.requires_grad_(label is None)
            opt = torch.optim.Adam([x], lr=lr * scale)
            ylr = torch.optim.Adam([y], lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
            best, best_x, best_y, since, done = float("inf"), x.detach().clone(), y.detach().clone(), 0, 0
            trace.append([])
            start = time.perf_counter()
            for _ in range(steps):
                loss = _dummy_objective(am.model, x, y, mask, ps, lrs, target, obs.optimizer, eps, l2_weight,
                                        key_weight, autocast)
                done += 1
                v = float(loss.detach())
                trace[-1].append(v)
                if patience > 0:  # early stop: keep the dummies of the best step seen
                    if v < best * (1 - tol):
                        since = 0
                    else:
                        since += 1
                    if v < best:
                        best, best_x, best_y = v, x.detach().clone(), y.detach().clone()
                    if since >= patience:
                        break
                # only the dummies' gradients: loss.backward() would also fill the weights' .grad
                free = [x] if label is not None else [x, y]
                for v_, g in zip(free, torch.autograd.grad(loss, free), strict=True):
                    v_.grad = g
                opt.step()
                if label is None:
                    ylr.step()
                sched.step()
            inversion_s += time.perf_counter() - start
            steps_run.append(done)
            xd, yd = (best_x, best_y) if patience > 0 and since >= patience else (x.detach(), y.detach())
            soft = F.softmax(yd, -1)
            if bag is not None:
                ids = place_bag(similarity(am, xd, bag), bag, mask, pad_id)
            else:
                ids = decode(am, xd, vocab)
            candidates.append((ids, soft))
        if bag is not None and (pos := position_scores(am, obs, bag)) is not None:
            soft = candidates[0][1] if candidates else F.one_hot(torch.tensor([label or 0] * b), obs.num_labels).float()
            candidates.append((place_bag(pos[:seq].expand(b, -1, -1), bag, mask, pad_id), soft))
        scored = [(discrete(ids, soft), ids, soft) for ids, soft in candidates]
        best_v, ids, soft = min(scored, key=lambda c: c[0])
        # LAMP-style discrete search on the objective of real tokens
        gen = torch_generator("attack", seed, restarts)
        real = mask.bool().nonzero()  # (P, 2)
        for _ in range(search if len(real) > 1 else 0):
            i, j = real[torch.randperm(len(real), generator=gen)[:2]]
            cand = ids.clone()
            if torch.rand(1, generator=gen) < 0.5:
                cand[i[0], i[1]], cand[j[0], j[1]] = ids[j[0], j[1]], ids[i[0], i[1]]
            else:
                cand[i[0], i[1]] = alphabet[torch.randint(len(alphabet), (1,), generator=gen)]
            if torch.equal(cand, ids):
                continue
            v = discrete(cand, soft)
            if v < best_v:
                best_v, ids = v, cand
    finally:
        for p, rg in zip(all_ps, saved_rg, strict=True):
            p.requires_grad_(rg)
        if attn not in (None, "eager"):
            am.model.set_attn_implementation(attn)
    if seq < full_seq:  # back to the observed width: the trimmed columns are padding
        ids = torch.cat([ids, torch.full((b, full_seq - seq), pad_id, dtype=ids.dtype)], dim=1)
    return AttackResult(ids, soft.argmax(-1), best_v, steps_run=steps_run, inversion_s=inversion_s,
                        trace=trace)


# ------------------------------------------------------------------ metrics


def _content(ids: torch.Tensor, mask: torch.Tensor, special: set[int]) -> list[list[int]]:
    return [[int(i) for i, m in zip(row, mrow, strict=True) if m and int(i) not in special]
            for row, mrow in zip(ids, mask, strict=True)]


def score(tokenizer, pred_ids: torch.Tensor, true_ids: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Bag-of-tokens precision / recall / F1 over the batch (special and pad tokens excluded, multiset
    counts) and the mean ROUGE-L F1 of each decoded row against its true row."""
    from rouge_score import rouge_scorer

    special = set(tokenizer.all_special_ids)
    pred, true = _content(pred_ids, mask, special), _content(true_ids, mask, special)
    pc, tc = Counter(i for r in pred for i in r), Counter(i for r in true for i in r)
    hit = sum((pc & tc).values())
    p = hit / max(1, sum(pc.values()))
    r = hit / max(1, sum(tc.values()))
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(tokenizer.decode(t), tokenizer.decode(q))["rougeL"].fmeasure for t, q in zip(true, pred,
                                                                                                      strict=True)]
    return {"precision": p, "recall": r, "f1": f1, "rouge_l": sum(rouge) / max(1, len(rouge))}


def mean_ci(values, level: float = 0.95, seed: int = 0, resamples: int = 2000) -> tuple[float, float, float]:
    """The mean of per-sentence scores and its percentile-bootstrap confidence interval (mean, lo, hi)."""
    import numpy as np
    from scipy.stats import bootstrap

    v = np.asarray(values, dtype=float)
    if len(v) < 2 or np.ptp(v) == 0:  # a single value or all equal: no spread to resample
        return float(v.mean()), float(v.mean()), float(v.mean())
    ci = bootstrap((v,), np.mean, confidence_level=level, n_resamples=resamples, method="percentile",
                   rng=rng("bootstrap", seed, len(v))).confidence_interval
    return float(v.mean()), float(ci.low), float(ci.high)


def ratio_ci(num, den, level: float = 0.95, seed: int = 0,
             resamples: int = 2000) -> tuple[float, float, float]:
    """mean(num) / mean(den) over the same sentences (paired), with a paired percentile-bootstrap interval."""
    import numpy as np
    from scipy.stats import bootstrap

    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if len(a) != len(b):
        raise ValueError(f"ratio_ci: {len(a)} and {len(b)} scores; the ratio is over the same sentences")
    if b.mean() == 0:
        return float("inf"), float("inf"), float("inf")
    r = float(a.mean() / b.mean())
    if len(a) < 2:
        return r, r, r

    def stat(x, y, axis=-1):
        return x.mean(axis) / np.maximum(y.mean(axis), 1e-12)

    ci = bootstrap((a, b), stat, paired=True, vectorized=True, confidence_level=level, n_resamples=resamples,
                   method="percentile", rng=rng("bootstrap", seed, len(a), 1)).confidence_interval
    return r, float(ci.low), float(ci.high)


def verdict(ratio_hi: float, ratio_lo: float, bound: float = 0.5) -> str:
    """'holds' when the whole interval of the ratio is at most `bound`, 'does not hold' when it is above, else
    'not settled'."""
    if ratio_hi <= bound:
        return "holds"
    return "does not hold" if ratio_lo > bound else "not settled"


# ------------------------------------------------------------------ one experiment on a Simulation


def attack_client(sim, method_name: str | None = None, cid: int = 0, batch_size: int = 1, batch_index: int = 0,
                  optimizer: str = "sgd", steps: int = 500, lr: float = 0.1, restarts: int = 1,
                  vocab: torch.Tensor | None = None, seed: int = 0, search: int = 30, **invert_kw) -> dict:
    """Attack client `cid`'s round-1 upload of one step on rows [batch_index·b, (batch_index+1)·b) of its
    training data; `method_name` None (or "full") attacks the full fine-tuning reference with the run's
    model. `invert_kw`: invert's other options (trim, patience, tol, precision). Returns the metrics with the
    decoded and true texts."""
    full = method_name in (None, FULL)
    method = None if full else sim.method
    if not full and method_name != sim.method.name:
        raise ValueError(f"attack: the simulation runs method '{sim.method.name}', not '{method_name}'")
    if not full and isinstance(sim.method, UploadCodec) and sim.method.encodes_upload:
        raise ValueError(f"attack: method '{method_name}' sends its upload in a basis only the client knows "
                         "(method.celora.c_basis: common); the server cannot replay its step")
    t = sim.server.last_round + 1
    dl = sim.server.download(cid, t) if not full else Download(cid, t, {})
    data = sim.client_train[cid]
    lo = batch_index * batch_size
    if lo + batch_size > len(data):
        raise ValueError(f"attack: client {cid} has {len(data)} examples, too few for batch {batch_index} "
                         f"of size {batch_size}")
    batch = data.batch(slice(lo, lo + batch_size))
    snapshot = sim.am.get_state()
    try:
        obs = client_step(sim.am, method, sim.clients[cid], dl, batch, sim.cfg.train, optimizer)
        res = invert(sim.am, obs, method, steps=steps, lr=lr, restarts=restarts, seed=seed, vocab=vocab,
                     search=search, **invert_kw)
    finally:
        sim.am.set_state(snapshot)
    m = score(sim.tokenizer, res.ids, obs.true_ids, obs.attention_mask)
    m["label_acc"] = float((res.labels == obs.true_labels).float().mean())
    res.metrics = m
    special = sim.tokenizer.all_special_ids
    return {"method": FULL if full else method.name, "batch_size": batch_size, **m, "objective": res.loss,
            "observed_numbers": int(sum(v.numel() for v in obs.delta.values())), "round": obs.round,
            "steps_run": res.steps_run, "inversion_s": res.inversion_s,
            "decoded": [sim.tokenizer.decode([i for i in r if i not in special]) for r in res.ids.tolist()],
            "true": [sim.tokenizer.decode([i for i in r if i not in special]) for r in obs.true_ids.tolist()]}
