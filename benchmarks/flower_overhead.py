"""Wall time of the same run on Flower over loopback (SuperLink + one SuperNode per client, TLS) vs in process.

    .venv/bin/python benchmarks/flower_overhead.py                       # tiny random BERT, 3 clients, 3 rounds
    .venv/bin/python benchmarks/flower_overhead.py --model minilm --task rt-sentiment --local-steps 20
    .venv/bin/python benchmarks/flower_overhead.py --isolation subprocess   # Flower's default: a process per message

Both runs start from a fresh process: `fedlora run` (imports, data, model, rounds) and `fedlora flower run`
(submit, ServerApp process start, data and model on the server and, in round 1, on every SuperNode,
rounds). The SuperLink and SuperNodes are started before and not timed: in a deployment they outlive runs.
Reported: the ratio of end-to-end wall times, the ratio of the rounds' wall times (metrics.jsonl
`wall_s`), and per round where Flower's time goes: each exchange (train, evaluate) minus the longest
time a ClientApp spent on it is transport (messages, polls, serialization). Prints a Markdown table,
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fedlora.sweep import write_json

CLI = [sys.executable, "-m", "fedlora.cli"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-bert")
    ap.add_argument("--task", default="synthetic")
    ap.add_argument("--max-examples", type=int, default=None, help="task.max_examples")
    ap.add_argument("--method", default="fedit")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--isolation", default="inprocess", choices=["inprocess", "subprocess"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the in-process run and of each SuperNode")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    from fedlora.runtime.flower_cli import flower_env, free_port, make_certificates

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="flower-overhead-"))
    # the same torch threads per process on both sides (the SuperNodes share the machine's cores)
    cfg = {"name": "overhead", "seed": 0, "threads": args.threads, "model": {"name": args.model, "max_length": 64},
           "task": {"name": args.task, **({"max_examples": args.max_examples} if args.max_examples else {})},
           "partition": {"num_clients": args.clients, "scheme": "dirichlet", "alpha": 1.0},
           "method": {"name": args.method}, "federation": {"rounds": args.rounds},
           "train": {"local_steps": args.local_steps, "batch_size": 16},
           "eval": {"every": 1, "max_global_examples": 500}, "output": {"dir": str(tmp / "runs")}}
    cfg_path = tmp / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = flower_env()

    # ---- in process ----
    t0 = time.perf_counter()
    subprocess.run([*CLI, "run", str(cfg_path), "--out", str(tmp / "inprocess")], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    inproc_wall = time.perf_counter() - t0
    inproc_rows = rows(tmp / "inprocess")

    # ---- Flower over loopback ----
    certs = make_certificates(tmp / "certs", ["127.0.0.1"])
    port = free_port()
    procs = []
    logs = tmp / "logs"
    logs.mkdir()

    def start(name: str, argv: list[str]) -> None:
        f = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        procs.append(subprocess.Popen([*CLI, "flower", *argv], stdout=f, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True))

    try:
        start("superlink", ["superlink", "--port", str(port), "--certificates", str(tmp / "certs")])
        for i in range(args.clients):
            start(f"supernode{i}", ["supernode", "--partition-id", str(i), "--num-partitions", str(args.clients),
                                    "--superlink", f"127.0.0.1:{port}", "--root-certificates", str(certs["ca"]),
                                    "--state-dir", str(tmp / "state"), "--threads", str(args.threads),
                                    "--isolation", args.isolation])
        # wait until every SuperNode is connected (not timed: they are long-lived)
        deadline = time.monotonic() + 300
        while sum("SuperNode ID" in (logs / f"supernode{i}.log").read_text(errors="replace")
                  for i in range(args.clients)) < args.clients:
            if time.monotonic() > deadline:
                raise RuntimeError("SuperNodes did not connect; see " + str(logs))
            time.sleep(0.5)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) == 0
        t0 = time.perf_counter()
        subprocess.run([*CLI, "flower", "run", str(cfg_path), "--superlink", f"127.0.0.1:{port}",
                        "--root-certificates", str(certs["ca"]), "--out", str(tmp / "flower")], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        flower_wall = time.perf_counter() - t0
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
    flower_rows = rows(tmp / "flower")

    def col(name: str, rs=flower_rows, skip_first: bool = False) -> list[float]:
        return [r.get(name, 0.0) for r in (rs[1:] if skip_first and len(rs) > 1 else rs)]

    later = len(flower_rows) > 1  # round 1 includes building the run on every SuperNode
    breakdown = {
        "train exchange": mean(col("time_train_exchange_s", skip_first=later)),
        "  longest ClientApp train": mean(col("time_train_client_max_s", skip_first=later)),
        "evaluate exchange": mean(col("time_eval_exchange_s", skip_first=later)),
        "  longest ClientApp evaluate": mean(col("time_eval_client_max_s", skip_first=later)),
        "server: global test": mean(col("time_server_eval_s", skip_first=later)),
        "server: validate + aggregate": mean(col("time_aggregate_s", skip_first=later)),
    }
    transport = breakdown["train exchange"] - breakdown["  longest ClientApp train"] + \
        breakdown["evaluate exchange"] - breakdown["  longest ClientApp evaluate"]
    result = {
        "config": cfg, "isolation": args.isolation, "threads_per_supernode": args.threads,
        "inprocess_wall_s": inproc_wall, "flower_wall_s": flower_wall, "ratio_wall": flower_wall / inproc_wall,
        "inprocess_rounds_s": sum(col("wall_s", inproc_rows)), "flower_rounds_s": sum(col("wall_s")),
        "inprocess_round_s": col("wall_s", inproc_rows), "flower_round_s": col("wall_s"),
        "flower_round_breakdown_s": breakdown, "flower_transport_per_round_s": transport,
        "same_bytes": [r["up_raw"] for r in inproc_rows] == [r["up_raw"] for r in flower_rows],
    }
    result["ratio_rounds"] = result["flower_rounds_s"] / result["inprocess_rounds_s"]
    name = f"flower_overhead_{args.model}_{args.isolation}.json"
    write_json(out / name, result)

    print(f"\n{args.clients} clients, {args.rounds} rounds, {args.model} on {args.task}, "
          f"{args.local_steps} local steps, "
          f"method {args.method}, SuperNodes: --isolation {args.isolation}, {args.threads} torch thread(s) each\n")
    print("| | in process | Flower (loopback, TLS) | Flower / in process |\n|---|---|---|---|")
    print(f"| end to end (s) | {inproc_wall:.1f} | {flower_wall:.1f} | {result['ratio_wall']:.2f} |")
    print(f"| rounds only (s) | {result['inprocess_rounds_s']:.1f} | {result['flower_rounds_s']:.1f} | "
          f"{result['ratio_rounds']:.2f} |")
    print(f"| per round (s) | {', '.join(f'{x:.2f}' for x in result['inprocess_round_s'])} | "
          f"{', '.join(f'{x:.2f}' for x in result['flower_round_s'])} | |")
    print(f"\nFlower, mean per round{' after round 1' if later else ''} (s):\n\n| part | s |\n|---|---|")
    for k, v in breakdown.items():
        print(f"| {k} | {v:.3f} |")
    print(f"| transport (exchanges minus ClientApp time) | {transport:.3f} |")
    print(f"\nraw bytes per round equal: {result['same_bytes']}; wrote {out / name}")


if __name__ == "__main__":
    main()
