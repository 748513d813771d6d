"""Drop-in modules built on the ops."""
from .binary import BinaryAdapter, BinaryLoRALinear
from .dylora import DyLoRALinear
from .shira_linear import ShiraLinear, mark_only_adapters_trainable, replace_linear

__all__ = ["BinaryAdapter", "BinaryLoRALinear", "DyLoRALinear", "ShiraLinear",
           "mark_only_adapters_trainable", "replace_linear"]
