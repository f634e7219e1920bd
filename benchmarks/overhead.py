"""Framework overhead: `fedlora`'s simulation vs a plain PyTorch loop doing the same optimizer steps.

(a) `Simulation.run()`: the whole framework (downloads, validation, accounting, checkpoints, metrics).
(b) a hand-written FedAvg loop over the SAME model, batches, factors, learning rates and evaluation
    schedule, with nothing around it: the compute floor.
Both arms are built outside the timer (model load, tokenization); they alternate a, b, a, b, ...
in one sitting, and the ratio wall(a) / wall(b) is reported per method.

    .venv/bin/python benchmarks/overhead.py            # MiniLM, rt-sentiment, 10 clients, 3 rounds x 10 steps
    .venv/bin/python benchmarks/overhead.py --quick    # tiny random BERT, seconds (the test suite runs this)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedlora.adapters import factor_of
from fedlora.config import build_config
from fedlora.data import BatchStream
from fedlora.methods import weighted_mean
from fedlora.runtime.simulation import Simulation
from fedlora.sweep import write_json
from fedlora.train import evaluate, factor_lr


def config(quick: bool, method: str, out: str) -> dict:
    if quick:
        model, task, steps, rounds = {"name": "tiny-bert", "max_length": 16}, {"name": "synthetic"}, 3, 2
    else:
        model, task, steps, rounds = {"name": "minilm", "max_length": 64}, {"name": "rt-sentiment"}, 10, 3
    return {"name": f"overhead-{method}", "seed": 0, "threads": 2, "model": model, "task": task,
            "partition": {"num_clients": 10 if not quick else 3, "scheme": "dirichlet", "alpha": 0.5},
            "adapter": {"r": 8 if not quick else 4, "alpha": 16}, "method": {"name": method},
            "federation": {"rounds": rounds}, "train": {"local_steps": steps, "batch_size": 16},
            "eval": {"every": rounds, "max_global_examples": 300, "max_client_examples": 50},
            "output": {"dir": out, "save_client_states": False}}


def plain_loop(sim: Simulation) -> None:
    """FedAvg of the uploaded factors; personal factors kept per client; no framework code in the loop."""
    cfg, method, am = sim.cfg, sim.method, sim.am
    params = am._params
    rounds, steps = cfg.federation.rounds, cfg.train.local_steps
    streams = [BatchStream(len(d), cfg.train.batch_size, cfg.seed, cid) for cid, d in enumerate(sim.train_sets)]
    shared = {k for k in params if sim.server.global_state.get(k) is not None}
    global_state = {k: params[k].detach().clone() for k in shared}
    personal = [{k: params[k].detach().clone() for k in params if k not in shared} for _ in sim.train_sets]
    for t in range(1, rounds + 1):
        trainable = method.trainable(t)
        uploads, sizes = [], []
        for cid, data in enumerate(sim.train_sets):
            with torch.no_grad():
                for k, v in {**global_state, **personal[cid]}.items():
                    params[k].copy_(v)
            groups = []
            for f in sorted(trainable):
                ps = [p for k, p in params.items() if factor_of(k) == f]
                if ps:
                    groups.append({"params": ps, "lr": factor_lr(f, cfg.train)})
            for p in params.values():
                p.requires_grad_(False)
            train_params = [p for g in groups for p in g["params"]]
            for p in train_params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)
            am.model.train()
            for _ in range(steps):
                loss = am.model(**data.batch(streams[cid].next_rows())).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(train_params, cfg.train.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            am.model.eval()
            uploads.append({k: params[k].detach().clone() for k in shared})
            personal[cid] = {k: params[k].detach().clone() for k in personal[cid]}
            sizes.append(len(data))
        global_state = {k: weighted_mean([u[k] for u in uploads], sizes) for k in shared}
        if t % cfg.eval.every == 0 or t == rounds:
            for cid in range(sim.num_clients):
                with torch.no_grad():
                    for k, v in {**global_state, **personal[cid]}.items():
                        params[k].copy_(v)
                evaluate(am, sim.client_test[cid], cfg.eval.batch_size)
                if cid == 0 or (personal[cid] and cid < (cfg.eval.global_clients or sim.num_clients)):
                    evaluate(am, sim.global_test, cfg.eval.batch_size)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default="fedit,celora")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            cfg = build_config(config(args.quick, method, tmp))
            walls = {"fedlora": [], "plain": []}
            for rep in range(args.repeats):
                for arm in ("fedlora", "plain"):
                    sim = Simulation(cfg, Path(tmp) / f"{method}-{rep}-{arm}")  # built outside the timer
                    start = time.perf_counter()
                    sim.run() if arm == "fedlora" else plain_loop(sim)
                    walls[arm].append(time.perf_counter() - start)
            ratio = [a / b for a, b in zip(walls["fedlora"], walls["plain"], strict=True)]
            results.append({"method": method, "fedlora_s": walls["fedlora"], "plain_s": walls["plain"],
                            "ratio": ratio, "ratio_median": float(np.median(ratio))})
    write_json(Path(args.out) / ("overhead_quick.json" if args.quick else "overhead.json"), results)
    print("| method | fedlora s (each rep) | plain s (each rep) | ratio (each rep) | median ratio |")
    print("|---|---|---|---|---|")
    for r in results:
        fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        print(f"| {r['method']} | {fmt(r['fedlora_s'])} | {fmt(r['plain_s'])} | {fmt(r['ratio'])} "
              f"| {r['ratio_median']:.3f} |")


if __name__ == "__main__":
    main()
