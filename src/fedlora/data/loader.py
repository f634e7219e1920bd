"""Tokenized client data and a resumable, seeded batch stream."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..seeding import rng


@dataclass
class Examples:
    """Tokenized examples, padded once to their longest; batches are trimmed to the batch's longest."""

    input_ids: torch.Tensor  # (n, L), right-padded
    attention_mask: torch.Tensor  # (n, L)
    labels: torch.Tensor  # (n,) class ids; or (n, L) token targets for a causal LM, -100 where masked
    prompt_len: torch.Tensor | None = None  # (n,) causal LM: tokens before the answer
    # image tasks: row -> index into `images`, uint8 (m, 3, S, S) decoded and resized once and shared by every
    # subset (never copied per client or per step); `pixels` turns a batch of them into the model's pixel_values
    image_index: torch.Tensor | None = None
    images: torch.Tensor | None = None
    pixels: Callable[[torch.Tensor], torch.Tensor] | None = None
    image_only: bool = False  # image classification: batches hold pixel_values and labels, no text

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def causal(self) -> bool:
        return self.labels.dim() == 2

    def batch(self, rows: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        if self.image_only:
            return {"pixel_values": self.pixel_values(rows), "labels": self.labels[rows]}
        mask = self.attention_mask[rows]
        width = int(mask.sum(1).max())
        labels = self.labels[rows, :width] if self.causal else self.labels[rows]
        out = {"input_ids": self.input_ids[rows, :width], "attention_mask": mask[:, :width], "labels": labels}
        if self.images is not None:
            out["pixel_values"] = self.pixel_values(rows)
        return out

    def pixel_values(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """The model's pixel_values of these rows' images (normalized from the shared uint8 images)."""
        assert self.images is not None and self.image_index is not None and self.pixels is not None
        return self.pixels(self.images[self.image_index[rows]])

    def subset(self, rows: np.ndarray | slice) -> Examples:
        r = rows if isinstance(rows, slice) else torch.as_tensor(rows, dtype=torch.long)
        return Examples(self.input_ids[r], self.attention_mask[r], self.labels[r],
                        None if self.prompt_len is None else self.prompt_len[r],
                        None if self.image_index is None else self.image_index[r], self.images, self.pixels,
                        self.image_only)

    def head(self, n: int | None) -> Examples:
        return self if n is None or n >= len(self) else self.subset(slice(0, n))


def tokenize(tokenizer, texts: list[str], labels: list[int], max_length: int) -> Examples:
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    return Examples(enc["input_ids"], enc["attention_mask"], torch.as_tensor(labels, dtype=torch.long))


def tokenize_causal(tokenizer, prompts: list[str], answers: list[str], max_length: int) -> Examples:
    """Chat-formatted prompt + answer + end-of-turn; the loss is on the answer tokens only (prompt: -100)."""
    end = tokenizer.eos_token or ""
    rows, targets, plens = [], [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        p_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer + end, add_special_tokens=False)["input_ids"]
        rows.append((p_ids + a_ids)[:max_length])
        targets.append(([-100] * len(p_ids) + a_ids)[:max_length])
        plens.append(min(len(p_ids), max_length))
    width = max(len(r) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, targets, strict=True)):
        ids[i, :len(r)], labels[i, :len(t)], mask[i, :len(r)] = torch.tensor(r), torch.tensor(t), 1
    return Examples(ids, mask, labels, torch.tensor(plens, dtype=torch.long))


def concat(parts: list[Examples]) -> Examples:
    width = max(p.input_ids.shape[1] for p in parts)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    causal = parts[0].causal
    return Examples(torch.cat([pad(p.input_ids, 0) for p in parts]),
                    torch.cat([pad(p.attention_mask, 0) for p in parts]),
                    torch.cat([pad(p.labels, -100) if causal else p.labels for p in parts]),
                    torch.cat([p.prompt_len for p in parts]) if causal else None,
                    *_concat_images(parts))


def _concat_images(parts: list[Examples]) -> tuple:
    if parts[0].images is None:
        return None, None, None, False
    if any(p.images is not parts[0].images for p in parts):  # subsets of one set share its images
        raise ValueError("concat: image examples must share one image store")
    return torch.cat([p.image_index for p in parts]), parts[0].images, parts[0].pixels, parts[0].image_only


class BatchStream:
    """Epochs of seeded permutations; its position (epoch, offset) is all the state a resume needs."""

    def __init__(self, n: int, batch_size: int, seed: int, stream_id: int):
        self.n, self.batch_size, self.seed, self.stream_id = n, batch_size, seed, stream_id
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        return rng("batch_order", self.seed, self.stream_id, self.epoch).permutation(self.n)

    def next_rows(self) -> torch.Tensor:
        if self.offset >= self.n:
            self.epoch, self.offset = self.epoch + 1, 0
            self._perm = self._permutation()
        rows = self._perm[self.offset:self.offset + self.batch_size]
        self.offset += len(rows)
        return torch.as_tensor(rows, dtype=torch.long)

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._permutation()
