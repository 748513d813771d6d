"""Drop-in modules built on the ops."""
from .shira_linear import ShiraLinear, mark_only_adapters_trainable, replace_linear

__all__ = ["ShiraLinear", "mark_only_adapters_trainable", "replace_linear"]
