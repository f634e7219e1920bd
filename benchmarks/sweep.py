"""Shared by the accuracy benchmarks: run a list of named configs (arms), skip finished ones, print a table.

Each arm is one `Simulation` run in its own folder (`<out>/runs/<label>`); an arm whose summary.json
exists is read back, not rerun, and one stopped mid-way resumes from its last checkpointed round, but
only if its stored config equals the requested one (a field added since at its default counts as equal):
otherwise the sweep stops with one line naming the folder and the fields. The one exception is a longer
budget: a finished arm asked for more rounds, and otherwise equal, continues from its last round's
checkpoint, which gives the run a fresh sweep at that budget would (the rounds already run are not rerun).
With `jobs` > 1 the arms run in that many worker processes with one torch thread each: on this 2-core box two
one-thread MiniLM runs side by side took 224–235 s each, one two-thread run alone 130 s (~1.13x
more arms per hour side by side).
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing as mp
import signal
import sys
import time
from pathlib import Path

from fedlora.report import read_run


class ArmBusy(RuntimeError):
    """A run folder another process holds (a plain exception: a pool worker must not exit on it)."""


def _run_one(job: tuple[str, dict, str]) -> str:
    label, cfg_dict, run_dir = job
    import torch

    from fedlora.checkpoint import has_checkpoint
    from fedlora.config import build_config
    from fedlora.runtime.simulation import Simulation

    if cfg_dict.get("threads"):
        torch.set_num_threads(cfg_dict["threads"])
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / ".lock", "w") as lock:
        try:  # two sweeps writing one run folder would interleave its metrics and checkpoints
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArmBusy(f"{run_dir}: another process is running this arm; stop it first") from None
        start = time.perf_counter()
        # an arm stopped mid-way continues after its last checkpointed round
        Simulation(build_config(cfg_dict), run_dir).run(resume=has_checkpoint(Path(run_dir)))
    print(f"  {label}: {time.perf_counter() - start:.0f} s", flush=True)
    return label


def run_arms(arms: list[tuple[str, dict]], out: Path, jobs: int = 1) -> dict[str, tuple[dict, list[dict]]]:
    """Run every (label, config dict) not finished yet; return {label: (summary, metrics rows)}."""
    from fedlora.checkpoint import has_checkpoint
    from fedlora.config import build_config
    from fedlora.rundir import config_differences

    todo = []
    for label, cfg in arms:
        run_dir = out / "runs" / label
        cfg = {**cfg, "name": label, "output": {**cfg.get("output", {}), "save_client_states": False}}
        built = build_config(cfg)
        changed = config_differences(built, run_dir, ("output.", "name", "threads"))
        longer = changed == ["federation.rounds"] and has_checkpoint(run_dir) and \
            stored_rounds(run_dir) < built.federation.rounds
        if changed and not longer:
            print(f"{run_dir}: stored run has a different config ({', '.join(changed[:5])}); "
                  "delete it or pass another --out", file=sys.stderr)
            raise SystemExit(2)
        if longer or not (run_dir / "summary.json").is_file():
            cfg["threads"] = 1 if jobs > 1 else cfg.get("threads")
            todo.append((label, cfg, str(run_dir)))
    print(f"{len(arms) - len(todo)} of {len(arms)} arms finished earlier; running {len(todo)} (jobs={jobs})",
          flush=True)
    if jobs > 1 and len(todo) == 1:  # one arm left: it gets both cores
        todo[0][1]["threads"] = None
    try:
        if jobs > 1 and len(todo) > 1:
            # SIGTERM (`pkill -f <script>`) must stop the workers too: leaving the `with` terminates the pool
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
            with mp.get_context("spawn").Pool(jobs) as pool:
                for _ in pool.imap_unordered(_run_one, todo):
                    pass
        else:
            for job in todo:
                _run_one(job)
    except ArmBusy as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None
    return {label: read_run(out / "runs" / label) for label, _ in arms}


def stored_rounds(run_dir: Path) -> int:
    """The rounds a run folder's config.yaml asks for."""
    import yaml

    from fedlora.config import build_config

    return build_config(yaml.safe_load((run_dir / "config.yaml").read_text())).federation.rounds


def with_seeds(arms: list[tuple[str, dict]], seeds: int) -> list[tuple[str, dict]]:
    """Each arm once per training seed 0..seeds-1 (label `<arm>@s<k>`), all on the arm's one data split.

    Seed-major (every arm's seed 0, then every arm's seed 1, ...): a sweep cut short leaves every arm
    at the same number of seeds, baselines included, rather than the first arms complete and the last absent."""
    return [(f"{label}@s{k}", {**cfg, "seed": k, "data_seed": cfg.get("data_seed", cfg.get("seed", 0))})
            for k in range(seeds) for label, cfg in arms]


def by_arm(results: dict[str, tuple[dict, list[dict]]]) -> dict[str, list[tuple[dict, list[dict]]]]:
    """{arm label: [(summary, rows) for each seed]} from `run_arms` over `with_seeds` arms."""
    out: dict[str, list] = {}
    for label, run in results.items():
        out.setdefault(label.rsplit("@s", 1)[0], []).append(run)
    return out


def values(runs: list[tuple[dict, list[dict]]], key: str) -> list[float]:
    return [s[key] for s, _ in runs if s.get(key) is not None]


def markdown(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """cols: (key, header, format); a missing or None value prints as '-'."""
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [("-" if r.get(k) is None else format(r[k], f)) for k, _, f in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
