"""RoLoRA's client-scaling claim (its Table 2): the same data over more clients hurts FedIT and FFA-LoRA more.

MiniLM-L6 on `rt-sentiment` (or `--task healthtweets-outlet`, 16 classes, harder, as the paper's
MNLI is harder than its SST-2), LoRA rank 2 on query/value, the same total number of training
examples split IID over 3, 20 and 50 clients, every client every round. The compute per round is
held equal: each client runs one local epoch (its examples / batch size steps), so 3 clients take
many steps each and 50 clients a few. FedIT, FFA-LoRA, RoLoRA by default; the exact-aggregation methods FLoRA
and FedEx-LoRA with `--methods fedit,ffa,rolora,flora,fedex` (their downloads grow with the client
count: FLoRA's with the sum of the ranks, FedEx's residual is a full matrix). One shared model (shared head);
the score is the global model's accuracy on the held-out global test set.

Expected (the paper): similar at 3 clients; at 20 and 50 clients RoLoRA stays close to its
3-client accuracy while FedIT and FFA-LoRA fall (FedIT's average of products is not the product of
averages; FFA's frozen random A limits what B can express).

    .venv/bin/python benchmarks/client_scaling.py             # 3 seeds: ~60 min on 2 cores
    .venv/bin/python benchmarks/client_scaling.py --task healthtweets-outlet --methods fedit,ffa,rolora,flora,fedex
    .venv/bin/python benchmarks/client_scaling.py --clients 3,20 --ranks 1,2,4,8   # RoLoRA's low-rank claim
    .venv/bin/python benchmarks/client_scaling.py --quick     # tiny random BERT, seconds (test suite)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from fedlora.report import call_text, late_gain_text
from fedlora.sweep import exit_on_error, markdown, mean_std, run_sweep, save_figure, values, write_json

METHODS = ["fedit", "ffa", "rolora"]


def config(quick: bool, method: str, clients: int, total: int, rounds: int, lr: float,
           task_name: str = "rt-sentiment", rank: int = 2) -> dict:
    model = {"name": "tiny-bert", "max_length": 16} if quick else {"name": "minilm", "max_length": 64}
    task = {"name": "synthetic"} if quick else {"name": task_name}
    batch = 16
    # the whole task is cut so that the clients' train parts hold `total` examples together
    task["max_examples"] = math.ceil(total / (0.8 * 0.95))
    return {"seed": 0, "model": model, "task": task,
            "partition": {"num_clients": clients, "scheme": "iid", "global_test_fraction": 0.2,
                          "client_test_fraction": 0.05, "min_partition_size": 0},
            "adapter": {"r": rank, "alpha": 16, "target_modules": ["query", "value"]},  # one alpha at every rank
            "method": {"name": method, "head": "shared"}, "federation": {"rounds": rounds},
            # one local epoch per round: equal compute per round at every client count
            "train": {"local_steps": max(1, round(total / clients / batch)), "batch_size": batch, "lr": lr},
            "eval": {"every": max(1, rounds // 3), "max_global_examples": 600, "max_client_examples": 8,
                     "global_clients": 1}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--clients", default=None, help="default 3,20,50 (quick: 2,6)")
    ap.add_argument("--methods", default=",".join(METHODS), help="also: flora, fedex (exact aggregation)")
    ap.add_argument("--task", default="rt-sentiment", help="rt-sentiment or healthtweets-outlet (ignored by --quick)")
    ap.add_argument("--total", type=int, default=None, help="training examples over all clients (default 1200)")
    ap.add_argument("--rounds", type=int, default=None, help="default 6")
    ap.add_argument("--ranks", default="2", help="LoRA ranks, e.g. 1,2,4,8 for RoLoRA's low-rank claim (default 2)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=None, help="training seeds per arm (default 3; quick 1)")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    counts = [int(c) for c in (args.clients or ("2,6" if args.quick else "3,20,50")).split(",")]
    total, rounds = args.total or (120 if args.quick else 1200), args.rounds or (2 if args.quick else 6)
    ranks = [int(r) for r in args.ranks.split(",")]
    name = "client_scaling" + ("" if args.quick or args.task == "rt-sentiment" else f"_{args.task}") + (
        "" if ranks == [2] else "_ranks" + "-".join(map(str, ranks))) + ("_quick" if args.quick else "")
    seeds = args.seeds or (1 if args.quick else 3)
    # label `<method>-<clients>` at rank 2 (as in the rank-2-only folder), `<method>-r<rank>-<clients>` otherwise
    arms = {f"{m}{'' if r == 2 else f'-r{r}'}-{k}": (m, k, r) for r in ranks for k in counts
            for m in args.methods.split(",")}
    configs = {label: config(args.quick, m, k, total, rounds, args.lr, args.task, r)
               for label, (m, k, r) in arms.items()}
    results = run_sweep(configs.items(), Path(args.out) / name, seeds=seeds, jobs=1 if args.quick else args.jobs,
                        save_client_states=False).arms
    rows = []
    for label, runs in results.items():
        m, k, rank = arms[label]
        acc = values(runs, "global_accuracy")
        mean, std = mean_std(acc)
        curves = [[r["global_accuracy"] for r in hist if r.get("global_accuracy") is not None] for _, hist in runs]
        evaluated = [r["round"] for r in runs[0][1] if r.get("global_accuracy") is not None]
        curve = list(zip(evaluated, np.mean(curves, axis=0).tolist(), strict=True))
        rows.append({"method": m, "rank": rank, "series": m if len(ranks) == 1 else f"{m} r{rank}",
                     "clients": int(k), "global_accuracy": mean, "global_accuracy_std": std,
                     "seed_values": acc, "local_steps": configs[label]["train"]["local_steps"],
                     "up_mb": runs[0][0]["up_raw"] / 1e6, "down_mb": runs[0][0]["down_raw"] / 1e6,
                     "wall_s": float(np.mean([s["wall_s"] for s, _ in runs])),
                     "curve": curve, "late_gain": late_gain_text(curve)})
    for series in dict.fromkeys(r["series"] for r in rows):  # drop from the fewest clients, with its 2-SE call
        mine = {r["clients"]: r for r in rows if r["series"] == series}
        fewest = mine[min(mine)]["seed_values"]
        for r in mine.values():
            r["drop_vs_fewest"] = float(np.mean(fewest) - r["global_accuracy"])
            r["drop_call"] = call_text(fewest, r["seed_values"])
    write_json(Path(args.out) / f"{name}.json", {"task": "synthetic" if args.quick else args.task,
                                                 "total_examples": total, "rounds": rounds, "seeds": seeds,
                                                 "ranks": ranks,
                                                 "rows": rows})
    plot(rows, Path(args.out) / f"{name}.png")
    print(f"{'synthetic' if args.quick else args.task}: {total} training examples in all, IID,"
          f" {rounds} rounds, one local epoch per round, rank {args.ranks} (alpha 16), "
          f"{seeds} seed(s): mean, sample std; a drop counts only beyond 2 SE")
    print(markdown(rows, [("method", "method", "s"), ("rank", "rank", "d"), ("clients", "clients", "d"),
                          ("local_steps", "local steps / round", "d"),
                          ("global_accuracy", "global acc", ".3f"), ("global_accuracy_std", "± std", ".3f"),
                          ("drop_call", "drop vs fewest clients (2-SE call)", "s"),
                          ("late_gain", "last-20% gain", "s"),
                          ("up_mb", "uplink MB", ".2f"), ("down_mb", "downlink MB", ".2f"),
                          ("wall_s", "wall s", ".0f")]))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    methods = list(dict.fromkeys(r["series"] for r in rows))
    counts = sorted({r["clients"] for r in rows})
    markers, styles = "osd^v<>", ["-", "--", ":", "-."]
    for i, m in enumerate(methods):  # one colour and marker per method, one line style per client count
        mine = sorted((r for r in rows if r["series"] == m), key=lambda r: r["clients"])
        line = ax[0].errorbar([r["clients"] for r in mine], [r["global_accuracy"] for r in mine],
                              yerr=[r["global_accuracy_std"] or 0.0 for r in mine], marker=markers[i % 7],
                              capsize=3, label=m, alpha=0.85)[0]
        for r in mine:
            t, acc = zip(*r["curve"], strict=True)
            ax[1].plot(t, acc, marker=markers[i % 7], ls=styles[counts.index(r["clients"]) % 4],
                       color=line.get_color(), label=f"{m}, {r['clients']} clients", alpha=0.85)
    ax[0].set_xscale("log")
    ax[0].set_xticks(counts, [str(c) for c in counts])
    ax[0].minorticks_off()
    ax[0].set(xlabel="clients (same total data)", ylabel="global accuracy (mean ± std over seeds)",
              title="final accuracy")
    ax[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    ax[1].set(xlabel="round", ylabel="global accuracy (mean over seeds)", title="accuracy vs round")
    ax[0].legend()
    ax[1].legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    exit_on_error(main)
