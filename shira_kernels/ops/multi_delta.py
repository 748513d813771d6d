"""Many sparse adapters in one batch: each row of x through the base weight plus its own
adapter's delta (SGMV's idea, as punica and S-LoRA serve many LoRAs, for SHiRA).

  multi_delta_linear(x, weight, bias, delta_set, row_adapter)
      y[t] = x[t]·(W + scale_a·S_a)ᵀ + b  with a = row_adapter[t]; a = -1: the base alone

One dense matmul for the whole batch (torch's, or on the CPU this package's fold kernel with
no entries where that measured faster on the machine: BASES below); then the rows are grouped
by adapter (a stable sort of row_adapter) and every group's sparse product is added to its
rows' outputs by the backend's grouped_spmm: on Triton and CUDA one launch for all groups
(SGMV's idea), on the CPU the backend's spmm per group on the gathered rows. With torch's
matmul as the base (always with tuning off), per row the result is the same bits as
sparse_delta_linear's "spmm" strategy on the same batch with that row's adapter (the same
dense matmul, and spmm's sum for a token does not depend on the other tokens; on the CPU a
group of one row takes the kernels' one-token path, whose sum is ordered differently; on CUDA
the lanes per row follow the adapters' average row length, as spmm's do for one adapter). The
backward gives x its gradient (gy·W plus each group's gy·S_a) and the set's values buffer
each adapter's own in its segment (the group's sddmm), so one batch can train many adapters;
the weight is only read, under its lock (no swap can change it meanwhile). Triton and CUDA
run the forward's and the backward's sparse parts in one launch each for all groups; the CPU
one call per adapter present.

The op's inputs are the set's packed buffers (formats.SparseDeltaSetState): the same dozen
tensors whatever the number of adapters in the set, so its cost per call, eager or compiled,
does not grow with adapters the batch does not use.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .. import _native, backends, tuning
from .._checks import check_float_tensor, check_linear
from .._concurrency import reading
from ..formats import SparseDeltaSet, SparseStructure
from . import registry
from ._eager import run_in_the_autocast_dtype
from .._group_tables import sddmm_tables, spmm_tables
from .sparse_delta.linear import _SLICE_BYTES, _backward_kind
from .sparse_delta.naive import spmm_reference
from .sparse_delta.parts import _triton_kernels


# ---------------------------------------------------------------------------------------------
# Reference: the specification.
# ---------------------------------------------------------------------------------------------
def multi_delta_linear_reference(x, weight, bias, deltas, scales, row_adapter) -> torch.Tensor:
    """Row by row in float64: x[t]·(W + scale_a·S_a)ᵀ + b for a = row_adapter[t] (deltas[a],
    scales[a]; -1 the base alone), rounded once to x's dtype. x [N, in], row_adapter [N]."""
    y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float64, device=x.device)
    for a in torch.unique(row_adapter).tolist():
        rows = (row_adapter == a).nonzero().view(-1)
        w = weight.double()
        if a >= 0:
            w = w + scales[a] * deltas[a].to_dense(torch.float64)
        y[rows] = F.linear(x[rows].double(), w, None if bias is None else bias.double())
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Kernels per backend, over the groups (rows = order[b0:b1] for each (b0, b1) of bounds, s its
# slot; every adapter's fields where the set keeps them: its entries at [e0, e1) of the entry
# buffers, its row offsets (counted from e0) at offsets[o : o + rows + 1], (e0, e1, o) =
# starts[s] (the set's segments), for the slots present only; scales[s] its scale):
#   grouped_spmm(y, x, order, bounds, slots, starts, offsets, cols, values, scales) -> y, in
#       place: y[rows] += scales[s]·x[rows]·S_sᵀ
#   grouped_backward(gx, gy, x, order, bounds, slots, starts, buffers, scales, need_x)
#       -> (gx with gx[rows] += scales[s]·gy[rows]·S_s if need_x, the values' gradient: like
#       values, scales[s]·sddmm(gy[rows], x[rows]) at each present adapter's entries, 0
#       elsewhere); buffers = (values, cols, rows, t_cols, t_perm, offsets), the set's, and
#       starts[s]'s o is its row offsets' (the transposed ones follow them)
# Triton and CUDA: one launch each for all groups (triton/sparse_delta.py grouped_spmm and
# grouped_sddmm; csrc/cuda/sparse_delta.cu, on the tables of _group_tables.py), reading the
# set's buffers in place; the reference and the CPU: the backend's spmm / spmm_t_sddmm / sddmm
# per group on the gathered rows and views of the buffers (on the CPU each call is one
# parallel region, and the backward one fused pass over S per group).
# ---------------------------------------------------------------------------------------------
def _runs(order: torch.Tensor, bounds) -> list:
    """Per group, slice(r0, r1) where its rows are the batch's rows r0 .. r1 - 1 (one run: an
    adapter per sequence, or a batch sorted by adapter), else the row indices order[b0:b1].
    A run is served by views of x, y and the gradients, without gathering and scattering
    them; the kernels get the same rows either way, so the same bits. (A group's rows ascend
    and are distinct, so they are one run iff the last minus the first is the count less
    one.)"""
    if not bounds:
        return []
    ends = torch.tensor([b for b0, b1 in bounds for b in (b0, b1 - 1)], device=order.device)
    ends = order.index_select(0, ends).tolist()
    return [slice(first, last + 1) if last - first == b1 - b0 - 1 else order[b0:b1]
            for (b0, b1), first, last in zip(bounds, ends[::2], ends[1::2])]


def _rows_of(t: torch.Tensor, rows) -> torch.Tensor:
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _put_rows(t: torch.Tensor, rows, part: torch.Tensor) -> None:
    """t's ``rows`` (as _runs gives them) set to ``part``; nothing to do where a kernel wrote
    into t's rows in place (overwrite_y on a view of a run)."""
    if not isinstance(rows, slice):
        t.index_copy_(0, rows, part)
    elif part.data_ptr() != t[rows].data_ptr():
        t[rows].copy_(part)


def _grouped_by(spmm):
    def grouped_spmm(y, x, order, bounds, slots, starts, offsets, cols, values, scales):
        n = y.shape[1] + 1
        for rows, s in zip(_runs(order, bounds), slots):
            e0, e1, o = starts[s]
            ya = spmm(_rows_of(y, rows), _rows_of(x, rows), offsets[o:o + n], cols[e0:e1],
                      values[e0:e1], scales[s], overwrite_y=True)
            _put_rows(y, rows, ya)
        return y
    return grouped_spmm


def _backward_by(backend: str):
    """grouped_backward as one call per group: the backend's fused spmm_t_sddmm (gx and the
    values' gradient; the CPU does both in one pass over S), or its sddmm alone."""
    def grouped_backward(gx, gy, x, order, bounds, slots, starts, buffers, scales, need_x):
        both = registry.lookup("spmm_t_sddmm", backend)
        sddmm = registry.lookup("sddmm", backend)
        values, cols, entry_rows, t_cols, t_perm, offsets = buffers
        out_f, in_f = gy.shape[1], x.shape[1]
        gvalues = torch.zeros_like(values)  # entries of adapters without rows: zero gradient
        for rows, s in zip(_runs(order, bounds), slots):
            e0, e1, o = starts[s]
            t_at = o + out_f + 1
            struct = (entry_rows[e0:e1], cols[e0:e1], offsets[o:t_at],
                      offsets[t_at:t_at + in_f + 1], t_cols[e0:e1], t_perm[e0:e1])
            gy_s, x_s = _rows_of(gy, rows), _rows_of(x, rows)
            if need_x:
                gx_s, g = both(_rows_of(gx, rows), gy_s, x_s, values[e0:e1], struct, scales[s])
                _put_rows(gx, rows, gx_s)
            else:
                g = sddmm(gy_s, x_s, struct[0], struct[1], struct[2])
            gvalues[e0:e1] = g if scales[s] == 1.0 else scales[s] * g
        return gx, gvalues
    return grouped_backward


def _one_launch_backward(kernels):
    """grouped_backward from a backend's one-launch grouped_spmm and grouped_sddmm
    (``kernels()`` returns them): one launch for gx (grouped_spmm over the transposed
    structures, on the values put in their order per adapter) and one for all the values'
    gradients."""
    def grouped_backward(gx, gy, x, order, bounds, slots, starts, buffers, scales, need_x):
        k = kernels()
        values, cols, entry_rows, t_cols, t_perm, offsets = buffers
        if need_x and slots:
            t_values = torch.empty_like(values)  # read at the present adapters' entries only
            t_starts = {}
            for s in slots:
                e0, e1, o = starts[s]
                torch.index_select(values[e0:e1], 0, t_perm[e0:e1], out=t_values[e0:e1])
                t_starts[s] = (e0, e1, o + gy.shape[1] + 1)
            k.grouped_spmm(gx, gy, order, bounds, slots, t_starts, offsets, t_cols, t_values,
                           scales)
        g = k.grouped_sddmm(gy, x, order, bounds, slots, starts, entry_rows, cols, scales)
        return gx, g.to(values.dtype)
    return grouped_backward


class _CudaGrouped:
    """The CUDA extension's one-launch grouped kernels (csrc/cuda/sparse_delta.cu) in the
    Triton functions' signatures, on the tables of _group_tables.py."""
    TILE_ROWS = 8        # rows of one group per tile (at most the kernel's 8)
    TILE_ENTRIES = 256   # entries per block (at most its 256 threads)

    def __init__(self):
        self._mod = _native.module("cuda")

    def grouped_spmm(self, y, x, order, bounds, slots, starts, offsets, cols, values, scales):
        if not slots or not y.shape[1]:
            return y
        t = spmm_tables(bounds, slots, starts, scales, self.TILE_ROWS, y.device)
        nnz = sum(starts[s][1] - starts[s][0] for s in slots)
        avg_row_nnz = -(-nnz // (len(slots) * y.shape[1]))  # the present adapters' rows' mean
        return self._mod.grouped_spmm(y, x, order, t.tile_group, t.tile_start, t.group_end,
                                      t.group_offsets, t.group_entries, offsets, cols, values,
                                      t.scales, self.TILE_ROWS, avg_row_nnz)

    def grouped_sddmm(self, gy, x, order, bounds, slots, starts, rows, cols, scales):
        t = sddmm_tables(bounds, slots, starts, scales, self.TILE_ENTRIES, gy.device)
        return self._mod.grouped_sddmm(gy, x, order, t.tile_group, t.tile_start, t.entry_end,
                                       t.group_rows, t.scales, rows, cols, self.TILE_ENTRIES)


_cuda_grouped = functools.lru_cache(maxsize=1)(_CudaGrouped)

registry.register("grouped_spmm", "reference", _grouped_by(spmm_reference))
registry.register("grouped_backward", "reference", _backward_by("reference"))
registry.register_module("triton", _triton_kernels, "grouped_spmm")
registry.register("grouped_backward", "triton", _one_launch_backward(_triton_kernels))
registry.register_lazy("grouped_spmm", "cuda", lambda: _cuda_grouped().grouped_spmm)
registry.register("grouped_backward", "cuda", _one_launch_backward(_cuda_grouped))
registry.register_lazy("grouped_spmm", "cpu", lambda: _grouped_by(registry.lookup("spmm", "cpu")))
registry.register("grouped_backward", "cpu", _backward_by("cpu"))


# ---------------------------------------------------------------------------------------------
# The base product x·Wᵀ + b of all rows (and gy·W in the backward): torch's matmul, or where it
# measured faster on this machine ("fold", CPU only) the fold strategy's kernel with no entries,
# this package's own matmul (on the AMD EPYC Zen 3 torch's fp32 matmul of a Llama block's
# projections took 2.5x its time at 4 rows, 1.4-1.5x at 32: multi_adapter_decode_cpu_zen3.md).
# ---------------------------------------------------------------------------------------------
BASES = ("torch", "fold")


@functools.lru_cache(maxsize=32)
def _no_entries(shape: tuple[int, int], dtype: torch.dtype, device: torch.device):
    """(values, structure) of a delta without entries: the fold kernel's plain matmul."""
    s = SparseStructure.build(torch.empty(0, dtype=torch.int64, device=device), shape)
    return (torch.empty(0, dtype=dtype, device=device),
            (s.rows, s.cols, s.row_offsets, s.t_offsets, s.t_cols, s.t_perm))


def _base_linear(x, weight, bias, base: str) -> torch.Tensor:
    if base == "fold":
        values, struct = _no_entries(tuple(weight.shape), weight.dtype, weight.device)
        return registry.kernel("folded_linear", x.device)(x, weight, bias, values, struct, 1.0)
    return F.linear(x, weight, bias)


def _base_grad_x(gy, weight, base: str) -> torch.Tensor:
    if base == "fold":
        values, struct = _no_entries(tuple(weight.shape), weight.dtype, weight.device)
        return registry.kernel("folded_linear_grad_x", gy.device)(gy, weight, values, struct, 1.0)
    return gy @ weight


def _base_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_x: bool,
                   need_weight: bool, base: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """The base product's gradients of x (on ``base``'s kernel) and of W, each empty where not
    needed; gy and x contiguous."""
    gx = _base_grad_x(gy, weight, base) if need_x else gy.new_empty(0)
    gw = gy.T @ x if need_weight else gy.new_empty(0)
    return gx, gw


BASE_DECISION = "multi_delta_linear.base"
_decided_bases = tuning.memo()


def base_choice(device: torch.device, dtype: torch.dtype, tokens: int, training: bool,
                grad_x: bool, shape: tuple[int, int]) -> str:
    """The base product's kernel (BASES) for a call of ``tokens`` rows: torch's matmul where
    tuning is off or the backend is not the CPU's, else the faster measured on this machine for
    the layer's shape, dtype, token class and backward (tuning.decide)."""
    if tuning.mode() == "off":
        return "torch"
    return _tuned_base(str(device), dtype, int(shape[0]), int(shape[1]),
                       tuning.token_class(tokens), _backward_kind(training, grad_x))


def _base_key(device: torch.device, dtype: torch.dtype, out_f: int, in_f: int, tokens: int,
              backward: str) -> tuple:
    return (tuning.place(device), backends.requested() or "auto",
            str(dtype).removeprefix("torch."), f"{out_f}x{in_f}", tuning.token_label(tokens),
            backward)


def base_entry(device, dtype: torch.dtype, tokens: int, training: bool, grad_x: bool,
               shape) -> dict | None:
    """The tuned decision behind base_choice for these arguments (value, each candidate's ms,
    how it was measured), or None where none was made in this process."""
    key = _base_key(torch.device(device), dtype, int(shape[0]), int(shape[1]),
                    tuning.token_class(tokens), _backward_kind(training, grad_x))
    return tuning.entry(BASE_DECISION, key)


@torch.compiler.assume_constant_result  # decided at trace time: no graph break, no recompile
def _tuned_base(device: str, dtype: torch.dtype, out_f: int, in_f: int, tokens: int,
                backward: str) -> str:
    def measured() -> str:
        if backends.select(device) != "cpu":  # the fold kernel is the CPU's
            return "torch"
        dev = torch.device(device)
        least = -(-_SLICE_BYTES // (in_f * dtype.itemsize))  # as the strategy's: 4 MiB of W
        make = functools.partial(_base_calls, dev, dtype, in_f, tokens, backward)
        return tuning.decide(BASE_DECISION, _base_key(dev, dtype, out_f, in_f, tokens, backward),
                             "torch", lambda: tuning.measure_sliced(make, out_f, least=least),
                             candidates=BASES)
    return tuning.remembered(_decided_bases, (device, dtype, out_f, in_f, tokens, backward,
                                              backends.requested()), measured)


def _base_calls(device: torch.device, dtype: torch.dtype, in_f: int, tokens: int,
                backward: str, rows: int) -> dict:
    """{base: its forward (and gy·W where the backward computes x's gradient)} on ``rows``
    output rows of a layer ``in_f`` wide."""
    weight = torch.full((rows, in_f), 0.01, dtype=dtype, device=device)
    x = torch.empty(tokens, in_f, dtype=dtype, device=device).uniform_(-1, 1)
    gy = torch.empty(tokens, rows, dtype=dtype, device=device).uniform_(-1, 1)

    def call(base):
        def run():
            _base_linear(x, weight, None, base)
            if backward == "training":
                _base_grad_x(gy, weight, base)
        return run
    return {base: call(base) for base in BASES}


# ---------------------------------------------------------------------------------------------
# The op: the set's buffers (SparseDeltaSetState's, their used parts), its segments and scales
# (CPU tensors, one row per slot): the same inputs however many adapters the set holds.
# ---------------------------------------------------------------------------------------------
def _sorted_groups(row_adapter: torch.Tensor, live: list[int]):
    """(order, bounds, slots): the rows sorted by slot (stable: batch order within a slot), and
    for each adapter slot present (not -1) its range [b0, b1) of ``order``.

    The slots are checked here, inside the ops, where reading them is free: the public
    functions then have no host sync and trace whole under torch.compile."""
    order = torch.sort(row_adapter, stable=True)
    slots, counts = torch.unique_consecutive(order.values, return_counts=True)
    slots, counts = slots.tolist(), counts.tolist()
    for slot in slots:
        if slot != -1 and slot not in live:
            raise ValueError(f"row_adapter holds {slot}, which is not an adapter slot of this "
                             f"set (slots {live}, or -1)")
    bounds, present, start = [], [], 0
    for slot, count in zip(slots, counts):
        if slot >= 0:
            bounds.append((start, start + count))
            present.append(slot)
        start += count
    return order.indices, bounds, present


def _groups(row_adapter: torch.Tensor, live: list[int]):
    """(slot, row indices) for each adapter slot present, rows in batch order."""
    order, bounds, slots = _sorted_groups(row_adapter, live)
    for (b0, b1), slot in zip(bounds, slots):
        yield slot, order[b0:b1]


def _present(segments: torch.Tensor, scales: torch.Tensor, row_adapter: torch.Tensor):
    """(order, bounds, slots) of the call's groups, and for the adapters present their
    segments (e0, e1, o: where they lie in the set's buffers) and scales, keyed by slot."""
    segments, scales = segments.tolist(), scales.tolist()
    live = [s for s, (e0, _, _) in enumerate(segments) if e0 >= 0]
    order, bounds, slots = _sorted_groups(row_adapter, live)
    starts = {s: tuple(segments[s]) for s in slots}
    return order, bounds, slots, starts, {s: scales[s] for s in slots}


def _multi_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  row_adapter: torch.Tensor, values: torch.Tensor, cols: torch.Tensor,
                  rows: torch.Tensor, t_cols: torch.Tensor, t_perm: torch.Tensor,
                  offsets: torch.Tensor, segments: torch.Tensor,
                  scales: torch.Tensor, base: str = "torch") -> torch.Tensor:
    # rows and the transposed structures are for the backward (saved from these inputs).
    x = x.contiguous()
    with reading(weight):
        y = _base_linear(x, weight, bias, base)
    order, bounds, slots, starts, slot_scales = _present(segments, scales, row_adapter)
    return registry.kernel("grouped_spmm", x.device)(y, x, order, bounds, slots, starts,
                                                     offsets, cols, values, slot_scales)


def _multi_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    row_adapter: torch.Tensor, values: torch.Tensor, cols: torch.Tensor,
                    rows: torch.Tensor, t_cols: torch.Tensor, t_perm: torch.Tensor,
                    offsets: torch.Tensor, segments: torch.Tensor, scales: torch.Tensor,
                    need_x: bool, need_weight: bool, base: str = "torch"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gy, x = gy.contiguous(), x.contiguous()
    with reading(weight):
        gx, gw = _base_backward(gy, x, weight, need_x, need_weight, base)
    order, bounds, slots, starts, slot_scales = _present(segments, scales, row_adapter)
    gx, gvalues = registry.kernel("grouped_backward", gy.device)(
        gx, gy, x, order, bounds, slots, starts, (values, cols, rows, t_cols, t_perm, offsets),
        slot_scales, need_x)
    return gx, gvalues, gw


_multi_linear_op = torch.library.custom_op("shira::multi_delta_linear",
                                           mutates_args=())(_multi_linear)
_multi_backward_op = torch.library.custom_op("shira::multi_delta_linear_backward",
                                             mutates_args=())(_multi_backward)


@_multi_linear_op.register_fake
def _(x, weight, bias, row_adapter, values, cols, rows, t_cols, t_perm, offsets, segments,
      scales, base="torch"):
    return x.new_empty((x.shape[0], weight.shape[0]))


@_multi_backward_op.register_fake
def _(gy, x, weight, row_adapter, values, cols, rows, t_cols, t_perm, offsets, segments, scales,
      need_x, need_weight, base="torch"):
    gx = gy.new_empty((gy.shape[0], weight.shape[1]) if need_x else (0,))
    gw = gy.new_empty(tuple(weight.shape) if need_weight else (0,))
    return gx, values.new_empty(values.shape), gw


def _setup_context(ctx, inputs, output):
    x, weight, bias, row_adapter, *packed, base = inputs  # (torch.library passes defaults)
    ctx.save_for_backward(x, weight, row_adapter)
    ctx.packed = packed  # the set's buffers, segments and scales (a set never writes them)
    ctx.base = base
    ctx.has_bias = bias is not None
    ctx.backend = backends.requested()  # autograd's device thread does not see use_backend()


def _backward(ctx, gy, backward=_multi_backward_op):
    x, weight, row_adapter = ctx.saved_tensors
    need_x, need_w, need_b, _, need_v = ctx.needs_input_grad[:5]
    with backends.use_backend(ctx.backend):
        gx, gvalues, gw = backward(gy, x, weight, row_adapter, *ctx.packed, need_x, need_w,
                                   ctx.base)
    gb = gy.sum(0) if ctx.has_bias and need_b else None
    return ((gx if need_x else None), (gw if need_w else None), gb, None,
            (gvalues if need_v else None)) + (None,) * 8


_multi_linear_op.register_autograd(_backward, setup_context=_setup_context)
# Under autocast the op runs in the autocast dtype, like F.linear and sparse_delta_linear (an
# op without this rule would run its inner matmul in that dtype and its sparse part in x's).
run_in_the_autocast_dtype("shira::multi_delta_linear")


# The base product alone, for a mixed batch whose adapters are added by another op
# (BinaryAdapterBank.mixed's 1-bit branches): the same kernels and decision as the base above.
def _base_only(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               base: str = "torch") -> torch.Tensor:
    return _base_linear(x.contiguous(), weight, bias, base)


def _base_only_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_x: bool,
                        need_weight: bool, base: str = "torch"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    return _base_backward(gy.contiguous(), x.contiguous(), weight, need_x, need_weight, base)


_base_only_op = torch.library.custom_op("shira::base_linear", mutates_args=())(_base_only)
_base_only_backward_op = torch.library.custom_op("shira::base_linear_backward",
                                                 mutates_args=())(_base_only_backward)


@_base_only_op.register_fake
def _(x, weight, bias, base="torch"):
    return x.new_empty((x.shape[0], weight.shape[0]))


@_base_only_backward_op.register_fake
def _(gy, x, weight, need_x, need_weight, base="torch"):
    return (gy.new_empty((gy.shape[0], weight.shape[1]) if need_x else (0,)),
            gy.new_empty(tuple(weight.shape) if need_weight else (0,)))


def _base_only_setup_context(ctx, inputs, output):
    x, weight, bias, base = inputs
    ctx.save_for_backward(x, weight)
    ctx.base, ctx.has_bias = base, bias is not None
    ctx.backend = backends.requested()


def _base_only_autograd(ctx, gy):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    with backends.use_backend(ctx.backend):
        gx, gw = _base_only_backward_op(gy, x, weight, need_x, need_w, ctx.base)
    return ((gx if need_x else None), (gw if need_w else None),
            (gy.sum(0) if ctx.has_bias and need_b else None), None)


_base_only_op.register_autograd(_base_only_autograd, setup_context=_base_only_setup_context)
run_in_the_autocast_dtype("shira::base_linear")


# ---------------------------------------------------------------------------------------------
# Public function: validate once, then call the op.
# ---------------------------------------------------------------------------------------------
def row_slots(x: torch.Tensor, row_adapter, slots_of_names) -> torch.Tensor:
    """row_adapter as int64 slots, one per row of x's rows flattened: from a tensor or list of
    ints of x's leading shape, of its rows flattened, or of its first dim only (one adapter per
    batch row, broadcast over the rest), or a list of names that ``slots_of_names`` maps."""
    n = math.prod(x.shape[:-1])
    if isinstance(row_adapter, (str, bytes)):
        raise TypeError(f"row_adapter must be a list of adapter names or integer slots, one "
                        f"per row, not a single string ({row_adapter!r:.60})")
    if isinstance(row_adapter, (list, tuple)) and any(isinstance(a, str) or a is None
                                                      for a in row_adapter):
        row_adapter = slots_of_names(row_adapter, device=x.device)
    elif not isinstance(row_adapter, torch.Tensor):
        # Not converted to int64 here: that would truncate 0.7 to slot 0 and take True as 1.
        try:
            row_adapter = torch.as_tensor(row_adapter, device=x.device)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"row_adapter must be a list of adapter names (str, or None for the "
                            f"base) or integer slots, one per row, got {row_adapter!r:.80}"
                            ) from None
        if row_adapter.numel() == 0:  # [] reads as float32
            row_adapter = row_adapter.long()
    if row_adapter.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"row_adapter must hold integer slots, got {row_adapter.dtype}")
    if x.dim() > 2 and row_adapter.shape == x.shape[:1] != (n,):  # per batch row
        row_adapter = row_adapter.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
    if row_adapter.numel() != n or row_adapter.shape not in (x.shape[:-1], (n,)):
        raise ValueError(f"row_adapter has shape {tuple(row_adapter.shape)}; x has {n} rows "
                         f"(leading shape {tuple(x.shape[:-1])})")
    return row_adapter.reshape(n).to(device=x.device, dtype=torch.int64)


def _values_in_place_of_the_sets(state, given) -> torch.Tensor:
    """The state's values buffer (its used part) with ``given`` (name → values) in the named
    adapters' segments: one cat, through which their gradients flow, and the other adapters'
    to the set's values where those require grad."""
    if not isinstance(given, Mapping):
        raise TypeError(f"values must be a mapping of adapter names to value tensors, got "
                        f"{type(given).__name__}")
    held = state.values
    segments = state.segments.tolist()
    named = {entry[0]: (segments[s], entry[1]) for s, entry in enumerate(state.slots)
             if entry is not None}
    unknown = [n for n in given if n not in named]
    if unknown:
        raise KeyError(f"values names {unknown[0]!r}, which is not in the set (it has "
                       f"{list(named)})")
    pieces, at = [], 0
    for name, ((e0, e1, _), delta) in sorted(named.items(), key=lambda item: item[1][0][0]):
        if name not in given:
            continue
        v = given[name]
        if not isinstance(v, torch.Tensor) or v.shape != (e1 - e0,):
            raise ValueError(f"values[{name!r}] must be a tensor of shape ({e1 - e0},) (the "
                             f"adapter's entries), got "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        check_float_tensor(f"values[{name!r}]", v, held.dtype, held.device)
        pieces += [held[at:e0], v]
        at = e1
    return torch.cat(pieces + [held[at:state.used]])


def multi_delta_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       delta_set: SparseDeltaSet, row_adapter, values=None,
                       base: str = "auto") -> torch.Tensor:
    """x·Wᵀ + b with each row's own adapter: y[t] = x[t]·(W + scale_a·S_a)ᵀ + b for
    a = row_adapter[t], a slot of ``delta_set`` (``delta_set.index(name)``), or -1 for the
    base alone. x [..., in]; row_adapter: int tensor (or list of ints) of x's leading shape,
    of its rows flattened, or of its first dim only (one adapter per batch row, for all its
    positions), or a list of adapter names (None or "__base__" for the base) of those lengths.
    Every adapter of the set must have x's dtype and device. Differentiable in x, the set's
    values (``delta_set.requires_grad_()``: ``delta_set.values.grad[delta_set.segment(name)]``
    is adapter ``name``'s), the bias and (only if it requires grad) W. ``values``: a mapping
    of adapter names to value tensors (each its adapter's nnz, in the set's dtype) to use in
    place of the set's copies, which then take their gradients (as the values of a PEFT
    model's adapters do through adapter_names; the other adapters' go to the set's values). ``base``: the kernel of the dense matmul
    of all rows (and gy·W), "torch", "fold" (on the CPU this package's fold kernel with no
    entries; elsewhere composed as torch's matmul) or "auto": the faster measured on this
    machine (tuning; "torch" with tuning off). No host sync before the op: under
    torch.compile it traces whole (a bad slot is reported when the op runs)."""
    if not isinstance(delta_set, SparseDeltaSet):
        raise TypeError(f"delta_set must be a SparseDeltaSet, got {type(delta_set).__name__}")
    if base not in ("auto",) + BASES:
        raise ValueError(f"base must be one of {('auto',) + BASES}, got {base!r}")
    # Under autocast the op's rule casts x, W, the bias and the values to the autocast dtype.
    dtype = check_linear(x, weight, bias)
    if tuple(weight.shape) != delta_set.shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but delta_set is for "
                         f"{delta_set.shape}")
    x2 = x.reshape(-1, x.shape[-1])
    # One snapshot of the set for the names, the checks and the buffers: another thread may
    # remove an adapter and add another into its slot meanwhile (SparseDeltaSet.add/remove are
    # thread-safe), and a row named "a" must never run with the adapter that took a's slot.
    state = delta_set.snapshot()
    row_adapter = row_slots(x, row_adapter, functools.partial(delta_set.row_adapter,
                                                              slots=state.slots))
    # The set holds one dtype and device (its add checks); row_adapter's slots are checked
    # inside the op (no sync).
    if state.values is None:  # no adapter was ever added: every row must be -1
        int32 = torch.empty(0, dtype=torch.int32, device=x.device)
        buffers = (x.new_empty(0), int32, int32, int32, int32.long(), int32.long())
    else:
        first = next((entry for entry in state.slots if entry is not None), None)
        if first is not None:
            check_float_tensor(f"the values of adapter {first[0]!r}", first[1].values, dtype,
                               x.device)
        buffers = tuple(t[:state.used] for t in (state.values, state.cols, state.rows,
                                                 state.t_cols, state.t_perm))
        if values is not None:
            buffers = (_values_in_place_of_the_sets(state, values),) + buffers[1:]
        buffers += (state.offsets[:state.used_offsets],)
    base = _resolved_base(base, x, weight, bias, x2.shape[0], buffers[0].requires_grad)
    y = _multi_linear_op(x2, weight, bias, row_adapter, *buffers, state.segments, state.scales,
                         base)
    return y.view(*x.shape[:-1], weight.shape[0])


def _resolved_base(base: str, x: torch.Tensor, weight: torch.Tensor, bias, rows: int,
                   grad_other: bool = False) -> str:
    """base, or for "auto" base_choice's for this call (``grad_other``: something else of the
    call records a backward too)."""
    if base != "auto":
        return base
    training = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or grad_other
        or (bias is not None and bias.requires_grad))
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(
        x.device.type) else x.dtype
    return base_choice(x.device, dtype, rows, training, x.requires_grad, tuple(weight.shape))


def base_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                base: str = "auto") -> torch.Tensor:
    """x·Wᵀ + b: the dense product of a mixed batch whose adapters another op adds (the 1-bit
    branches of BinaryAdapterBank.mixed), on the kernel multi_delta_linear's base takes (the
    same decision: "auto" measures torch's matmul against, on the CPU, this package's fold
    kernel with no entries). Differentiable in x, W and the bias; with "torch" it is F.linear."""
    if base not in ("auto",) + BASES:
        raise ValueError(f"base must be one of {('auto',) + BASES}, got {base!r}")
    check_linear(x, weight, bias, contiguous=False)
    x2 = x.reshape(-1, x.shape[-1])
    base = _resolved_base(base, x, weight, bias, x2.shape[0])
    if base == "torch":
        return F.linear(x, weight, bias)
    y = _base_only_op(x2, weight.contiguous(), bias, base)
    return y.view(*x.shape[:-1], weight.shape[0])
