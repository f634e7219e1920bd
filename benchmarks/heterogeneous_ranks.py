"""Heterogeneous client ranks: HetLoRA vs FlexLoRA vs FLoRA, and FedIT at the smallest common rank.

MiniLM-L6 on `rt-sentiment`, 20 clients (Dirichlet 0.5 on the label), a quarter of them each at
rank 2, 4, 8 and 16 (`adapter.client_ranks` tiers, assigned by the seeded generator), LoRA on
query/value, shared head, 3 seeds. FedIT cannot take mixed ranks, so it runs every client at the
smallest rank, 2: what a federation without rank heterogeneity would have to do. Every arm has
the same scale s = alpha / adapter.r (adapter.r = 2), the same data, rounds and local steps.

Reported per method: global accuracy (HetLoRA and FlexLoRA: the mean over a seeded subset of
clients' own models on the global test set, since each client holds its own rank), personalized
accuracy, uplink and downlink MB in all, adapter bytes per client per round. FLoRA's downlink is
the stack of every client's factors (Σ r_i (d + k) per layer per client), which is the price of
its exact aggregation.

    .venv/bin/python benchmarks/heterogeneous_ranks.py            # full size: 1 h 48 min on 2 cores (2026-12-02)
    .venv/bin/python benchmarks/heterogeneous_ranks.py --quick    # tiny random BERT, seconds (test suite)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedlora.report import call_text, late_gain_text
from fedlora.sweep import exit_on_error, markdown, mean_std, run_sweep, save_figure, values, write_json

METHODS = ["hetlora", "flexlora", "flora", "fedit"]
TIERS = {2: 0.25, 4: 0.25, 8: 0.25, 16: 0.25}


def config(quick: bool, method: str, seed: int, clients: int, rounds: int) -> dict:
    model = {"name": "tiny-bert", "max_length": 16} if quick else {"name": "minilm", "max_length": 64}
    task = {"name": "synthetic"} if quick else {"name": "rt-sentiment"}
    adapter = {"r": 2, "alpha": 16, "target_modules": ["query", "value"]}
    if method != "fedit":  # FedIT: everyone at the smallest rank
        adapter["client_ranks"] = TIERS
    return {"seed": seed, "model": model, "task": task,
            "partition": {"num_clients": clients, "scheme": "dirichlet", "alpha": 0.5,
                          "min_partition_size": 10 if quick else 20},
            "adapter": adapter, "method": {"name": method, "head": "shared"}, "federation": {"rounds": rounds},
            "train": {"local_steps": 2 if quick else 5, "batch_size": 16, "lr": 3e-3},
            "eval": {"every": 1 if quick else 2, "max_global_examples": 64 if quick else 500,
                     "max_client_examples": 8 if quick else None, "global_clients": 2 if quick else 3}}


def curve(runs: list[tuple[dict, list[dict]]], key: str) -> list[tuple[int, float]]:
    """(round, mean over seeds) at every evaluated round."""
    per_seed = [[(r["round"], r[key]) for r in hist if r.get(key) is not None] for _, hist in runs]
    rounds = [t for t, _ in per_seed[0]]
    return [(t, float(np.mean([dict(c)[t] for c in per_seed]))) for t in rounds]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        for ax, key in zip(axes, ("global_accuracy", "personal_accuracy"), strict=True):
            t, acc = zip(*r[f"{key}_curve"], strict=True)
            ax.plot(t, acc, marker="o", label=f"{r['method']} (ranks {r['ranks']})")
    for ax, title in zip(axes, ("global accuracy", "personalized accuracy"), strict=True):
        ax.set(xlabel="round", ylabel=title, title=f"{title}, mean over {rows[0]['seeds']} seed(s)")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=None, help="training seeds, one data split (default 3; quick 1)")
    ap.add_argument("--clients", type=int, default=None, help="default 20 (quick: 4)")
    ap.add_argument("--rounds", type=int, default=None, help="default 10 (quick: 2)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    seeds = args.seeds or (1 if args.quick else 3)
    clients, rounds = args.clients or (4 if args.quick else 20), args.rounds or (2 if args.quick else 10)
    name = "heterogeneous_ranks" + ("_quick" if args.quick else "")
    methods = args.methods.split(",")
    # runs `<method>@s<seed>`, seed-major: a sweep cut short has every method at the same number of seeds
    arms = [(m, {**config(args.quick, m, 0, clients, rounds), "data_seed": 0}) for m in methods]
    groups = run_sweep(arms, Path(args.out) / name, seeds=seeds, jobs=1 if args.quick else args.jobs,
                       save_client_states=False).arms
    rows = []
    for m, runs in groups.items():
        row = {"method": m, "ranks": "2 (all)" if m == "fedit" else "2/4/8/16", "seeds": seeds}
        for k in ("global_accuracy", "personal_accuracy"):
            vals = values(runs, k)
            row[f"{k}_seeds"] = vals
            row[k], row[f"{k}_std"] = mean_std(vals)
            row[f"{k}_curve"] = curve(runs, k)
            vs = "–" if m == "fedit" or "fedit" not in groups else call_text(vals, values(groups["fedit"], k))
            row[f"{k.split('_')[0]}_vs_fedit"] = vs  # personal_vs_fedit, global_vs_fedit
        row["late_gain"] = late_gain_text(row["personal_accuracy_curve"])
        row["up_mb"] = float(np.mean([s["up_raw"] for s, _ in runs])) / 1e6
        row["down_mb"] = float(np.mean([s["down_raw"] for s, _ in runs])) / 1e6
        row["up_b_client_round"] = float(np.mean([s["up_raw_adapter_per_client_round"] for s, _ in runs]))
        row["wall_s"] = float(np.mean([s["wall_s"] for s, _ in runs]))
        rows.append(row)
    write_json(Path(args.out) / f"{name}.json", {"clients": clients, "rounds": rounds, "seeds": seeds,
                                                  "tiers": {str(k): v for k, v in TIERS.items()}, "rows": rows})
    plot(rows, Path(args.out) / f"{name}.png")
    print(f"{clients} clients, ranks {'/'.join(map(str, TIERS))} (a quarter each), {rounds} rounds, {seeds} seed(s) "
          "(mean, sample std; a difference is called only beyond 2 SE)")
    print(markdown(rows, [("method", "method", "s"), ("ranks", "ranks", "s"),
                          ("global_accuracy", "global acc", ".3f"), ("global_accuracy_std", "±", ".3f"),
                          ("global_vs_fedit", "global vs FedIT", "s"),
                          ("personal_accuracy", "pers. acc", ".3f"), ("personal_accuracy_std", "±", ".3f"),
                          ("personal_vs_fedit", "pers. vs FedIT", "s"), ("late_gain", "last-20% gain (pers.)", "s"),
                          ("up_mb", "uplink MB", ".2f"), ("down_mb", "downlink MB", ".2f"),
                          ("up_b_client_round", "adapter up B/client/round", ",.0f"), ("wall_s", "wall s", ".0f")]))


if __name__ == "__main__":
    exit_on_error(main)
