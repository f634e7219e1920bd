"""One evaluation for both runtimes: a plan of who is measured on what, and one combine into a metrics row.

    plan = plan_evaluation(run, generate)      which clients, which sets (own test, own validation, global test)
    server's part: measure_global(run, ...)    the one global model on the global test set (single-model runs)
    each client:   measure_client(run, cid, plan.clients[cid], generate)  with that client's model loaded
    row, samples = combine(run, plan, global_metrics, client_results)

The in-process simulation runs the plan itself (`Run.evaluate`); on Flower the ServerApp measures its part and
sends each client its `ClientTask`, and hands the replies to the same `combine`. So a Flower run's rows have
the same columns as `fedlora run`'s: the built-in metrics, the user's `eval.metrics`, and `val_personal_*`.

Who is measured on what:
- every client of `eval.clients` (a fixed seeded subset; plus the round's participants with
  `eval.participants`) on its own test set and, where the run has one, its own validation set;
- global metrics: one model for everyone -> that model on the global test set; a model per client -> the mean
  over `eval.global_clients` clients' own models on it; no global test set (node-local data without
  `eval.server_test`) -> the clients' own-test reports, example-weighted.
The summary's best round is chosen on validation columns only, never on test (`best_round`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .run import Run

METRICS = ("accuracy", "macro_f1", "loss", "perplexity", "rouge_l", "exact_match")
SAMPLES_PER_MODEL = 3  # generated answers kept per model in samples_round_<t>.jsonl: a few are enough to read


@dataclass(frozen=True)
class ClientTask:
    """What one client measures with its own model."""

    test: bool = False  # its own test set
    validation: bool = False  # its own validation set
    global_test: bool = False  # the global test set (a personal model among eval.global_clients)


@dataclass
class EvalPlan:
    generate: bool  # greedy answers too (causal LM, last round)
    single: bool  # one model for every client
    global_source: str  # "server": the one model on the global test; "clients": their models' mean; "weighted"
    clients: dict[int, ClientTask] = field(default_factory=dict)  # in client order
    own: list[int] = field(default_factory=list)  # clients measured on their own test sets
    num_clients: int = 0


def plan_evaluation(run: Run, generate: bool = False) -> EvalPlan:
    """The plan for the models as they are now (after `run.server.last_round`)."""
    generate = generate and run.task.causal and run.cfg.eval.generate_examples > 0
    own = run.eval_clients()
    single = run.single_model()
    if not run.has_global_test():
        source, global_by = "weighted", set()
    elif single:
        source, global_by = "server", set()
    else:
        source, global_by = "clients", run.global_eval_clients()
    validation = run.client_val is not None
    clients = {c: ClientTask(test=c in own, validation=validation and c in own, global_test=c in global_by)
               for c in sorted(set(own) | global_by)}
    return EvalPlan(generate, single, source, clients, list(own), run.num_clients)


def measure_global(run: Run, generate: bool) -> tuple[dict, list[dict]]:
    """The model loaded now on the global test set: its metrics and generated answers."""
    samples: list[dict] = []
    return run.measure(run.global_test, generate, samples, run.global_prompts), samples


def measure_client(run: Run, cid: int, task: ClientTask, generate: bool) -> dict:
    """Client `cid`'s model (loaded now) on the sets of `task`: {"test", "val", "global": metrics, "samples"}."""
    out: dict = {"samples": {}}
    if task.test:
        own: list[dict] = []
        out["test"] = run.measure(run.client_test[cid], generate, own, run.client_prompts[cid])
        out["samples"]["own"] = own[:SAMPLES_PER_MODEL]
    if task.validation:
        out["val"] = run.measure(run.client_val[cid], False)
    if task.global_test:
        on_global: list[dict] = []
        out["global"] = run.measure(run.global_test, generate, on_global, run.global_prompts)
        out["samples"]["global"] = on_global[:SAMPLES_PER_MODEL]
    return out


def weighted_metrics(per_client: list[dict], metrics: Sequence[str] = METRICS) -> dict:
    """The example-weighted aggregate of the clients' metrics (the global metrics when no global test set exists)."""
    n = np.array([m["n"] for m in per_client], dtype=float)
    return {k: float((np.array([m[k] for m in per_client]) * n).sum() / n.sum()) for k in metrics if k in per_client[0]}


def evaluation_row(g: dict, per_client: list[dict], metrics: Sequence[str] = METRICS) -> dict:
    """The evaluation columns of a metrics row: global metrics `g`, per-client metrics on their own test.

    Classification has accuracy / macro-F1 / loss; a causal LM loss / perplexity and, when answers were
    generated, ROUGE-L / exact match. Personal metrics are unweighted means over clients."""
    row = {f"global_{k}": float(g[k]) for k in metrics if k in g}
    for k in metrics:
        if k in per_client[0]:
            row[f"personal_{k}"] = float(np.mean([m[k] for m in per_client]))
    if "accuracy" in per_client[0]:
        n = np.array([m["n"] for m in per_client], dtype=float)
        acc = np.array([m["accuracy"] for m in per_client])
        row |= {"personal_accuracy_weighted": float((acc * n).sum() / n.sum()),
                "personal_accuracy_std": float(acc.std()), "client_accuracy": [round(float(a), 4) for a in acc]}
    else:
        row["client_perplexity"] = [round(float(m["perplexity"]), 3) for m in per_client]
    return row


def combine(run: Run, plan: EvalPlan, global_metrics: dict | None, results: dict[int, dict],
            global_samples: list[dict] | None = None) -> tuple[dict, dict[str, list[dict]]]:
    """One metrics row (and the generated answers by model) from the plan's measurements; clients missing from
    `results` (a Flower client that did not answer) are left out and counted in `evaluated_clients`."""
    names = run.metric_names
    per_client = [results[c]["test"] for c in plan.own if "test" in results.get(c, {})]
    val = [results[c]["val"] for c in plan.own if "val" in results.get(c, {})]
    samples: dict[str, list[dict]] = {}
    if global_samples is not None:
        samples["global"] = global_samples[:SAMPLES_PER_MODEL]
    for c, r in results.items():
        if "own" in r.get("samples", {}):
            samples[f"client_{c}"] = r["samples"]["own"]
        if "global" in r.get("samples", {}):
            samples[f"global_by_{c}"] = r["samples"]["global"]
    if not per_client:
        return {}, samples
    if plan.global_source == "weighted":
        g = weighted_metrics(per_client, names)
    elif plan.global_source == "server":
        if global_metrics is None:
            return {}, samples
        g = global_metrics
    else:
        gs = [r["global"] for _, r in sorted(results.items()) if "global" in r]
        if not gs:
            return {}, samples
        g = {k: float(np.mean([x[k] for x in gs])) for k in gs[0] if k in names}
    row = evaluation_row(g, per_client, names)
    if val:
        row |= {f"val_personal_{k}": float(np.mean([m[k] for m in val])) for k in names if k in val[0]}
    if len(plan.own) < plan.num_clients:
        row["eval_clients"] = plan.own
    if len(per_client) < len(plan.own):
        row["evaluated_clients"] = len(per_client)
    return row, samples


def write_samples(run_dir: Path, t: int, samples: dict[str, list[dict]]) -> None:
    """samples_round_<t>.jsonl: a few generated answers per model, for reading."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / f"samples_round_{t}.jsonl", "w") as f:
        for who, rows in samples.items():
            for r in rows[:SAMPLES_PER_MODEL]:
                f.write(json.dumps({"model": who, **r}) + "\n")
    shown = [{"model": who, **r} for who, rows in samples.items() for r in rows[:2]]
    if any("image" in r for r in shown):  # a VLM: the answers as a picture, images with question and answer
        from .vision.grid import sample_grid

        sample_grid(shown, run_dir / f"vqa_samples_round_{t}.png", title=f"round {t}")


def best_round(run: Run, history: list[dict]) -> dict:
    """The round that scored best on VALIDATION data (eval.best_metric), with that round's metrics; a run
    without a validation split has none (the best round is never chosen on test)."""
    key = run.cfg.eval.best_metric or ("personal_loss" if run.task.causal else "personal_accuracy")
    if run.cfg.eval.split == "validation":
        col = key  # every evaluation column is a validation metric
    elif run.client_val is not None and key.startswith("personal_"):
        col = f"val_{key}"
    else:
        why = "no validation split (partition.client_val_fraction is 0)" if run.client_val is None else \
            f"eval.best_metric '{key}' has no validation column (validation is per client: personal_*)"
        return {"best_round": None, "best_selected_on": f"none: {why}; never chosen on test"}
    rows = [r for r in history if col in r]
    if not rows:
        raise ValueError(f"eval.best_metric: no evaluated round has column '{col}'")
    lower = "loss" in key or "perplexity" in key
    best = (min if lower else max)(rows, key=lambda r: r[col])
    cols = {k: best[k] for k in best if k.startswith(("global_", "personal_", "val_")) and isinstance(best[k], float)}
    return {"best_round": best["round"], "best_selected_on": f"validation {key} ({'min' if lower else 'max'})",
            "best": cols}
