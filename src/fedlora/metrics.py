"""Evaluation metrics: accuracy and macro-F1 from scikit-learn, plus metrics of your own.

A metric of your own is a callable registered under a name (`register_metric`), or any importable
`module:function`, listed in `eval.metrics`. Classification metrics are called as `fn(y_true, y_pred)`
on label ids (so `sklearn.metrics:balanced_accuracy_score` works as is); causal-LM metrics as
`fn(references, answers)` on the generated answers' strings, in the rounds that generate.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

METRIC_FNS: dict[str, Callable[..., float]] = {}


def register_metric(name: str, fn: Callable[..., float] | None = None):
    """`register_metric("my_f1", fn)`, or as a decorator `@register_metric("my_f1")`."""
    def deco(f: Callable[..., float]) -> Callable[..., float]:
        METRIC_FNS[name] = f
        return f
    return deco(fn) if fn is not None else deco


def resolve_metrics(specs: list[str]) -> list[tuple[str, Callable[..., float]]]:
    """`eval.metrics` -> [(column name, callable)]: a registered name, or `module:function` (column: function)."""
    out = []
    for spec in specs:
        if spec in METRIC_FNS:
            out.append((spec, METRIC_FNS[spec]))
            continue
        module, _, attr = spec.partition(":")
        if not attr:
            raise ValueError(f"eval.metrics: unknown metric '{spec}' (registered: {sorted(METRIC_FNS) or 'none'}; "
                             f"or give 'module:function')")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"eval.metrics: cannot import '{spec}': {e}") from None
        if not callable(fn):
            raise ValueError(f"eval.metrics: '{spec}' is not callable")
        out.append((attr, fn))
    names = [n for n, _ in out]
    if len(set(names)) < len(names):
        raise ValueError(f"eval.metrics: two metrics share a column name: {names}")
    return out


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                           extra: list[tuple[str, Callable[..., float]]] = ()) -> dict[str, float]:
    """Accuracy and macro-F1 (over the labels present in gold or predictions), then the user's metrics."""
    m = {"accuracy": float(accuracy_score(y_true, y_pred)),
         "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0))}
    for name, fn in extra:
        m[name] = float(fn(y_true, y_pred))
    return m
