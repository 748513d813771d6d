"""shira_kernels: fast, exact kernels for sparse (SHiRA) and 1-bit adapters in PyTorch."""
from . import backends, io, masks, nn
from .adapters import AdapterBank
from .backends import use_backend
from .binary_adapters import BinaryAdapterBank
from .formats import BinaryWeight, SparseDelta, SparseDeltaSet
from .ops import (add_delta, binary_linear, binary_lora, csr_add, multi_binary_lora,
                  multi_delta_linear, scatter_swap_, sddmm, sparse_delta_linear,
                  sparse_product_add, spmm, spmm_t, validate_indices)
from .transfer import distill_adapter, lora_to_sparse, sparse_diff

__version__ = "0.1.0"
__all__ = ["AdapterBank", "BinaryAdapterBank", "BinaryWeight", "SparseDelta", "SparseDeltaSet", "add_delta", "backends",
           "binary_linear", "binary_lora", "csr_add", "distill_adapter", "io", "lora_to_sparse", "masks",
           "multi_binary_lora", "multi_delta_linear", "nn", "scatter_swap_", "sddmm",
           "sparse_delta_linear", "sparse_diff", "sparse_product_add", "spmm", "spmm_t",
           "use_backend", "validate_indices", "__version__"]
