"""Bytes of every payload: raw tensor bytes (numel × element size) and serialized (safetensors) bytes."""

from __future__ import annotations

import torch
from safetensors.torch import save

from .adapters import factor_of


def raw_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def serialized_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Size of the payload as a safetensors blob (header included); an empty payload is not sent: 0."""
    if not tensors:
        return 0
    return len(save({k: v.contiguous() for k, v in tensors.items()}))


def payload_bytes(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    head = {k: v for k, v in tensors.items() if factor_of(k) == "head"}
    adapter = {k: v for k, v in tensors.items() if factor_of(k) != "head"}
    return {"raw": raw_bytes(tensors), "raw_adapter": raw_bytes(adapter), "raw_head": raw_bytes(head),
            "serialized": serialized_bytes(tensors)}
