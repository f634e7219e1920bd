"""One run driver for every runtime: the run directory, checkpoint and restore, metrics rows, summary, states.

    RunDriver(run, runtime).drive(checkpoint, on_round)
        rundir.start             config.yaml, adapter_meta.json (Run.adapter_meta)
        restore                  from a checkpoint: the run's part (Run.restore) and the runtime's
        baseline.json            eval.baseline: the base model's metrics before round 1
        rounds                   runtime.run_round(t) -> row; metrics.jsonl; checkpoint; trackers
        summary.json             totals, final and best-round metrics, plus the runtime's own columns
        states/                  the server's tensors, the shared model, each client's model

A runtime only says how a round's messages travel and where its client state lives (`Runtime`): the
in-process simulation keeps every client's state in this process; Flower's ServerApp keeps the server's and
collects the clients' final models from the nodes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from . import rundir
from .checkpoint import Checkpointer
from .evaluation import METRICS, best_round
from .trackers import Trackers

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger("fedlora")


class Runtime(Protocol):
    """What the driver asks of a runtime."""

    def run_round(self, t: int) -> dict: ...  # one round: its metrics row (evaluation included)

    def snapshot(self) -> dict: ...  # everything a bit-identical resume needs (Run.snapshot + the runtime's)

    def restore(self, ck: dict) -> None: ...

    def evaluate_now(self) -> dict: ...  # the models as they are now (the baseline before round 1)

    def final_models(self) -> tuple[dict[str, torch.Tensor] | None, Iterable[tuple[int, dict[str, torch.Tensor]]]]:
        ...  # (the one shared model or None, each client's model)

    def summary_extra(self) -> dict: ...  # the runtime's own summary columns


class RunDriver:
    def __init__(self, run: Run, runtime: Runtime):
        self.run, self.runtime = run, runtime
        self.checkpointer = Checkpointer(run.run_dir)
        self.checkpoint_costs: list[dict] = []  # bytes and seconds of each round's checkpoint in this process

    def drive(self, checkpoint: dict | None = None, on_round: Callable[[dict], None] | None = None) -> dict:
        """Run the rounds after `checkpoint` (None: from round 1) and write the run directory; the summary."""
        run, runtime = self.run, self.runtime
        rundir.start(run.run_dir, run.cfg, run.adapter_meta())
        if checkpoint is not None:
            runtime.restore(checkpoint)
            self.checkpointer.resumed(runtime.snapshot(), checkpoint)
            log.info("resuming %s after round %d", run.run_dir, checkpoint["round"])
        trackers = Trackers(run.cfg.output.loggers, run.run_dir, run.cfg.name, run.cfg.model_dump(mode="json")) \
            if run.cfg.output.loggers else None
        baseline_path = run.run_dir / "baseline.json"
        if run.cfg.eval.baseline and not baseline_path.is_file():  # the base model (ΔW = 0) before round 1
            baseline_path.write_text(json.dumps(runtime.evaluate_now()))

        def after_round(t: int, row: dict) -> None:
            self.checkpointer.save(runtime.snapshot())
            self.checkpoint_costs.append({"round": t, "bytes": self.checkpointer.last_bytes,
                                          "seconds": self.checkpointer.last_seconds})
            if trackers:
                trackers.log_round(t, row, run.weights_image(t))
            if on_round:
                on_round(row)

        try:
            rundir.write_rounds(run.run_dir, run.history, run.cfg.federation.rounds, runtime.run_round, after_round)
        finally:
            if trackers:
                trackers.close()
        result = summary(run, sum(r["wall_s"] for r in run.history)) | runtime.summary_extra()
        if baseline_path.is_file():
            result["baseline"] = json.loads(baseline_path.read_text())
        rundir.write_summary(run.run_dir, result)
        if run.cfg.output.save_client_states:
            shared, clients = runtime.final_models()
            rundir.save_states(run.run_dir, run.server.global_state, shared, clients)
        return result


def summary(run: Run, wall: float) -> dict:
    """summary.json: the run's totals, the last evaluated round's metrics and the best round on validation."""
    history = run.history
    last = next((r for r in reversed(history) if "global_loss" in r), {})
    per_client_round = [r["up_raw_adapter_per_client"] for r in history]
    # the final models reach the clients too: counted apart and in the run's totals
    final_down = run.server.final_download_bytes(run.trainers())
    totals = dict(run.server.cumulative)
    for k, v in final_down.items():
        totals[f"down_{k}"] += v
    final = {f"{w}_{k}": last.get(f"{w}_{k}") for w in ("global", "personal") for k in METRICS if f"{w}_{k}" in last}
    final |= {k: last[k] for k in ("client_accuracy", "client_perplexity") if k in last}
    final |= {k: last[k] for k in last if k.startswith(("global_", "personal_")) and k not in final
              and isinstance(last[k], float)}  # the user's metrics (eval.metrics)
    return {"name": run.cfg.name, "method": run.method.name, "head": run.method.head,
            "task": run.task.name, "num_clients": run.num_clients, "rounds": len(history),
            "global_accuracy": None, "personal_accuracy": None,  # None for a causal LM; set below otherwise
            **final, "personal_accuracy_weighted": last.get("personal_accuracy_weighted"),
            "up_raw_adapter_per_client_round": float(np.mean(per_client_round)) if per_client_round else 0.0,
            **totals, **{f"final_down_{k}": v for k, v in final_down.items()}, "wall_s": wall,
            "final_round": last.get("round"), **best_round(run, history)}
