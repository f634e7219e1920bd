from .layer import LowRankLinear
from .model import FACTORS, AdaptedModel, detect_head, factor_of, inject_adapters
from .peft_export import export_peft, export_with_meta

__all__ = ["FACTORS", "AdaptedModel", "LowRankLinear", "detect_head", "export_peft", "export_with_meta", "factor_of",
           "inject_adapters"]
