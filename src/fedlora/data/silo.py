"""Node-local data: each client's own file, as a silo (a hospital's SuperNode) holds it.

    partition.scheme: files            client i reads partition.files[i] and nothing else
    test: partition.test_files[i]      or a seeded client_test_fraction of its own file
    labels: task.labels                or the sorted union of the clients' labels
    global test: eval.server_test      the server's own file, or none (global metrics = the clients' reports)

The in-process simulation and a Flower SuperNode (`--data`) read a client's file through the same
`load_local`, encode its labels against the same label space and carve its test split with the same
generator, so a deployment can be rehearsed in one process on exactly the silos' files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig, TaskConfig
from ..errors import ConfigError
from ..seeding import rng
from .loader import Examples
from .partition import Split, split_task
from .source import load_task_source
from .tasks import Task, load_task

FILE_TASKS = ("csv", "jsonl", "file", "instructions")


@dataclass
class Silo:
    """One client's own data: a file (or a local Hugging Face dataset folder), and optionally its test file."""

    data: str
    test: str | None = None


def load_local(path: str, task: TaskConfig) -> Task:
    """Read one client's (or the server's) own file: CSV / JSONL / JSON / parquet / arrow, an instructions file, or
    a saved Hugging Face dataset folder, through the loader `task.name: hf` uses (data/source.py)."""
    if task.name == "vqa":  # a silo's own images: a JSONL of image, question, answer (or an hf dataset folder)
        from .source import load_vqa_source
        from .tasks import vqa_options

        if not Path(path).expanduser().exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        opts = vqa_options({"image_column": task.image_column, "output_column": task.output_column,
                            "category_column": task.category_column}, task.text_column)
        return load_vqa_source(str(Path(path).expanduser()), **opts)
    if task.name not in FILE_TASKS + ("hf",):
        raise ValueError(f"task.name: partition.scheme 'files' reads files: use csv, jsonl, instructions or hf, "
                         f"not '{task.name}'")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    kind = "instructions" if task.name == "instructions" else ("classification" if task.name != "hf" else task.kind)
    fmt = {"csv": "csv", "jsonl": "jsonl"}.get(task.name)
    return load_task_source(str(p), kind=kind, fmt=fmt if p.is_file() else None, text_column=task.text_column,
                            label_column=task.label_column, instruction_column=task.instruction_column,
                            input_column=task.input_column, output_column=task.output_column,
                            category_column=task.category_column, name=p.stem if p.is_file() else p.name)


def relabel(task: Task, names: list[str], where: str) -> Task:
    """The task with its labels encoded against the run's label space `names`."""
    unknown = sorted(set(task.label_names) - set(names))
    if unknown:
        raise ValueError(f"{where}: labels {unknown[:5]} are not in task.labels {names}")
    index = {n: i for i, n in enumerate(names)}
    labels = [index[task.label_names[y]] for y in task.labels]
    images = {c: task.columns[c] for c in ("image", "image_where") if c in task.columns}  # an image task's
    return Task(task.name, task.texts, labels, list(names), images, task.targets)


def label_space(cfg: RunConfig, tasks: list[Task]) -> list[str]:
    """task.labels, or the sorted union of the labels the clients hold."""
    if cfg.task.labels:
        return list(cfg.task.labels)
    return sorted({n for t in tasks for n in t.label_names})


def config_silos(cfg: RunConfig) -> dict[int, Silo]:
    """Every client's silo as `partition.files` names them (the in-process simulation of a deployment)."""
    p = cfg.partition
    if not p.files:
        raise ValueError("partition.scheme 'files' needs partition.files (one file per client); on Flower each "
                         "SuperNode brings its own (`fedlora flower supernode --data PATH`)")
    tests = p.test_files or [None] * len(p.files)
    return {cid: Silo(f, t) for cid, (f, t) in enumerate(zip(p.files, tests, strict=True))}


def carve(n: int, fraction: float, seed: int, cid: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's own (train, test) rows of its file: a seeded `fraction` of them is its test split."""
    order = rng("client_split", seed, cid).permutation(n)
    n_test = max(1, int(round(n * fraction)))
    if n - n_test < 1:
        raise ValueError(f"client {cid}: its file has {n} rows, too few for a train and a test split")
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def files_task(cfg: RunConfig, silos: dict[int, Silo], label_names: list[str] | None = None,
               server_test: bool = True) -> tuple[Task, Split]:
    """The local silos' data as one Task and a Split over it: the rows of clients not in `silos` are empty.

    `label_names`: the run's label space (None: `label_space` of the silos read here). `server_test`: also read
    eval.server_test as the global test set (the server's own file; a client never reads it).
    """
    part = {cid: (load_local(s.data, cfg.task), load_local(s.test, cfg.task) if s.test else None)
            for cid, s in sorted(silos.items())}
    srv = load_local(cfg.eval.server_test, cfg.task) if server_test and cfg.eval.server_test else None
    names = label_names or label_space(cfg, [t for pair in part.values() for t in pair if t is not None])
    texts, labels, targets = [], [], []
    causal = cfg.task.name in ("instructions", "vqa")  # known without reading a file (a server reads none)
    images: dict[str, list] = {"image": [], "image_where": []}

    def add(task: Task, where: str) -> np.ndarray:
        task = relabel(task, names, where)
        start = len(texts)
        texts.extend(task.texts)
        labels.extend(task.labels)
        targets.extend(task.targets or [])
        for c in images:
            images[c].extend(task.columns.get(c, []))
        return np.arange(start, len(texts), dtype=np.int64)

    empty = np.zeros(0, dtype=np.int64)
    clients = [(empty, empty)] * cfg.partition.num_clients
    validation = [empty] * cfg.partition.num_clients if cfg.partition.client_val_fraction else None
    for cid, (data, test) in part.items():
        rows = add(data, silos[cid].data)
        if test is not None:
            train, held = rows, add(test, silos[cid].test)
        else:
            train, held = (rows[i] for i in carve(len(rows), cfg.partition.client_test_fraction, cfg.split_seed, cid))
        if validation is not None:
            order = rng("client_val", cfg.split_seed, cid).permutation(len(train))
            n_v = max(1, int(round(len(train) * cfg.partition.client_val_fraction)))
            validation[cid], train = np.sort(train[order[:n_v]]), np.sort(train[order[n_v:]])
        clients[cid] = (train, held)
    global_test = add(srv, cfg.eval.server_test) if srv is not None else empty
    task = Task("files", texts, labels, list(names), images if cfg.task.name == "vqa" else {},
                targets if causal else None)
    return task, Split(global_test, clients, validation)


def no_examples(causal: bool) -> Examples:
    """Zero rows, for the clients a process holds no data of (and a server without a test set)."""
    z = torch.zeros(0, 1, dtype=torch.long)
    return Examples(z, z.clone(), torch.zeros((0, 1) if causal else (0,), dtype=torch.long),
                    torch.zeros(0, dtype=torch.long) if causal else None)


def write_silo_files(cfg: RunConfig, out: Path) -> Path:
    """Each client's partition of a shared task as its own CSV (`client_i.csv`: text, label), and `run.yaml`:
    the config on those files (`partition.scheme: files`), for a rehearsal of a deployment on loopback."""
    import pandas as pd
    import yaml


    t = cfg.task
    if t.name == "instructions" or (t.name not in ("csv", "jsonl", "file") and t.path):
        raise ConfigError("fedlora flower silos: splits a classification task; instruction files are one silo each "
                          "already")
    task = load_task(t.name, path=t.path, text_column=t.text_column, label_column=t.label_column,
                     max_examples=t.max_examples, max_per_class=t.max_per_class, seed=cfg.seed,
                     keep_labels=t.keep_labels)
    split = split_task(task, cfg.partition, cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for cid, (train, test) in enumerate(split.clients):
        rows = sorted([*train.tolist(), *test.tolist()])
        path = (out / f"client_{cid}.csv").resolve()
        pd.DataFrame({"text": [task.texts[i] for i in rows],
                      "label": [task.label_names[task.labels[i]] for i in rows]}).to_csv(path, index=False)
        files.append(str(path))
    data = cfg.model_dump(mode="json")
    data["task"] = {"name": "csv", "text_column": "text", "label_column": "label", "labels": task.label_names}
    data["partition"] = {**data["partition"], "scheme": "files", "files": files}
    k = data["federation"].get("clients_per_round")
    if k is not None and k > len(files):
        data["federation"]["clients_per_round"] = None
    (out / "run.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return out / "run.yaml"
