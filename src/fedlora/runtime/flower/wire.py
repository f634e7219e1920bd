"""The wire format: tensors as Flower ArrayRecords, and the bytes a message really carries."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

HELLO = MessageType.QUERY
TRAIN = MessageType.TRAIN
EVALUATE = MessageType.EVALUATE
# errors after which the same message is sent again (to the partition's current node)
RETRYABLE = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
             ErrorCode.CLIENT_APP_CRASHED}


PACKED = "safetensors"  # the one key of a packed ArrayRecord


def to_record(tensors: dict[str, torch.Tensor], wire: str = "arrays") -> tuple[ArrayRecord, ConfigRecord]:
    """Tensors as an ArrayRecord.

    wire = "arrays": one Flower Array per tensor (Flower's own form); dtypes NumPy lacks (bfloat16, float8)
    travel as their raw bits in an integer Array of the same width (bf16: 2 bytes, as counted), and are named
    in the returned ConfigRecord to be viewed back.
    wire = "packed": the whole payload as one safetensors blob in a single uint8 Array (every dtype as is,
    bfloat16 included; one Flower object per payload instead of two per tensor: fewer HTTP requests).
    """
    if wire == "packed":
        blob = safetensors_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}) if tensors else b""
        return ArrayRecord({PACKED: Array.from_numpy_ndarray(np.frombuffer(blob, dtype=np.uint8))}), ConfigRecord()
    rec, cast = ArrayRecord(), {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        try:
            arr = v.numpy()
        except TypeError:
            cast[k] = str(v.dtype).removeprefix("torch.")
            arr = v.view(_BITS[v.element_size()]).numpy()
        rec[k] = Array.from_numpy_ndarray(arr)
    return rec, ConfigRecord(cast)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-width carriers of raw bits


def from_record(rec: ArrayRecord, cast: ConfigRecord | None = None) -> dict[str, torch.Tensor]:
    if list(rec.keys()) == [PACKED]:
        blob = rec[PACKED].numpy().tobytes()
        tensors = safetensors_load(blob) if blob else {}
        return {k: tensors[k] for k in sorted(tensors)}  # safetensors decodes in no fixed order: give a fixed one
    cast = cast or {}
    out = {}
    for k, a in rec.items():
        t = torch.from_numpy(a.numpy().copy())
        out[k] = t.view(getattr(torch, str(cast[k]))) if k in cast else t
    return out


def array_bytes(msg: Message) -> int:
    """Payload bytes of the message's ArrayRecords (what Flower reports as its size)."""
    if not msg.has_content():
        return 0
    return sum(r.count_bytes() for r in msg.content.array_records.values())


def message_bytes(msg: Message) -> int:
    """Bytes of every serialized object of the message (the objects Flower pushes and pulls)."""
    try:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    except ImportError:  # a Flower without this internal helper: the arrays at least
        return array_bytes(msg)
    return sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]



EVAL_SETS = ("test", "val", "global")  # the parts of a client's evaluation result (fedlora.evaluation)


def results_to_records(result: dict) -> dict:
    """A client's evaluation result (`measure_client`) as records: metrics '<set>_<name>', samples as JSON."""
    metrics = {f"{part}_{k}": float(v) for part in EVAL_SETS for k, v in result.get(part, {}).items()}
    records: dict = {"metrics": MetricRecord(metrics)}
    if result.get("samples"):
        records["samples"] = ConfigRecord({k: json.dumps(v) for k, v in result["samples"].items()})
    return records


def results_from_record(content: RecordDict) -> dict:
    out: dict = {"samples": {}}
    for key, v in content["metrics"].items():
        part, name = key.split("_", 1)
        out.setdefault(part, {})[name] = float(v)
    if "samples" in content:
        out["samples"] = {k: json.loads(str(v)) for k, v in content["samples"].items()}
    return out
