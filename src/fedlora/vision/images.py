"""Images decoded and resized once: uint8 (3, S, S) tensors, centre-cropped to a square."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_square(img: Image.Image, size: int) -> torch.Tensor:
    """RGB, centre square crop, bicubic resize to size×size: uint8 (3, size, size)."""
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if s != size:
        img = img.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def load_image(path: str, size: int) -> torch.Tensor:
    with Image.open(path) as img:
        return to_square(img, size)
