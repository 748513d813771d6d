"""Ops, one file per family: reference (the spec), torch.library op, public function."""
from .._checks import validate_indices
from .scatter_swap import scatter_swap_, scatter_swap_reference

__all__ = ["scatter_swap_", "scatter_swap_reference", "validate_indices"]
