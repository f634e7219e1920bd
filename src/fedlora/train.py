"""Local training and evaluation, shared by every method and both runtimes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapters import AdaptedModel
from .adapters.stacked import set_trainable_stacked, stacked
from .config import TrainConfig
from .data import BatchStream, Examples


def _lr(factor: str, cfg: TrainConfig) -> float:
    return {"C": cfg.lr_c, "head": cfg.lr_head}.get(factor, cfg.lr)


def local_train(am: AdaptedModel, data: Examples, stream: BatchStream, factors: set[str], cfg: TrainConfig,
                steps: int) -> dict[str, float]:
    """`steps` AdamW steps on the given factors (a fresh optimizer each round, as in FedAvg)."""
    am.set_trainable(factors)
    groups = [{"params": ps, "lr": _lr(f, cfg)} for f in sorted(factors) if (ps := am.parameters({f}))]
    if not groups:
        return {"train_loss": float("nan"), "steps": 0}
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    am.model.train()
    total = 0.0
    for _ in range(steps):
        batch = data.batch(stream.next_rows())
        loss = am.model(**batch).loss
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        total += loss.item()
    am.model.eval()
    am.set_trainable(())
    return {"train_loss": total / steps, "steps": steps}


def concat_batches(batches: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """K clients' batches as one: padded to the widest and the largest row count, rows of client k contiguous.

    Padding columns have attention mask 0 (and label -100); padding rows repeat the client's first row
    and get weight 0 in its loss. Returns the batch and the (K·b,) row weights (1 real, 0 padding)."""
    width = max(b["input_ids"].shape[1] for b in batches)
    rows = max(b["input_ids"].shape[0] for b in batches)
    causal = batches[0]["labels"].dim() == 2
    out: dict[str, list[torch.Tensor]] = {"input_ids": [], "attention_mask": [], "labels": []}
    weights = []
    for b in batches:
        n, pad = b["input_ids"].shape[0], width - b["input_ids"].shape[1]
        filler = torch.zeros(rows - n, dtype=torch.long)  # padding rows: copies of row 0
        for key, value in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
            x = b[key]
            if x.dim() == 2:
                x = F.pad(x, (0, pad), value=value)
            out[key].append(torch.cat([x, x[filler]]))
        weights.append(torch.cat([torch.ones(n), torch.zeros(rows - n)]))
    batch = {k: torch.cat(v) for k, v in out.items()}
    if causal:  # padding rows carry no target
        batch["labels"][torch.cat(weights) == 0] = -100
    return batch, torch.cat(weights)


def per_client_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """(K,) each client's mean loss over its own batch: cross-entropy per example (classification) or per
    answer token (causal LM, labels shifted by one, -100 ignored) — what the model's own `.loss` computes."""
    if labels.dim() == 2:
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                              reduction="none").reshape(k, -1)  # (K, b·(L−1))
        return nll.sum(1) / (labels.reshape(k, -1) != -100).sum(1).clamp(min=1)
    nll = F.cross_entropy(logits.float(), labels, reduction="none") * weights.to(logits.device)  # (K·b,)
    return nll.reshape(k, -1).sum(1) / weights.reshape(k, -1).sum(1).to(logits.device)


@torch.no_grad()
def clip_per_client(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """clip_grad_norm_ on each client's slice: the norm of its own gradients over all its parameters."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    sq = torch.stack([g.reshape(g.shape[0], -1).float().pow(2).sum(1) for g in grads]).sum(0)  # (K,)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1))))


def local_train_stacked(am: AdaptedModel, states: list[dict[str, torch.Tensor]], datas: list[Examples],
                        streams: list[BatchStream], factors: set[str], cfg: TrainConfig, steps: int,
                        keep: set[str]) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, float]]]:
    """`local_train` for K clients at once, over one forward/backward of the base per step.

    Each client has its own loss (mean over its own batch), AdamW state (one AdamW over the stacked
    parameters is K independent ones: its update is elementwise), learning rate per factor and gradient
    clipping (its own slice's norm). Returns each client's trained tensors for the keys in `keep`."""
    k = len(states)
    with stacked(am, states) as stack:
        set_trainable_stacked(stack, factors)
        groups = [{"params": ps, "lr": _lr(f, cfg)} for f in sorted(factors)
                  if (ps := [p for key, p in stack.items() if key in am.keys({f})])]
        if not groups:
            return [{} for _ in states], [{"train_loss": float("nan"), "steps": 0} for _ in states]
        params = [p for g in groups for p in g["params"]]
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        device = params[0].device
        am.model.train()
        totals = torch.zeros(k, dtype=torch.float64)
        try:
            for _ in range(steps):
                batch, weights = concat_batches([d.batch(s.next_rows()) for d, s in zip(datas, streams, strict=True)])
                batch = {key: v.to(device) for key, v in batch.items()}
                logits = am.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                losses = per_client_loss(logits, batch["labels"], weights, k)  # (K,)
                losses.sum().backward()  # client k's slice gets the gradient of loss_k alone
                if cfg.max_grad_norm:
                    clip_per_client(params, cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                totals += losses.detach().double().cpu()
        finally:
            am.model.eval()
        out = [{key: p[i].detach().clone() for key, p in stack.items() if key in keep} for i in range(k)]  # model order
    return out, [{"train_loss": float(totals[i]) / steps, "steps": steps} for i in range(k)]


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, num_labels: int) -> float:
    """Mean F1 over the labels present in gold or pred (sklearn's 'macro' on those labels)."""
    f1s = []
    for k in range(num_labels):
        tp = ((pred == k) & (gold == k)).sum().item()
        fp = ((pred == k) & (gold != k)).sum().item()
        fn = ((pred != k) & (gold == k)).sum().item()
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s) if f1s else 0.0


@torch.inference_mode()
def evaluate(am: AdaptedModel, data: Examples, batch_size: int = 64) -> dict[str, float]:
    am.model.eval()
    preds, loss_sum = [], 0.0
    for i in range(0, len(data), batch_size):
        out = am.model(**data.batch(slice(i, i + batch_size)))
        loss_sum += out.loss.item() * out.logits.shape[0]
        preds.append(out.logits.argmax(-1))
    pred = torch.cat(preds)
    num_labels = int(max(pred.max().item(), data.labels.max().item())) + 1
    return {"accuracy": (pred == data.labels).float().mean().item(),
            "macro_f1": macro_f1(pred, data.labels, num_labels), "loss": loss_sum / len(data), "n": len(data)}


@torch.inference_mode()
def evaluate_lm(am: AdaptedModel, data: Examples, batch_size: int = 16) -> dict[str, float]:
    """Token-level loss and perplexity on the answer tokens (labels != -100)."""
    am.model.eval()
    loss_sum, tokens = 0.0, 0
    for i in range(0, len(data), batch_size):
        b = data.batch(slice(i, i + batch_size))
        logits = am.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        target = b["labels"][:, 1:]
        loss_sum += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                      target.reshape(-1), ignore_index=-100, reduction="sum").item()
        tokens += int((target != -100).sum())
    loss = loss_sum / max(1, tokens)
    return {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "n": len(data), "tokens": tokens}


@torch.inference_mode()
def generate_answers(am: AdaptedModel, tokenizer, data: Examples, max_new_tokens: int = 32,
                     batch_size: int = 8) -> list[dict[str, str]]:
    """Greedy answers to each example's prompt (left-padded batches), with the reference answer."""
    am.model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(data), batch_size):
        rows = range(i, min(i + batch_size, len(data)))
        prompts = [data.input_ids[r, :int(data.prompt_len[r])] for r in rows]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(prompts):
            ids[j, width - len(p):], mask[j, width - len(p):] = p, 1
        gen = am.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=pad_id)
        for j, r in enumerate(rows):
            ref = data.labels[r][data.labels[r] != -100]
            out.append({"prompt": tokenizer.decode(prompts[j], skip_special_tokens=True),
                        "answer": tokenizer.decode(gen[j, width:], skip_special_tokens=True).strip(),
                        "reference": tokenizer.decode(ref, skip_special_tokens=True).strip()})
    return out


def score_generations(samples: list[dict[str, str]]) -> dict[str, float]:
    """ROUGE-L F1 (rouge-score) and exact match (case- and space-insensitive) against the references."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(s["reference"], s["answer"])["rougeL"].fmeasure for s in samples]
    em = [" ".join(s["answer"].lower().split()) == " ".join(s["reference"].lower().split()) for s in samples]
    n = max(1, len(samples))
    return {"rouge_l": sum(rouge) / n, "exact_match": sum(em) / n}
