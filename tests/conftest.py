"""Shared fixtures: tiny random BERT on the synthetic task; runs in seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from fedlora.config import build_config  # noqa: E402
from fedlora.runtime.simulation import Simulation  # noqa: E402


def tiny_config(tmp_path, **sections) -> dict:
    cfg = {
        "name": "tiny",
        "seed": 0,
        "model": {"name": "tiny-bert", "max_length": 16},
        "task": {"name": "synthetic"},
        "partition": {"num_clients": 3, "scheme": "iid"},
        "adapter": {"r": 4, "alpha": 8},
        "method": {"name": "fedit"},
        "federation": {"rounds": 2},
        "train": {"local_steps": 2, "batch_size": 8},
        "eval": {"every": 1, "max_global_examples": 64},
        "output": {"dir": str(tmp_path / "runs")},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg[section], **values} if isinstance(values, dict) else values
    return cfg


def make_sim(tmp_path, **sections) -> Simulation:
    cfg = build_config(tiny_config(tmp_path, **sections))
    return Simulation(cfg, tmp_path / "runs" / cfg.method.name)


class Recorder:
    """Wraps a simulation's server to record every round's accepted uploads and the state after aggregation."""

    def __init__(self, sim: Simulation):
        self.sim, self.rounds = sim, {}
        server, original = sim.server, sim.server.aggregate

        def aggregate(t, uploads):
            before = {k: v.clone() for k, v in server.global_state.items()}
            original(t, uploads)
            self.rounds[t] = {"uploads": uploads, "before": before,
                              "after": {k: v.clone() for k, v in server.global_state.items()}}

        server.aggregate = aggregate


@pytest.fixture
def tiny(tmp_path):
    return lambda **sections: make_sim(tmp_path, **sections)
