"""Federated fine-tuning of a VLM on easy-VQA: personalized and global VQA accuracy vs uplink bytes.

effnet-smollm2 (the packaged EfficientNet-Lite0, its projector aligned once on captions of easy-VQA's test
images, SmolLM2-135M-Instruct), 64 px images = 4 image tokens; one client per question type (shape / color /
yes-no: a natural non-IID split). LoRA r = 8 on the LM's q/k/v/o_proj; the projector is the trained "head"
factor (each method's head policy). FedIT, FFA-LoRA, RoLoRA, FedSA-LoRA, CE-LoRA and local-only, the same rounds,
local steps, batches and seeds. VQA accuracy = exact match of the normalised greedy answer (max 3 new tokens);
personalized = each client's model on its own held-out questions; global = on held-out questions of every type.
The starting model (aligned projector, ΔW = 0) is measured once as the baseline. It also prints the seconds per
local step of the VLM beside SmolLM2 alone on the same questions without the image, at the same batch.

    .venv/bin/python benchmarks/vlm_personalization.py            # 3 seeds; hours on 2 cores (see docs/vlm.md)
    .venv/bin/python benchmarks/vlm_personalization.py --quick    # tiny random LLaVA, seconds (test suite)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fedlora.report import call_text
from fedlora.sweep import exit_on_error, markdown, mean_std, run_sweep, values, write_json

METHODS = ["fedit", "ffa", "rolora", "fedsa", "celora", "local"]


def config(quick: bool, method: str, rounds: int, steps: int, examples: int) -> dict:
    model = {"name": "tiny-llava", "max_length": 80} if quick else {"name": "effnet-smollm2", "max_length": 72}
    r = 4 if quick else 8
    return {"seed": 0, "model": model, "task": {"name": "easy-vqa", "max_examples": examples},
            "partition": {"num_clients": 3, "scheme": "natural", "column": "qtype", "global_test_fraction": 0.1,
                          "min_partition_size": 2},
            "adapter": {"r": r, "alpha": 2 * r}, "method": {"name": method}, "federation": {"rounds": rounds},
            "train": {"local_steps": steps, "batch_size": 4, "lr": 1e-3, "lr_c": 3e-2, "lr_head": 1e-3},
            "eval": {"every": rounds, "batch_size": 8, "baseline": method == "fedit", "max_global_examples": 48,
                     "max_client_examples": 32, "global_clients": 3, "generate_examples": 32 if not quick else 2,
                     "max_new_tokens": 3}}


def step_seconds(quick: bool, steps: int = 3, batch: int = 4) -> dict:
    """Seconds per forward + backward + AdamW step (LoRA r 8 on q/k/v/o) of the VLM with its image tokens, and of
    the LM alone on the same questions without them, at the same batch: the image tokens' cost."""
    from fedlora.adapters import inject_adapters
    from fedlora.data.loader import tokenize_causal
    from fedlora.data.tasks import load_task, subset
    from fedlora.models import load_causal_lm
    from fedlora.vision.vlm import LM_TARGETS, load_vlm, tokenize_vlm

    task = subset(load_task("easy-vqa"), np.arange(batch * steps))
    vlm = load_vlm("tiny-llava" if quick else "effnet-smollm2", 0)
    lm = load_causal_lm("tiny-llama" if quick else "smollm2", 0)
    out = {}
    for name, model, data, targets in (
            ("vlm", vlm.model, tokenize_vlm(vlm, task, 96), [LM_TARGETS]),
            ("lm", lm, tokenize_causal(vlm.tokenizer, task.texts, task.targets, 96), ["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"])):
        am = inject_adapters(model, targets, 8, 16, head_modules=[])
        am.set_trainable({"A", "B"})
        opt = torch.optim.AdamW(am.parameters({"A", "B"}), lr=1e-4)
        model.train()
        times = []
        for s in range(steps + 1):  # the first step warms up
            t = time.perf_counter()
            model(**data.batch(torch.arange(s % steps * batch, s % steps * batch + batch))).loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
        out[f"{name}_s_per_step"] = float(np.median(times[1:]))
        out[f"{name}_tokens"] = int(data.attention_mask[:batch].sum(1).float().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=None, help="default 3")
    ap.add_argument("--steps", type=int, default=None, help="local steps per round (default 8)")
    ap.add_argument("--examples", type=int, default=None, help="easy-VQA questions used (default 3000)")
    ap.add_argument("--seeds", type=int, default=None, help="training seeds (default 3; quick 1)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    rounds, steps = args.rounds or (1 if args.quick else 3), args.steps or (1 if args.quick else 8)
    examples = args.examples or (120 if args.quick else 3000)
    name = "vlm_personalization" + ("_quick" if args.quick else "")
    seeds = args.seeds or (1 if args.quick else 3)
    timing = step_seconds(args.quick)
    arms = [(m, config(args.quick, m, rounds, steps, examples)) for m in args.methods.split(",")]
    results = run_sweep(arms, Path(args.out) / name, seeds=seeds, jobs=args.jobs, save_client_states=False).arms
    baseline = next((s["baseline"] for runs in results.values() for s, _ in runs if "baseline" in s), {})
    rows = [{"method": "starting model (no training)", "personal_vqa": baseline.get("personal_exact_match"),
             "global_vqa": baseline.get("global_exact_match"), "up_mb": 0.0}] if baseline else []
    acc = {label: values(runs, "personal_exact_match") for label, runs in results.items()}
    best = max(acc, key=lambda m: np.mean(acc[m]) if acc[m] else -1)
    for label, runs in results.items():
        s = runs[0][0]

        def mean(key: str, runs=runs) -> float | None:
            xs = values(runs, key)
            return float(np.mean(xs)) if xs else None

        rows.append({"method": label, "personal_vqa": mean("personal_exact_match"),
                     "personal_vqa_std": mean_std(acc[label])[1] if acc[label] else None,
                     "vs_best": "best" if label == best else call_text(acc[label], acc[best])
                     if acc[label] and acc[best] else "",
                     "global_vqa": mean("global_exact_match"), "personal_loss": mean("personal_loss"),
                     "up_mb": s["up_raw"] / 1e6, "up_head_mb": s.get("up_raw_head", 0) / 1e6,
                     "wall_s": mean("wall_s")})
    write_json(Path(args.out) / f"{name}.json", {"rounds": rounds, "local_steps": steps, "seeds": seeds,
                                                 "examples": examples, "step_timing": timing, "rows": rows})
    print(f"{'tiny random LLaVA' if args.quick else 'effnet-smollm2'} on easy-VQA, 3 question-type clients, "
          f"{rounds} rounds x {steps} local steps (batch 4), {seeds} seed(s); VQA accuracy = exact match")
    print(f"seconds per local step at batch 4: VLM {timing['vlm_s_per_step']:.2f} ({timing['vlm_tokens']} tokens "
          f"per row) vs the LM alone {timing['lm_s_per_step']:.2f} ({timing['lm_tokens']} tokens per row)")
    print(markdown(rows, [("method", "method", "s"), ("personal_vqa", "personalized VQA acc", ".3f"),
                          ("personal_vqa_std", "± std", ".3f"), ("vs_best", "vs best (2-SE call)", "s"),
                          ("global_vqa", "global VQA acc", ".3f"), ("personal_loss", "personalized loss", ".3f"),
                          ("up_mb", "uplink MB", ".3f"), ("up_head_mb", "of it projector MB", ".3f"),
                          ("wall_s", "wall s", ".0f")]))


if __name__ == "__main__":
    exit_on_error(main)
