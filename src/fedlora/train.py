"""Local training and evaluation, shared by every method and both runtimes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .adapters import AdaptedModel, factor_of
from .adapters.stacked import set_trainable_stacked, stacked
from .compute import autocast, grad_scaler
from .metrics import classification_metrics

if TYPE_CHECKING:  # torch alone at run time: benchmarks/throughput.py runs on a bare GPU machine
    from .config import TrainConfig
    from .data import BatchStream, Examples


def factor_lr(factor: str, cfg: TrainConfig) -> float:
    """The learning rate of an adapter factor ("A", "B", "C", "head", ...): lr_c for C, lr_head for the head."""
    return {"C": cfg.lr_c, "head": cfg.lr_head}.get(factor, cfg.lr)


class LocalHook:
    """A method's addition to local training (FedProx's proximal term, SCAFFOLD's drift correction).

    `params` maps each trainable adapter key to its parameter, `lrs` each key to its learning rate.
    `loss`: a term added to the task loss (its gradient goes through the optimizer with the task's);
    `before_step`: a change to the gradients after backward, before clipping and the optimizer step;
    `after_step`: a change applied to the parameters after every optimizer step (under no_grad).
    """

    def loss(self, params: dict[str, torch.nn.Parameter]) -> torch.Tensor | None:
        return None

    def before_step(self, params: dict[str, torch.nn.Parameter]) -> None:
        pass

    def after_step(self, params: dict[str, torch.nn.Parameter], lrs: dict[str, float]) -> None:
        pass


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def local_train(am: AdaptedModel, data: Examples, stream: BatchStream, factors: set[str], cfg: TrainConfig,
                steps: int, hook: LocalHook | None = None) -> dict[str, float]:
    """`steps` optimizer steps (AdamW or SGD) on the given factors (a fresh optimizer each round, as in FedAvg).

    Under bf16/fp16 (`am.precision`) the forward runs in autocast while the parameters and AdamW's moments
    stay fp32. The loss is summed on the device and read once at the end: no host sync per step."""
    am.set_trainable(factors)
    groups = [{"params": ps, "lr": factor_lr(f, cfg)} for f in sorted(factors) if (ps := am.parameters({f}))]
    if not groups:
        return {"train_loss": float("nan"), "steps": 0}
    params = [p for g in groups for p in g["params"]]
    named = dict(zip(am.keys(factors), am.parameters(factors), strict=True))
    lrs = {k: factor_lr(factor_of(k), cfg) for k in named}
    if getattr(cfg, "optimizer", "adamw") == "sgd":  # a bare TrainConfig-like object (throughput, gpu_check): AdamW
        opt = torch.optim.SGD(groups, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    device = am.device
    scaler = grad_scaler(device, am.precision)
    am.model.train()
    total = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    for _ in range(steps):
        batch = to_device(data.batch(stream.next_rows()), device)
        with autocast(device, am.precision):
            loss = am.model(**batch).loss
            extra = hook.loss(named) if hook is not None else None
        scaler.scale(loss if extra is None else loss + extra).backward()
        if hook is not None:
            hook.before_step(named)
        if cfg.max_grad_norm:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if hook is not None:
            with torch.no_grad():
                hook.after_step(named, lrs)
        total += loss.detach()  # the task loss alone, comparable across methods
    am.model.eval()
    am.set_trainable(())
    return {"train_loss": total.item() / steps, "steps": steps}


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
    clipping (its own slice's norm). Under bf16 the forward runs in autocast as in `local_train` (fp16's
    one loss scale for all K would couple the clients: the simulation trains those one by one). The losses
    are summed on the device and read once. Returns each client's trained tensors for the keys in `keep`."""
    k = len(states)
    with stacked(am, states) as stack:
        set_trainable_stacked(stack, factors)
        groups = [{"params": ps, "lr": factor_lr(f, cfg)} for f in sorted(factors)
                  if (ps := [p for key, p in stack.items() if key in am.keys({f})])]
        if not groups:
            return [{} for _ in states], [{"train_loss": float("nan"), "steps": 0} for _ in states]
        params = [p for g in groups for p in g["params"]]
        sgd = getattr(cfg, "optimizer", "adamw") == "sgd"  # both update elementwise: K independent optimizers
        opt = (torch.optim.SGD if sgd else torch.optim.AdamW)(groups, weight_decay=cfg.weight_decay)
        device = params[0].device
        am.model.train()
        totals = torch.zeros(k, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
        try:
            for _ in range(steps):
                batch, weights = concat_batches([d.batch(s.next_rows()) for d, s in zip(datas, streams, strict=True)])
                batch = to_device(batch, device)
                with autocast(device, am.precision):
                    logits = am.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                losses = per_client_loss(logits, batch["labels"], weights, k)  # (K,), fp32
                losses.sum().backward()  # client k's slice gets the gradient of loss_k alone
                if cfg.max_grad_norm:
                    clip_per_client(params, cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                totals += losses.detach().to(totals.dtype)
        finally:
            am.model.eval()
        out = [{key: p[i].detach().clone() for key, p in stack.items() if key in keep} for i in range(k)]  # model order
    totals = totals.cpu().tolist()
    return out, [{"train_loss": totals[i] / steps, "steps": steps} for i in range(k)]


@torch.inference_mode()
def evaluate(am: AdaptedModel, data: Examples, batch_size: int = 64,
             metrics: list[tuple[str, Callable[..., float]]] = ()) -> dict[str, float]:
    """Accuracy, macro-F1 and loss of a classifier on `data`, plus `metrics` (see fedlora.metrics), with the
    adapter merged into the weights (one host sync at the end)."""
    am.model.eval()
    device = am.device
    preds, loss_sum = [], torch.zeros((), dtype=torch.float64 if device.type != "mps" else torch.float32,
                                      device=device)
    with am.merged(), autocast(device, am.precision):
        for i in range(0, len(data), batch_size):
            out = am.model(**to_device(data.batch(slice(i, i + batch_size)), device))
            loss_sum += out.loss.to(loss_sum.dtype) * out.logits.shape[0]
            preds.append(out.logits.argmax(-1))
    pred = torch.cat(preds).cpu()
    return {**classification_metrics(data.labels.numpy(), pred.numpy(), metrics), "loss": loss_sum.item() / len(data),
            "n": len(data)}


@torch.inference_mode()
def evaluate_lm(am: AdaptedModel, data: Examples, batch_size: int = 16) -> dict[str, float]:
    """Token-level loss and perplexity on the answer tokens (labels != -100)."""
    am.model.eval()
    device = am.device
    loss_sum, tokens = torch.zeros((), dtype=torch.float64 if device.type != "mps" else torch.float32,
                                   device=device), 0
    with am.merged(), autocast(device, am.precision):
        for i in range(0, len(data), batch_size):
            b = data.batch(slice(i, i + batch_size))
            target = b["labels"][:, 1:]
            tokens += int((target != -100).sum())
            b = to_device(b, device)
            logits = am.model(**{k: v for k, v in b.items() if k != "labels"}).logits  # + pixel_values (VLM)
            loss_sum += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                          b["labels"][:, 1:].reshape(-1), ignore_index=-100,
                                                          reduction="sum")
    loss = loss_sum.item() / max(1, tokens)
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
        images = {} if data.images is None else {
            "pixel_values": data.pixel_values(torch.as_tensor(list(rows), dtype=torch.long)).to(am.device)}
        with am.merged(), autocast(am.device, am.precision):
            gen = am.model.generate(input_ids=ids.to(am.device), attention_mask=mask.to(am.device),
                                    max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                    **images).cpu()
        for j, r in enumerate(rows):
            ref = data.labels[r][data.labels[r] != -100]
            image = {} if data.image_index is None else {"image_slot": int(data.image_index[r])}
            out.append({**image, "prompt": tokenizer.decode(prompts[j], skip_special_tokens=True),
                        "answer": tokenizer.decode(gen[j, width:], skip_special_tokens=True).strip(),
                        "reference": tokenizer.decode(ref, skip_special_tokens=True).strip()})
    return out


def normalise_answer(text: str) -> str:
    """Lower case, spaces collapsed, end punctuation dropped: "Circle." and "circle" are the same answer."""
    return " ".join(text.lower().split()).strip(" .!?,;:")


def score_generations(samples: list[dict[str, str]]) -> dict[str, float]:
    """ROUGE-L F1 (rouge-score) and exact match (`normalise_answer`; a VLM's VQA accuracy) against the references."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(s["reference"], s["answer"])["rougeL"].fmeasure for s in samples]
    em = [normalise_answer(s["answer"]) == normalise_answer(s["reference"]) for s in samples]
    n = max(1, len(samples))
    return {"rouge_l": sum(rouge) / n, "exact_match": sum(em) / n}
