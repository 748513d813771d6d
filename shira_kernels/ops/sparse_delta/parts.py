"""The parts of the sparse-delta matmul, each a torch.library op with reference, cpu, triton
and cuda kernels (registered in ops/registry.py under (part, backend), every one in its
reference's signature, naive.py):
  spmm       y + scale·x·Sᵀ for S in CSR          (forward; spmm_t, with Sᵀ's CSR: gx += gy·S)
  sddmm      g[j] = Σ_t gy[t, row_j]·x[t, col_j]   (gradient of S's values: no dense m×n grad)
  add_delta  out = W + scale·S                     (copy W, then add_at_indices on S's entries)
Here: their kernel registrations per backend (with the fused spmm_t_sddmm and the fold that
sparse_delta_linear's strategies run), the ops with fake kernels, and the public functions;
last, sparse_product_add: y + scale·x·Sᵀ differentiable in y, x and S's values, for layers that
have no float W (a quantized base, a bare sparse matrix).
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.nn.functional as F

from ... import _native, backends, tuning
from ..._checks import TensorCache, check_float_tensor, check_scale
from ..._concurrency import reading
from ...formats import SparseDelta, SparseStructure
from .. import registry
from .._eager import eager_function, looped_under_vmap, via_op
from ..scatter_swap import raise_outside
from .naive import add_at_indices_reference, sddmm_reference, spmm_reference

# The measured decisions of the dense sddmm are rows of the tuning table
# (shira_kernels/tuning.py); these names are read-only views of it, kept for code that reads them.
DENSE_SDDMM_FROM_TOKENS = tuning.view("dense_sddmm_from_tokens")["cuda"]
SDDMM_BLOCK_BYTES = tuning.view("sddmm_block_bytes")["cuda"]


# ---------------------------------------------------------------------------------------------
# Kernels per backend (registry.py), each in its reference's signature:
#   spmm(y, x, offsets, cols, values, scale, overwrite_y=False) -> y + scale·x·Sᵀ; with
#       overwrite_y (the caller no longer needs y) a kernel may write the result into y.
#   sddmm(gy, x, rows, cols, offsets=None) -> fp32 [nnz], the gradient of S's values; offsets
#       (S's CSR row offsets, when the caller has them) spare the CPU kernel deriving them.
#   add_at_indices(out, weight, flat, values, scale, saved=None) -> int: out[flat] =
#       weight[flat] + scale·values (assigned, not accumulated: flat is unique); saved, if
#       given, gets weight[flat] first. Every index is checked against the weight's size:
#       entries outside are skipped (never read or written) and their count returned.
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
    from ...triton import sparse_delta
    return sparse_delta


# reference: the specification; the fused parts composed of it.
registry.register("spmm", "reference", spmm_reference)
registry.register("sddmm", "reference", sddmm_reference)
registry.register("add_at_indices", "reference", add_at_indices_reference)
_register_composites("reference")

# triton (shira_kernels/triton/sparse_delta.py).
registry.register_module("triton", _triton_kernels, "spmm", "sddmm", "add_at_indices")
_register_composites("triton")

# cuda (csrc/cuda/bindings.cpp).
registry.register_module("cuda", functools.partial(_native.module, "cuda"),
                         "spmm", "sddmm", "add_at_indices")
_register_composites("cuda")

# cpu (csrc/cpu/bindings.cpp): the parts as bound; the fused backward and the fold take S's
# structure as separate tensors, and the fold and its gradient are one binding (grad_x).
registry.register_module("cpu", functools.partial(_native.module, "cpu"),
                         "spmm", "sddmm", "add_at_indices")


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


@torch.library.custom_op("shira::add_delta", mutates_args=("out",))
def _add_delta_op(weight: torch.Tensor, flat_indices: torch.Tensor, values: torch.Tensor,
                  scale: float, out: torch.Tensor) -> None:
    with reading(weight):
        _add_delta_holding(weight, flat_indices, values, scale, out)


def _add_delta_holding(weight, flat_indices, values, scale, out) -> None:
    """add_delta's body, for callers that hold W's lock already (it is not reentrant)."""
    if out.data_ptr() != weight.data_ptr():
        out.copy_(weight)
    skipped = registry.kernel("add_at_indices", weight.device)(out, weight, flat_indices,
                                                               values.contiguous(), scale)
    if skipped:
        raise_outside(skipped, [flat_indices])


@_add_delta_op.register_fake
def _(weight, flat_indices, values, scale, out):
    return None


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


def _check_operands(delta, first, second, values: bool = True) -> None:
    """Two [T, features] operands, each (name, tensor, "in" | "out"): floating, of the first's
    dtype and device, with the same T, and delta [out, in] between them. ``values``: the op
    reads S's values, so they too must be of that dtype (else delta need only be on that
    device)."""
    (name_a, a, side_a), (name_b, b, side_b) = first, second
    check_float_tensor(name_a, a)
    check_float_tensor(name_b, b, a.dtype, a.device)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} must be [T, {side_a}] and {name_b} [T, {side_b}], "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    sides = {side_a: (name_a, a), side_b: (name_b, b)}
    (out_name, out), (in_name, in_) = sides["out"], sides["in"]
    _check_delta(delta, (out.shape[1], in_.shape[1]), f"{out_name} and {in_name}")
    if values:
        check_float_tensor("delta.values", delta.values, a.dtype, a.device)
    elif delta.device != a.device:
        raise ValueError(f"delta is on {delta.device} but {name_a} is on {a.device}")


def spmm(y: torch.Tensor, x: torch.Tensor, delta: SparseDelta, scale: float = 1.0):
    """y + scale·x·Sᵀ for x [T, in], y [T, out], S = delta [out, in]."""
    _check_operands(delta, ("x", x, "in"), ("y", y, "out"))
    s = delta.structure
    return _spmm_op(y, x, s.row_offsets, s.cols, delta.values, check_scale(scale))


def spmm_t(gx: torch.Tensor, gy: torch.Tensor, delta: SparseDelta, scale: float = 1.0):
    """gx + scale·gy·S for gy [T, out], gx [T, in]: the gradient of x through S."""
    _check_operands(delta, ("gy", gy, "out"), ("gx", gx, "in"))
    s = delta.structure
    return _spmm_op(gx, gy, s.t_offsets, s.t_cols, delta.values.index_select(0, s.t_perm),
                    check_scale(scale))


def sddmm(gy: torch.Tensor, x: torch.Tensor, delta: SparseDelta) -> torch.Tensor:
    """fp32 [nnz]: Σ_t gy[t, row_j]·x[t, col_j] for each entry j of delta."""
    _check_operands(delta, ("gy", gy, "out"), ("x", x, "in"), values=False)
    s = delta.structure
    return _sddmm_op(gy, x, s.rows, s.cols)


def add_delta(weight: torch.Tensor, delta: SparseDelta, scale: float = 1.0,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """W + scale·S (entries computed in fp32 and rounded once), into ``out`` if given."""
    check_float_tensor("weight", weight)
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous 2-D tensor, got shape {tuple(weight.shape)}")
    _check_delta(delta, weight.shape, "weight")
    check_float_tensor("delta.values", delta.values, weight.dtype, weight.device)
    if out is None:
        out = torch.empty_like(weight)
    else:
        check_float_tensor("out", out, weight.dtype, weight.device)
        if out.shape != weight.shape or not out.is_contiguous():
            raise ValueError(f"out must be contiguous with shape {tuple(weight.shape)}")
    _add_delta_op(weight, delta.flat_indices, delta.values, check_scale(scale), out)
    return out


def csr_add(weight: torch.Tensor, delta: SparseDelta, scale: float = 1.0,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Deprecated name of add_delta (S comes as flat indices, not as CSR)."""
    warnings.warn("csr_add is deprecated, use add_delta (S is given by flat indices, not CSR)",
                  DeprecationWarning, stacklevel=2)
    return add_delta(weight, delta, scale, out)


# ---------------------------------------------------------------------------------------------
# The sparse product alone, with autograd (no base weight: a quantized base's output, or a
# bare sparse matrix as MoSA's bottleneck).
# ---------------------------------------------------------------------------------------------
def _spmm_t_sddmm(gx, gy, x, values, struct, scale):
    return registry.kernel("spmm_t_sddmm", gy.device)(gx, gy, x, values, struct, scale)


def _sddmm(gy, x, rows, cols, offsets):
    return registry.kernel("sddmm", gy.device)(gy, x, rows, cols, offsets)


# The backward's kernels as torch.func's vmap takes them (vmap(grad(...))).
_looped_spmm_t_sddmm = looped_under_vmap("_SpmmTSddmm", _spmm_t_sddmm)
_looped_sddmm = looped_under_vmap("_Sddmm", _sddmm)


def _product_add(y, x, values, rows, cols, offsets, t_offsets, t_cols, t_perm, scale, use_ops):
    """y + scale·x·Sᵀ for 2-D y [T, out], x [T, in] and values of y's dtype. ``use_ops``:
    through the shira::spmm / shira::sddmm ops (torch.compile, autocast), else the backend's
    kernels directly (an op call costs tens of microseconds of Python)."""
    if use_ops:
        return torch.ops.shira.spmm(y, x, offsets, cols, values, scale)
    # Not overwrite_y: y is the base's output, which a forward hook may have kept.
    return registry.kernel("spmm", y.device)(y, x, offsets, cols, values, scale)


def _product_setup(ctx, inputs, output):
    _, x, values, rows, cols, offsets, t_offsets, t_cols, t_perm, scale, use_ops = inputs
    ctx.save_for_backward(x, values, rows, cols, offsets, t_offsets, t_cols, t_perm)
    ctx.scale, ctx.use_ops = scale, use_ops
    # Autograd's device thread does not see use_backend(): the backward re-enters the
    # forward's explicit choice (not read while tracing: a context variable breaks the graph).
    ctx.backend = None if torch.compiler.is_compiling() else backends.requested()


def _product_backward(ctx, gy):
    x, values, rows, cols, offsets, t_offsets, t_cols, t_perm = ctx.saved_tensors
    need_y, need_x, need_v = ctx.needs_input_grad[:3]
    gy, scale = gy.contiguous(), ctx.scale
    gx = g = None
    with (backends.use_backend(ctx.backend) if ctx.backend is not None
          else contextlib.nullcontext()):
        if ctx.use_ops:
            if need_x:
                gx = torch.ops.shira.spmm(gy.new_zeros(x.shape), gy, t_offsets, t_cols,
                                          values.index_select(0, t_perm), scale)
            if need_v:
                g = torch.ops.shira.sddmm(gy, x, rows, cols)
        elif need_x:  # gx and the values' gradient in one pass over S (CPU)
            struct = (rows, cols, offsets, t_offsets, t_cols, t_perm)
            gx, g = _looped_spmm_t_sddmm(gy.new_zeros(x.shape), gy, x, values, struct, scale)
        elif need_v:
            g = _looped_sddmm(gy, x, rows, cols, offsets)
    gvalues = None
    if need_v:
        gvalues = (g if scale == 1.0 else scale * g).to(values.dtype)
    return (gy if need_y else None), (gx if need_x else None), gvalues, *([None] * 8)


_sparse_product_add = eager_function("_SparseProductAdd", _product_add, _product_setup,
                                     _product_backward, differentiable=(0, 1, 2))


def sparse_product_add(y: torch.Tensor, x: torch.Tensor, delta: SparseDelta,
                       scale: float = 1.0) -> torch.Tensor:
    """y + scale·x·Sᵀ for x [..., in], y [..., out] and S = delta [out, in], computed in y's
    dtype (x and S's values are cast to it); differentiable in y, x and S's values (gx by
    spmm_t, the values' gradient by sddmm: no dense m×n tensor either way)."""
    if not isinstance(delta, SparseDelta):
        raise TypeError(f"delta must be a SparseDelta, got {type(delta).__name__}")
    return sparse_product_add_unpacked(y, x, delta.shape, delta.values, delta.structure, scale)


def sparse_product_add_unpacked(y: torch.Tensor, x: torch.Tensor, delta_shape,
                                values: torch.Tensor, structure: SparseStructure,
                                scale: float = 1.0) -> torch.Tensor:
    """sparse_product_add with the delta as (shape, values, structure), which the caller keeps
    canonical (a layer's buffers): no SparseDelta is built per call."""
    check_float_tensor("y", y)
    check_float_tensor("x", x, device=y.device)
    check_float_tensor("values", values, device=y.device)
    out_f, in_f = (int(n) for n in delta_shape)
    if x.dim() == 0 or x.shape[-1] != in_f:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dim must be in_features = "
                         f"{in_f}")
    if y.shape[-1:] != (out_f,) or y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"y has shape {tuple(y.shape)}; expected {(*x.shape[:-1], out_f)} "
                         f"for x of shape {tuple(x.shape)}")
    if values.dim() != 1 or values.numel() != structure.rows.numel():
        raise ValueError(f"values has shape {tuple(values.shape)} but the structure has "
                         f"{structure.rows.numel()} entries")
    dtype = y.dtype
    x2 = x.reshape(-1, in_f).to(dtype).contiguous()
    y2 = y.reshape(-1, out_f).contiguous()
    s = structure
    out = _sparse_product_add(y2, x2, values.to(dtype).contiguous(), s.rows, s.cols,
                              s.row_offsets, s.t_offsets, s.t_cols, s.t_perm, check_scale(scale),
                              via_op(x))
    return out.view(y.shape)
