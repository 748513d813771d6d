"""Ops, one file (sparse_delta: one package) per family: reference (the spec), its kernels per
backend (registered in registry.py: (op, backend) → kernel), torch.library op, public function."""
from .._checks import validate_indices
from .binary import binary_linear, binary_lora
from .multi_binary import multi_binary_lora
from .multi_delta import multi_delta_linear
from .scatter_swap import scatter_swap_, scatter_swap_reference
from .sparse_delta import (add_delta, csr_add, sddmm, sparse_delta_linear, sparse_product_add,
                           spmm, spmm_t)

__all__ = ["add_delta", "binary_linear", "binary_lora", "csr_add", "multi_binary_lora",
           "multi_delta_linear", "scatter_swap_", "scatter_swap_reference", "sddmm",
           "sparse_delta_linear", "sparse_product_add", "spmm", "spmm_t", "validate_indices"]
