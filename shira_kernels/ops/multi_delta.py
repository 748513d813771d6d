"""Many sparse adapters in one batch: each row of x through the base weight plus its own
adapter's delta (SGMV's idea, as punica and S-LoRA serve many LoRAs, for SHiRA).

  multi_delta_linear(x, weight, bias, delta_set, row_adapter)
      y[t] = x[t]·(W + scale_a·S_a)ᵀ + b  with a = row_adapter[t]; a = -1: the base alone

One dense matmul for the whole batch; then the rows are grouped by adapter (a stable sort of
row_adapter) and every group's sparse product is added to its rows' outputs by the backend's
grouped_spmm: on Triton and CUDA one launch for all groups (SGMV's idea), on the CPU the
backend's spmm per group on the gathered rows. Per row the result is the same bits as
sparse_delta_linear's "spmm" strategy on the same batch with that row's adapter (the same
dense matmul, and spmm's sum for a token does not depend on the other tokens; on the CPU a
group of one row takes the kernels' one-token path, whose sum is ordered differently; on CUDA
the lanes per row follow the adapters' average row length, as spmm's do for one adapter). The
backward gives x its gradient (gy·W plus each group's gy·S_a) and each adapter's values their
own (the group's sddmm), so one batch can train many adapters; the weight is only read, under
its lock (no swap can change it meanwhile). Triton and CUDA run the forward's and the
backward's sparse parts in one launch each for all groups; the CPU one call per adapter
present.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .. import _native, backends
from .._checks import check_float_tensor
from .._concurrency import reading
from ..formats import SparseDeltaSet
from . import registry
from .._group_tables import sddmm_tables, spmm_tables
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
# slot; the per-slot lists as the op gets them):
#   grouped_spmm(y, x, order, bounds, slots, offsets, cols, values, scales) -> y, in place:
#       y[rows] += scales[s]·x[rows]·S_sᵀ
#   grouped_backward(gx, gy, x, order, bounds, slots, values, structs, scales, need_x)
#       -> (gx with gx[rows] += scales[s]·gy[rows]·S_s if need_x, [sddmm(gy[rows], x[rows])
#       per group, fp32, unscaled])
# Triton and CUDA: one launch each for all groups (triton/sparse_delta.py grouped_spmm and
# grouped_sddmm; csrc/cuda/sparse_delta.cu, on the tables of _group_tables.py); the reference
# and the CPU: the backend's spmm / spmm_t_sddmm / sddmm per group on the gathered rows (on the
# CPU each call is one parallel region, and the backward one fused pass over S per group).
# ---------------------------------------------------------------------------------------------
def _grouped_by(spmm):
    def grouped_spmm(y, x, order, bounds, slots, offsets, cols, values, scales):
        for (b0, b1), s in zip(bounds, slots):
            r = order[b0:b1]
            ya = spmm(y.index_select(0, r), x.index_select(0, r), offsets[s], cols[s],
                      values[s].contiguous(), scales[s], overwrite_y=True)
            y.index_copy_(0, r, ya)
        return y
    return grouped_spmm


def _backward_by(backend: str):
    """grouped_backward as one call per group: the backend's fused spmm_t_sddmm (gx and the
    values' gradient; the CPU does both in one pass over S), or its sddmm alone."""
    def grouped_backward(gx, gy, x, order, bounds, slots, values, structs, scales, need_x):
        both = registry.lookup("spmm_t_sddmm", backend)
        sddmm = registry.lookup("sddmm", backend)
        grads = []
        for (b0, b1), s in zip(bounds, slots):
            r = order[b0:b1]
            gy_s, x_s = gy.index_select(0, r), x.index_select(0, r)
            if need_x:
                gx_s, g = both(gx.index_select(0, r), gy_s, x_s, values[s].contiguous(),
                               structs[s], scales[s])
                gx.index_copy_(0, r, gx_s)
            else:
                rows, cols, offsets = structs[s][:3]
                g = sddmm(gy_s, x_s, rows, cols, offsets)
            grads.append(g)
        return gx, grads
    return grouped_backward


def _one_launch_backward(kernels):
    """grouped_backward from a backend's one-launch grouped_spmm and grouped_sddmm
    (``kernels()`` returns them): one launch for gx (grouped_spmm over the transposed
    structures) and one for all the values' gradients."""
    def grouped_backward(gx, gy, x, order, bounds, slots, values, structs, scales, need_x):
        k = kernels()
        if need_x and slots:
            transposed = {s: values[s].index_select(0, structs[s][5]) for s in slots}
            t_values = [transposed.get(s) for s in range(len(values))]
            k.grouped_spmm(gx, gy, order, bounds, slots, [st[3] for st in structs],
                           [st[4] for st in structs], t_values, scales)
        grads = k.grouped_sddmm(gy, x, order, bounds, slots, [st[0] for st in structs],
                                [st[1] for st in structs])
        return gx, grads
    return grouped_backward


class _CudaGrouped:
    """The CUDA extension's one-launch grouped kernels (csrc/cuda/sparse_delta.cu) in the
    Triton functions' signatures, on the tables of _group_tables.py."""
    TILE_ROWS = 8        # rows of one group per tile (at most the kernel's 8)
    TILE_ENTRIES = 256   # entries per block (at most its 256 threads)

    def __init__(self):
        self._mod = _native.module("cuda")

    def grouped_spmm(self, y, x, order, bounds, slots, offsets, cols, values, scales):
        if not slots or not y.shape[1]:
            return y
        t = spmm_tables(bounds, slots, offsets, cols, values, scales, self.TILE_ROWS, y.device)
        return self._mod.grouped_spmm(y, x, order, t.tile_group, t.tile_start, t.group_end,
                                      t.offsets, t.cols, t.values, t.scales, self.TILE_ROWS)

    def grouped_sddmm(self, gy, x, order, bounds, slots, rows, cols):
        t = sddmm_tables(bounds, slots, rows, cols, self.TILE_ENTRIES, gy.device)
        g = self._mod.grouped_sddmm(gy, x, order, t.tile_group, t.tile_start, t.entry_end,
                                    t.group_rows, t.rows, t.cols, self.TILE_ENTRIES)
        return list(g.split(t.sizes))


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
# The op: the adapters' fields as lists (one entry per slot; a free slot has empty tensors).
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


def _live(offsets: list[torch.Tensor], out_features: int) -> list[int]:
    """The slots holding an adapter: a free slot's row offsets have length 1, a live one's
    out_features + 1."""
    return [a for a, o in enumerate(offsets) if o.numel() == out_features + 1]


def _multi_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  row_adapter: torch.Tensor, values: list[torch.Tensor],
                  offsets: list[torch.Tensor], cols: list[torch.Tensor],
                  rows: list[torch.Tensor], t_offsets: list[torch.Tensor],
                  t_cols: list[torch.Tensor], t_perm: list[torch.Tensor],
                  scales: list[float]) -> torch.Tensor:
    # rows and the transposed structures are for the backward (saved from these inputs).
    x = x.contiguous()
    with reading(weight):
        y = F.linear(x, weight, bias)
    order, bounds, slots = _sorted_groups(row_adapter, _live(offsets, weight.shape[0]))
    return registry.kernel("grouped_spmm", x.device)(y, x, order, bounds, slots, offsets, cols,
                                                     values, scales)


def _multi_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    row_adapter: torch.Tensor, values: list[torch.Tensor],
                    offsets: list[torch.Tensor], cols: list[torch.Tensor],
                    rows: list[torch.Tensor], t_offsets: list[torch.Tensor],
                    t_cols: list[torch.Tensor], t_perm: list[torch.Tensor], scales: list[float],
                    need_x: bool, need_weight: bool
                    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    gy, x = gy.contiguous(), x.contiguous()
    gvalues = [torch.zeros_like(v) for v in values]  # adapters without rows: zero gradient
    with reading(weight):
        gx = gy @ weight if need_x else gy.new_empty(0)
    gw = gy.T @ x if need_weight else gy.new_empty(0)
    order, bounds, slots = _sorted_groups(row_adapter, _live(offsets, weight.shape[0]))
    structs = [(rows[s], cols[s], offsets[s], t_offsets[s], t_cols[s], t_perm[s])
               for s in range(len(values))]
    gx, grads = registry.kernel("grouped_backward", gy.device)(
        gx, gy, x, order, bounds, slots, values, structs, scales, need_x)
    for s, g in zip(slots, grads):
        gvalues[s] = (g if scales[s] == 1.0 else scales[s] * g).to(values[s].dtype)
    return gx, gvalues, gw


_multi_linear_op = torch.library.custom_op("shira::multi_delta_linear",
                                           mutates_args=())(_multi_linear)
_multi_backward_op = torch.library.custom_op("shira::multi_delta_linear_backward",
                                             mutates_args=())(_multi_backward)


@_multi_linear_op.register_fake
def _(x, weight, bias, row_adapter, values, offsets, cols, rows, t_offsets, t_cols, t_perm,
      scales):
    return x.new_empty((x.shape[0], weight.shape[0]))


@_multi_backward_op.register_fake
def _(gy, x, weight, row_adapter, values, offsets, cols, rows, t_offsets, t_cols, t_perm,
      scales, need_x, need_weight):
    gx = gy.new_empty((gy.shape[0], weight.shape[1]) if need_x else (0,))
    gw = gy.new_empty(tuple(weight.shape) if need_weight else (0,))
    return gx, [v.new_empty(v.shape) for v in values], gw


def _setup_context(ctx, inputs, output):
    x, weight, bias, row_adapter, *lists, scales = inputs
    ctx.save_for_backward(x, weight, row_adapter)
    ctx.lists, ctx.scales = lists, scales  # the adapters' values and structures (per slot)
    ctx.has_bias = bias is not None
    ctx.backend = backends.requested()  # autograd's device thread does not see use_backend()


def _backward(ctx, gy, backward=_multi_backward_op):
    x, weight, row_adapter = ctx.saved_tensors
    need_x, need_w, need_b, _, need_v = ctx.needs_input_grad[:5]
    with backends.use_backend(ctx.backend):
        gx, gvalues, gw = backward(gy, x, weight, row_adapter, *ctx.lists, ctx.scales, need_x,
                                   need_w)
    gb = gy.sum(0) if ctx.has_bias and need_b else None
    none = [None] * len(gvalues)  # the lists' structure, as the inputs have it
    return ((gx if need_x else None), (gw if need_w else None), gb, None,
            (gvalues if need_v else none)) + (none,) * 6 + (None,)


# Always through the op (no eager autograd.Function as the single-adapter ops have): the values
# come as lists, whose tensors an autograd.Function would not see.
_multi_linear_op.register_autograd(_backward, setup_context=_setup_context)
# Under autocast the op runs in the autocast dtype, like F.linear and sparse_delta_linear (an
# op without this rule would run its inner matmul in that dtype and its sparse part in x's).
torch.library.register_autocast("shira::multi_delta_linear", "cpu", torch.bfloat16)
torch.library.register_autocast("shira::multi_delta_linear", "cuda", torch.float16)


# ---------------------------------------------------------------------------------------------
# Public function: validate once, then call the op.
# ---------------------------------------------------------------------------------------------
def _slot_fields(entries, device):
    """Per slot of ``entries`` (a SparseDeltaSet's slots): values, row offsets, cols, rows,
    t_offsets, t_cols, t_perm, scale (a free slot: empty tensors, scale 0, which no row may
    use)."""
    fields = []
    for entry in entries:
        if entry is None:
            e, z = torch.empty(0, device=device), torch.zeros(1, dtype=torch.int64, device=device)
            fields.append((e, z, e.int(), e.int(), z, e.int(), e.long(), 0.0))
            continue
        _, delta, scale = entry
        s = delta.structure
        fields.append((delta.values, s.row_offsets, s.cols, s.rows, s.t_offsets, s.t_cols,
                       s.t_perm, scale))
    return [list(column) for column in zip(*fields)] if fields else [[]] * 8


def _fields_of(delta_set: SparseDeltaSet, entries, device):
    """_slot_fields of a snapshot of ``delta_set``, kept on the set for the next call with the
    same snapshot (per call they cost a few µs per adapter, which a model of many layers pays
    for every adapter of its bank). Not kept while dynamo traces: the graph holds the fields."""
    if torch.compiler.is_compiling():
        return _slot_fields(entries, device)
    kept = delta_set.op_fields
    if kept is not None and kept[0] is entries and kept[1] == device:
        return kept[2]
    fields = _slot_fields(entries, device)
    delta_set.op_fields = (entries, device, fields)
    return fields


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
        row_adapter = torch.as_tensor(row_adapter, device=x.device)
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


def multi_delta_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       delta_set: SparseDeltaSet, row_adapter) -> torch.Tensor:
    """x·Wᵀ + b with each row's own adapter: y[t] = x[t]·(W + scale_a·S_a)ᵀ + b for
    a = row_adapter[t], a slot of ``delta_set`` (``delta_set.index(name)``), or -1 for the
    base alone. x [..., in]; row_adapter: int tensor (or list of ints) of x's leading shape,
    of its rows flattened, or of its first dim only (one adapter per batch row, for all its
    positions), or a list of adapter names (None or "__base__" for the base) of those lengths.
    Every adapter of the set must have x's dtype and device. Differentiable in x, the adapters'
    values, the bias and (only if it requires grad) W. No host sync before the op: under
    torch.compile it traces whole (a bad slot is reported when the op runs)."""
    if not isinstance(delta_set, SparseDeltaSet):
        raise TypeError(f"delta_set must be a SparseDeltaSet, got {type(delta_set).__name__}")
    check_float_tensor("x", x)
    # Under autocast the op's rule casts x, W, the bias and the values to the autocast dtype.
    dtype = None if torch.is_autocast_enabled(x.device.type) else x.dtype
    check_float_tensor("weight", weight, dtype, x.device)
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous 2-D tensor, got shape {tuple(weight.shape)}")
    if tuple(weight.shape) != delta_set.shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but delta_set is for "
                         f"{delta_set.shape}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dim must be in_features = "
                         f"{weight.shape[1]}")
    if bias is not None:
        check_float_tensor("bias", bias, dtype, x.device)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    x2 = x.reshape(-1, x.shape[-1])
    # One snapshot of the slots for the names, the checks and the fields: another thread may
    # remove an adapter and add another into its slot meanwhile (SparseDeltaSet.add/remove are
    # thread-safe), and a row named "a" must never run with the adapter that took a's slot.
    entries = delta_set.snapshot()
    row_adapter = row_slots(x, row_adapter, functools.partial(delta_set.row_adapter,
                                                              slots=entries))
    # The set holds one dtype and device (its add checks), so its first adapter stands for all;
    # row_adapter's slots are checked inside the op (no sync).
    first = next((entry for entry in entries if entry is not None), None)
    if first is not None:
        check_float_tensor(f"the values of adapter {first[0]!r}", first[1].values, dtype,
                           x.device)
    values, offsets, cols, rows, t_offsets, t_cols, t_perm, scales = _fields_of(
        delta_set, entries, x.device)
    y = _multi_linear_op(x2, weight, bias, row_adapter, values, offsets, cols, rows, t_offsets,
                         t_cols, t_perm, scales)
    return y.view(*x.shape[:-1], weight.shape[0])
