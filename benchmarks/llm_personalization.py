"""Federated instruction tuning of SmolLM2-135M-Instruct: personalized and global quality vs uplink bytes.

chatterbot-corpus QA, one client per category (the 8 largest: trivia, emotion, conversations, AI,
coding, psychology, literature, computers: a natural non-IID split), chat-template formatting with
the loss on the answer tokens only, LoRA r = 8 on q/k/v/o_proj of all 30 layers. FedIT, FFA-LoRA,
RoLoRA, CE-LoRA and local-only, the same rounds, local steps, batches and seed; every client every
round. Personalized = each client's model on its own held-out answers; global = on the held-out
questions of all categories (mean over 3 clients' models for the personalized methods). ROUGE-L
of greedy answers to each client's held-out questions at the last round. The untrained model's
(ΔW = 0) perplexity is measured once as the baseline.

    .venv/bin/python benchmarks/llm_personalization.py            # 3 seeds: ~45 min on 2 cores
    .venv/bin/python benchmarks/llm_personalization.py --quick    # tiny random Llama, seconds (test suite)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedlora.report import call_text
from fedlora.sweep import exit_on_error, markdown, mean_std, run_sweep, save_figure, values, write_json

METHODS = ["fedit", "ffa", "rolora", "celora", "local"]
CATEGORIES = ["trivia", "emotion", "conversations", "AI", "coding", "psychology", "literature", "computers"]


def config(quick: bool, method: str, rounds: int, steps: int) -> dict:
    if quick:
        model, cats, r = {"name": "tiny-llama", "max_length": 48}, CATEGORIES[:3], 4
    else:
        model, cats, r = {"name": "smollm2", "max_length": 128}, CATEGORIES, 8
    return {"seed": 0, "model": model, "task": {"name": "chatterbot-qa", "keep_labels": cats},
            "partition": {"num_clients": len(cats), "scheme": "natural", "column": "category",
                          "global_test_fraction": 0.1},
            "adapter": {"r": r, "alpha": 2 * r},
            "method": {"name": method}, "federation": {"rounds": rounds},
            "train": {"local_steps": steps, "batch_size": 4, "lr": 1e-3, "lr_c": 3e-2},
            "eval": {"every": rounds, "batch_size": 8, "baseline": method == "fedit", "max_global_examples": 32,
                     "max_client_examples": 12, "global_clients": 3, "generate_examples": 3 if not quick else 1,
                     "max_new_tokens": 24 if not quick else 4}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=None, help="default 3")
    ap.add_argument("--steps", type=int, default=None, help="local steps per round (default 4)")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side (the 135M model uses both cores well)")
    ap.add_argument("--seeds", type=int, default=None, help="training seeds (default 3; quick 1)")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    rounds, steps = args.rounds or (1 if args.quick else 3), args.steps or (1 if args.quick else 4)
    name = "llm_personalization" + ("_quick" if args.quick else "")
    seeds = args.seeds or (1 if args.quick else 3)
    arms = [(m, config(args.quick, m, rounds, steps)) for m in args.methods.split(",")]
    results = run_sweep(arms, Path(args.out) / name, seeds=seeds, jobs=args.jobs, save_client_states=False).arms
    baseline = next((s["baseline"] for runs in results.values() for s, _ in runs if "baseline" in s), {})
    rows = [{"method": "base model (no training)", "personal_perplexity": baseline.get("personal_perplexity"),
             "global_perplexity": baseline.get("global_perplexity"), "up_mb": 0.0}] if baseline else []
    ppl = {label: values(runs, "personal_perplexity") for label, runs in results.items()}
    best = min(ppl, key=lambda m: np.mean(ppl[m]))
    for label, runs in results.items():
        before = baseline.get("client_perplexity")
        s = runs[0][0]

        def mean(key: str, runs=runs) -> float | None:
            xs = values(runs, key)
            return float(np.mean(xs)) if xs else None

        improved = [sum(a < b for a, b in zip(r["client_perplexity"], before, strict=True)) for r, _ in runs] \
            if before else None
        rows.append({"method": label, "personal_perplexity": mean("personal_perplexity"),
                     "personal_perplexity_std": mean_std(ppl[label])[1],
                     "vs_best": "best" if label == best else call_text(ppl[label], ppl[best]),
                     "global_perplexity": mean("global_perplexity"), "personal_rouge_l": mean("personal_rouge_l"),
                     "global_rouge_l": mean("global_rouge_l"),
                     "improved": f"{min(improved)}-{max(improved)} / {len(before)}" if before else None,
                     "up_mb": s["up_raw"] / 1e6, "up_per_client_round": s["up_raw_adapter_per_client_round"],
                     "wall_s": mean("wall_s")})
    write_json(Path(args.out) / f"{name}.json", {"rounds": rounds, "local_steps": steps, "seeds": seeds,
                                                 "rows": rows})
    plot(rows, Path(args.out) / f"{name}.png")
    print(f"SmolLM2-135M-Instruct, {len(CATEGORIES)} category clients, {rounds} rounds x {steps} local steps "
          f"(batch 4), {seeds} seed(s): means, sample std; lower perplexity wins only beyond 2 SE"
          if not args.quick else "quick: tiny random Llama")
    print(markdown(rows, [("method", "method", "s"), ("personal_perplexity", "personalized ppl", ".2f"),
                          ("personal_perplexity_std", "± std", ".2f"), ("vs_best", "vs best (2-SE call)", "s"),
                          ("improved", "clients improved", "s"), ("global_perplexity", "global ppl", ".2f"),
                          ("personal_rouge_l", "personalized ROUGE-L", ".3f"),
                          ("global_rouge_l", "global ROUGE-L", ".3f"),
                          ("up_mb", "uplink MB", ".2f"), ("up_per_client_round", "uplink B / client / round", ",.0f"),
                          ("wall_s", "wall s", ".0f")]))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        if r["method"].startswith("base"):
            ax[0].axhline(r["personal_perplexity"], ls=":", color="gray", label="base model")
            continue
        x = max(r["up_mb"], 1e-3)  # local-only sends nothing: drawn at the left edge
        ax[0].scatter(x, r["personal_perplexity"], label=r["method"])
        if r.get("personal_rouge_l") is not None:
            ax[1].scatter(x, r["personal_rouge_l"], label=r["method"])
    ax[0].set(xscale="log", yscale="log", xlabel="total uplink MB (log; local-only at 0.001)",
              ylabel="personalized perplexity (log)", title="perplexity vs bytes sent")
    ax[1].set(xscale="log", xlabel="total uplink MB (log; local-only at 0.001)", ylabel="personalized ROUGE-L",
              title="greedy answers vs bytes sent")
    ax[0].legend(fontsize=8)
    ax[1].legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    exit_on_error(main)
