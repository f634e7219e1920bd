"""QLoRA smoke run: a SmolLM2-135M-shaped causal LM, 4-bit NF4 base, fp32 LoRA factors trained on top.

The model is randomly initialised from SmolLM2's config and written to a temporary folder, then loaded
by `fedlora.models.load_causal_lm` through bitsandbytes (NF4, double quantization, bf16 compute). Low-rank
factors on q/k/v/o train with fedlora's `local_train` under bf16 autocast, fitting one fixed batch (the
loss must fall), and the adapter is exported with `export_peft` and loaded by peft onto the unquantized
model (its PEFT export is unchanged by quantization).

Without CUDA it checks that a 4-bit request fails in one line, then runs the same path unquantized in
fp32 on the CPU (with --layers 2 by default there): the fallback the test suite exercises.

    PYTHONPATH=src python benchmarks/qlora_smoke.py --out /tmp/out            # CUDA: 4-bit, then 8-bit
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel
from throughput import SMOLLM2, random_tokens
from transformers import LlamaConfig, LlamaForCausalLM

from fedlora.adapters import export_peft, inject_adapters
from fedlora.compute import resolve_device
from fedlora.errors import ConfigError
from fedlora.models import load_causal_lm
from fedlora.sweep import write_json
from fedlora.train import evaluate_lm, local_train

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def run(folder: Path, bits: int | None, device: torch.device, steps: int, out: Path) -> dict:
    precision = "bf16" if device.type == "cuda" else "fp32"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = load_causal_lm(str(folder), 0, dtype, bits, device)
    if bits is None:
        model.to(device)
    load_s = time.perf_counter() - t0
    am = inject_adapters(model, TARGETS, 8, 16.0)
    am.precision = precision
    base_type = type(am.layers[am.targets[0]].base).__name__
    n, length = (8, 64) if device.type == "cuda" else (4, 16)
    data = random_tokens("smollm2", model.config.vocab_size, n, length, n)  # one batch, fitted again and again
    train = type("Cfg", (), dict(lr=5e-3, lr_c=0.1, lr_head=1e-2, weight_decay=0.0, max_grad_norm=1.0,
                                 optimizer="adamw"))
    before = evaluate_lm(am, data, n)["loss"]
    t0 = time.perf_counter()
    local_train(am, data, data, {"A", "B"}, train, steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    after = evaluate_lm(am, data, n)["loss"]
    assert after < before, f"the loss did not fall: {before:.4f} -> {after:.4f}"
    assert all(p.dtype == torch.float32 for p in am.parameters({"A", "B"})), "factors are not fp32 masters"
    # the PEFT export of a quantized run loads onto the plain model, factor for factor
    peft_dir = out / f"peft_{bits or 'none'}bit"
    state = am.get_state()
    export_peft(state, peft_dir, r=8, alpha=16.0, targets=am.targets, head_modules=[], task_type="CAUSAL_LM")
    plain = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(plain, peft_dir)
    loaded = {n: p for n, p in peft_model.named_parameters() if "lora_A" in n}
    key = next(k for k in state if k.endswith(".A"))
    match = [p for n, p in loaded.items() if key.removesuffix(".A") in n]
    assert match and torch.equal(match[0].detach().cpu(), state[key]), "PEFT export does not carry the factors"
    mem = model.get_memory_footprint() / 2**20
    return {"quantization": bits, "device": str(device), "precision": precision, "base_layer": base_type,
            "load_s": round(load_s, 2), "train_steps": steps, "train_s": round(train_s, 3),
            "steps_per_s": round(steps / train_s, 2), "loss_before": round(before, 4), "loss_after": round(after, 4),
            "model_mib": round(mem, 1), "peft_export": "ok"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--steps", type=int, default=None, help="default: 30 on CUDA, 5 on CPU")
    ap.add_argument("--layers", type=int, default=None, help="hidden layers (default: 30 on CUDA, 2 on CPU)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = resolve_device("cuda" if cuda else "cpu")
    layers = args.layers or (SMOLLM2["num_hidden_layers"] if cuda else 2)
    steps = args.steps or (30 if cuda else 5)
    rows = []
    if not cuda:
        try:
            resolve_device("cuda")
            raise SystemExit("expected a one-line error for device cuda without CUDA")
        except ConfigError as e:
            print(f"no CUDA: QLoRA skipped ({e}); running the unquantized CPU fallback")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**{**SMOLLM2, "num_hidden_layers": layers})).save_pretrained(tmp)
        for bits in ((4, 8) if cuda else (None,)):
            rows.append(run(Path(tmp), bits, device, steps, out))
            print(json.dumps(rows[-1]))
    write_json(out / "qlora_smoke.json", {"layers": layers, "rows": rows})
    print("| quantization | base layer | device | load s | steps/s | loss before -> after | model MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quantization']} | {r['base_layer']} | {r['device']} | {r['load_s']} | {r['steps_per_s']} | "
              f"{r['loss_before']} -> {r['loss_after']} | {r['model_mib']} |")


if __name__ == "__main__":
    main()
