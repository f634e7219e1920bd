"""One federation on Flower's Simulation Engine (Ray) with 1, 2, 4 ClientApp actors vs the in-process run.

    .venv/bin/python benchmarks/scale_out.py                          # MiniLM, 20 clients, CPU: 1, 2, 4 actors
    .venv/bin/python benchmarks/scale_out.py --rounds 2 --local-steps 2 --max-examples 1200   # a reduced size
    .venv/bin/python benchmarks/scale_out.py --gpus-per-client 0.25 --actors 4,8   # GPUs: four actors per GPU
    .venv/bin/python benchmarks/scale_out.py --quick                  # tiny random BERT, 3 clients, 1 actor

Every arm is a fresh process: `fedlora run` (in process, one model) and `fedlora simulate --backend ray`
on a new local Ray cluster of N CPUs (`--num-cpus N --cpus-per-client 1`: N actors, each building the base
model once; with --gpus-per-client G also ceil(N * G) GPUs, so 4 actors at 0.25 share one GPU, 8 use two).
Reported per arm: seconds per round (metrics.jsonl `wall_s`: the mean over all rounds, and over the rounds
after the first, in which each actor builds its run), end-to-end wall time, peak memory (the sum of the
resident sets of the arm's process tree, sampled every 0.5 s: the driver with the ServerApp, Ray's own
services and the actors; shared pages count once per process), and whether the metrics equal the
in-process run's (they should: threads 1 everywhere). On a CPU the actors share the machine's cores, so
the ratio to the in-process run is the engine's overhead, not a speed-up. Prints a Markdown table,
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

from fedlora.sweep import markdown, write_json

CLI = [sys.executable, "-m", "fedlora.cli"]
SKIP = ("wall_s", "time_", "flower_", "cum_flower_")  # columns of the transport, not of the result


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_result(a: list[dict], b: list[dict]) -> bool:
    def strip(r: dict) -> dict:
        return {k: v for k, v in r.items() if not k.startswith(SKIP)}
    return len(a) == len(b) and all(strip(x) == strip(y) for x, y in zip(a, b, strict=True))


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall s, peak resident GB of the process tree) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, done = [0], threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            peak[0] = max(peak[0], total)
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:])} failed (rc {proc.returncode}):\n{err[-3000:]}")
    return time.perf_counter() - start, peak[0] / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--task", default="rt-sentiment")
    ap.add_argument("--max-examples", type=int, default=None, help="task.max_examples")
    ap.add_argument("--method", default="fedit")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--actors", default="1,2,4", help="comma-separated actor counts (CPU: the local cluster's CPUs)")
    ap.add_argument("--gpus-per-client", type=float, default=0.0, help="> 0: actors on GPUs (device cuda)")
    ap.add_argument("--quick", action="store_true", help="tiny random BERT, 3 clients, 2 rounds, 1 actor")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    if args.quick:
        args.model, args.task, args.clients, args.rounds, args.local_steps, args.actors = \
            "tiny-bert", "synthetic", 3, 2, 2, "1"

    tmp = Path(tempfile.mkdtemp(prefix="scale-out-"))
    gpu = args.gpus_per_client > 0
    cfg = {"name": "scale-out", "seed": 0, "threads": 1, "device": "cuda" if gpu else "cpu",
           "model": {"name": args.model, "max_length": 64},
           "task": {"name": args.task, **({"max_examples": args.max_examples} if args.max_examples else {})},
           "partition": {"num_clients": args.clients, "scheme": "dirichlet", "alpha": 1.0},
           "method": {"name": args.method}, "federation": {"rounds": args.rounds},
           "train": {"local_steps": args.local_steps, "batch_size": 16},
           "eval": {"every": args.rounds, "max_global_examples": 200}, "output": {"dir": str(tmp / "runs")}}
    cfg_path = tmp / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    arms = [("in process", 0, [*CLI, "run", str(cfg_path), "--out", str(tmp / "in_process")], tmp / "in_process")]
    for n in (int(x) for x in args.actors.split(",")):
        run_dir = tmp / f"ray_{n}"
        cmd = [*CLI, "simulate", str(cfg_path), "--backend", "ray", "--out", str(run_dir)]
        cmd += ["--num-cpus", str(n), "--cpus-per-client", "1"]
        if gpu:  # a local cluster of the GPUs that n actors need: 4 actors at 0.25 on one GPU, 8 on two
            cmd += ["--gpus-per-client", str(args.gpus_per_client), "--num-gpus",
                    str(math.ceil(n * args.gpus_per_client))]
        gpus = f" on {math.ceil(n * args.gpus_per_client)} GPU" if gpu else ""
        arms.append((f"Ray, {n} actor{'s' if n > 1 else ''}{gpus}", n, cmd, run_dir))
    results, base = [], None
    for name, n, cmd, run_dir in arms:
        wall, peak = timed(cmd)
        r = rows(run_dir)
        walls = [x["wall_s"] for x in r]
        later = walls[1:] or walls
        row = {"arm": name, "actors": n, "round_s": sum(walls) / len(walls), "later_round_s": sum(later) / len(later),
               "wall_s": wall, "peak_gb": peak, "final_global_accuracy": r[-1].get("global_accuracy")}
        base = base or row
        row["round_ratio"] = row["round_s"] / base["round_s"]
        row["same_result"] = same_result(r, rows(tmp / "in_process"))
        results.append(row)
        print(f"{name}: {row['round_s']:.2f} s/round, {wall:.1f} s, peak {peak:.2f} GB, same {row['same_result']}",
              flush=True)
    table = markdown(results, [("arm", "arm", ""), ("round_s", "s / round", ".2f"),
                               ("later_round_s", "s / round after the 1st", ".2f"),
                               ("round_ratio", "vs in process", ".2f"), ("wall_s", "end to end s", ".1f"),
                               ("peak_gb", "peak GB", ".2f"), ("same_result", "same metrics", "")])
    print(table)
    write_json(Path(args.out) / f"scale_out{'_quick' if args.quick else ''}.json", {"config": cfg, "rows": results})


if __name__ == "__main__":
    main()
