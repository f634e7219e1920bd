"""Images of an image task, decoded and resized once per process (a client, or a simulation's clients together)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..vision.images import load_image
from .loader import Examples


def decode_images(paths: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each distinct file decoded once, centre-cropped and resized to size×size: (index per row, uint8 images).

    A missing or unreadable file is one error naming its path and its row (1-based)."""
    first: dict[str, int] = {}
    for row, p in enumerate(paths):
        first.setdefault(p, row)
    store = torch.empty((len(first), 3, size, size), dtype=torch.uint8)
    slot = {}
    for i, (p, row) in enumerate(first.items()):
        try:
            store[i] = load_image(p, size)
        except (OSError, ValueError) as e:
            raise ValueError(f"image '{p}' (row {row + 1}): cannot read it: {str(e).splitlines()[0][:120]}") from None
        slot[p] = i
    return torch.tensor([slot[p] for p in paths], dtype=torch.long), store


def attach_images(examples: Examples, paths: list[str], size: int,
                  pixels: Callable[[torch.Tensor], torch.Tensor]) -> Examples:
    """`examples` (one row per path) with their images: decoded once here, shared by every subset."""
    index, store = decode_images(paths, size)
    examples.image_index, examples.images, examples.pixels = index, store, pixels
    return examples
