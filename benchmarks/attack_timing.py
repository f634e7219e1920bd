"""Seconds per inversion step of the gradient-inversion attack, per attacked upload and batch size.

Same set-up as benchmarks/privacy.py (MiniLM, rt-sentiment, r 8 on query/value, shared head), one torch
thread. For each method the client's real round-(warm + 1) upload of one batch is observed, then the
inversion runs `--steps` steps with no discrete search, and the per-step time is the continuous stage's
wall time over the steps it took (`AttackResult.inversion_s`, `steps_run`): set-up, decoding and scoring are
not counted.
`--profile` adds torch.profiler's top operators of a few steps of each attack.

    .venv/bin/python benchmarks/attack_timing.py                       # every upload, batch 1 and 4
    .venv/bin/python benchmarks/attack_timing.py --before trim=False   # old (padded length) vs new, same load
    .venv/bin/python benchmarks/attack_timing.py --methods fedit --batch-sizes 1 --profile
"""

from __future__ import annotations

import argparse
import ast
import inspect
from pathlib import Path

import privacy  # benchmarks/ is on sys.path when this script runs
import torch

from fedlora.config import build_config
from fedlora.privacy import attack as A
from fedlora.runtime.simulation import Simulation
from fedlora.sweep import exit_on_error, markdown, write_json


def overrides(pairs: list[str]) -> dict:
    """key=value strings, each value a Python literal."""
    return {k: ast.literal_eval(v) for k, v in (p.split("=", 1) for p in pairs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(privacy.ATTACKED))
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warm", type=int, default=1, help="rounds trained before the attacked round")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--label", default="", help="a name for this measurement in the JSON (e.g. before, after)")
    ap.add_argument("--set", nargs="*", default=[], help="invert() keyword overrides, key=value (python literal)")
    ap.add_argument("--before", nargs="*", default=None,
                    help="also time invert() with these overrides on the same observation, right before (the old "
                         "attack: trim=False)")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    extra = overrides(args.set)
    known = set(inspect.signature(A.invert).parameters)
    extra = {k: v for k, v in extra.items() if k in known}
    before = overrides(args.before) if args.before is not None else None
    rows = []
    for m in args.methods.split(","):
        cfg = privacy.base(False, privacy._method_name(m), privacy._warm(m, args.warm), 3)
        cfg["threads"] = 1
        sim = Simulation(build_config({**cfg, "name": f"timing-{m}"}), None)
        sim.run()
        method = None if m == "full" else sim.method
        vocab = torch.unique(torch.cat([d.input_ids.flatten() for d in sim.client_train]))
        t = sim.server.last_round + 1
        for b in (int(x) for x in args.batch_sizes.split(",")):
            dl = sim.server.download(0, t) if method is not None else A.Download(0, t, {})
            batch = sim.client_train[0].batch(slice(0, b))
            snap = sim.am.get_state()
            obs = A.client_step(sim.am, method, sim.clients[0], dl, batch, sim.cfg.train, "sgd")
            kw = {"vocab": vocab, "search": 0, **extra}
            steps = args.steps if m != "full" else max(1, args.steps // 5)
            if before is not None:
                old = A.invert(sim.am, obs, method, steps=steps, **{**kw, **before})
                old_s = old.inversion_s / max(1, sum(old.steps_run))
            res = A.invert(sim.am, obs, method, steps=steps, **kw)
            run = sum(res.steps_run)
            row = {"method": m, "batch_size": b, "steps": run, "s_per_step": res.inversion_s / max(1, run),
                   "width": A.real_width(obs.attention_mask), "observed_numbers": int(sum(v.numel() for v in
                                                                                        obs.delta.values()))}
            if before is not None:
                row["s_per_step_before"], row["speed_up"] = old_s, old_s / max(row["s_per_step"], 1e-12)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    A.invert(sim.am, obs, method, steps=min(3, steps), **kw)
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
                row["profile"] = table
                print(f"--- {m} b={b}\n{table}", flush=True)
            sim.am.set_state(snap)
            rows.append(row)
            print(f"  {m} b={b}: {row['s_per_step']:.3f} s/step over {run} steps"
                  + (f" (before {row['s_per_step_before']:.3f})" if before is not None else ""), flush=True)
    name = "attack_timing" + (f"_{args.label}" if args.label else "")
    write_json(Path(args.out) / f"{name}.json", {"label": args.label, "invert_overrides": extra, "before": before,
                                                 "rows": rows})
    print(markdown(rows, [("method", "upload", "s"), ("batch_size", "batch", "d"),
                          ("observed_numbers", "numbers", ",d"), ("width", "real width", "d"),
                          ("steps", "steps timed", "d"), ("s_per_step_before", "s / step before", ".3f"),
                          ("s_per_step", "s / step", ".3f"), ("speed_up", "speed-up", ".2f")]))


if __name__ == "__main__":
    exit_on_error(main)
