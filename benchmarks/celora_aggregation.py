"""CE-LoRA's server-side aggregation time vs the number of uploads in a round.

One round of `CELoRA.aggregate` (parameter similarity, the (m × m) weight matrix, C̄_i = Σ_j w_ij C_j
for every client) on synthetic uploads shaped like MiniLM-L6's: 12 adapted matrices (query, value of
6 layers), r = 8. Each size is timed `--repeats` times after one warm-up call, on a second round so
that every client has a C̄ to measure its ΔC from; the median is reported. beta 0.5 with random
descriptors (overall: hist + mean + var of 384 features), so the data similarity is included.

    .venv/bin/python benchmarks/celora_aggregation.py              # 100, 200, 400 uploads
    .venv/bin/python benchmarks/celora_aggregation.py --quick      # 10, 40 (the test suite runs this)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fedlora.config import build_config
from fedlora.federation import Server, Upload
from fedlora.methods.celora import CELoRA
from fedlora.sweep import markdown, write_json


def one_size(m: int, weights: str, repeats: int, layers: int = 12, r: int = 8, hidden: int = 384) -> dict:
    cfg = build_config({"method": {"name": "celora", "celora": {"weights": weights}}})
    method = CELoRA(cfg)
    keys = [f"layer{i}.C" for i in range(layers)]
    method.init_c = {k: torch.zeros(r, r) for k in keys}
    method.num_labels = 16
    server = Server(method, dict(method.init_c), cfg.federation, m)
    gen = torch.Generator().manual_seed(0)
    for cid in range(m):
        hist = torch.rand(16, generator=gen)
        desc = {"hist": hist / hist.sum(), "mean": torch.randn(hidden, generator=gen),
                "var": torch.rand(hidden, generator=gen)}
        method.receive_descriptor(server, cid, desc, 1)

    def uploads(t: int) -> list[Upload]:
        return [Upload(cid, t, {k: torch.randn(r, r, generator=gen) for k in keys}, n_examples=50 + cid % 7)
                for cid in range(m)]

    method.aggregate(server, 1, uploads(1))  # every client now has a C̄
    times = []
    for i in range(repeats + 1):
        ups = uploads(2)
        t0 = time.perf_counter()
        method.aggregate(server, 2, ups)
        if i:  # the first call warms up
            times.append(time.perf_counter() - t0)
    return {"uploads": m, "weights": weights, "keys": layers, "r": r, "aggregate_s": float(np.median(times)),
            "max_s": float(np.max(times))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default=None, help="comma-separated numbers of uploads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(x) for x in (args.sizes or ("10,40" if args.quick else "100,200,400")).split(",")]
    rows = [one_size(m, w, args.repeats) for w in ("softmax", "learned") for m in sizes]
    name = "celora_aggregation" + ("_quick" if args.quick else "")
    write_json(Path(args.out) / f"{name}.json", rows)
    print("one round of CELoRA.aggregate, 12 keys of (8 × 8), one torch thread; median of "
          f"{args.repeats} after a warm-up")
    print(markdown(rows, [("weights", "weights", "s"), ("uploads", "uploads", "d"),
                          ("aggregate_s", "aggregate s (median)", ".4f"), ("max_s", "max s", ".4f")]))


if __name__ == "__main__":
    main()
