"""Privacy: gradient inversion on each method's real upload, and accuracy vs client-level DP epsilon.

Part 1, token recovery. MiniLM-L6 on `rt-sentiment`. Each method first trains `--warm` rounds
(so that B != 0 and every factor has a gradient: at LoRA's init B = 0, A's gradient is exactly 0),
then the server attacks the next upload of `--sentences` batches (the same training rows for every
method, round-robin over the clients): one SGD step on one batch, inverted from exactly the tensors
the method uploads under one head policy for every method (`--head`, default shared, so the head is
uploaded and, in part 2, noised: FedIT A, B; FFA-LoRA and RoLoRA's odd rounds B; FedSA A; CE-LoRA C;
each + head), and from the full fine-tuning update of every base weight, word embeddings included
(the most leaky reference: its word-embedding rows give the bag of tokens exactly). The attacker
decodes adapter uploads among the task's tokens (a domain prior). Token F1 and ROUGE-L at batch 1
and 4: mean over the sentences with a 95 % percentile-bootstrap interval; CE-LoRA's claim (its
leakage <= 1/2 of FedIT's) is the paired ratio of means with its bootstrap interval: "holds" only if
the whole interval is <= 0.5, "does not hold" if it is all above, else "not settled".

Part 2, accuracy vs epsilon. FedIT, FFA-LoRA, RoLoRA, CE-LoRA, one head policy, with local DP (each
client clips its upload's delta to S and adds N(0, (sigma S)^2)), sigma in --sigmas; S per method is the median
delta norm of that method's non-private round-1 uploads (the usual adaptive-clipping choice), so
every method clips about half its updates. epsilon at delta 1e-5 after all rounds, from Opacus's
RDP accountant (every client every round: sampling rate 1); CE-LoRA's data descriptor is released
once with the same noise multiplier (clipped to norm 1) and composed into its epsilon.

    .venv/bin/python benchmarks/privacy.py --skip attack   # DP part: 36 runs at 3 seeds, ~80 min on 2 cores
    .venv/bin/python benchmarks/privacy.py --quick    # tiny random BERT, seconds (test suite)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fedlora.config import build_config
from fedlora.federation import apply_download, client_fit
from fedlora.privacy.attack import attack_client, mean_ci, ratio_ci, verdict
from fedlora.privacy.dp import delta_norm
from fedlora.runtime.simulation import Simulation
from fedlora.sweep import exit_on_error, markdown, mean_std, run_sweep, save_figure, values, write_json

ATTACKED = ["full", "fedit", "ffa", "rolora", "rolora-a", "fedsa", "celora"]
DP_METHODS = ["fedit", "ffa", "rolora", "celora"]
LR = {"fedit": 3e-3, "ffa": 3e-3, "rolora": 3e-3, "celora": 3e-3}


def base(quick: bool, method: str, rounds: int, steps: int, clients: int = 10, head: str = "shared") -> dict:
    model = {"name": "tiny-bert", "max_length": 16} if quick else {"name": "minilm", "max_length": 32}
    task = {"name": "synthetic"} if quick else {"name": "rt-sentiment", "max_examples": 3000}
    return {"seed": 0, "threads": 2, "model": model, "task": task,
            "partition": {"num_clients": clients if not quick else 3, "scheme": "dirichlet", "alpha": 0.5},
            "adapter": {"r": 8 if not quick else 4, "alpha": 16, "target_modules": ["query", "value"]},
            "method": {"name": "fedit" if method == "full" else method, "head": head}, "federation": {"rounds": rounds},
            "train": {"local_steps": steps, "batch_size": 16, "lr": LR.get(method, 3e-3)},
            "eval": {"every": rounds, "max_global_examples": 400, "max_client_examples": 60, "global_clients": 3},
            "output": {"save_client_states": False}}


def sentences(sim, b: int, n: int) -> list[tuple[int, int]]:
    """n batches of b training rows, (client, batch index), round-robin over the clients that have the rows;
    the split does not depend on the method, so every method is attacked on the same sentences (paired)."""
    picks, k = [], 0
    while len(picks) < n and k < n * len(sim.client_train) + len(sim.client_train):
        cid, idx = k % len(sim.client_train), k // len(sim.client_train)
        if (idx + 1) * b <= len(sim.client_train[cid]):
            picks.append((cid, idx))
        k += 1
    if len(picks) < n:
        raise ValueError(f"privacy: only {len(picks)} batches of {b} rows in the clients' training data, want {n}")
    return picks


# attacked uploads, in the order each (sentence, batch size) visits them: the claim's pair first. "rolora" is
# RoLoRA's B-round upload, "rolora-a" its A-round upload (one more round)
ORDER = ["fedit", "celora", "ffa", "rolora", "rolora-a", "fedsa", "full"]


def _method_name(label: str) -> str:
    return "rolora" if label == "rolora-a" else label


def _warm(label: str, warm: int) -> int:
    """Rounds before the attacked round: RoLoRA uploads B in odd rounds and A in even ones."""
    if label in ("rolora", "rolora-a"):
        want_odd = label == "rolora"
        return warm if ((warm + 1) % 2 == 1) == want_odd else warm + 1
    return warm


def attack_settings(args) -> dict:
    """Everything an item's result depends on besides (upload, batch size, sentence): a rerun with other
    settings is refused rather than mixed into the same file."""
    return {"quick": args.quick, "warm": args.warm, "head": args.head, "steps": args.attack_steps,
            "search": args.search, "patience": args.patience, "tol": args.tol, "trim": not args.no_trim,
            "precision": args.precision, "optimizer": "sgd", "restarts": 1}


def read_items(path: Path, settings: dict) -> dict[tuple[str, int, int], dict]:
    """The finished items of an attack file, keyed (upload, batch size, sentence); a torn last line (a kill
    mid-write) is dropped."""
    import json

    done = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if item.get("settings") != settings:
            raise ValueError(f"privacy: {path} holds items of other settings ({item.get('settings')}); "
                             "use another --out or delete it")
        done[(item["method"], item["batch_size"], item["sentence"])] = item
    return done


def random_baseline(sim, vocab: torch.Tensor, b: int, cid: int, idx: int, seed: int) -> dict:
    """A random-token guess from the same alphabet as the adapter attack (the task's tokens), at the real
    positions: what the scores are worth with no upload at all."""
    from fedlora.privacy.attack import score
    from fedlora.seeding import torch_generator

    batch = sim.client_train[cid].batch(slice(idx * b, idx * b + b))
    gen = torch_generator("attack_baseline", seed, b)
    ids = vocab[torch.randint(len(vocab), batch["input_ids"].shape, generator=gen)]
    return score(sim.tokenizer, ids, batch["input_ids"], batch["attention_mask"])


def token_recovery(args, out: Path) -> list[dict]:
    """Every (sentence, batch size, upload) item once, appended to attack_items.jsonl as it finishes; a rerun
    skips the finished ones, so the run can be stopped and resumed across sessions."""
    import json

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    labels = [m for m in ORDER if m in args.attack_methods.split(",")]
    settings = attack_settings(args)
    path = out / "attack_items.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_items(path, settings)
    sims: dict[str, object] = {}

    def sim_for(label: str):
        if label not in sims:
            cfg = base(args.quick, _method_name(label), _warm(label, args.warm), 3, head=args.head)
            cfg["name"], cfg["threads"] = f"attack-{label}", 1
            sim = Simulation(build_config(cfg), None)
            sim.run()  # warm-up rounds: the attack is on the next round
            sims[label] = sim
        return sims[label]

    # the adapter uploads first, sentence by sentence (a run cut short leaves them all at the same sentences,
    # paired); the full control, whose inversion step costs ~20x an adapter's, after them
    order = [m for m in labels if m != "full"], [m for m in labels if m == "full"]
    todo = [(k, b, m) for group in order for k in range(args.sentences) for b in sizes for m in group
            if (m, b, k) not in done]
    print(f"  attack: {len(done)} items done, {len(todo)} to go ({path})", flush=True)
    picks: dict[int, list] = {}
    for k, b, m in todo:
        sim = sim_for(m)
        picks.setdefault(b, sentences(sim, b, args.sentences))  # the same rows for every upload
        cid, idx = picks[b][k]
        vocab = torch.unique(torch.cat([d.input_ids.flatten() for d in sim.client_train]))
        start = time.perf_counter()
        r = attack_client(sim, _method_name(m), cid, b, idx, "sgd", args.attack_steps, vocab=vocab, seed=k,
                          search=args.search, patience=args.patience, tol=args.tol, trim=not args.no_trim,
                          precision=args.precision)
        # the upload's label last: attack_client's "method" is the method's name ("rolora" for "rolora-a" too)
        item = {**r, "batch_size": b, "sentence": k, "client": cid, "batch_index": idx, "settings": settings,
                **{f"random_{key}": v for key, v in random_baseline(sim, vocab, b, cid, idx, k).items()},
                "wall_s": time.perf_counter() - start, "method": m}
        with path.open("a") as f:  # one line per item, flushed: a kill loses at most the item in flight
            f.write(json.dumps(item) + "\n")
        done[(m, b, k)] = item
        print(f"  attack {m} b={b} sentence {k}: F1 {item['f1']:.3f} ROUGE-L {item['rouge_l']:.3f} "
              f"(random {item['random_f1']:.3f}; {sum(item['steps_run'])} steps, {item['wall_s']:.0f} s)", flush=True)
    return summarize_items(done, labels, sizes, args.sentences)


def summarize_items(done: dict, labels: list[str], sizes: list[int], want: int) -> list[dict]:
    """One row per (upload, batch size): means with 95 % bootstrap intervals over its finished sentences."""
    rows = []
    for m in labels:
        for b in sizes:
            items = [done[(m, b, k)] for k in range(want) if (m, b, k) in done]
            if not items:
                continue
            row = {"method": m, "batch_size": b, "sentences": len(items), "complete": len(items) == want,
                   "observed_numbers": items[0]["observed_numbers"], "wall_s": sum(i["wall_s"] for i in items),
                   "steps_mean": float(np.mean([sum(i["steps_run"]) for i in items])),
                   "sentence_ids": [i["sentence"] for i in items],
                   "example": {"true": items[0]["true"][0], "decoded": items[0]["decoded"][0]}}
            for key in ("precision", "recall", "f1", "rouge_l", "random_f1", "random_rouge_l"):
                per = [i[key] for i in items]
                row[key], row[f"{key}_lo"], row[f"{key}_hi"] = mean_ci(per)
                row[f"{key}_each"] = per
            rows.append(row)
    return rows


def celora_claim(rec: list[dict]) -> list[dict]:
    """CE-LoRA's claim: its leakage is at most half of FedIT's, per batch size and metric, on the same
    sentences; 'holds' only if the whole 95 % interval of the ratio is at most 0.5."""
    out = []
    for b in sorted({r["batch_size"] for r in rec}):
        got = {r["method"]: r for r in rec if r["batch_size"] == b}
        if not {"celora", "fedit"} <= set(got):
            continue
        ce, fe = got["celora"], got["fedit"]
        both = [k for k in ce.get("sentence_ids", range(ce["sentences"])) if k in set(fe.get("sentence_ids",
                                                                                          range(fe["sentences"])))]
        pos = {name: {k: i for i, k in enumerate(r.get("sentence_ids", range(r["sentences"])))}
               for name, r in (("celora", ce), ("fedit", fe))}
        complete = ce.get("complete", True) and fe.get("complete", True)
        for k in ("f1", "rouge_l"):
            a = [ce[f"{k}_each"][pos["celora"][s]] for s in both]
            d = [fe[f"{k}_each"][pos["fedit"][s]] for s in both]
            ratio, lo, hi = ratio_ci(a, d)
            out.append({"batch_size": b, "metric": k, "celora": float(np.mean(a)), "fedit": float(np.mean(d)),
                        "ratio": ratio, "ratio_lo": lo, "ratio_hi": hi, "sentences": len(both),
                        "verdict": verdict(hi, lo) if complete else "partial: " + verdict(hi, lo)})
    return out


def calibrate_clip(cfg: dict, clients: int) -> float:
    """Median L2 norm of the non-private round-1 upload deltas of the first `clients` clients."""
    sim = Simulation(build_config({**cfg, "name": "calibrate"}), None)
    norms = []
    for cid in range(clients):
        dl = sim.server.download(cid, 1)
        start = apply_download(sim.clients[cid], dl, sim.method).full()
        up, _ = client_fit(sim.am, sim.method, sim.clients[cid], dl, sim.train_sets[cid], sim.streams[cid],
                           sim.cfg.train)
        norms.append(delta_norm({k: v - start[k] for k, v in up.tensors.items()}))
    return float(statistics.median(norms))


def accuracy_vs_epsilon(args, out: Path) -> list[dict]:
    sigmas = [float(s) for s in args.sigmas.split(",")]
    arms, clips = [], {}
    for m in args.dp_methods.split(","):
        cfg = base(args.quick, m, args.rounds, args.steps, args.clients, head=args.head)
        clips[m] = calibrate_clip(cfg, 3 if args.quick else 5)
        arms.append((f"{m}-nodp", cfg))
        for s in sigmas:
            c = copy.deepcopy(cfg)
            c["privacy"] = {"dp": "local", "clip": clips[m], "noise_multiplier": s}
            if m == "celora":  # its data descriptor is released once with the same noise multiplier (in epsilon)
                c["method"]["celora"] = {"descriptor_sigma": s}
            arms.append((f"{m}-sigma{s:g}", c))
    results = run_sweep(arms, out / "dp", seeds=args.seeds, jobs=1 if args.quick else args.jobs,
                        save_client_states=False).arms
    rows = []
    for label, runs in results.items():
        m, arm = label.split("-", 1)
        acc = values(runs, "personal_accuracy")
        mean, std = mean_std(acc)
        rows.append({"method": m, "sigma": None if arm == "nodp" else float(arm.removeprefix("sigma")),
                     "clip": clips[m], "epsilon": runs[0][1][-1].get("epsilon"), "seeds": len(runs),
                     "personal_accuracy": mean, "personal_accuracy_std": std,
                     "global_accuracy": float(np.mean(values(runs, "global_accuracy"))),
                     "wall_s": float(np.mean(values(runs, "wall_s")))})
    return rows


def plot(rec: list[dict], dp: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p, rows in (("attack", rec), ("dp", dp)) if rows]  # one panel per part that ran
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    ax = dict(zip(panels, axes[0], strict=True))
    methods = list(dict.fromkeys(r["method"] for r in rec))
    sizes = sorted({r["batch_size"] for r in rec})
    width = 0.8 / max(1, len(sizes))
    for j, b in enumerate(sizes):
        got = [next((r for r in rec if r["method"] == m and r["batch_size"] == b), None) for m in methods]
        f1 = [g["f1"] if g else 0.0 for g in got]
        err = [[g["f1"] - g["f1_lo"] if g else 0.0 for g in got], [g["f1_hi"] - g["f1"] if g else 0.0 for g in got]]
        ax["attack"].bar(np.arange(len(methods)) + j * width, f1, width, yerr=err, capsize=3, label=f"batch {b}")
    if rec:
        ax["attack"].set_xticks(np.arange(len(methods)) + width * (len(sizes) - 1) / 2, methods)
        ax["attack"].set(ylabel="token F1 (mean, 95 % CI)", title="gradient inversion on each method's upload")
        ax["attack"].legend()
    for m in dict.fromkeys(r["method"] for r in dp):
        pts = sorted((r["epsilon"], r["personal_accuracy"]) for r in dp if r["method"] == m and r["sigma"])
        nodp = next(r["personal_accuracy"] for r in dp if r["method"] == m and r["sigma"] is None)
        line = ax["dp"].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)[0]
        ax["dp"].axhline(nodp, ls=":", color=line.get_color())
    if dp:
        ax["dp"].set(xlabel="epsilon (delta 1e-5), log", ylabel="personalized accuracy", xscale="log",
                     title="accuracy vs client-level local DP (dotted: no DP)")
        ax["dp"].legend()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--attack-methods", default=",".join(ATTACKED))
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--sentences", type=int, default=None,
                    help="batches attacked per method and batch size, the same for every method (default 20)")
    ap.add_argument("--attack-steps", type=int, default=None,
                    help="inversion steps (default 200; 0: closed form and search only)")
    ap.add_argument("--search", type=int, default=None, help="discrete search proposals per batch (default 30)")
    ap.add_argument("--warm", type=int, default=2, help="rounds trained before the attacked round")
    ap.add_argument("--patience", type=int, default=None,
                    help="stop an inversion after this many steps without a relative fall of --tol "
                         "(default 20; 0: off)")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--no-trim", action="store_true", help="invert at the padded length, not the real width")
    ap.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto",
                    help="the inversion's autocast (auto: bf16 only where the CPU has it natively)")
    ap.add_argument("--summarize", action="store_true",
                    help="only read the finished attack items back and print the tables (while a run goes on)")
    ap.add_argument("--dp-methods", default=",".join(DP_METHODS))
    # the DP budget: 5 clients x 6 rounds x 20 steps, where FedIT learns without DP (0.73 on one seed; at the
    # old 10 x 4 x 5 it stayed at the majority class, so DP had nothing to destroy)
    ap.add_argument("--sigmas", default="0.5,2")
    ap.add_argument("--rounds", type=int, default=None, help="DP runs: rounds (default 6)")
    ap.add_argument("--steps", type=int, default=None, help="DP runs: local steps (default 20)")
    ap.add_argument("--clients", type=int, default=5, help="DP runs: clients")
    ap.add_argument("--head", choices=["shared", "personal"], default="shared",
                    help="one head policy for every method (default shared: the head is uploaded, so DP noises it too)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--skip", choices=["attack", "dp"], default=None)
    ap.add_argument("--seeds", type=int, default=None, help="DP runs: training seeds (default 3; quick 1)")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.sentences = args.sentences or (2 if args.quick else 20)
    args.attack_steps = args.attack_steps if args.attack_steps is not None else (10 if args.quick else 200)
    args.search = args.search if args.search is not None else (3 if args.quick else 30)
    args.patience = args.patience if args.patience is not None else 20
    args.rounds, args.steps = args.rounds or (2 if args.quick else 6), args.steps or (2 if args.quick else 20)
    if args.quick:
        args.warm, args.sigmas = 1, "1"
    name = "privacy" + ("_quick" if args.quick else "")
    out = Path(args.out) / name
    if args.summarize:
        labels = [m for m in ORDER if m in args.attack_methods.split(",")]
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        rec = summarize_items(read_items(out / "attack_items.jsonl", attack_settings(args)), labels, sizes,
                              args.sentences)
        args.skip = "dp"
    else:
        rec = [] if args.skip == "attack" else token_recovery(args, out)
    dp = [] if args.skip == "dp" else accuracy_vs_epsilon(args, out)
    claim = celora_claim(rec)
    write_json(Path(args.out) / f"{name}.json", {"head": args.head, "token_recovery": rec, "celora_claim": claim,
                                                 "dp": dp, "attack_steps": args.attack_steps, "search": args.search})
    if rec or dp:
        plot(rec, dp, Path(args.out) / f"{name}.png")
    if dp:
        print(markdown(dp, [("method", "method", "s"), ("sigma", "sigma", "g"), ("clip", "clip S", ".3g"),
                            ("epsilon", "epsilon", ".3g"), ("seeds", "seeds", "d"),
                            ("personal_accuracy", "personalized acc", ".3f"), ("personal_accuracy_std", "± std", ".3f"),
                            ("global_accuracy", "global acc", ".3f"), ("wall_s", "wall s", ".0f")]))
        print()
    if claim:
        print(markdown(claim, [("batch_size", "batch", "d"), ("metric", "metric", "s"), ("fedit", "FedIT", ".3f"),
                               ("celora", "CE-LoRA", ".3f"), ("ratio", "CE-LoRA / FedIT", ".2f"),
                               ("ratio_lo", "95 % CI lo", ".2f"), ("ratio_hi", "hi", ".2f"),
                               ("verdict", "<= 1/2 ?", "s")]))
        print()
    if rec:
        print(markdown(rec, [("method", "upload attacked", "s"), ("batch_size", "batch", "d"),
                             ("sentences", "sentences", "d"), ("observed_numbers", "numbers seen", ",d"),
                             ("f1", "token F1", ".3f"), ("f1_lo", "95 % CI lo", ".3f"), ("f1_hi", "hi", ".3f"),
                             ("rouge_l", "ROUGE-L", ".3f"), ("rouge_l_lo", "95 % CI lo", ".3f"),
                             ("rouge_l_hi", "hi", ".3f"), ("random_f1", "random-token F1", ".3f"),
                             ("steps_mean", "steps (mean)", ".0f"), ("wall_s", "wall s", ".0f")]))


if __name__ == "__main__":
    exit_on_error(main)
