"""One file per method; importing this package registers every module in it.

A method file declares the method (`@register`), its options (`Options`, the section `method.<name>`) and
its cross-section checks (`check`); config.py validates both through `METHODS` when a config is built.
"""

import importlib
import pkgutil

from .base import METHODS, Method, MethodContext, MethodOptions, is_adapter_key, register, weighted_mean

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"method.name: unknown method '{name}' (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


__all__ = ["METHODS", "Method", "MethodContext", "MethodOptions", "get_method", "is_adapter_key", "register",
           "weighted_mean"]
