"""Peak RSS and checkpoint cost vs number of clients at equal compute (same clients per round, steps, rounds).

Each size runs in its own process; the worker reports its peak RSS (ru_maxrss) after a full run,
checkpoints and final states included (and the peak GPU memory when the model is on a GPU). Clients
hold only adapter state: the base model exists once. Checkpoints are incremental: the columns give
the bytes and seconds of a round's checkpoint after the first (what changed: 10 clients' states), and
what one full snapshot of every client would cost at the end.

    .venv/bin/python benchmarks/memory_scaling.py            # MiniLM, rt-sentiment: 1, 10, 100, 1000 clients
    .venv/bin/python benchmarks/memory_scaling.py --quick    # tiny random BERT: 1, 10, 50 clients
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(n: int, method: str, quick: bool, out: str) -> None:
    import torch

    from fedlora.config import build_config
    from fedlora.runtime.simulation import Simulation

    model = {"name": "tiny-bert", "max_length": 16} if quick else {"name": "minilm", "max_length": 64}
    cfg = build_config({
        "name": f"mem-{method}-{n}", "seed": 0, "threads": 2, "model": model,
        "task": {"name": "synthetic" if quick else "rt-sentiment"},
        "partition": {"num_clients": n, "scheme": "iid", "client_test_fraction": 0.2,
                      "global_test_fraction": 0.1},
        "adapter": {"r": 8, "alpha": 16}, "method": {"name": method},
        "federation": {"rounds": 3, "clients_per_round": min(n, 10)},
        "train": {"local_steps": 2, "batch_size": 8},
        "eval": {"every": 3, "max_global_examples": 100, "max_client_examples": 5, "global_clients": 5},
        "output": {"dir": out}})
    start = time.perf_counter()
    sim = Simulation(cfg)
    sim.run()
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    later = sim.checkpoint_costs[1:] or sim.checkpoint_costs
    buf = io.BytesIO()
    torch.save(sim.snapshot(), buf)
    row = {"clients": n, "method": method, "peak_rss_mb": peak_mb, "wall_s": wall,
           "ckpt_bytes_per_round": sum(c["bytes"] for c in later) / len(later),
           "ckpt_s_per_round": sum(c["seconds"] for c in later) / len(later), "full_snapshot_bytes": buf.tell()}
    if torch.cuda.is_available():
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default="fedsa,celora")
    ap.add_argument("--sizes", default=None, help="comma-separated client counts")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker, args.method, args.quick, args.tmp)
        return
    sizes = [int(x) for x in (args.sizes or ("1,10,50" if args.quick else "1,10,100,1000")).split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for n in sizes:
                cmd = [sys.executable, __file__, "--worker", str(n), "--method", method, "--tmp", tmp]
                res = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True)
                if res.returncode != 0:
                    raise SystemExit(f"{method} with {n} clients failed:\n{res.stderr[-3000:]}")
                results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    for r in results:
        base = next(x for x in results if x["method"] == r["method"] and x["clients"] == sizes[0])
        r["rss_vs_smallest"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    from fedlora.sweep import write_json

    write_json(Path(args.out) / ("memory_scaling_quick.json" if args.quick else "memory_scaling.json"), results)
    gpu = "peak_gpu_mb" in results[0]
    print(f"| method | clients | peak RSS MB | x RSS of {sizes[0]} client(s) | wall s | checkpoint KB/round "
          f"| checkpoint s/round | full snapshot KB |{' peak GPU MB |' if gpu else ''}\n"
          f"|---|---|---|---|---|---|---|---|{'---|' if gpu else ''}")
    for r in results:
        print(f"| {r['method']} | {r['clients']} | {r['peak_rss_mb']:.0f} | {r['rss_vs_smallest']:.2f} "
              f"| {r['wall_s']:.1f} | {r['ckpt_bytes_per_round'] / 1024:.1f} | {r['ckpt_s_per_round']:.3f} "
              f"| {r['full_snapshot_bytes'] / 1024:.1f} |" + (f" {r['peak_gpu_mb']:.0f} |" if gpu else ""))


if __name__ == "__main__":
    main()
