"""Incremental, atomic checkpoints: each round writes only what changed since the last one.

A checkpoint is a chain in `checkpoint/`: a full `base_<t>.pt` (the payload as it is), then one
`delta_<t>_<u>.pt` per later round u. The payload (nested dicts, lists, tuples of tensors and plain
values) is flattened into {path: leaf}; a delta holds the leaves that changed and the paths that
went away. A tensor is
unchanged when it is the very same object as at the last save: state tensors are replaced, never
written in place, so a client that did not take part costs nothing (its tensors, its batch position
and the earlier metrics rows are all the same objects or values). When the deltas of a chain add up
to the size of its base, the next save starts a new chain, so a run writes O(changed state) per
round, O(N) only every so often, and the reload reads at most about twice the state.

Each file is written to a temp name, fsynced and renamed. Loading takes the newest base that
reads, applies its deltas in order and stops at the first missing or unreadable one: a crash
mid-write, or a file truncated on disk, falls back to the last round before it. The previous
chain is kept until the next one is complete. Files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("fedlora")

DIR = "checkpoint"
LEGACY = "checkpoint.pt"  # one full file per save, as older runs wrote it


# ---- payload <-> {path: leaf} ----
def flatten(obj: Any, path: tuple = (), out: dict | None = None) -> dict[tuple, tuple]:
    """{path: ("dict", keys) | ("list", n) | ("tuple", n) | ("leaf", value)}, containers before their items."""
    out = {} if out is None else out
    if isinstance(obj, dict):
        out[path] = ("dict", tuple(obj))
        for k, v in obj.items():
            flatten(v, path + (k,), out)
    elif isinstance(obj, (list, tuple)):
        out[path] = ("list" if isinstance(obj, list) else "tuple", len(obj))
        for i, v in enumerate(obj):
            flatten(v, path + (i,), out)
    else:
        out[path] = ("leaf", obj)
    return out


def unflatten(flat: dict[tuple, tuple], path: tuple = ()) -> Any:
    kind, value = flat[path]
    if kind == "dict":
        return {k: unflatten(flat, path + (k,)) for k in value}
    if kind in ("list", "tuple"):
        items = [unflatten(flat, path + (i,)) for i in range(value)]
        return items if kind == "list" else tuple(items)
    return value


def _same(a: tuple, b: tuple) -> bool:
    (ka, va), (kb, vb) = a, b
    if ka != kb or type(va) is not type(vb):
        return False
    if va is vb:
        return True
    if isinstance(va, torch.Tensor):
        return False  # another tensor object: written again (tensors are replaced, not mutated)
    try:
        return bool(va == vb)
    except Exception:  # noqa: BLE001 - anything not comparable is written again
        return False


def _write(path: Path, payload: Any) -> int:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, path)
    return size


def _read(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unreadable file ends its chain, with a warning
        log.warning("checkpoint %s is unreadable (%s); using an earlier round", path, str(e).splitlines()[0])
        return None


class Checkpointer:
    """Writes a run's checkpoint chain; `last_bytes` / `last_seconds`: the cost of the last save."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / DIR
        self.flat: dict[tuple, tuple] | None = None  # the payload as last saved (or loaded)
        self.base: int | None = None  # the round of the current chain's base
        self.base_bytes = self.delta_bytes = 0
        self.round = 0
        self.last_bytes, self.last_seconds = 0, 0.0

    def save(self, payload: dict) -> Path:
        """Save `payload` (with an int "round"): a delta against the last save, or a new base."""
        start = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        t = int(payload["round"])
        flat = flatten(payload)
        if self.flat is None or self.base is None or self.delta_bytes >= self.base_bytes:
            path = self.dir / f"base_{t:06d}.pt"
            self.last_bytes = self.base_bytes = _write(path, {"round": t, "payload": payload})
            previous, self.base, self.delta_bytes = self.base, t, 0
            self._prune(keep=previous)
        else:
            changed = [(p, v) for p, v in flat.items() if p not in self.flat or not _same(self.flat[p], v)]
            removed = [p for p in self.flat if p not in flat]
            path = self.dir / f"delta_{self.base:06d}_{t:06d}.pt"
            self.last_bytes = _write(path, {"round": t, "parent": self.round, "changed": changed, "removed": removed})
            self.delta_bytes += self.last_bytes
        self.flat, self.round = flat, t
        self.last_seconds = time.perf_counter() - start
        return path

    def resumed(self, payload: dict, ck: dict) -> None:
        """After a resume from `ck` (load_checkpoint's answer): the next save is a delta on that chain."""
        self.flat, self.round = flatten(payload), int(ck["round"])
        self.base, self.base_bytes, self.delta_bytes = ck["_base"], ck["_base_bytes"], ck["_delta_bytes"]
        # files of later rounds than the one resumed from (past an unreadable file) would break the chain
        for p in self.dir.glob("*.pt") if self.dir.is_dir() else []:
            if int(p.stem.split("_")[-1]) > self.round:
                p.unlink()

    def _prune(self, keep: int | None) -> None:
        """Delete chains older than the previous one (kept as the fallback)."""
        for p in self.dir.glob("*.pt"):
            chain = int(p.stem.split("_")[1])
            if chain != self.base and chain != keep:
                p.unlink()


def load_checkpoint(run_dir: Path) -> dict | None:
    """The newest round's payload that a readable chain reaches, or None if there is none."""
    d = Path(run_dir) / DIR
    bases = sorted(d.glob("base_*.pt"), reverse=True) if d.is_dir() else []
    for base_path in bases:
        base = _read(base_path)
        if base is None:
            continue
        b, flat, t = int(base_path.stem.split("_")[1]), flatten(base["payload"]), base["round"]
        base_bytes, delta_bytes = base_path.stat().st_size, 0
        for p in sorted(d.glob(f"delta_{b:06d}_*.pt")):
            delta = _read(p)
            if delta is None or delta["parent"] != t:
                break
            for path in delta["removed"]:
                flat.pop(path, None)
            flat.update(delta["changed"])
            t, delta_bytes = delta["round"], delta_bytes + p.stat().st_size
        payload = unflatten(flat)
        payload.update(_base=b, _base_bytes=base_bytes, _delta_bytes=delta_bytes)
        return payload
    legacy = Path(run_dir) / LEGACY
    if legacy.exists():
        payload = _read(legacy)
        if payload is not None:
            return payload | {"_base": None, "_base_bytes": 0, "_delta_bytes": 0}
    return None


def has_checkpoint(run_dir: Path) -> bool:
    """Whether `run_dir` holds any checkpoint file (a run stopped mid-way, to be resumed)."""
    d = Path(run_dir) / DIR
    return (d.is_dir() and any(d.glob("base_*.pt"))) or (Path(run_dir) / LEGACY).exists()
