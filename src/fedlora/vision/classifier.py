"""Image classification on the same data layer: `AutoModelForImageClassification` (a folder or hub name; a tiny
random ViT for tests), its images decoded once at the processor's size, adapters on its attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .vlm import normalizer


@dataclass
class ImageClassifier:
    model: nn.Module
    image_size: int
    pixels: object  # uint8 (B, 3, S, S) -> pixel_values


def load_image_classifier(name: str, num_labels: int, seed: int) -> ImageClassifier:
    from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    from ..models import resolve_model_path, unreachable

    torch.manual_seed(seed)  # the new head (and a random test model) from the run seed
    if name == "tiny-vit":
        cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=num_labels)
        return ImageClassifier(ViTForImageClassification(cfg).eval(), 32, normalizer((0.5,) * 3, (0.5,) * 3))
    path = resolve_model_path(name)
    try:
        proc = AutoImageProcessor.from_pretrained(path)
        model = AutoModelForImageClassification.from_pretrained(path, num_labels=num_labels,
                                                                ignore_mismatched_sizes=True)
    except OSError as e:
        raise unreachable(name, e) from None
    size = proc.size.get("height") or proc.size.get("shortest_edge") or 224
    return ImageClassifier(model.eval(), int(size), normalizer(proc.image_mean, proc.image_std))


def image_examples(task, clf: ImageClassifier):
    """One row per image: pixel_values and the label (no text)."""
    from ..data.images import attach_images
    from ..data.loader import Examples

    n = len(task.labels)
    z = torch.zeros(n, 1, dtype=torch.long)
    ex = Examples(z, z.clone(), torch.as_tensor(task.labels, dtype=torch.long), image_only=True)
    return attach_images(ex, task.images, clf.image_size, clf.pixels, task.columns.get("image_where"))
