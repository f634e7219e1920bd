"""Injection into a Hugging Face model and adapter state as flat `{name: tensor}` dicts.

Keys: `<module path>.A|B|C` for low-rank factors, `<module path>.W` for a full update folded into
the frozen weight (FLoRA, FedEx-LoRA), the parameter name (e.g. `classifier.weight`) for the task
head, whose factor is `head`. The base model's own weights are never in the state.

Heterogeneous ranks: layers are built at the largest rank R; `set_state` takes A (r×d) and B (k×r)
at any r ≤ R (the rest of the layer's A rows and B columns set to 0, which keeps them 0 in training:
see fedlora/ranks.py) and `get_state` returns them at the rank last set.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .layer import LowRankLinear

FACTORS = ("A", "B", "C", "W", "LA", "LB", "head")  # LA, LB: a dual adapter's local pair (FedDPA)
_HEAD_CANDIDATES = ("classifier", "score")


def factor_of(key: str) -> str:
    last = key.rsplit(".", 1)[-1]
    return last if last in ("A", "B", "C", "W", "LA", "LB") else "head"


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
    scale: float | None = None,
    full_update: bool = False,
    dual: bool = False,
    generator: torch.Generator | None = None,
) -> AdaptedModel:
    """Replace every matching nn.Linear by a LowRankLinear; freeze everything but adapters and head.

    `generator` draws every A (in module order); the same generator state gives the same adapter."""
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
        setattr(parent, child, LowRankLinear(getattr(parent, child), r, alpha, dropout, tri, scale, full_update,
                                             dual, generator))
    names = dict(model.named_modules())
    for h in head_modules:
        if h not in names:
            raise ValueError(f"adapter.head_modules: no module named '{h}' in the model")
    am = AdaptedModel(model, targets, head_modules, r=r, alpha=alpha, tri=tri)
    am.scale = alpha / r if scale is None else scale
    return am


class AdaptedModel:
    """A model with low-rank layers injected; get/set adapter state by factor."""

    def __init__(self, model: nn.Module, targets: list[str], head_modules: list[str], r: int, alpha: float,
                 tri: bool):
        self.model, self.targets, self.head_modules = model, targets, head_modules
        self.r, self.alpha, self.tri = r, alpha, tri
        self.scale = alpha / r
        self.rank: dict[str, int] = dict.fromkeys(targets, r)  # each layer's rank as last set (≤ r)
        self.precision = "fp32"  # autocast dtype of training and evaluation (fedlora/compute.py)
        self.layers: dict[str, LowRankLinear] = {t: model.get_submodule(t) for t in targets}
        self._params: dict[str, nn.Parameter] = {}
        for t, layer in self.layers.items():
            for f in ("A", "B", "C", "W", "LA", "LB"):
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

    @property
    def device(self) -> torch.device:
        return next(iter(self._params.values())).device

    def get_state(self, factors: Iterable[str] = FACTORS, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """A detached CPU copy of the adapter state for the given factors (or exactly these `keys`), A and B at
        each layer's rank as last set (client states live in host memory, so that the accelerator holds one
        model whatever the number of clients)."""
        keys = self.keys(factors) if keys is None else [k for k in self._params if k in set(keys)]
        out = {}
        for k in keys:
            p, f = self._params[k].detach(), factor_of(k)
            r = self.rank[k.rsplit(".", 1)[0]] if f in ("A", "B") else None
            out[k] = (p[:r] if f == "A" else p[:, :r] if f == "B" else p).to("cpu", copy=True).contiguous()
        return out

    @torch.no_grad()
    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        ranks: dict[str, int] = {}
        for k, v in state.items():
            p = self._params.get(k)
            if p is None:
                raise KeyError(f"unknown adapter key '{k}'")
            f = factor_of(k)
            if p.shape == v.shape:
                p.copy_(v)
            elif f == "A" and v.ndim == 2 and v.shape[1] == p.shape[1] and v.shape[0] < p.shape[0]:
                p[: v.shape[0]].copy_(v)  # a lower-rank state: the leading rows, the rest 0
                p[v.shape[0]:].zero_()
            elif f == "B" and v.ndim == 2 and v.shape[0] == p.shape[0] and v.shape[1] < p.shape[1]:
                p[:, : v.shape[1]].copy_(v)
                p[:, v.shape[1]:].zero_()
            else:
                raise ValueError(f"adapter key '{k}': shape {tuple(v.shape)} does not fit {tuple(p.shape)}")
            if f in ("A", "B"):
                layer, r = k.rsplit(".", 1)[0], int(v.shape[0] if f == "A" else v.shape[1])
                if ranks.setdefault(layer, r) != r:
                    raise ValueError(f"adapter layer '{layer}': A and B have different ranks")
                self.rank[layer] = r

    def set_trainable(self, factors: Iterable[str]) -> None:
        """requires_grad on exactly these factors' parameters (the base model stays frozen)."""
        factors = set(factors)
        for k, p in self._params.items():
            p.requires_grad_(factor_of(k) in factors)

    def merge(self) -> None:
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()

    @contextlib.contextmanager
    def merged(self) -> Iterator[None]:
        """Evaluate with ΔW folded into the weights (no low-rank branch per forward), W0 restored exactly after;
        a no-op when any target layer cannot be merged (bf16 or quantized base)."""
        ok = all(layer.mergeable for layer in self.layers.values())
        if ok:
            self.merge()
        try:
            yield
        finally:
            if ok:
                self.unmerge()
