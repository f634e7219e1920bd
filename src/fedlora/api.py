"""The Python API for notebooks: federate a model object (or name) over datasets in hand.

    result = fedlora.federate(model=model, tokenizer=tok, clients=[ds_0, ds_1, ds_2], method="celora",
                              federation={"rounds": 3}, train={"local_steps": 5})
    result.summary["personal_accuracy"], result.adapters[0]     # metrics; client 0's adapter tensors
    result.export(0, "client0-peft")                            # a PEFT LoRA folder

`clients` are one data source per client (natural clients: a `datasets.Dataset`, a DataFrame, a list of
dicts, a file or folder; see `fedlora.data.load_task_source`); or `dataset` plus `partition` splits one
source over `partition["num_clients"]` clients. Every other keyword is a config section (`train={...}`)
or a top-level field (`seed=1`), as in a YAML config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .adapters import LowRankLinear, export_with_meta
from .config import build_config, load_config
from .data import Split, Task, load_task_source, merge_tasks
from .metrics import register_metric
from .seeding import rng

SOURCE_OPTIONS = ("split", "kind", "text_column", "label_column", "instruction_column", "input_column",
                  "output_column", "category_column")


@dataclass
class FederationResult:
    summary: dict
    adapters: dict[int, dict[str, torch.Tensor]]  # each client's adapter (and head) state, as it was evaluated
    meta: dict  # the run's adapter metadata (Run.adapter_meta, as adapter_meta.json): what a PEFT export needs
    run_dir: Path

    def export(self, client: int, out_dir: str | Path) -> Path:
        """Client `client`'s adapter as a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)."""
        if client not in self.adapters:
            raise ValueError(f"client: no client {client} (clients are 0..{len(self.adapters) - 1})")
        return export_with_meta(self.adapters[client], out_dir, self.meta)


def split_clients(client_of: list[str], num_clients: int, global_test_fraction: float, client_test_fraction: float,
                  client_val_fraction: float, seed: int) -> Split:
    """Natural clients: each client's rows, shuffled, give a share to the global test set, then its own test
    (and validation) split; the rest is its training data."""
    owner = np.asarray([int(c) for c in client_of])
    global_test, clients, validation = [], [], []
    for cid in range(num_clients):
        idx = rng("client_split", seed, cid).permutation(np.flatnonzero(owner == cid))
        n_g = int(round(len(idx) * global_test_fraction))
        rest = idx[n_g:]
        n_t = max(1, int(round(len(rest) * client_test_fraction)))
        n_v = int(round(len(rest) * client_val_fraction))
        if client_val_fraction:
            n_v = max(1, n_v)
        if len(rest) - n_t - n_v < 1:
            raise ValueError(f"clients[{cid}]: {len(idx)} examples are too few for its global-test, test and "
                             f"validation shares (partition.*_fraction)")
        global_test.append(idx[:n_g])
        clients.append((np.sort(rest[n_t + n_v:]), np.sort(rest[:n_t])))
        validation.append(np.sort(rest[n_t:n_t + n_v]))
    return Split(np.sort(np.concatenate(global_test)), clients, validation if client_val_fraction else None)


def _base_config(config: dict | str | Path | None, overrides: dict) -> dict:
    if isinstance(config, str | Path):
        return load_config(config, overrides).model_dump(mode="json")
    return build_config(config or {}, overrides).model_dump(mode="json")


def federate(model: str | nn.Module = "minilm", tokenizer: Any = None, clients: list | None = None,
             dataset: Any = None, partition: dict | None = None, method: str = "celora",
             config: dict | str | Path | None = None, metrics: dict[str, Callable[..., float]] | None = None,
             columns: dict | None = None, run_dir: str | Path | None = None, processor: Any = None,
             **overrides: Any) -> FederationResult:
    """Run one federation in-process and return its summary and per-client adapters.

    model: a name (`minilm`, a folder, a hub id) or a loaded `nn.Module` (adapters are injected into it, in
      place: pass a fresh model to each call); with a module, `tokenizer` is required.
    clients: one data source per client; or `dataset` with `partition` (e.g. {"num_clients": 8,
      "scheme": "dirichlet", "alpha": 0.3}).
    metrics: {name: fn(y_true, y_pred)} added to the evaluation (columns global_<name>, personal_<name>).
    columns: column mapping for the sources (text_column, label_column, instruction_column, ..., split).
    processor: with a vision-language `model` object, its `AutoProcessor`; the sources are then image-question
      data (a JSONL of image, question, answer, or a dataset with an `Image` column: `columns` may set
      image_column, question_column, answer_column).
    """
    from .runtime.simulation import Simulation

    if isinstance(model, nn.Module):
        if tokenizer is None and processor is None:
            raise ValueError("tokenizer (or, for a vision-language model, processor): required when model is an "
                             "nn.Module")
        if any(isinstance(m, LowRankLinear) for m in model.modules()):
            raise ValueError("model: already holds fedlora adapters (from an earlier federate call): pass a fresh one")
    if (clients is None) == (dataset is None):
        raise ValueError("federate: pass either clients=[one dataset per client] or dataset=... with partition")
    if clients is not None and partition and "num_clients" in partition and partition["num_clients"] != len(clients):
        raise ValueError(f"partition.num_clients is {partition['num_clients']} but {len(clients)} clients were given")
    columns = dict(columns or {})
    vlm = None
    if processor is not None:
        from .data.source import load_vqa_source
        from .vision.vlm import from_processor

        if not isinstance(model, nn.Module):
            raise ValueError("processor: pass it with a model object (a name loads its own processor)")
        vlm = from_processor(model, processor, type(model).__name__)
        sources = clients if clients is not None else [dataset]
        tasks = [load_vqa_source(s, **columns) for s in sources]
        columns, tokenizer = {}, vlm.tokenizer
    unknown = sorted(set(columns) - set(SOURCE_OPTIONS))
    if unknown:
        raise ValueError(f"columns: unknown option(s) {unknown} (known: {', '.join(SOURCE_OPTIONS)})")
    for name, fn in (metrics or {}).items():
        register_metric(name, fn)

    sources = clients if clients is not None else [dataset]
    if vlm is None:
        tasks = [load_task_source(s, name=f"client{i}" if clients is not None else None, **columns)
                 for i, s in enumerate(sources)]
    task: Task = merge_tasks(tasks) if clients is not None else tasks[0]
    task.name = "clients" if clients is not None else task.name

    over = dict(overrides)
    over["method"] = {**over.get("method", {}), "name": method}
    over["partition"] = {**over.get("partition", {}), **(partition or {})}
    if clients is not None:
        over["partition"] |= {"num_clients": len(clients), "scheme": "natural", "column": "client"}
    over["eval"] = {**over.get("eval", {}), "metrics": [*over.get("eval", {}).get("metrics", []), *(metrics or {})]}
    over["task"] = {**over.get("task", {}), "name": "python", **columns}
    if isinstance(model, nn.Module):
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        over["model"] = {**over.get("model", {}), "name": name}
        _check_model(model, task)
    else:
        over["model"] = {**over.get("model", {}), "name": model}
    cfg = build_config(_base_config(config, {}), over)
    split = None
    if clients is not None:
        p = cfg.partition
        split = split_clients(task.columns["client"], len(clients), p.global_test_fraction, p.client_test_fraction,
                              p.client_val_fraction, cfg.seed)
    sim = Simulation(cfg, run_dir, task=task, split=split, model=model if isinstance(model, nn.Module) else None,
                     tokenizer=tokenizer, vlm=vlm)
    summary = sim.run()
    summary["run_dir"] = str(sim.run_dir)
    adapters = {cid: {k: v.detach().clone() for k, v in sim.eval_state(cid).items()} for cid in range(sim.num_clients)}
    return FederationResult(summary, adapters, sim.adapter_meta(), sim.run_dir)


def _check_model(model: nn.Module, task: Task) -> None:
    config = getattr(model, "config", None)
    if task.causal:
        if not hasattr(model, "generate"):
            raise ValueError("model: the data are instructions, which need a causal LM (e.g. AutoModelForCausalLM)")
        return
    n = getattr(config, "num_labels", None)
    if n is not None and n != task.num_labels:
        raise ValueError(f"model: the classifier has {n} labels but the data have {task.num_labels} "
                         f"({task.label_names}); load it with num_labels={task.num_labels}")
