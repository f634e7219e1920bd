"""Local training and evaluation, shared by every method and both runtimes."""

from __future__ import annotations

import torch

from .adapters import AdaptedModel
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
