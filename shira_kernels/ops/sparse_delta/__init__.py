"""Sparse-delta matmul: y = x·(W + scale·S)ᵀ + b with S a SparseDelta, and its parts.

  naive.py   the pure-torch references: the specification of each part
  parts.py   spmm, spmm_t, sddmm, add_delta: kernels per backend, torch.library ops, functions;
             sparse_product_add (the sparse product alone, with autograd)
  linear.py  sparse_delta_linear: its strategies, op, backward and autograd, and "auto"'s choice

The names below are this package's interface (``from shira_kernels.ops import sparse_delta as
sd; sd.auto_strategy(...)``), including the few private ones that tests read.
"""
from .linear import (FOLD_TOKENS, FOLD_TRAINING_TOKENS, STRATEGIES, STRATEGY_DECISION,
                     SWAP_FROM_TOKENS, _scratch, _strategy_key, auto_strategy,
                     linear_of_parts, sparse_delta_linear, sparse_delta_linear_unpacked, static_strategy,
                     strategy_entry)
from .naive import (add_at_indices_reference, sddmm_reference, sparse_delta_linear_reference,
                    spmm_reference)
from .parts import (_ROW_BLOCKS, DENSE_SDDMM_FROM_TOKENS, SDDMM_BLOCK_BYTES, add_delta, csr_add,
                    sddmm, sddmm_row_blocks, sparse_product_add, sparse_product_add_unpacked,
                    spmm, spmm_t)

__all__ = ["DENSE_SDDMM_FROM_TOKENS", "FOLD_TOKENS", "FOLD_TRAINING_TOKENS", "SDDMM_BLOCK_BYTES",
           "STRATEGIES", "STRATEGY_DECISION", "SWAP_FROM_TOKENS", "add_at_indices_reference",
           "add_delta", "auto_strategy", "csr_add", "linear_of_parts", "sddmm",
           "sddmm_reference", "sddmm_row_blocks", "sparse_delta_linear",
           "sparse_delta_linear_reference", "sparse_delta_linear_unpacked",
           "sparse_product_add", "sparse_product_add_unpacked", "spmm",
           "spmm_reference", "spmm_t", "static_strategy", "strategy_entry"]
