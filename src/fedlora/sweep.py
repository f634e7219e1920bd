"""The one sweep engine: arms × seeds into run folders, resumable; one rule for a changed config; one JSON writer.

`fedlora compare` and every benchmark run their arms through `run_sweep`:

    result = run_sweep([Arm("fedit", {"method": {"name": "fedit"}}), Arm("celora", ["method.name=celora"])],
                       Path("out"), base=yaml_dict, seeds=3, jobs=2)
    result.arms["fedit"]            # one (summary, metrics rows) per seed, seed 0 first
    result.mean_std("personal_accuracy")["fedit"]   # (mean, sample std or None) over the seeds

An arm is a name and config overrides (a nested dict, or `key=value` strings as `--set` takes them) on
`base`. Its config is built once; each seed k is that config with `seed` = k, `data_seed` = the arm's
split seed (its `data_seed`, else its `seed`: every seed trains on one data split) and `name` = the run's
label (`{arm}@s{seed}` unless `label` says otherwise), in its own folder `<out>/runs/<label>`. Runs are
seed-major (every arm's seed 0, then every arm's seed 1, ...): a sweep cut short leaves every arm at the
same number of seeds. A finished run (summary.json) is read back, not rerun; one stopped mid-way
continues after its last checkpointed round. With `jobs` > 1 the runs go to that many worker processes
with one torch thread each (SIGTERM stops them too); a run folder another process holds is refused
(`ArmBusy`).

The rule for an existing run folder (the one rule: `fedlora compare`, the benchmarks, `fedlora run --resume`):
its stored config.yaml, read through today's schema (a field added since, at its default, compares
equal), may differ from the requested config only in fields that do not change any result:

    name, threads, output.*, eval.every     free (labels, speed, files written, the evaluation cadence:
                                            the last round is always evaluated, and evaluating draws no
                                            training randomness)
    federation.rounds                       only upward, and only where the folder has a checkpoint: a
                                            finished run asked for more rounds continues from its last
                                            round's checkpoint, which gives what a fresh run at that
                                            budget gives. Fewer rounds are refused (the stored run's
                                            summary is the longer run's).

Any other difference (learning rate, method options, eval.split, the evaluation caps, the seeds, ...)
refuses the run with one line naming the folder and the fields (`ConfigChanged`, a `ConfigError`), the
stored run kept; `overwrite=True` deletes the folder and reruns it instead.

`write_json(path, payload)` is the one writer of a benchmark's results: the payload (a dict, or a list
written as {"rows": list}) gets a "meta" entry: the command line, the date (UTC), the Python and torch
versions, the fedlora commit, and the machine (platform, CPU model and count, the CPU flags that decide
bf16 speed such as avx512_bf16 and amx_bf16, the GPU). It imports nothing beyond the standard library
and torch, so that the torch-only benchmarks use it on a bare GPU machine.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import ConfigError

# fields that may differ freely between a stored run and the requested config: none changes a result
FREE_CHANGES = ("name", "threads", "output.", "eval.every")
# may only grow, continuing from the stored run's checkpoint
GROWING = "federation.rounds"
# the CPU flags a results file records (bf16 autocast pays off only with the first two)
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "avx512f", "avx2")

Run = tuple[dict, list[dict]]  # (summary.json, metrics.jsonl rows)


class ConfigChanged(ConfigError):
    """A run folder whose stored config differs in a field the rule does not allow; one line."""


class ArmBusy(RuntimeError):
    """A run folder another process holds (a plain exception: a pool worker must not exit on it)."""


@dataclass(frozen=True)
class Arm:
    """A named config: `overrides` (a nested dict, or `key=value` strings) on the sweep's base."""

    name: str
    overrides: dict | list[str] | tuple[str, ...] = field(default_factory=dict)


@dataclass
class SweepResult:
    runs: dict[str, Run]  # label -> (summary, rows), in run order (seed-major)
    arms: dict[str, list[Run]]  # arm -> one (summary, rows) per seed, seed 0 first
    run_dirs: list[Path]  # arm by arm, seed 0 first

    def values(self, key: str) -> dict[str, list[float]]:
        """{arm: the summary's `key` of each seed that has it}."""
        return {arm: values(runs, key) for arm, runs in self.arms.items()}

    def mean_std(self, key: str) -> dict[str, tuple[float | None, float | None]]:
        """{arm: (mean, sample std)} of the summary's `key` over the seeds (std None for one seed)."""
        return {arm: mean_std(xs) for arm, xs in self.values(key).items()}


# ---------------------------------------------------------------------------- the rule


def stored_rounds(run_dir: Path) -> int:
    """The rounds a run folder's config.yaml asks for."""
    import yaml

    from .config import build_config

    return build_config(yaml.safe_load((Path(run_dir) / "config.yaml").read_text())).federation.rounds


def refused_changes(cfg, run_dir: Path) -> list[str] | None:
    """The fields in which `run_dir`'s stored config differs from `cfg` beyond what the rule allows
    (module docstring); [] when the run may be reused or continued; None when the folder holds no config."""
    from .checkpoint import has_checkpoint
    from .rundir import config_differences

    changed = config_differences(cfg, Path(run_dir), FREE_CHANGES)
    if changed is None:
        return None
    refused = [f for f in changed if f != GROWING]
    if GROWING in changed and not (has_checkpoint(run_dir) and stored_rounds(run_dir) < cfg.federation.rounds):
        refused.append(GROWING)
    return refused


def check_run_dir(cfg, run_dir: Path, hint: str = "delete it or pass another --out") -> None:
    """Raise `ConfigChanged` (one line: the folder and the fields) if the rule refuses `run_dir` for `cfg`."""
    refused = refused_changes(cfg, run_dir)
    if refused:
        raise ConfigChanged(f"{run_dir}: stored run has a different config ({', '.join(refused[:5])}"
                            f"{', ...' if len(refused) > 5 else ''}); {hint}")


# ---------------------------------------------------------------------------- running


def simulate(cfg, run_dir: Path, resume: bool) -> dict:
    """The default runner: one in-process simulation."""
    from .runtime.simulation import Simulation

    return Simulation(cfg, run_dir).run(resume=resume)


def _execute(label: str, cfg, run_dir: Path, resume: bool, runner: Callable[..., Any]) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as lock:
        try:  # two sweeps writing one run folder would interleave its metrics and checkpoints
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArmBusy(f"{run_dir}: another process is running this arm; stop it first") from None
        start = time.perf_counter()
        runner(cfg, run_dir, resume)
    print(f"  {label}: {time.perf_counter() - start:.0f} s", flush=True)


def run_job(job: tuple[str, dict, str, bool]) -> str:
    """A worker process's run: (label, config as a dict, run folder, resume)."""
    from .config import build_config

    label, cfg_dict, run_dir, resume = job
    _execute(label, build_config(cfg_dict), Path(run_dir), resume, simulate)
    return label


def _as_arm(a: Arm | tuple[str, Any]) -> Arm:
    return a if isinstance(a, Arm) else Arm(*a)


def run_sweep(arms: Iterable[Arm | tuple[str, dict | list[str]]], out: Path, *, base: dict | None = None,
              seeds: int | Iterable[int] = 1, jobs: int = 1, label: str = "{arm}@s{seed}",
              save_client_states: bool | None = None, overwrite: bool = False,
              hint: str = "delete it or pass another --out", runner: Callable[..., Any] | None = None,
              log: Callable[[str], None] = print) -> SweepResult:
    """Run every arm at every seed into `<out>/runs/<label>` (module docstring); return the results.

    `save_client_states` overrides output.save_client_states (None: as configured). `runner(cfg, run_dir,
    resume)` runs one in-process run (default: a `Simulation`); worker processes (`jobs` > 1) always simulate.
    Refused folders are all checked before any run starts."""
    from .checkpoint import has_checkpoint
    from .config import build_config
    from .report import read_run

    arms = [_as_arm(a) for a in arms]
    if len({a.name for a in arms}) < len(arms):
        raise ConfigError(f"sweep: two arms share a name in {[a.name for a in arms]}")
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    out = Path(out)
    built = {}
    for a in arms:  # each arm's config, once
        cfg = build_config(base or {}, a.overrides if isinstance(a.overrides, dict) else list(a.overrides))
        if save_client_states is not None:
            cfg.output.save_client_states = save_client_states
        built[a.name] = cfg
    planned: list[tuple[str, Any, Path]] = []
    for k in seeds:
        for a in arms:
            cfg = built[a.name]
            name = label.format(arm=a.name, seed=k)
            planned.append((name, cfg.model_copy(deep=True, update={"seed": k, "data_seed": cfg.split_seed,
                                                                     "name": name}), out / "runs" / name))
    todo = []
    for name, cfg, run_dir in planned:
        refused = refused_changes(cfg, run_dir)
        if refused and overwrite:
            import shutil

            shutil.rmtree(run_dir)
        elif refused:
            check_run_dir(cfg, run_dir, hint)
        longer = refused is not None and not refused and (run_dir / "summary.json").is_file() and \
            stored_rounds(run_dir) < cfg.federation.rounds
        if longer or not (run_dir / "summary.json").is_file():
            todo.append((name, cfg, run_dir, has_checkpoint(run_dir)))
    log(f"{len(planned) - len(todo)} of {len(planned)} runs finished earlier; running {len(todo)} (jobs={jobs})")
    if jobs > 1 and len(todo) > 1:
        jobs_ = [(name, cfg.model_copy(update={"threads": 1}).model_dump(mode="json"), str(run_dir), resume)
                 for name, cfg, run_dir, resume in todo]
        _pool(jobs_, jobs)
    else:  # one run left: it gets every core its config asks for
        for i, (name, cfg, run_dir, resume) in enumerate(todo, 1):
            log(f"[{i}/{len(todo)}] {name}{' (resumed)' if resume else ''}")
            _execute(name, cfg, run_dir, resume, runner or simulate)
    runs = {name: read_run(run_dir) for name, _, run_dir in planned}
    names = {a.name: [label.format(arm=a.name, seed=k) for k in seeds] for a in arms}
    return SweepResult(runs, {arm: [runs[n] for n in ns] for arm, ns in names.items()},
                       [out / "runs" / n for ns in names.values() for n in ns])


def _pool(jobs_: list[tuple[str, dict, str, bool]], jobs: int) -> None:
    import multiprocessing as mp

    # SIGTERM (`pkill -f <script>`) must stop the workers too: leaving the `with` terminates the pool
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with mp.get_context("spawn").Pool(jobs) as pool:
            for _ in pool.imap_unordered(run_job, jobs_):
                pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_on_error(main: Callable[[], Any]) -> None:
    """A script's entry point: a refused run folder or a bad config is one line on stderr and exit code 2."""
    try:
        main()
    except (ConfigError, ArmBusy) as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None


# ---------------------------------------------------------------------------- aggregation over seeds


def values(runs: list[Run], key: str) -> list[float]:
    """The summary's `key` of each run that has it."""
    return [s[key] for s, _ in runs if s.get(key) is not None]


def mean_std(xs: Iterable[float]) -> tuple[float | None, float | None]:
    """(mean, sample std) of the values; std None for one value, both None for none."""
    import numpy as np

    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else None)


# ---------------------------------------------------------------------------- results files


def _cpu() -> tuple[str | None, list[str]]:
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor() or None, []
    model = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), None)
    flags = next((x.split(":", 1)[1].split() for x in lines if x.startswith("flags")), [])
    return model, flags


def _commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (res.stdout.strip() or None) if res.returncode == 0 else None


def metadata() -> dict:
    """What a results file records about how and where it was made."""
    model, flags = _cpu()
    meta = {"command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": None, "fedlora_commit": _commit(),
            "machine": {"platform": platform.platform(), "cpu": model, "cpus": os.cpu_count(),
                        "cpu_flags": {f: f in flags for f in CPU_FLAGS}, "gpu": None}}
    try:
        import torch
    except ImportError:
        return meta
    meta["torch"] = torch.__version__
    if torch.cuda.is_available():
        meta["machine"]["gpu"] = torch.cuda.get_device_name()
    return meta


def write_json(path: Path, payload: dict | list) -> Path:
    """Write a benchmark's results with their "meta" (module docstring); a list is written as {"rows": list}."""
    obj = {"rows": payload} if isinstance(payload, list) else dict(payload)
    if "meta" in obj:
        raise ValueError("write_json: the payload has its own 'meta' entry")
    obj["meta"] = metadata()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    return path


def markdown(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """A Markdown table; cols: (key, header, format); a missing or None value prints as '-'."""
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
