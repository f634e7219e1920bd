"""Injection into a Hugging Face model and adapter state as flat `{name: tensor}` dicts.

Keys: `<module path>.A|B|C` for low-rank factors, the parameter name (e.g. `classifier.weight`)
for the task head, whose factor is `head`. The base model's own weights are never in the state.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from .layer import LowRankLinear

FACTORS = ("A", "B", "C", "head")
_HEAD_CANDIDATES = ("classifier", "score")


def factor_of(key: str) -> str:
    last = key.rsplit(".", 1)[-1]
    return last if last in ("A", "B", "C") else "head"


def _matches(name: str, patterns: Iterable[str]) -> bool:
    # a plain pattern matches the last component of the module path; anything with regex
    # characters is a full-match regex on the whole path
    last = name.rsplit(".", 1)[-1]
    for p in patterns:
        if p == last or (any(c in p for c in "^$*+?[]().|\\") and re.fullmatch(p, name)):
            return True
    return False


def detect_head(model: nn.Module) -> list[str]:
    names = dict(model.named_modules())
    return [h for h in _HEAD_CANDIDATES if h in names]


def inject_adapters(
    model: nn.Module,
    target_modules: list[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    tri: bool = False,
    head_modules: list[str] | None = None,
) -> AdaptedModel:
    """Replace every matching nn.Linear by a LowRankLinear; freeze everything but adapters and head."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, target_modules)]
    head_modules = detect_head(model) if head_modules is None else head_modules
    targets = [t for t in targets if not any(t == h or t.startswith(h + ".") for h in head_modules)]
    if not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"adapter.target_modules {target_modules} match no linear layer; "
                         f"linear layer names in this model: {linear}")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LowRankLinear(getattr(parent, child), r, alpha, dropout, tri))
    names = dict(model.named_modules())
    for h in head_modules:
        if h not in names:
            raise ValueError(f"adapter.head_modules: no module named '{h}' in the model")
    return AdaptedModel(model, targets, head_modules, r=r, alpha=alpha, tri=tri)


class AdaptedModel:
    """A model with low-rank layers injected; get/set adapter state by factor."""

    def __init__(self, model: nn.Module, targets: list[str], head_modules: list[str], r: int, alpha: float,
                 tri: bool):
        self.model, self.targets, self.head_modules = model, targets, head_modules
        self.r, self.alpha, self.tri = r, alpha, tri
        self.layers: dict[str, LowRankLinear] = {t: model.get_submodule(t) for t in targets}
        self._params: dict[str, nn.Parameter] = {}
        for t, layer in self.layers.items():
            for f in ("A", "B", "C"):
                p = getattr(layer, f)
                if p is not None:
                    self._params[f"{t}.{f}"] = p
        for h in head_modules:
            for n, p in model.get_submodule(h).named_parameters():
                self._params[f"{h}.{n}"] = p

    def keys(self, factors: Iterable[str] = FACTORS) -> list[str]:
        factors = set(factors)
        return [k for k in self._params if factor_of(k) in factors]

    def parameters(self, factors: Iterable[str]) -> list[nn.Parameter]:
        return [self._params[k] for k in self.keys(factors)]

    def get_state(self, factors: Iterable[str] = FACTORS, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """A detached copy of the adapter state for the given factors (or exactly these `keys`)."""
        keys = self.keys(factors) if keys is None else [k for k in self._params if k in set(keys)]
        return {k: self._params[k].detach().clone() for k in keys}

    @torch.no_grad()
    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            p = self._params.get(k)
            if p is None:
                raise KeyError(f"unknown adapter key '{k}'")
            if p.shape != v.shape:
                raise ValueError(f"adapter key '{k}': shape {tuple(v.shape)} != {tuple(p.shape)}")
            p.copy_(v)

    def set_trainable(self, factors: Iterable[str]) -> None:
        """requires_grad on exactly these factors' parameters (the base model stays frozen)."""
        factors = set(factors)
        for k, p in self._params.items():
            p.requires_grad_(factor_of(k) in factors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(p.shape) for k, p in self._params.items()}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: p.dtype for k, p in self._params.items()}

    def merge(self) -> None:
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()
