"""Sparse-delta matmul: y = x·(W + scale·S)ᵀ + b with S a SparseDelta, and its parts.

The parts (each a torch.library op with reference, cpu, triton and cuda kernels, registered in
ops/registry.py under (part, backend), every one in its reference's signature):
  spmm     y + scale·x·Sᵀ for S in CSR          (forward; with Sᵀ's CSR also gx += gy·S)
  sddmm    g[j] = Σ_t gy[t, row_j]·x[t, col_j]   (gradient of S's values: no dense m×n grad)
  csr_add  out = W + scale·S                     (copy W, then add on S's entries only)

sparse_delta_linear runs one of four strategies, each one dense matmul plus extra work:
  "fold"   y = x·(W + scale·S)ᵀ + b in one matmul that adds S's entries to each panel of W as
           it is loaded (O(nnz) adds, nothing written to W): the CPU kernel (folded_linear.cpp);
           on other backends it is composed as "spmm" is
  "spmm"   y = x·Wᵀ + b, then y += scale·x·Sᵀ            O(tokens·nnz): best for few tokens
  "swap"   swap W + scale·S into W's entries (scatter_swap_), y = x·Wᵀ + b, swap the base
           entries back: O(nnz), no copy of W, W restored bit for bit before returning. W is
           briefly modified: the call holds W's lock exclusively, and this package's other ops
           on W hold it shared (_concurrency.py), so none of them sees the adapted entries
  "merge"  W' = W + scale·S into a reused scratch buffer, y = x·W'ᵀ + b: O(out·in) copy, for
           callers that need W untouched while many tokens run
"auto" runs the strategy measured fastest on this machine for the layer's shape, dtype, class
of entries, token class and training or not (auto_strategy: tuning.decide times the candidates
once and caches the winner per machine); with tuning off, the tuning table's choice by token
count (static_strategy: on the CPU fold at the counts of "fold_tokens", or "fold_training_tokens"
when the call records a backward; elsewhere spmm below "swap_from_tokens", else swap).
The backward gives x (gy·W + scale·gy·S, gy·(W + scale·S) in one pass for fold, or gy·W' as
the strategy says), S's values
(scale·sddmm), the bias, and W only if W asks: it never builds a dense m×n gradient unless W
requires grad, and never copies W beyond the one scratch buffer of "merge".
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading

import torch
import torch.nn.functional as F
from .. import _native, backends, tuning
from .._checks import FLOAT_DTYPES, TensorCache, check_scale
from .._concurrency import reading, weight_lock
from ..formats import SparseDelta, SparseStructure, flat_index_dtype
from . import registry
from ._eager import eager_function, via_op
from .scatter_swap import raise_outside, swap_in_range, swap_unchecked

STRATEGIES = ("auto", "fold", "spmm", "swap", "merge")
# The measured decisions ("auto"'s token thresholds, the dense sddmm's) are rows of the tuning
# table (shira_kernels/tuning.py, which names the reports that measured them). These names are
# read-only views of it, kept for code that reads them.
FOLD_TOKENS = tuning.view("fold_tokens")
FOLD_TRAINING_TOKENS = tuning.view("fold_training_tokens")
SWAP_FROM_TOKENS = tuning.view("swap_from_tokens")
DENSE_SDDMM_FROM_TOKENS = tuning.view("dense_sddmm_from_tokens")["cuda"]
SDDMM_BLOCK_BYTES = tuning.view("sddmm_block_bytes")["cuda"]


# ---------------------------------------------------------------------------------------------
# Reference: the specification of each part.
# ---------------------------------------------------------------------------------------------
def _csr_to_dense(offsets, cols, values, n_cols) -> torch.Tensor:
    n_rows = offsets.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n_rows, device=offsets.device), offsets.diff())
    dense = torch.zeros(n_rows, n_cols, dtype=torch.float32, device=values.device)
    dense[rows, cols.long()] = values.float()
    return dense


def spmm_reference(y, x, offsets, cols, values, scale: float, overwrite_y=False) -> torch.Tensor:
    dense = _csr_to_dense(offsets, cols, values, x.shape[1])
    return (y.float() + scale * (x.float() @ dense.T)).to(y.dtype)


def sddmm_reference(gy, x, rows, cols, offsets=None) -> torch.Tensor:
    # The dense gradient gyᵀ·x read at S's entries (offsets, S's CSR row offsets, are a hint
    # that kernels walking S by rows may take; the result does not depend on them).
    return (gy.float().T @ x.float())[rows.long(), cols.long()]


def scatter_add_reference(out, weight, flat_indices, values, scale: float, saved=None) -> int:
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


# ---------------------------------------------------------------------------------------------
# Kernels per backend (registry.py), each in its reference's signature:
#   spmm(y, x, offsets, cols, values, scale, overwrite_y=False) -> y + scale·x·Sᵀ; with
#       overwrite_y (the caller no longer needs y) a kernel may write the result into y.
#   sddmm(gy, x, rows, cols, offsets=None) -> fp32 [nnz], the gradient of S's values; offsets
#       (S's CSR row offsets, when the caller has them) spare the CPU kernel deriving them.
#   scatter_add(out, weight, flat, values, scale, saved=None) -> int: out[flat] = weight[flat]
#       + scale·values; saved, if given, gets weight[flat] first. Every index is checked
#       against the weight's size: entries outside are skipped (never read or written) and
#       their count returned.
#   spmm_t_sddmm(gx, gy, x, values, struct, scale) -> (gx + scale·gy·S, sddmm(gy, x)), the
#       spmm strategy's backward; gx may be overwritten. struct is the SparseStructure's
#       tensors (rows, cols, row_offsets, t_offsets, t_cols, t_perm). The CPU backend does
#       both in one pass over S; the others compose spmm and sddmm.
#   folded_linear(x, weight, bias, values, struct, scale) -> x·(W + scale·S)ᵀ + b, and
#   folded_linear_grad_x(gy, weight, values, struct, scale) -> gy·(W + scale·S): the fold
#       strategy. The CPU backend folds S into W as W is read; the others compose a dense
#       matmul and spmm.
# ---------------------------------------------------------------------------------------------
def _register_composites(backend: str) -> None:
    """spmm_t_sddmm and the fold as ``backend``'s spmm and sddmm plus a dense matmul (what the
    "spmm" strategy runs), for a backend without fused kernels for them."""
    def spmm_t_sddmm(gx, gy, x, values, struct, scale):
        rows, cols, offsets, t_offsets, t_cols, t_perm = struct
        gx = registry.lookup("spmm", backend)(gx, gy, t_offsets, t_cols,
                                              values.index_select(0, t_perm), scale,
                                              overwrite_y=True)
        return gx, _values_gradient(registry.lookup("sddmm", backend), gy, x, rows, cols,
                                    offsets)

    def folded_linear(x, weight, bias, values, struct, scale):
        _, cols, offsets, _, _, _ = struct
        return registry.lookup("spmm", backend)(F.linear(x, weight, bias), x, offsets, cols,
                                                values, scale, overwrite_y=True)

    def folded_linear_grad_x(gy, weight, values, struct, scale):
        _, _, _, t_offsets, t_cols, t_perm = struct
        return registry.lookup("spmm", backend)(gy @ weight, gy, t_offsets, t_cols,
                                                values.index_select(0, t_perm), scale,
                                                overwrite_y=True)
    for fn in (spmm_t_sddmm, folded_linear, folded_linear_grad_x):
        registry.register(fn.__name__, backend, fn)


def _triton_kernels():
    from ..triton import sparse_delta
    return sparse_delta


# reference: the specification; the fused parts composed of it.
registry.register("spmm", "reference", spmm_reference)
registry.register("sddmm", "reference", sddmm_reference)
registry.register("scatter_add", "reference", scatter_add_reference)
_register_composites("reference")

# triton (shira_kernels/triton/sparse_delta.py).
registry.register_module("triton", _triton_kernels, "spmm", "sddmm", "scatter_add")
_register_composites("triton")

# cuda (csrc/cuda/bindings.cpp).
registry.register_module("cuda", functools.partial(_native.module, "cuda"),
                         "spmm", "sddmm", "scatter_add")
_register_composites("cuda")

# cpu (csrc/cpu/bindings.cpp): the parts as bound; the fused backward and the fold take S's
# structure as separate tensors, and the fold and its gradient are one binding (grad_x).
registry.register_module("cpu", functools.partial(_native.module, "cpu"),
                         "spmm", "sddmm", "scatter_add")


@functools.partial(registry.register_lazy, "spmm_t_sddmm", "cpu")
def _cpu_spmm_t_sddmm():
    fused = _native.module("cpu").spmm_t_sddmm

    def spmm_t_sddmm(gx, gy, x, values, struct, scale):
        _, _, _, t_offsets, t_cols, t_perm = struct
        return fused(gx, gy, x, t_offsets, t_cols, t_perm, values, scale, overwrite_gx=True)
    return spmm_t_sddmm


@functools.partial(registry.register_lazy, "folded_linear", "cpu")
def _cpu_folded_linear():
    fold = _native.module("cpu").folded_linear

    def folded_linear(x, weight, bias, values, struct, scale):
        _, cols, offsets, _, _, _ = struct
        return fold(x, weight, bias, offsets, cols, None, values, scale, False)
    return folded_linear


@functools.partial(registry.register_lazy, "folded_linear_grad_x", "cpu")
def _cpu_folded_linear_grad_x():
    fold = _native.module("cpu").folded_linear

    def folded_linear_grad_x(gy, weight, values, struct, scale):
        _, _, _, t_offsets, t_cols, t_perm = struct
        return fold(gy, weight, None, t_offsets, t_cols, t_perm, values, scale, True)
    return folded_linear_grad_x


_ROW_BLOCKS = TensorCache()


def _row_blocks(rows, cols, offsets, n_in: int, rows_per_block: int):
    """[(first row, entry range, entries' flat index in the block)], cached per index tensor."""
    key = (rows_per_block, n_in)
    cached = _ROW_BLOCKS.get(rows, key)
    if cached is not None:
        return cached
    starts = offsets.tolist()  # once per structure (a device sync on CUDA)
    n_out = len(starts) - 1
    blocks = []
    for r0 in range(0, n_out, rows_per_block):
        a, b = starts[r0], starts[min(r0 + rows_per_block, n_out)]
        if b > a:
            local = (rows[a:b].long() - r0) * n_in + cols[a:b].long()
            blocks.append((r0, a, b, local))
    return _ROW_BLOCKS.put(rows, blocks, key)


def _values_gradient(sddmm, gy, x, rows, cols, offsets):
    """A backend's sddmm, or on CUDA for many tokens the dense row blocks (sddmm_row_blocks)."""
    if (gy.is_cuda and gy.shape[0] >= tuning.lookup("dense_sddmm_from_tokens", "cuda")
            and sddmm is not sddmm_reference):
        return sddmm_row_blocks(gy, x, rows, cols, offsets)
    return sddmm(gy, x, rows, cols, offsets)


def sddmm_row_blocks(gy, x, rows, cols, offsets, block_bytes: int | None = None):
    """sddmm as row blocks of the dense gyᵀ·x (fp32 result, at most block_bytes of it at a
    time), each read at S's entries in those rows. On a GPU the products run on tensor cores,
    far faster than gathering per entry once there are many tokens."""
    if block_bytes is None:
        block_bytes = tuning.lookup("sddmm_block_bytes", gy.device.type, None,
                                    SDDMM_BLOCK_BYTES)
    n_in = x.shape[1]
    per = max(1, block_bytes // (4 * n_in))
    g = torch.empty(rows.numel(), dtype=torch.float32, device=gy.device)
    for r0, a, b, local in _row_blocks(rows, cols, offsets, n_in, per):
        lhs = gy[:, r0:r0 + per].T
        if gy.is_cuda and gy.dtype != torch.float32:
            block = torch.mm(lhs, x, out_dtype=torch.float32)  # fp32 sums, not rounded to bf16
        else:
            block = lhs.float() @ x.float()
        g[a:b] = block.view(-1)[local]
    return g


# ---------------------------------------------------------------------------------------------
# torch.library ops with fake kernels.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("shira::spmm", mutates_args=())
def _spmm_op(y: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, cols: torch.Tensor,
             values: torch.Tensor, scale: float) -> torch.Tensor:
    return registry.kernel("spmm", y.device)(y.contiguous(), x.contiguous(), offsets, cols,
                                             values.contiguous(), scale)


@_spmm_op.register_fake
def _(y, x, offsets, cols, values, scale):
    return torch.empty_like(y)


@torch.library.custom_op("shira::sddmm", mutates_args=())
def _sddmm_op(gy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor,
              cols: torch.Tensor) -> torch.Tensor:
    return registry.kernel("sddmm", gy.device)(gy.contiguous(), x.contiguous(), rows, cols)


@_sddmm_op.register_fake
def _(gy, x, rows, cols):
    return gy.new_empty(rows.shape, dtype=torch.float32)


@torch.library.custom_op("shira::csr_add", mutates_args=("out",))
def _csr_add_op(weight: torch.Tensor, flat_indices: torch.Tensor, values: torch.Tensor,
                scale: float, out: torch.Tensor) -> None:
    with reading(weight):
        _csr_add_holding(weight, flat_indices, values, scale, out)


def _csr_add_holding(weight, flat_indices, values, scale, out) -> None:
    """csr_add's body, for callers that hold W's lock already (it is not reentrant)."""
    if out.data_ptr() != weight.data_ptr():
        out.copy_(weight)
    skipped = registry.kernel("scatter_add", weight.device)(out, weight, flat_indices,
                                                            values.contiguous(), scale)
    if skipped:
        raise_outside(skipped, [flat_indices])


@_csr_add_op.register_fake
def _(weight, flat_indices, values, scale, out):
    return None


# Scratch buffers, one per (kind, shape, dtype, device) and thread, reused by every layer of
# that shape: no allocation (or page faults) per call, and for "swap" a stable address, so
# scatter_swap_'s launch table is built once.
_scratch = threading.local()


def _scratch_buffer(kind: str, like: torch.Tensor, shape) -> torch.Tensor:
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (kind, tuple(shape), like.dtype, like.device)
    buf = buffers.get(key)
    if buf is None:
        with torch.inference_mode(False):  # kept for later calls, also outside inference_mode
            buf = buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf


def _merged_weight(weight, flat, values, scale) -> torch.Tensor:
    buf = _scratch_buffer("merge", weight, weight.shape)
    _csr_add_holding(weight, flat, values, scale, buf)
    return buf


@contextlib.contextmanager
def _adapted_in_place(weight, flat, values, scale):
    """W + scale·S stands in W's entries for the duration; then the base bits go back."""
    # .data: the temporary write is invisible to autograd's version counter, so W saved for
    # another backward stays valid (it is restored bit for bit before anyone could read it).
    w = weight.data
    saved = _scratch_buffer("swap", w, flat.shape)
    # One pass: W[idx] += scale·S (fp32, rounded once) while the base bits go to `saved`.
    skipped = registry.kernel("scatter_add", w.device)(w, w, flat, values.contiguous(), scale,
                                                       saved)
    if skipped:  # the kernel skipped indices outside W: put back the entries it did write
        swap_in_range([w], [flat], [saved])
        raise_outside(skipped, [flat])
    try:
        yield
    finally:
        swap_unchecked([w], [flat], [saved])


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            values: torch.Tensor, flat: torch.Tensor, offsets: torch.Tensor, cols: torch.Tensor,
            rows: torch.Tensor, t_offsets: torch.Tensor, t_cols: torch.Tensor,
            t_perm: torch.Tensor, scale: float, strategy: str) -> torch.Tensor:
    # "swap" writes W for the length of the call: it holds W's lock exclusively, the other
    # strategies (which read W) hold it shared (_concurrency.py).
    lock = weight_lock(weight)
    if strategy == "swap":
        lock.acquire_exclusive()
        try:
            with _adapted_in_place(weight, flat, values, scale):
                return F.linear(x, weight, bias)
        finally:
            lock.release_exclusive()
    lock.acquire_shared()
    try:
        return _linear_reading(x, weight, bias, values, flat, offsets, cols, rows, t_offsets,
                               t_cols, t_perm, scale, strategy)
    finally:
        lock.release_shared()


def _linear_reading(x, weight, bias, values, flat, offsets, cols, rows, t_offsets, t_cols,
                    t_perm, scale, strategy):
    if strategy == "fold":
        return registry.kernel("folded_linear", x.device)(
            x.contiguous(), weight, bias, values.contiguous(),
            (rows, cols, offsets, t_offsets, t_cols, t_perm), scale)
    if strategy == "merge":
        return F.linear(x, _merged_weight(weight, flat, values, scale), bias)
    # The parts are called directly, not through their ops: each op call costs tens of
    # microseconds of Python, as much as the GPU work of a decoding step.
    return registry.kernel("spmm", x.device)(F.linear(x, weight, bias), x.contiguous(), offsets,
                                             cols, values.contiguous(), scale, overwrite_y=True)


def _linear_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     values: torch.Tensor, flat: torch.Tensor, offsets: torch.Tensor,
                     cols: torch.Tensor, rows: torch.Tensor, t_offsets: torch.Tensor,
                     t_cols: torch.Tensor, t_perm: torch.Tensor, scale: float, strategy: str,
                     need_x: bool, need_weight: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lock = weight_lock(weight)
    exclusive = need_x and strategy == "swap"
    (lock.acquire_exclusive if exclusive else lock.acquire_shared)()
    try:
        return _backward_holding(gy, x, weight, values, flat, offsets, cols, rows, t_offsets,
                                 t_cols, t_perm, scale, strategy, need_x, need_weight)
    finally:
        (lock.release_exclusive if exclusive else lock.release_shared)()


def _backward_holding(gy, x, weight, values, flat, offsets, cols, rows, t_offsets, t_cols,
                      t_perm, scale, strategy, need_x, need_weight):
    gy, x = gy.contiguous(), x.contiguous()
    gx, gw = gy.new_empty(0), gy.new_empty(0)
    struct = (rows, cols, offsets, t_offsets, t_cols, t_perm)
    if need_x and strategy == "spmm":
        gx, g = registry.kernel("spmm_t_sddmm", gy.device)(gy @ weight, gy, x,
                                                           values.contiguous(), struct, scale)
    else:
        if need_x and strategy == "fold":
            gx = registry.kernel("folded_linear_grad_x", gy.device)(
                gy, weight, values.contiguous(), struct, scale)
        elif need_x and strategy == "merge":
            gx = gy @ _merged_weight(weight, flat, values, scale)
        elif need_x:
            with _adapted_in_place(weight, flat, values, scale):
                gx = gy @ weight
        g = _values_gradient(registry.kernel("sddmm", gy.device), gy, x, rows, cols, offsets)
    gvalues = (g if scale == 1.0 else scale * g).to(values.dtype)
    if need_weight:
        gw = gy.T @ x
    return gx, gvalues, gw


_linear_op = torch.library.custom_op("shira::sparse_delta_linear", mutates_args=())(_linear)
_linear_backward_op = torch.library.custom_op("shira::sparse_delta_linear_backward",
                                              mutates_args=())(_linear_backward)


@_linear_op.register_fake
def _(x, weight, bias, values, flat, offsets, cols, rows, t_offsets, t_cols, t_perm, scale,
      strategy):
    return x.new_empty((x.shape[0], weight.shape[0]))


@_linear_backward_op.register_fake
def _(gy, x, weight, values, flat, offsets, cols, rows, t_offsets, t_cols, t_perm, scale,
      strategy, need_x, need_weight):
    gx = gy.new_empty((gy.shape[0], weight.shape[1]) if need_x else (0,))
    gw = gy.new_empty(tuple(weight.shape) if need_weight else (0,))
    return gx, values.new_empty(values.shape), gw


def _setup_context(ctx, inputs, output):
    x, weight, bias, values, *struct, scale, strategy = inputs
    ctx.save_for_backward(x, weight, values, *struct)
    ctx.scale, ctx.strategy, ctx.has_bias = scale, strategy, bias is not None
    # CUDA backwards run on autograd's device thread, which does not see the forward's
    # use_backend() (a context variable): the backward re-enters the same choice.
    ctx.backend = backends.requested()


def _backward(ctx, gy, backward=_linear_backward_op):
    x, weight, values, *struct = ctx.saved_tensors
    need_x, need_w, need_b, need_v = ctx.needs_input_grad[:4]
    with backends.use_backend(ctx.backend):
        gx, gvalues, gw = backward(gy, x, weight, values, *struct, ctx.scale, ctx.strategy,
                                   need_x, need_w)
    gb = gy.sum(0) if ctx.has_bias and need_b else None
    return ((gx if need_x else None), (gw if need_w else None), gb,
            (gvalues if need_v else None)) + (None,) * 9


_linear_op.register_autograd(_backward, setup_context=_setup_context)
# Under autocast the op runs in the autocast dtype, like F.linear.
torch.library.register_autocast("shira::sparse_delta_linear", "cpu", torch.bfloat16)
torch.library.register_autocast("shira::sparse_delta_linear", "cuda", torch.float16)
_eager_linear = eager_function("_EagerLinear", _linear, _setup_context,
                               functools.partial(_backward, backward=_linear_backward))


# ---------------------------------------------------------------------------------------------
# Public functions: validate once, then call the op.
# ---------------------------------------------------------------------------------------------
def _check_delta(delta, shape=None, what: str = "") -> SparseDelta:
    if not isinstance(delta, SparseDelta):
        raise TypeError(f"delta must be a SparseDelta, got {type(delta).__name__}")
    if shape is not None:
        _check_delta_shape(delta.shape, shape, what)
    return delta


def _check_delta_shape(delta_shape, shape, what: str) -> None:
    if tuple(delta_shape) != tuple(shape):
        raise ValueError(f"delta has shape {tuple(delta_shape)} but {what} needs {tuple(shape)}")


def _check_float(name: str, t, dtype=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the other inputs have {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def spmm(y: torch.Tensor, x: torch.Tensor, delta: SparseDelta, scale: float = 1.0):
    """y + scale·x·Sᵀ for x [T, in], y [T, out], S = delta [out, in]."""
    _check_float("x", x)
    _check_float("y", y, x.dtype, x.device)
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be [T, in] and y [T, out], got {tuple(x.shape)} and {tuple(y.shape)}")
    _check_delta(delta, (y.shape[1], x.shape[1]), "y and x")
    _check_float("delta.values", delta.values, x.dtype, x.device)
    s = delta.structure
    return _spmm_op(y, x, s.row_offsets, s.cols, delta.values, check_scale(scale))


def spmm_t(gx: torch.Tensor, gy: torch.Tensor, delta: SparseDelta, scale: float = 1.0):
    """gx + scale·gy·S for gy [T, out], gx [T, in]: the gradient of x through S."""
    _check_float("gy", gy)
    _check_float("gx", gx, gy.dtype, gy.device)
    if gx.dim() != 2 or gy.dim() != 2 or gx.shape[0] != gy.shape[0]:
        raise ValueError(f"gy must be [T, out] and gx [T, in], got {tuple(gy.shape)} and {tuple(gx.shape)}")
    _check_delta(delta, (gy.shape[1], gx.shape[1]), "gy and gx")
    _check_float("delta.values", delta.values, gy.dtype, gy.device)
    s = delta.structure
    return _spmm_op(gx, gy, s.t_offsets, s.t_cols, delta.values.index_select(0, s.t_perm),
                    check_scale(scale))


def sddmm(gy: torch.Tensor, x: torch.Tensor, delta: SparseDelta) -> torch.Tensor:
    """fp32 [nnz]: Σ_t gy[t, row_j]·x[t, col_j] for each entry j of delta."""
    _check_float("gy", gy)
    _check_float("x", x, gy.dtype, gy.device)
    if gy.dim() != 2 or x.dim() != 2 or gy.shape[0] != x.shape[0]:
        raise ValueError(f"gy must be [T, out] and x [T, in], got {tuple(gy.shape)} and {tuple(x.shape)}")
    _check_delta(delta, (gy.shape[1], x.shape[1]), "gy and x")
    if delta.device != gy.device:
        raise ValueError(f"delta is on {delta.device} but gy is on {gy.device}")
    s = delta.structure
    return _sddmm_op(gy, x, s.rows, s.cols)


def csr_add(weight: torch.Tensor, delta: SparseDelta, scale: float = 1.0,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """W + scale·S (entries computed in fp32 and rounded once), into ``out`` if given."""
    _check_float("weight", weight)
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous 2-D tensor, got shape {tuple(weight.shape)}")
    _check_delta(delta, weight.shape, "weight")
    _check_float("delta.values", delta.values, weight.dtype, weight.device)
    if out is None:
        out = torch.empty_like(weight)
    else:
        _check_float("out", out, weight.dtype, weight.device)
        if out.shape != weight.shape or not out.is_contiguous():
            raise ValueError(f"out must be contiguous with shape {tuple(weight.shape)}")
    _csr_add_op(weight, delta.flat_indices, delta.values, check_scale(scale), out)
    return out


def static_strategy(device_type: str, dtype: torch.dtype, tokens: int,
                    training: bool = False) -> str:
    """The tuning table's strategy for this many tokens (what "auto" runs with tuning off);
    ``training``: the call records a backward (its strategy is the forward's)."""
    first, last = tuning.lookup("fold_training_tokens" if training else "fold_tokens",
                                device_type, dtype, (None, None))
    if first is not None and first <= tokens and (last is None or tokens <= last):
        return "fold"
    return "swap" if tokens >= tuning.lookup("swap_from_tokens", device_type, dtype, 64) else "spmm"


def auto_strategy(device: torch.device | str, dtype: torch.dtype, tokens: int,
                  training: bool = False, shape: tuple[int, int] | None = None,
                  nnz: int | None = None) -> str:
    """The strategy "auto" runs for this many tokens of this dtype on ``device`` (a layer of
    ``shape`` with ``nnz`` adapted entries): measured on this machine for the layer's class
    (tuning.decide), or the table's choice (static_strategy) when tuning is off or the layer's
    shape is not given."""
    device = torch.device(device)
    default = static_strategy(device.type, dtype, tokens, training)
    if shape is None or nnz is None or not nnz or tuning.mode() == "off":
        return default
    token_class = next((c for c in _TOKEN_CLASSES if tokens <= c), _TOKEN_CLASSES[-1])
    return _tuned_strategy(str(device), dtype, int(shape[0]), int(shape[1]), int(nnz),
                           token_class, bool(training), default)


STRATEGY_DECISION = "sparse_delta_linear.strategy"
# Token classes: a decision is measured once per class, at its upper end.
_TOKEN_CLASSES = (1, 4, 16, 64, 256, 1024, 4096)


def _strategy_key(device: torch.device, dtype: torch.dtype, out_f: int, in_f: int, nnz: int,
                  tokens: int, training: bool) -> tuple:
    """The decision's key: where it runs (the GPU, or the CPU threads torch uses), the backend
    asked for, the dtype, the layer's shape, its number of entries to the nearest power of two,
    the token class and training or not."""
    where = (f"{torch.cuda.get_device_name(device)} "
             f"sm{''.join(map(str, torch.cuda.get_device_capability(device)))}"
             if device.type == "cuda" else f"cpu {torch.get_num_threads()} threads")
    nnz_class = min(1 << round(math.log2(max(nnz, 1))), out_f * in_f)
    return (where, backends.requested() or "auto", str(dtype).removeprefix("torch."),
            f"{out_f}x{in_f}", nnz_class, tokens, "training" if training else "inference")


def strategy_entry(device, dtype: torch.dtype, tokens: int, training: bool, shape,
                   nnz: int) -> dict | None:
    """The tuned decision behind auto_strategy for these arguments (value, each candidate's
    ms, how it was measured), or None where none was made in this process."""
    token_class = next((c for c in _TOKEN_CLASSES if tokens <= c), _TOKEN_CLASSES[-1])
    key = _strategy_key(torch.device(device), dtype, int(shape[0]), int(shape[1]), int(nnz),
                        token_class, training)
    return tuning.entry(STRATEGY_DECISION, key)


_decided = tuning.memo()  # the arguments of _tuned_strategy → its result, for this process


@torch.compiler.assume_constant_result  # decided at trace time: no graph break, no recompile
def _tuned_strategy(device: str, dtype: torch.dtype, out_f: int, in_f: int, nnz: int,
                    tokens: int, training: bool, default: str) -> str:
    # A layer's forward asks this once per call: a dict lookup on the raw arguments (and what
    # else the key depends on) first, the key and the decision only the first time.
    fast = (device, dtype, out_f, in_f, nnz, tokens, training, default, tuning.mode(),
            backends.requested(), torch.get_num_threads())
    value = _decided.get(fast)
    if value is None:
        dev = torch.device(device)
        key = _strategy_key(dev, dtype, out_f, in_f, nnz, tokens, training)
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None
        make = functools.partial(_strategy_calls, dev, dtype, (out_f, in_f), key[4], tokens,
                                 training)
        value = tuning.decide(STRATEGY_DECISION, key, default,
                              lambda: tuning.measure_sliced(make, out_f, sync=sync))
        if value not in STRATEGIES[1:]:  # a cache file written by another version
            value = default
        _decided[fast] = value
    return value


def _strategy_calls(device: torch.device, dtype: torch.dtype, shape: tuple[int, int], nnz: int,
                    tokens: int, training: bool, rows: int) -> dict:
    """{strategy: a call running it} on ``rows`` output rows of a layer like the one asked
    about (its width, dtype and density of entries, spread at random), forward and, for
    ``training``, the backward of x and of S's values, through the op bodies (lock-free: these
    tensors are the call's own). Values do not change the time: W is a constant."""
    in_f = shape[1]
    gen = torch.Generator().manual_seed(rows)
    entries = max(1, round(nnz * rows / shape[0]))
    flat = torch.randint(0, rows * in_f, (entries,), generator=gen).unique()
    flat = flat.to(flat_index_dtype((rows, in_f))).to(device)
    s = SparseStructure.build(flat, (rows, in_f))
    values = torch.full((flat.numel(),), 1e-3, dtype=dtype, device=device)
    weight = torch.full((rows, in_f), 0.01, dtype=dtype, device=device)
    x = torch.empty(tokens, in_f, dtype=dtype, device=device).uniform_(-1, 1)
    gy = torch.empty(tokens, rows, dtype=dtype, device=device).uniform_(-1, 1)
    struct = (s.row_offsets, s.cols, s.rows, s.t_offsets, s.t_cols, s.t_perm)
    names = ["spmm", "swap"]
    if backends.select(device) == "cpu":  # elsewhere "fold" is composed as "spmm" is
        names.insert(0, "fold")

    def call(strategy: str):
        def run():
            if strategy == "swap":
                with _adapted_in_place(weight, flat, values, 1.0):
                    F.linear(x, weight, None)
            else:
                _linear_reading(x, weight, None, values, flat, *struct, 1.0, strategy)
            if training:
                _backward_holding(gy, x, weight, values, flat, *struct, 1.0, strategy,
                                  True, False)
        return run
    return {name: call(name) for name in names}


def sparse_delta_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        delta: SparseDelta, scale: float = 1.0, strategy: str = "auto"):
    """x·(W + scale·S)ᵀ + b for x of any leading shape [..., in]; differentiable in x, S's
    values, the bias and (only if it requires grad) W."""
    _check_delta(delta)
    return linear_of_parts(x, weight, bias, delta.shape, delta.values, delta.flat_indices,
                           delta.structure, scale, strategy)


def linear_of_parts(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    delta_shape, values: torch.Tensor, flat_indices: torch.Tensor, structure,
                    scale: float = 1.0, strategy: str = "auto"):
    """sparse_delta_linear with the delta as its parts (shape, values, flat indices and their
    SparseStructure), which the caller keeps canonical, as ShiraLinear does with its buffers:
    no SparseDelta is built per call (its checks take longer than a small layer's matmul)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    _check_float("x", x)
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = None if autocast else x.dtype
    _check_float("weight", weight, dtype, x.device)
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous 2-D tensor, got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dim must be in_features = "
                         f"{weight.shape[1]}")
    if bias is not None:
        _check_float("bias", bias, dtype, x.device)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    _check_delta_shape(delta_shape, weight.shape, "weight")
    _check_float("delta.values", values, dtype, x.device)
    x2 = x.reshape(-1, x.shape[-1])
    if strategy == "auto":
        run_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        training = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or values.requires_grad
            or (bias is not None and bias.requires_grad))
        strategy = auto_strategy(x.device, run_dtype, x2.shape[0], training, weight.shape,
                                 values.shape[0])
    s = structure
    run = _linear_op if via_op(x) else _eager_linear
    y = run(x2, weight, bias, values, flat_indices, s.row_offsets, s.cols, s.rows,
            s.t_offsets, s.t_cols, s.t_perm, check_scale(scale), strategy)
    return y.view(*x.shape[:-1], weight.shape[0])
