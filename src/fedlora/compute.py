"""Where a run computes and in which dtype: `device`, `precision` and the base model's `model.dtype`.

    device:    auto (cuda if present, else mps, else cpu) | cpu | cuda | cuda:N | mps
    precision: fp32 | bf16 | fp16 -- bf16/fp16 run forward and backward under torch.autocast; the adapter
               factors, the head and AdamW's state stay fp32 (the master copies), and fp16 scales the loss
               (GradScaler) so small gradients do not flush to zero.
    model.dtype: the frozen base model's weights (bf16 halves their memory); autocast then mixes it with
               the fp32 adapters, so a non-fp32 base needs precision bf16 or fp16.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The torch device for `device:`; one line naming the field when it is not on this machine."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: '{name}' but this machine has no CUDA device (torch.cuda.is_available() "
                              f"is False; torch {torch.__version__}); use device: cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device: '{name}' but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: '{name}' but MPS is not available on this machine; use device: cpu or auto")
    return dev


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"precision: bf16 but {torch.cuda.get_device_name(device)} has no bf16; use fp16")


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): only then does bf16 autocast pay off on it."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for bf16/fp16; a no-op for fp32 (so fp32 runs are bit-identical to no context)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    # fp16's 5-bit exponent underflows small gradients: scale the loss; bf16 has fp32's range and needs none
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def rng_state(device: torch.device) -> dict:
    """The accelerator's RNG state, for a checkpoint (the CPU one is saved apart)."""
    return {"cuda": torch.cuda.get_rng_state_all()} if device.type == "cuda" else {}


def set_rng_state(state: dict) -> None:
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
