"""CE-LoRA's claim under non-IID data: personalized accuracy vs FedIT and local-only, and the bytes paid.

MiniLM-L6 on `healthtweets-outlet` (16 outlets), 20 clients, Dirichlet alpha 0.1 and 0.5 on the
label; every method gets the same data, seed, rounds and local steps. All federated methods keep a
personal classification head here (the same head policy for all, as CE-LoRA's claim needs; the head
bytes are reported apart), plus FedIT with a shared head, the usual FedIT (first alpha only). Uplink is the adapter
bytes one client sends in one round. The centralized reference trains on the pooled data with the
same total number of steps per round as the federation (the core gives it local steps x clients).

Two stages, on different data:
  --stage tune   CE-LoRA's ablation (FedAvg of C, data-only, parameter-only, both, learned; self-weight
                 0.2 / 0.5 / 0.8 / 0.95 / auto; tau; overall vs per-class descriptor; frozen, local,
                 warm-up A/B, frozen A/B at 4r, local A/B with
                 C sent in the common basis; A/B lr), local-only, and each baseline's learning rate,
                 scored on a validation split carved from the clients' train data (the test splits are
                 never read). Rows show the mean self-weight, collaborators 1 / sum_j w_ij^2, descriptor bytes.
  --stage test   every method with its tuned options, scored on the clients' test splits.
  --stage ablation  CE-LoRA's ablation on the test splits: no sharing (C never mixed), shrinkage only
                 (C̄_i = 0.5 C_i: the default's self-weight, nobody else's C), FedAvg of C,
                 data-only, parameter-only, both (the default), learned, beside local-only, FedIT and
                 FedSA-LoRA. It shares the test stage's run folders, so arms the test stage already ran
                 are read back, not rerun.

    .venv/bin/python benchmarks/noniid_personalization.py --stage tune
    # or screen every arm at one seed, then give the best arms and every baseline arm their other seeds
    # (seed 0 is reused; the table's `seeds` column says which rows have 3):
    .venv/bin/python benchmarks/noniid_personalization.py --stage tune --seeds 1
    .venv/bin/python benchmarks/noniid_personalization.py --stage tune --arms celora,...,local,fedit-lr-0.003
    .venv/bin/python benchmarks/noniid_personalization.py --stage test
    .venv/bin/python benchmarks/noniid_personalization.py --stage ablation --alphas 0.1
    .venv/bin/python benchmarks/noniid_personalization.py --quick     # tiny random BERT, the test suite's smoke run

Prints the table last; writes `<out>/noniid_personalization[_tune|_ablation][_quick].json` and a PNG of
personalized accuracy vs round and vs cumulative uplink.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

from fedlora.report import call_text, head_bytes_per_upload, late_gain_text
from fedlora.sweep import exit_on_error, markdown, mean_std, run_sweep, save_figure, values, write_json

# learning rates per method: A/B factors, the core C, the head (set from --stage tune; see benchmarks/README.md)
# winners of --stage tune (2026-11-28): FedIT and FFA-LoRA 3e-3 over 1e-3; RoLoRA, FedSA, local-only and
# centralized take FedIT's; CE-LoRA's C 0.1 over 3e-2 (its A/B keep 1e-3, not tuned)
LR = {"fedit": 3e-3, "ffa": 3e-3, "rolora": 3e-3, "fedsa": 3e-3, "celora": 1e-3, "local": 3e-3, "centralized": 3e-3,
      # the FL-optimizer and personalization baselines take FedIT's lr (not tuned)
      "fedprox": 3e-3, "scaffold": 3e-3, "pfedgraph": 3e-3, "feddpa": 3e-3, "lorafair": 3e-3,
      "ravan": 3e-3,  # RAVAN trains only C, at LR_C as CE-LoRA's
      # exact aggregation (HetLoRA is left out: at one rank its zero-padded average is FedIT's)
      "flora": 3e-3, "fedex": 3e-3, "flexlora": 3e-3}
LR_C = 1e-1
METHODS = ["fedit", "ffa", "rolora", "fedsa", "celora", "fedprox", "scaffold", "pfedgraph", "feddpa", "lorafair",
           "ravan", "flora", "fedex", "flexlora", "local", "centralized"]


def base_config(quick: bool, alpha: float, rounds: int, steps: int, stage: str, precision: str = "fp32",
                eval_every: int | None = None) -> dict:
    if quick:
        model, task, n, r = {"name": "tiny-bert", "max_length": 16}, {"name": "synthetic"}, 6, 4
    else:
        model, task, n, r = {"name": "minilm", "max_length": 64}, {"name": "healthtweets-outlet"}, 20, 8
    cfg = {"seed": 0, "precision": precision, "model": model, "task": task,
           "partition": {"num_clients": n, "scheme": "dirichlet", "alpha": alpha},
           "adapter": {"r": r, "alpha": 2 * r, "target_modules": ["query", "value"]},
           "federation": {"rounds": rounds},
           "train": {"local_steps": steps, "batch_size": 16, "lr_c": LR_C, "lr_head": 1e-2},
           "eval": {"every": eval_every or max(1, rounds // 2), "max_global_examples": 300, "global_clients": 3}}
    if stage == "tune":
        cfg["partition"]["client_val_fraction"] = 0.2
        cfg["eval"]["split"] = "validation"
    return cfg


def arm(base: dict, method: str, head: str | None = "personal", lr: float | None = None, **celora) -> dict:
    cfg = copy.deepcopy(base)
    cfg["method"] = {"name": method, **({"head": head} if head and method != "centralized" else {}),
                     **({"celora": celora} if celora else {})}
    cfg["train"]["lr"] = lr or LR[method]
    return cfg


# the ablation the CE-LoRA claim is judged by (on test): which part of the aggregation pays
# no-sharing: the same tri adapter, C never mixed (self-weight 1): what the aggregation adds over training alone;
# shrink: C̄_i = 0.5 C_i, the default's self-weight with nobody else's C: is what mixing adds only shrinkage?
ABLATION = ["celora-no-sharing", "celora-shrink", "celora-fedavg-c", "celora-data-only", "celora-param-only", "celora",
            "celora-learned"]
QUICK_TUNE = {"celora", "celora-fedavg-c", "celora-learned", "celora-self-auto", "celora-per-class", "celora-warmup-ab",
              "celora-common-basis"}


def arms_for(stage: str, base: dict, methods: list[str], shared_head: bool = True,
             quick: bool = False) -> list[tuple[str, dict]]:
    if stage == "test":
        out = [(m, arm(base, m)) for m in methods]
        if "fedit" in methods and shared_head:
            out.append(("fedit-shared-head", arm(base, "fedit", head="shared")))
        return out
    if stage == "ablation":  # the test split; labels as in the test stage, so its runs are reused
        variants = dict(celora_variants(base))
        baselines = [(m, arm(base, m)) for m in ("local", "fedit", "fedsa") if m in methods]
        return [(label, variants[label]) for label in ABLATION] + baselines
    # tune: CE-LoRA's options, then an lr pair per baseline
    out = celora_variants(base)
    if quick:  # the smoke run: one arm of each kind of option
        out = [(label, c) for label, c in out if label in QUICK_TUNE]
    if "local" in methods:
        out.append(("local", arm(base, "local")))
    for m in [m for m in methods if m in ("fedit", "ffa")]:  # the two baselines; the others take FedIT's lr
        out += [(f"{m}-lr-{lr:g}", arm(base, m, lr=lr)) for lr in (1e-3, 3e-3)]
    return out


def celora_variants(base: dict) -> list[tuple[str, dict]]:
    """CE-LoRA's options, one changed at a time from the defaults (svd, local A/B, beta 0.5, tau 1 on
    z-scored similarities, self_weight 0.5, softmax, overall descriptor, C lr 0.1, A/B lr 1e-3)."""
    start = copy.deepcopy(base)

    def ce(**opts) -> dict:
        return arm(start, "celora", lr=1e-3, **opts)

    wide = copy.deepcopy(start)
    wide["adapter"] = {**wide["adapter"], "r": 4 * wide["adapter"]["r"], "alpha": 8 * wide["adapter"]["r"]}
    return [("celora", ce()), ("celora-fedavg-c", ce(weights="fedavg")),
            ("celora-no-sharing", ce(self_weight=1.0, beta=0.0)),  # beta 0: no descriptor, it would go unused
            # the default's self-weight, but the other half of C̄ is C = 0 rather than the others' C
            ("celora-shrink", ce(weights="shrink")),
           ("celora-data-only", ce(beta=1.0)), ("celora-param-only", ce(beta=0.0)),
           ("celora-learned", ce(weights="learned")),
           *[(f"celora-self-{lam}", ce(self_weight=lam)) for lam in (0.2, 0.8, 0.95, "auto")],
           ("celora-tau-0.3", ce(tau=0.3)), ("celora-per-class", ce(descriptor="per_class")),
           ("celora-frozen-ab", ce(ab_train="frozen")), ("celora-warmup-ab", ce(ab_train="warmup")),
           ("celora-common-basis", ce(c_basis="common")),
           ("celora-frozen-ab-4r", arm(wide, "celora", lr=1e-3, ab_train="frozen")),
           ("celora-lr_ab-3e-3", ce() | {"train": {**start["train"], "lr": 3e-3}})]


def last_metric(hist: list[dict], key: str) -> float | None:
    return next((r[key] for r in reversed(hist) if key in r), None)


def rows_from(results: dict[str, list[tuple[dict, list[dict]]]], alpha: float) -> list[dict]:
    """One row per arm ({arm: one (summary, rows) per seed}): means over its seeds (sample std beside the
    personalized accuracy), curves averaged."""
    rows = []
    for label, runs in results.items():
        s, hist = runs[0]
        acc = values(runs, "personal_accuracy")
        mean, std = mean_std(acc)
        curves = [[r["personal_accuracy"] for r in h if r.get("personal_accuracy") is not None] for _, h in runs]
        mean_curve = np.mean(curves, axis=0).tolist()
        rows.append({"alpha": alpha, "arm": label, "method": s["method"], "head": s["head"], "seeds": len(runs),
                     "seed_values": acc, "personal_accuracy": mean, "personal_accuracy_std": std,
                     "global_accuracy": float(np.mean(values(runs, "global_accuracy"))),
                     "up_adapter_per_client_round": s["up_raw_adapter_per_client_round"],
                     "up_head_per_client_round": head_bytes_per_upload(hist),
                     "up_mb": s["up_raw"] / 1e6, "wall_s": s["wall_s"],
                     "descriptor_bytes": sum(r.get("up_raw_other", 0) for r in hist),
                     # CE-LoRA, last round: the sharing; the mean ΔC cosine between clients and its
                     # correlation with data similarity
                     "self_weight": last_metric(hist, "celora_self_weight"),
                     "collaborators": last_metric(hist, "celora_collaborators"),
                     "param_similarity": last_metric(hist, "celora_param_similarity"),
                     "similarity_agreement": last_metric(hist, "celora_similarity_agreement"),
                     "curve": [(r["round"], r["cum_up_raw"] / 1e6, a) for r, a in
                               zip([r for r in hist if r.get("personal_accuracy") is not None], mean_curve,
                                   strict=True)]})
    for r in rows:
        r["late_gain"] = late_gain_text([(t, a) for t, _, a in r["curve"]])
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    alphas = sorted({r["alpha"] for r in rows})
    # one colour, marker and line style per arm: more arms than the 10-colour cycle must not share a look
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    cmap = plt.get_cmap("tab20")
    look = {arm: {"color": cmap(i % 20), "marker": "osd^v<>PXh*"[i % 11], "ls": ["-", "--", ":", "-."][i % 4]}
            for i, arm in enumerate(arms)}
    fig, axes = plt.subplots(len(alphas), 2, figsize=(11, 4 * len(alphas)), squeeze=False)
    for i, a in enumerate(alphas):
        for r in [r for r in rows if r["alpha"] == a]:
            t, up, acc = zip(*r["curve"], strict=True)
            axes[i, 0].plot(t, acc, label=r["arm"], alpha=0.85, **look[r["arm"]])
            if r["up_mb"] > 0:  # nothing sent: no point on a log axis
                axes[i, 1].plot(up, acc, label=r["arm"], alpha=0.85, **look[r["arm"]])
        axes[i, 0].set(xlabel="round", ylabel="personalized accuracy", title=f"Dirichlet alpha {a}")
        axes[i, 0].xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        axes[i, 1].set(xlabel="cumulative uplink MB (log)", ylabel="personalized accuracy", xscale="log",
                       title=f"Dirichlet alpha {a}: accuracy vs bytes sent")
        axes[i, 0].legend(fontsize=7)
        axes[i, 1].legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=["tune", "test", "ablation"], default="test")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--alphas", default=None, help="default: 0.1,0.5 (test, ablation), 0.1 (tune)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--arms", default=None, help="only these arm labels (e.g. to give the best arms of a "
                                                 "1-seed screen their other seeds); default: all")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="local steps per round")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: autocast with fp32 master copies (2.5x faster on a CPU with avx512_bf16; "
                         "every arm of one table at one precision)")
    ap.add_argument("--eval-every", type=int, default=None, help="rounds between evaluations (default rounds // 2)")
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side, one torch thread each")
    ap.add_argument("--seeds", type=int, default=None, help="training seeds per arm (default 3; quick 1)")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    seeds = args.seeds or (1 if args.quick else 3)
    rounds = args.rounds or (2 if args.quick else 6)
    steps = args.steps or (2 if args.quick else 5)
    alphas = [float(a) for a in (args.alphas or ("0.1" if args.stage == "tune" else "0.1,0.5")).split(",")]
    methods = args.methods.split(",")
    quick = "_quick" if args.quick else ""
    name = "noniid_personalization" + ("" if args.stage == "test" else f"_{args.stage}") + quick
    runs_name = "noniid_personalization" + ("_tune" if args.stage == "tune" else "") + quick  # ablation: test's runs
    out = Path(args.out)
    rows = []
    for a in alphas:
        base = base_config(args.quick, a, rounds, steps, args.stage, args.precision, args.eval_every)
        # the usual FedIT (shared head): first alpha only
        arms = arms_for(args.stage, base, methods, shared_head=a == alphas[0], quick=args.quick)
        if args.arms:
            wanted = args.arms.split(",")
            unknown = sorted(set(wanted) - {label for label, _ in arms})
            if unknown:
                print(f"--arms: no arm named {', '.join(unknown)} in stage {args.stage}", file=sys.stderr)
                raise SystemExit(2)
            arms = [(label, c) for label, c in arms if label in wanted]
        rows += rows_from(run_sweep(arms, out / runs_name / f"alpha{a}", seeds=seeds,
                                    jobs=1 if args.quick else args.jobs, save_client_states=False).arms, a)
    # rows of an (alpha, arm) not run this time are kept from the file, if it was written at the same budget
    path = out / f"{name}.json"
    if path.exists():
        old = json.loads(path.read_text())
        if (old.get("rounds"), old.get("local_steps"), old.get("stage"), old.get("precision", "fp32")) == \
                (rounds, steps, args.stage, args.precision):
            now = {(r["alpha"], r["arm"]) for r in rows}
            rows = [r for r in old["rows"] if (r["alpha"], r["arm"]) not in now] + rows
    write_json(path, {"rounds": rounds, "local_steps": steps, "stage": args.stage, "precision": args.precision,
                      "rows": rows})
    plot(rows, out / f"{name}.png")
    for a in alphas:  # the claim, in numbers, per alpha
        by = {r["arm"]: r for r in rows if r["alpha"] == a}
        if {"celora", "fedit", "local"} <= by.keys():
            c, f, loc = by["celora"], by["fedit"], by["local"]
            print(f"alpha {a}: CE-LoRA - FedIT = {call_text(c['seed_values'], f['seed_values'])}, "
                  f"CE-LoRA - local = {call_text(c['seed_values'], loc['seed_values'])}, "
                  f"uplink ratio FedIT / CE-LoRA = "
                  f"{f['up_adapter_per_client_round'] / max(1.0, c['up_adapter_per_client_round']):.0f}")
        if args.stage == "ablation" and "local" in by:  # each variant against the bar: local-only
            for label in [label for label in ABLATION if label in by]:
                print(f"alpha {a}: {label} - local = {call_text(by[label]['seed_values'], by['local']['seed_values'])}")
    print(f"split: {'validation' if args.stage == 'tune' else 'test'}; {seeds} seed(s) per arm (mean, sample std; "
          f"a difference is a win only beyond 2 SE); {rounds} rounds x {steps} local steps, "
          f"all clients every round; mean personalized accuracy {np.mean([r['personal_accuracy'] for r in rows]):.3f}")
    print(markdown(rows, [("alpha", "alpha", "g"), ("arm", "arm", "s"), ("head", "head", "s"), ("seeds", "seeds", "d"),
                          ("personal_accuracy", "personalized acc", ".3f"), ("personal_accuracy_std", "± std", ".3f"),
                          ("global_accuracy", "global acc", ".3f"),
                          ("up_adapter_per_client_round", "uplink B / client / round (adapter)", ",.0f"),
                          ("up_head_per_client_round", "head B", ",.0f"), ("up_mb", "uplink MB total", ".2f"),
                          ("descriptor_bytes", "descriptor B total", ",.0f"), ("self_weight", "mean w_ii", ".2f"),
                          ("collaborators", "collaborators", ".1f"), ("param_similarity", "ΔC cos", ".2f"),
                          ("similarity_agreement", "ΔC~data r", ".2f"), ("late_gain", "last-20% gain", "s"),
                          ("wall_s", "wall s", ".0f")]))


if __name__ == "__main__":
    exit_on_error(main)
