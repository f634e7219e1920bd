"""fedlora: federated fine-tuning of foundation models with LoRA-family adapters."""

from __future__ import annotations


def __getattr__(name: str):
    # lazy, so that `import fedlora` (and the CLI) stay light
    if name in ("federate", "FederationResult"):
        from . import api

        return getattr(api, name)
    if name == "register_metric":
        from .metrics import register_metric

        return register_metric
    if name == "load_task_source":
        from .data import load_task_source

        return load_task_source
    raise AttributeError(f"module 'fedlora' has no attribute '{name}'")


__all__ = ["FederationResult", "federate", "load_task_source", "register_metric"]
