"""Round throughput vs clients per batched pass (train.clients_per_pass = K), as ratios against K = 1.

One process, one model: the same round of C clients is timed at every K (a warm-up round first,
then `--repeats` rounds per K, the median kept), so the ratios compare like with like on one machine.
Only training is timed (no evaluation, no checkpoint): `Simulation.run_round` with eval off.

    .venv/bin/python benchmarks/clients_per_pass.py            # MiniLM, rt-sentiment, batch 16 x 48, 20 clients
    .venv/bin/python benchmarks/clients_per_pass.py --quick    # tiny random BERT, seconds
    .venv/bin/python benchmarks/clients_per_pass.py --ks 1,4,8,20,50 --set <device field>=cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ks", default="1,4,8,20")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--method", default="fedsa")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="config override key=value (e.g. a device)")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()

    import tempfile

    import torch

    from fedlora.config import build_config
    from fedlora.runtime.simulation import Simulation
    from fedlora.sweep import write_json

    ks = [int(k) for k in args.ks.split(",")]
    model = {"name": "tiny-bert", "max_length": 16} if args.quick else {"name": "minilm", "max_length": 48}
    tmp = tempfile.mkdtemp()
    cfg = build_config({
        "name": "kpass", "seed": 0, "threads": args.threads, "model": model,
        "task": {"name": "synthetic" if args.quick else "rt-sentiment"},
        "partition": {"num_clients": args.clients, "scheme": "iid", "min_partition_size": 5},
        "method": {"name": args.method}, "federation": {"rounds": 1000},
        "train": {"local_steps": 2 if args.quick else 5, "batch_size": 8 if args.quick else 16},
        "eval": {"every": 1000}, "output": {"dir": tmp, "save_client_states": False}}, args.set)
    sim = Simulation(cfg, Path(tmp) / "run")
    steps = cfg.train.local_steps
    cuda = torch.cuda.is_available() and next(sim.am.model.parameters()).is_cuda
    rows, t = [], 0
    for k in ks:
        sim.cfg.train.clients_per_pass = k
        times = []
        for i in range(args.repeats + 1):
            t += 1
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            sim.run_round(t)
            if cuda:
                torch.cuda.synchronize()
            if i:  # the first round at each K warms up
                times.append(time.perf_counter() - start)
        wall = statistics.median(times)
        rows.append({"K": k, "clients": args.clients, "local_steps": steps, "round_s": wall,
                     "client_steps_per_s": args.clients * steps / wall,
                     "device": "cuda" if cuda else "cpu", "threads": args.threads})
    base = next((r for r in rows if r["K"] == 1), rows[0])
    for r in rows:
        r["throughput_vs_k1"] = base["round_s"] / r["round_s"]
    write_json(Path(args.out) / ("clients_per_pass_quick.json" if args.quick else "clients_per_pass.json"), rows)
    print(f"| K | round s | client-steps/s | x K={base['K']} | device |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']} | {r['round_s']:.3f} | {r['client_steps_per_s']:.1f} | {r['throughput_vs_k1']:.2f} "
              f"| {r['device']} |")


if __name__ == "__main__":
    main()
