"""Client partitions through flwr-datasets partitioners, then per-client train/test splits.

Order: shuffle (seeded) -> hold out the global test set -> partition the rest over clients ->
split each client's part into its own train and test (personalized evaluation).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    ShardPartitioner,
)

from ..config import PartitionConfig
from ..seeding import rng
from .tasks import Task


@dataclass
class Split:
    global_test: np.ndarray  # example indices into the task
    clients: list[tuple[np.ndarray, np.ndarray]]  # (train indices, test indices) per client
    validation: list[np.ndarray] | None = None  # per client, carved from its train part (tuning only)


def make_partitioner(cfg: PartitionConfig, seed: int) -> Partitioner:
    n = cfg.num_clients
    if cfg.scheme == "iid":
        return IidPartitioner(num_partitions=n)
    if cfg.scheme == "dirichlet":
        return DirichletPartitioner(num_partitions=n, partition_by="label", alpha=cfg.alpha,
                                    min_partition_size=cfg.min_partition_size, self_balancing=False, seed=seed)
    if cfg.scheme == "shards":
        return ShardPartitioner(num_partitions=n, partition_by="label",
                                num_shards_per_partition=cfg.shards_per_client, seed=seed)
    if cfg.scheme == "natural":
        if not cfg.column:
            raise ValueError("partition.column is required for partition.scheme 'natural'")
        return NaturalIdPartitioner(partition_by=cfg.column)
    raise ValueError(f"partition.scheme: unknown scheme '{cfg.scheme}'")


def flwr_call(fn: Callable[[], Any], cfg: PartitionConfig) -> Any:
    """A flwr-datasets partitioner call, its retry warnings silenced and its failure one line naming the fields."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn()
        except ValueError as e:
            if cfg.scheme != "dirichlet" or "attempts" not in str(e):
                raise
    raise ValueError(f"partition.alpha: no Dirichlet split (alpha {cfg.alpha}) gives each of the "
                     f"{cfg.num_clients} clients partition.min_partition_size={cfg.min_partition_size} examples: "
                     f"raise partition.alpha, or lower partition.min_partition_size or partition.num_clients")


def split_task(task: Task, cfg: PartitionConfig, seed: int) -> Split:
    """`seed` is the run's data seed: it fixes the split whatever the training seed."""
    order = rng("split", seed).permutation(len(task.labels))
    n_test = int(round(len(order) * cfg.global_test_fraction))
    global_test, rest = np.sort(order[:n_test]), order[n_test:]
    columns = {"idx": rest.tolist(), "label": [task.labels[i] for i in rest]}
    if cfg.scheme == "natural":
        if cfg.column not in task.columns and cfg.column != "label":
            raise ValueError(f"partition.column: task '{task.name}' has no column '{cfg.column}' "
                             f"(has: {sorted(task.columns) + ['label']})")
        if cfg.column != "label":
            columns[cfg.column] = [task.columns[cfg.column][i] for i in rest]
    if len(rest) < 2 * cfg.num_clients:  # each client needs a train and a test example
        raise ValueError(f"partition.num_clients: {cfg.num_clients} clients need at least {2 * cfg.num_clients} "
                         f"examples, but {len(rest)} remain after the global test set: lower partition.num_clients")
    partitioner = make_partitioner(cfg, seed)
    partitioner.dataset = Dataset.from_dict(columns)
    if flwr_call(lambda: partitioner.num_partitions, cfg) != cfg.num_clients:
        raise ValueError(f"partition.num_clients is {cfg.num_clients} but column '{cfg.column}' has "
                         f"{partitioner.num_partitions} distinct values")
    clients = []
    for cid in range(cfg.num_clients):
        idx = np.asarray(flwr_call(lambda c=cid: partitioner.load_partition(c), cfg)["idx"], dtype=np.int64)
        if len(idx) < 2:
            raise ValueError(f"client {cid} got {len(idx)} examples: partition too small "
                             f"(fewer clients, a larger partition.alpha, or more data)")
        idx = idx[rng("client_split", seed, cid).permutation(len(idx))]
        n_c = max(1, int(round(len(idx) * cfg.client_test_fraction)))
        clients.append((np.sort(idx[n_c:]), np.sort(idx[:n_c])))
    if not cfg.client_val_fraction:
        return Split(global_test, clients)
    # validation comes out of train (test untouched, so a tuned run's test numbers stay unseen)
    validation = []
    for cid, (train, test) in enumerate(clients):
        train = train[rng("client_val", seed, cid).permutation(len(train))]
        n_v = max(1, int(round(len(train) * cfg.client_val_fraction)))
        if len(train) - n_v < 1:
            raise ValueError(f"client {cid}: partition.client_val_fraction leaves no training examples")
        clients[cid] = (np.sort(train[n_v:]), test)
        validation.append(np.sort(train[:n_v]))
    return Split(global_test, clients, validation)


def stratified_sample(indices: np.ndarray, labels: np.ndarray, n: int | None,
                      gen: np.random.Generator) -> np.ndarray:
    """A seeded random sample of `n` of `indices`, stratified by label; sorted. All of them if n is None or ≥ len.

    Each label gets its proportional share of `n` by largest remainder (ties broken at random), so a
    capped evaluation set holds the labels of the full set in their proportions (within one example),
    whatever the order of the file it came from.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if n is None or n >= len(indices):
        return np.sort(indices)
    labels = np.asarray(labels)[indices]
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(indices)
    take = np.floor(quota).astype(np.int64)
    remainder = quota - take + gen.random(len(classes)) * 1e-9  # random tie-break among equal remainders
    take[np.argsort(-remainder)[: n - int(take.sum())]] += 1
    picked = [gen.choice(indices[labels == c], size=k, replace=False) for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(picked))


def label_histogram(labels: list[int] | np.ndarray, num_labels: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels)
