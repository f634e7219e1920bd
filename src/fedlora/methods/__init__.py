"""One file per method; importing this package registers every module in it."""

import importlib
import pkgutil

from .base import METHODS, Method, is_adapter_key, register, weighted_mean

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"method.name: unknown method '{name}' (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


__all__ = ["METHODS", "Method", "get_method", "is_adapter_key", "register", "weighted_mean"]
