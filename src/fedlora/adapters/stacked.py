"""K clients' adapters over ONE frozen base model, in one forward and backward pass.

The K clients' batches are concatenated along the batch dimension, client k's rows at
[k·b, (k+1)·b). Every adapted layer holds the K clients' factors stacked and applies them by
batched matmul over a (K, b·L, d) view of its input:

    y = W0 x + s · bmm(bmm(bmm(x_K, A_Kᵀ), C_Kᵀ), B_Kᵀ)     x_K (K, b·L, d), A_K (K, r, d), C_K (K, r, r), B_K (K, k, r)

and the task head (each nn.Linear in it) by bmm on the stacked head weights. Client k's slice of
every stacked parameter only ever meets client k's rows, so the gradient of Σ_k loss_k with respect
to that slice is the gradient of loss_k alone: the same mathematics as training the K one by one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .layer import LowRankLinear
from .model import AdaptedModel, factor_of


def _per_client(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.reshape(k, -1, x.shape[-1])  # (K, b·L, d): client k's rows are contiguous


class StackedLowRankLinear(nn.Module):
    """A LowRankLinear whose A, B (and C) are K clients' factors, (K, r, d), (K, k, r), (K, r, r)."""

    def __init__(self, layer: LowRankLinear, A: nn.Parameter, B: nn.Parameter, C: nn.Parameter | None):
        super().__init__()
        self.layer, self.A, self.B, self.C = layer, A, B, C

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer.base(x)
        k = self.A.shape[0]
        h = torch.bmm(_per_client(self.layer.dropout(x), k), self.A.transpose(1, 2))  # (K, b·L, r)
        if self.C is not None:
            h = torch.bmm(h, self.C.transpose(1, 2))  # (K, b·L, r)
        h = torch.bmm(h, self.B.transpose(1, 2))  # (K, b·L, out)
        return y + self.layer.scale * h.reshape(y.shape)


class StackedLinear(nn.Module):
    """K clients' copies of a head nn.Linear: weight (K, out, in), bias (K, out)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[0]
        y = torch.bmm(_per_client(x, k), self.weight.transpose(1, 2))  # (K, b·L, out)
        if self.bias is not None:
            y = y + self.bias[:, None, :]
        return y.reshape(*x.shape[:-1], y.shape[-1])


def head_is_stackable(am: AdaptedModel) -> bool:
    """Every head parameter belongs to an nn.Linear (the only head modules batched here)."""
    for h in am.head_modules:
        module = am.model.get_submodule(h)
        for name, _ in module.named_parameters():
            owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            if not isinstance(owner, nn.Linear):
                return False
    return True


def _swap(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


@contextmanager
def stacked(am: AdaptedModel, states: list[dict[str, torch.Tensor]]) -> Iterator[dict[str, nn.Parameter]]:
    """Swap in K clients' adapter states stacked on a leading dim; yields {key: (K, *shape) parameter}.

    Inside the block, the model takes K concatenated batches of equal row count; on exit the
    original layers are back (their own parameters untouched).
    """
    ref = am._params
    stack = {}
    for key, p in ref.items():
        stack[key] = nn.Parameter(torch.stack([s[key].to(p.device, p.dtype) for s in states]), requires_grad=False)
    swapped: list[tuple[str, nn.Module]] = []
    try:
        for t, layer in am.layers.items():
            c = stack.get(f"{t}.C")
            swapped.append((t, _swap(am.model, t, StackedLowRankLinear(layer, stack[f"{t}.A"], stack[f"{t}.B"], c))))
        for h in am.head_modules:
            module = am.model.get_submodule(h)
            linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
            for n in linears:
                path = f"{h}.{n}" if n else h
                prefix = f"{path}."
                swapped.append((path, _swap(am.model, path, StackedLinear(stack[prefix + "weight"],
                                                                          stack.get(prefix + "bias")))))
        yield stack
    finally:
        for path, old in reversed(swapped):
            _swap(am.model, path, old)


def set_trainable_stacked(stack: dict[str, nn.Parameter], factors: set[str]) -> None:
    for key, p in stack.items():
        p.requires_grad_(factor_of(key) in factors)
