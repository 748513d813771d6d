"""Drop-in modules built on the ops."""
from .binary import BinaryAdapter, BinaryLoRALinear
from .dylora import DyLoRALinear
from .quantized import QuantizedShiraLinear
from .shira_linear import ShiraLinear, mark_only_adapters_trainable, replace_linear

__all__ = ["BinaryAdapter", "BinaryLoRALinear", "DyLoRALinear", "QuantizedShiraLinear", "ShiraLinear",
           "mark_only_adapters_trainable", "replace_linear"]
