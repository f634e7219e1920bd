"""Images of an image task, decoded and resized once per process (a client, or a simulation's clients together)."""

from __future__ import annotations

import io
from collections.abc import Callable

import torch
from PIL import Image

from ..vision.images import load_image, to_square
from .loader import Examples


def decode_images(paths: list, size: int, where: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each distinct file decoded once, centre-cropped and resized to size×size: (index per row, uint8 images).

    An image is a file path, or a Hugging Face `Image` feature's {"bytes", "path"} (decoded per row). A missing or
    unreadable image is one error naming its path and its row (1-based) or `where[row]` (a file's line)."""
    keys = [p if isinstance(p, str) else ("#", row) for row, p in enumerate(paths)]
    first: dict = {}
    for row, k in enumerate(keys):
        first.setdefault(k, row)
    store = torch.empty((len(first), 3, size, size), dtype=torch.uint8)
    slot = {}
    for i, (k, row) in enumerate(first.items()):
        item = paths[row]
        try:
            if isinstance(item, str):
                store[i] = load_image(item, size)
            else:
                with Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as img:
                    store[i] = to_square(img, size)
        except (OSError, ValueError, KeyError, TypeError) as e:
            name = item if isinstance(item, str) else (item.get("path") if isinstance(item, dict) else None) or "?"
            at = where[row] if where else f"row {row + 1}"
            raise ValueError(f"image '{name}' ({at}): cannot read it: {str(e).splitlines()[0][:120]}") from None
        slot[k] = i
    return torch.tensor([slot[k] for k in keys], dtype=torch.long), store


def attach_images(examples: Examples, paths: list, size: int, pixels: Callable[[torch.Tensor], torch.Tensor],
                  where: list[str] | None = None) -> Examples:
    """`examples` (one row per path) with their images: decoded once here, shared by every subset."""
    index, store = decode_images(paths, size, where)
    examples.image_index, examples.images, examples.pixels = index, store, pixels
    return examples
