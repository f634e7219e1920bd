"""Secure aggregation's cost: FedIT with and without SecAgg+ in process, at 5, 20 and 100 clients.

For each size: accuracy (global, personal), bytes up and down per round (the protocol's columns
included), seconds per round, and the largest difference between the two runs' server-held tensors
(quantization carried through training). Tiny random BERT on the synthetic task with `--quick`
(what fits a 2-core box without a GPU); MiniLM on rt-sentiment otherwise.

    .venv/bin/python benchmarks/secagg.py --quick --clients 5 20 100
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedlora.config import build_config
from fedlora.runtime.simulation import Simulation
from fedlora.sweep import markdown, write_json


def config(quick: bool, clients: int, secure: bool, out: str) -> dict:
    model, task = ({"name": "tiny-bert", "max_length": 16}, {"name": "synthetic", "max_examples": 40 * clients}) \
        if quick else ({"name": "minilm", "max_length": 64}, {"name": "rt-sentiment"})
    return {"name": f"secagg-{clients}-{secure}", "seed": 0, "threads": 2, "model": model, "task": task,
            "partition": {"num_clients": clients, "scheme": "iid", "min_partition_size": 2},
            "adapter": {"r": 4, "alpha": 8}, "method": {"name": "fedit"},
            "federation": {"rounds": 2, "secure_aggregation": secure},
            "train": {"local_steps": 2 if quick else 10, "batch_size": 8},
            "eval": {"every": 2, "max_global_examples": 64, "clients": min(clients, 5)},
            "output": {"dir": out, "save_client_states": False}}


def one(quick: bool, clients: int, secure: bool) -> tuple[dict, Simulation]:
    with tempfile.TemporaryDirectory() as out:
        sim = Simulation(build_config(config(quick, clients, secure, out)), Path(out) / "run")
        start = time.perf_counter()
        sim.run()
        wall = time.perf_counter() - start
        rows = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    last, n = rows[-1], len(rows)
    row = {"clients": clients, "secure": secure, "global_accuracy": last.get("global_accuracy"),
           "personal_accuracy": last.get("personal_accuracy"), "s_per_round": wall / n,
           "round_s": sum(r["wall_s"] for r in rows) / n,
           "up_bytes_per_round": sum(r["up_raw"] for r in rows) / n,
           "down_bytes_per_round": sum(r["down_raw"] for r in rows) / n}
    for k in ("keys", "shares", "masked", "unmask"):
        row[f"up_secagg_{k}"] = sum(r.get(f"up_secagg_{k}", 0) for r in rows) / n
    row["up_secagg_per_client"] = rows[-1].get("up_secagg_per_client", 0)
    return row, sim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--clients", type=int, nargs="+", default=[5, 20, 100])
    ap.add_argument("--out", default="benchmarks/results/secagg.json")
    args = ap.parse_args()
    rows = []
    for n in args.clients:
        plain, a = one(args.quick, n, False)
        sec, b = one(args.quick, n, True)
        sec["max_state_diff"] = max((a.server.global_state[k] - b.server.global_state[k]).abs().max().item()
                                    for k in a.server.global_state)
        rows += [plain, sec]
        print(json.dumps(sec), flush=True)
    write_json(Path(args.out), rows)
    print(markdown(rows, [("clients", "clients", "d"), ("secure", "SecAgg+", ""),
                          ("global_accuracy", "global acc", ".3f"), ("personal_accuracy", "personal acc", ".3f"),
                          ("up_bytes_per_round", "up B/round", ".0f"), ("down_bytes_per_round", "down B/round", ".0f"),
                          ("up_secagg_per_client", "SecAgg up B/client", ".0f"), ("round_s", "s/round", ".2f"),
                          ("max_state_diff", "max state diff", ".1e")]))


if __name__ == "__main__":
    main()
