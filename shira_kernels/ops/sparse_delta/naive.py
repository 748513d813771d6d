"""The specification of each part of the sparse-delta matmul, in pure torch: what every
backend's kernel (parts.py registers them) must compute, and PEFT's dense layer that
sparse_delta_linear replaces."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...formats import SparseDelta


def _csr_to_dense(offsets, cols, values, n_cols) -> torch.Tensor:
    n_rows = offsets.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n_rows, device=offsets.device), offsets.diff())
    dense = torch.zeros(n_rows, n_cols, dtype=torch.float32, device=values.device)
    dense[rows, cols.long()] = values.float()
    return dense


def spmm_reference(y, x, offsets, cols, values, scale: float, overwrite_y=False) -> torch.Tensor:
    """y + scale·x·Sᵀ for S in CSR (row offsets, columns, values), rounded once to y's dtype."""
    dense = _csr_to_dense(offsets, cols, values, x.shape[1])
    return (y.float() + scale * (x.float() @ dense.T)).to(y.dtype)


def sddmm_reference(gy, x, rows, cols, offsets=None) -> torch.Tensor:
    """fp32 g[j] = Σ_t gy[t, rows[j]]·x[t, cols[j]]: the gradient of S's values."""
    # The dense gradient gyᵀ·x read at S's entries (offsets, S's CSR row offsets, are a hint
    # that kernels walking S by rows may take; the result does not depend on them).
    return (gy.float().T @ x.float())[rows.long(), cols.long()]


def add_at_indices_reference(out, weight, flat_indices, values, scale: float, saved=None) -> int:
    """out[idx] = round(weight[idx] + scale·values); saved (if given) gets weight[idx] first.
    Returns the number of indices outside the weight; if there are any, nothing is written."""
    flat = flat_indices.long()
    outside = int(((flat < 0) | (flat >= weight.numel())).sum())
    if outside:
        return outside
    base = weight.view(-1)[flat]
    if saved is not None:
        saved.copy_(base)
    out.view(-1)[flat] = (base.float() + scale * values.float()).to(out.dtype)
    return 0


def sparse_delta_linear_reference(x, weight, bias, delta: SparseDelta, scale: float = 1.0):
    """Clone W, add the dense delta, F.linear: what PEFT's SHiRA layer does."""
    return F.linear(x, weight + scale * delta.to_dense(weight.dtype), bias)

