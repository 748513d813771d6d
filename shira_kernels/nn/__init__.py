"""Drop-in modules built on the ops."""
from .binary import BinaryAdapter, BinaryLoRALinear
from .shira_linear import ShiraLinear, mark_only_adapters_trainable, replace_linear

__all__ = ["BinaryAdapter", "BinaryLoRALinear", "ShiraLinear", "mark_only_adapters_trainable", "replace_linear"]
