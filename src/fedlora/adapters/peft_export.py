"""Write an adapter state as a standard PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).

PEFT's LoRA computes W0 x + (alpha / r) · lora_B(lora_A(x)); the tri-matrix form B C A is exported
with C folded into B (lora_B = B C), which is exact. The task head goes to `modules_to_save`.
A client of a heterogeneous-rank run is exported at its own rank r_i, with lora_alpha = s · r_i so
that the scale s = alpha / r of the run is kept. A state with a full update W folded into the base
weights (FLoRA, FedEx-LoRA) is refused: a LoRA folder cannot hold it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .model import factor_of


def export_peft(
    state: dict[str, torch.Tensor],
    out_dir: str | Path,
    *,
    r: int,
    alpha: float,
    targets: list[str],
    head_modules: list[str],
    base_model: str | None = None,
    task_type: str | None = "SEQ_CLS",
    dropout: float = 0.0,
) -> Path:
    if any(factor_of(k) == "W" and bool(v.any()) for k, v in state.items()):
        raise ValueError("export: this run folded full updates W (k×d) into the base weights (flora / fedex); "
                         "a PEFT LoRA folder cannot hold them (the states/ files have W)")
    ranks = {int(state[f"{t}.A"].shape[0]) for t in targets}
    if len(ranks) != 1:
        raise ValueError(f"export: the adapted layers have different ranks {sorted(ranks)}")
    rank = ranks.pop()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for t in targets:
        A, B = state[f"{t}.A"], state[f"{t}.B"]
        C = state.get(f"{t}.C")
        up = B @ C if C is not None else B  # (out, r)
        tensors[f"base_model.model.{t}.lora_A.weight"] = A.contiguous().float()
        tensors[f"base_model.model.{t}.lora_B.weight"] = up.contiguous().float()
    for k, v in state.items():
        if factor_of(k) == "head":
            tensors[f"base_model.model.{k}"] = v.contiguous().float()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha / r * rank,  # keeps the run's scale alpha / r at this state's rank
        "lora_dropout": dropout,
        "target_modules": sorted(targets),
        "modules_to_save": list(head_modules) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def export_with_meta(state: dict[str, torch.Tensor], out_dir: str | Path, meta: dict,
                     base_model: str | None = None) -> Path:
    """`export_peft` with the run's adapter metadata (`Run.adapter_meta`, adapter_meta.json): the one way every
    interface exports, so the rank and scale always come from the same fact. `base_model`: default meta's model."""
    return export_peft(state, out_dir, r=meta["r"], alpha=meta["alpha"], targets=meta["targets"],
                       head_modules=meta["head_modules"], base_model=base_model or meta["model"],
                       task_type=meta.get("task_type", "SEQ_CLS"))
