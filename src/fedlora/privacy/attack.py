"""The honest-but-curious server's gradient-inversion attack on exactly what a method uploads.

Threat model (stated assumptions): the server knows the base model, the round's download (hence the
client's starting state of every key it uploads), the learning rate of each factor, the batch size,
the padded sequence length and each row's attention mask (the number of real tokens), and that the
client took ONE local step on ONE batch. It observes ΔU = upload − download for the uploaded keys
only (FedIT: A, B [+ head]; FFA / RoLoRA B-round: B [+ head]; FedSA: A; CE-LoRA: C) — or, as the most
leaky reference, the full fine-tuning update of every base weight except the word embeddings.

    client step (the attack experiment): "sgd":   ΔU = −lr · g               -> target g = −ΔU / lr
                                         "adamw": ΔU ≈ −lr · g / (|g| + eps) (AdamW's first step)
    inversion (DLG / TAG style): optimize dummy input embeddings x (b × L × hidden, fed via
        `inputs_embeds`) and soft labels y so that the update they induce through the same step rule
        matches the observed one:  Σ (1 − cos) + λ_l2 ‖u(x, y) − u_obs‖² / ‖u_obs‖²
    decoding: each position goes to the token whose embedding-layer output (word + position + type,
        LayerNorm) is nearest in cosine to the dummy's; for a model whose embedding layer is the
        word embedding alone, nearest word embedding in cosine.
Metrics: bag-of-tokens precision / recall / F1 (special and pad tokens excluded) and ROUGE-L of the
decoded text against the true text. Classification models only (a causal LM is not supported here).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..adapters import AdaptedModel, factor_of
from ..federation import ClientState, Download, apply_download
from ..methods import Method
from ..train import _lr

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


# ------------------------------------------------------------------ which tensors are observed


def full_params(am: AdaptedModel) -> dict[str, torch.nn.Parameter]:
    """Every base weight except the word embeddings (dummy inputs enter through `inputs_embeds`, so that
    gradient is not matchable) and the adapters' own factors."""
    emb = am.model.get_input_embeddings().weight
    return {n: p for n, p in am.model.named_parameters()
            if p is not emb and not n.endswith((".A", ".B", ".C"))}


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
    st = apply_download(state, dl)
    am.set_state(st.full())
    if method is None:
        train = full_params(am)
        lrs = dict.fromkeys(train, train_cfg.lr)
    else:
        train = {k: am._params[k] for k in am.keys(method.trainable(t))}
        lrs = {k: _lr(factor_of(k), train_cfg) for k in train}
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


# ------------------------------------------------------------------ the inversion


def _embedding_out(model, x: torch.Tensor) -> torch.Tensor:
    """The embedding layer's output for inputs_embeds x (BERT: + position + type, LayerNorm), or x itself."""
    emb = getattr(getattr(model, "base_model", model), "embeddings", None)
    if emb is None:
        return x
    return emb(inputs_embeds=x)


@torch.no_grad()
def decode(am: AdaptedModel, x: torch.Tensor, vocab: torch.Tensor | None = None, chunk: int = 4096) -> torch.Tensor:
    """Nearest token (cosine, in the embedding layer's output space) at each position of x (b × L × h)."""
    model = am.model
    words = model.get_input_embeddings().weight
    ids = torch.arange(words.shape[0]) if vocab is None else vocab
    b, seq, _ = x.shape
    target = F.normalize(_embedding_out(model, x), dim=-1)  # (b, L, h)
    best = torch.full((b, seq), -2.0)
    best_id = torch.zeros(b, seq, dtype=torch.long)
    for i in range(0, len(ids), chunk):
        cand = ids[i:i + chunk]
        # each candidate at every position: (n, L, h) through the embedding layer
        e = words[cand][:, None, :].expand(-1, seq, -1)
        out = F.normalize(_embedding_out(model, e), dim=-1)  # (n, L, h)
        sim = torch.einsum("blh,nlh->bln", target, out)
        val, arg = sim.max(-1)
        better = val > best
        best = torch.where(better, val, best)
        best_id = torch.where(better, cand[arg], best_id)
    return best_id


def _induced(grads: list[torch.Tensor], lrs: list[float], optimizer: str, eps: float) -> list[torch.Tensor]:
    if optimizer == "sgd":
        return [-lr * g for g, lr in zip(grads, lrs, strict=True)]
    return [-lr * g / (g.abs() + eps) for g, lr in zip(grads, lrs, strict=True)]


def invert(am: AdaptedModel, obs: Observation, method: Method | None = None, steps: int = 500, lr: float = 0.1,
           l2_weight: float = 1.0, key_weight: float = 1.0, min_rel_update: float = 0.0, restarts: int = 1,
           seed: int = 0, vocab: torch.Tensor | None = None,
           init_scale: float | None = None) -> AttackResult:
    """Reconstruct the batch from `obs` (only the keys the method uploads). The model must hold the
    client's starting state (the download applied), as after `client_step`."""
    check_keys(am, method, obs.round, obs.delta)
    params = dict(am.model.named_parameters()) | am._params
    # keys whose update is below float32 resolution of the weight carry rounding noise, not signal
    # (e.g. attention key biases, whose gradient is exactly 0): left out of the objective
    keys = [k for k in sorted(obs.delta)
            if float(obs.delta[k].norm()) > min_rel_update * max(float(params[k].detach().norm()), 1e-12)]
    if not keys:
        raise ValueError("attack: every observed update is below the weights' float32 resolution")
    ps = [params[k] for k in keys]
    lrs = [obs.lr[k] for k in keys]
    target = [obs.delta[k] for k in keys]
    t_flat = torch.cat([v.flatten() for v in target])
    t_norm2 = t_flat.pow(2).sum().clamp_min(1e-30)
    # AdamW: a smooth sign; eps relative to the typical gradient magnitude the attacker can guess from ΔU
    eps = 1e-3
    mask = obs.attention_mask
    b, seq = mask.shape
    words = am.model.get_input_embeddings().weight.detach()
    scale = float(words.std()) if init_scale is None else init_scale
    hidden = words.shape[1]
    am.model.eval()
    # double backward (the gradient of a gradient) is not implemented for the fused SDPA kernels
    attn = getattr(am.model.config, "_attn_implementation", None)
    if attn not in (None, "eager"):
        am.model.set_attn_implementation("eager")
    saved_rg = [p.requires_grad for p in ps]
    for p in ps:
        p.requires_grad_(True)
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    try:
        for r in range(restarts):
            gen = torch.Generator().manual_seed(seed * 1000 + r)
            x = (torch.randn(b, seq, hidden, generator=gen) * scale).requires_grad_(True)
            y = torch.zeros(b, obs.num_labels).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr * scale)
            ylr = torch.optim.Adam([y], lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
            loss_v = float("inf")
            for _ in range(steps):
                out = am.model(inputs_embeds=x, attention_mask=mask).logits
                ce = _soft_ce(out, F.softmax(y, -1))
                grads = torch.autograd.grad(ce, ps, create_graph=True)
                ind = _induced(list(grads), lrs, obs.optimizer, eps)
                d_flat = torch.cat([v.flatten() for v in ind])
                cos = F.cosine_similarity(d_flat, t_flat, dim=0)
                per_key = sum(1 - F.cosine_similarity(a.flatten(), c.flatten(), dim=0, eps=1e-12)
                              for a, c in zip(ind, target, strict=True)) / len(keys)
                loss = (1 - cos) + key_weight * per_key + l2_weight * (d_flat - t_flat).pow(2).sum() / t_norm2
                opt.zero_grad()
                ylr.zero_grad()
                loss.backward()
                opt.step()
                ylr.step()
                sched.step()
                loss_v = float(loss.detach())
            if best is None or loss_v < best[0]:
                best = (loss_v, x.detach().clone(), y.detach().clone())
    finally:
        for p, rg in zip(ps, saved_rg, strict=True):
            p.requires_grad_(rg)
        if attn not in (None, "eager"):
            am.model.set_attn_implementation(attn)
    loss_v, x, y = best
    ids = decode(am, x, vocab)
    return AttackResult(ids, y.argmax(-1), loss_v)


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


# ------------------------------------------------------------------ one experiment on a Simulation


def attack_client(sim, method_name: str | None = None, cid: int = 0, batch_size: int = 1, batch_index: int = 0,
                  optimizer: str = "sgd", steps: int = 500, lr: float = 0.1, restarts: int = 1,
                  vocab: torch.Tensor | None = None, seed: int = 0) -> dict:
    """Attack client `cid`'s round-1 upload of one step on rows [batch_index·b, (batch_index+1)·b) of its
    training data; `method_name` None (or "full") attacks the full fine-tuning reference with the run's
    model. Returns the metrics with the decoded and true texts."""
    full = method_name in (None, FULL)
    method = None if full else sim.method
    if not full and method_name != sim.method.name:
        raise ValueError(f"attack: the simulation runs method '{sim.method.name}', not '{method_name}'")
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
        res = invert(sim.am, obs, method, steps=steps, lr=lr, restarts=restarts, seed=seed, vocab=vocab)
    finally:
        sim.am.set_state(snapshot)
    m = score(sim.tokenizer, res.ids, obs.true_ids, obs.attention_mask)
    m["label_acc"] = float((res.labels == obs.true_labels).float().mean())
    res.metrics = m
    special = sim.tokenizer.all_special_ids
    return {"method": FULL if full else method.name, "batch_size": batch_size, **m, "objective": res.loss,
            "observed_numbers": int(sum(v.numel() for v in obs.delta.values())),
            "decoded": [sim.tokenizer.decode([i for i in r if i not in special]) for r in res.ids.tolist()],
            "true": [sim.tokenizer.decode([i for i in r if i not in special]) for r in obs.true_ids.tolist()]}
