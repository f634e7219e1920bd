"""Atomic checkpoints: write to a temp file, fsync, rename; keep the previous one as a fallback.

A crash while writing leaves `checkpoint.pt` (and `checkpoint.prev.pt`) intact; a checkpoint that
fails to load (truncated, corrupted) is skipped in favour of the previous one. Files are read with
`torch.load(weights_only=True)`: tensors, numbers, strings, lists, tuples and dicts only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("fedlora")

NAME, PREV = "checkpoint.pt", "checkpoint.prev.pt"


def save_checkpoint(run_dir: Path, payload: dict) -> Path:
    path, tmp = run_dir / NAME, run_dir / (NAME + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, run_dir / PREV)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> dict | None:
    """The newest checkpoint that loads, or None if there is none."""
    for name in (NAME, PREV):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            return torch.load(path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped, with a warning
            log.warning("checkpoint %s is unreadable (%s); trying an older one", path, str(e).splitlines()[0])
    return None
