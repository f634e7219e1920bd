from .layer import LowRankLinear
from .model import FACTORS, AdaptedModel, detect_head, factor_of, inject_adapters
from .peft_export import export_peft

__all__ = ["FACTORS", "AdaptedModel", "LowRankLinear", "detect_head", "export_peft", "factor_of",
           "inject_adapters"]
