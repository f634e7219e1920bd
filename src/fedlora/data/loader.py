"""Tokenized client data and a resumable, seeded batch stream."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Examples:
    """Tokenized examples, padded once to their longest; batches are trimmed to the batch's longest."""

    input_ids: torch.Tensor  # (n, L)
    attention_mask: torch.Tensor  # (n, L)
    labels: torch.Tensor  # (n,)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        mask = self.attention_mask[rows]
        width = int(mask.sum(1).max())
        return {"input_ids": self.input_ids[rows, :width], "attention_mask": mask[:, :width],
                "labels": self.labels[rows]}

    def subset(self, rows: np.ndarray) -> Examples:
        r = torch.as_tensor(rows, dtype=torch.long)
        return Examples(self.input_ids[r], self.attention_mask[r], self.labels[r])

    def head(self, n: int | None) -> Examples:
        return self if n is None or n >= len(self) else Examples(self.input_ids[:n], self.attention_mask[:n],
                                                                 self.labels[:n])


def tokenize(tokenizer, texts: list[str], labels: list[int], max_length: int) -> Examples:
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    return Examples(enc["input_ids"], enc["attention_mask"], torch.as_tensor(labels, dtype=torch.long))


def concat(parts: list[Examples]) -> Examples:
    width = max(p.input_ids.shape[1] for p in parts)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return Examples(torch.cat([pad(p.input_ids, 0) for p in parts]),
                    torch.cat([pad(p.attention_mask, 0) for p in parts]),
                    torch.cat([p.labels for p in parts]))


class BatchStream:
    """Epochs of seeded permutations; its position (epoch, offset) is all the state a resume needs."""

    def __init__(self, n: int, batch_size: int, seed: int, stream_id: int):
        self.n, self.batch_size, self.seed, self.stream_id = n, batch_size, seed, stream_id
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.stream_id, self.epoch]).permutation(self.n)

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
