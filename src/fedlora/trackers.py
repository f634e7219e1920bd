"""Experiment trackers (`output.loggers`): TensorBoard, Weights & Biases, MLflow.

Each round's numeric columns go to every tracker: metrics (`metrics/`), bytes (`bytes/`), wall time
(`time/`), and CE-LoRA's mixing-weight matrix as a heatmap image (`celora/weights`).
- tensorboard: event files in <run_dir>/tensorboard (`tensorboard --logdir runs`).
- wandb: `wandb.init` in <run_dir>; set WANDB_MODE=offline to write locally and `wandb sync` later.
- mlflow: MLFLOW_TRACKING_URI if set (a server, or a file store `file:...` with MLFLOW_ALLOW_FILE_STORE=true),
  else a SQLite store <run_dir>/mlflow.db (`mlflow ui --backend-store-uri sqlite:///...`).
wandb and mlflow are optional: `pip install "fedlora[trackers]"`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def scalar_columns(row: dict) -> dict[str, float]:
    """The row's numeric columns, each under its group: bytes/, time/ or metrics/."""
    out = {}
    for k, v in row.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or k == "round":
            continue
        group = "time" if k.endswith("_s") else "bytes" if k.startswith(("up_", "down_")) else "metrics"
        out[f"{group}/{k}"] = float(v)
    return out


def heatmap(weights: np.ndarray, clients: list[int], title: str) -> np.ndarray:
    """A (H, W, 3) uint8 image of a client-by-client weight matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3.4), dpi=80)
    im = ax.imshow(weights, cmap="viridis", vmin=0)
    ax.set_xticks(range(len(clients)), clients)
    ax.set_yticks(range(len(clients)), clients)
    ax.set_xlabel("from client")
    ax.set_ylabel("client's C̄")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img


class Trackers:
    def __init__(self, names: list[str], run_dir: Path, name: str, config: dict):
        self.names, self.tb, self.wandb_run, self.mlflow = list(names), None, None, None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "wandb" in names:
            wandb = _optional("wandb")
            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fedlora"), name=name,
                                        dir=str(run_dir), config=config, reinit="finish_previous")
        if "mlflow" in names:
            self.mlflow = _optional("mlflow")
            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
            self.mlflow.set_tracking_uri(uri)
            self.mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "fedlora"))
            self.mlflow_run = self.mlflow.start_run(run_name=name)
            self.mlflow.log_params({k: str(v)[:500] for k, v in _flat(config).items()})

    def log_round(self, t: int, row: dict, image: np.ndarray | None = None) -> None:
        scalars = scalar_columns(row)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, t)
            if image is not None:
                self.tb.add_image("celora/weights", image, t, dataformats="HWC")
            self.tb.flush()
        if self.wandb_run is not None:
            import wandb

            extra = {"celora/weights": wandb.Image(image)} if image is not None else {}
            self.wandb_run.log({**scalars, **extra}, step=t)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "."): v for k, v in scalars.items()}, step=t)
            if image is not None:
                self.mlflow.log_image(image, key="celora.weights", step=t)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _optional(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"output.loggers: '{module}' is not installed (pip install \"fedlora[trackers]\")") from None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out
