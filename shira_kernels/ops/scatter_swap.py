"""Batched scatter-swap: trade weights[i].view(-1)[indices[i]] with values[i], for every i at once.

The kernel behind exact adapter switching: swapping an adapter's values in stores the base
entries in their place, and swapping again restores the base bit for bit (no arithmetic is done,
only bit patterns move). Layout: reference (the specification) → launch table shared by the
native backends → their kernels, registered in ops/registry.py → validation → torch.library
op → public function.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from .. import _native, backends, tuning
from .._checks import (check_float_tensor, check_representable, forget_index_checks,
                       validate_indices)
from .._concurrency import interrupts_deferred, writing
from . import registry


# ---------------------------------------------------------------------------------------------
# Reference: the specification every backend is tested against.
# ---------------------------------------------------------------------------------------------
def scatter_swap_reference(weights, indices, values) -> int:
    """Returns the number of indices outside their weight; if there are any, nothing is
    written (the native kernels skip just those entries; the caller raises either way)."""
    outside = sum(int(((index < 0) | (index >= weight.numel())).sum())
                  for weight, index in zip(weights, indices))
    if outside:
        return outside
    for weight, index, value in zip(weights, indices, values):
        flat = weight.view(-1)
        old = flat[index]
        flat[index] = value
        value.copy_(old)
    return 0


# ---------------------------------------------------------------------------------------------
# Launch table for the native backends: one row per tensor (addresses, length, element size,
# index width, the weight's size for the kernels' bound check) and one row per block of work
# (tensor, start). Built once for a given list of tensors and reused from a small cache, so a
# repeated switch pays no setup.
# ---------------------------------------------------------------------------------------------
BLOCK = tuning.view("swap_block")  # entries per block of work, per backend (tuning.py)
_TABLE_CACHE: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_TABLE_CACHE_SIZE = 32
_TABLE_LOCK = threading.Lock()  # the cache is shared by every thread


def swap_table(weights, indices, values, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tasks int64 [T, 7], blocks int64 [B, 2]) on the tensors' device, cached by address."""
    device = weights[0].device
    rows = tuple((w.data_ptr(), i.data_ptr(), v.data_ptr(), i.numel(), w.element_size(),
                  int(i.dtype == torch.int64), w.numel())
                 for w, i, v in zip(weights, indices, values))
    key = (device, block, rows)
    with _TABLE_LOCK:
        table = _TABLE_CACHE.get(key)
        if table is not None:
            _TABLE_CACHE.move_to_end(key)
            return table
    tasks = torch.tensor(rows, dtype=torch.int64).view(-1, 7)
    per_task = (tasks[:, 3] + block - 1) // block
    task_of_block = torch.repeat_interleave(torch.arange(len(rows)), per_task)
    first_block = torch.cumsum(per_task, 0) - per_task
    starts = (torch.arange(task_of_block.numel()) - first_block[task_of_block]) * block
    table = (tasks.to(device), torch.stack([task_of_block, starts], 1).contiguous().to(device))
    with _TABLE_LOCK:
        _TABLE_CACHE[key] = table
        if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    return table


def _tabled(backend: str, launch):
    """The swap in the reference's signature for a backend whose kernel runs over the launch
    table: ``launch(tasks, blocks, block)`` returns how many entries it skipped for an index
    outside their weight (the kernels check every index; nothing is written for those)."""
    def scatter_swap(weights, indices, values) -> int:
        tasks, blocks = swap_table(weights, indices, values, BLOCK[backend])
        return launch(tasks, blocks, BLOCK[backend])
    return scatter_swap


def _triton_launch():
    from ..triton.scatter_swap import scatter_swap
    return scatter_swap


def _native_launch(backend: str):
    return _native.module(backend).scatter_swap


# Kernels per backend (registry.py): the reference; the table launchers of triton
# (triton/scatter_swap.py), cpu and cuda (csrc/*/bindings.cpp).
registry.register("scatter_swap", "reference", scatter_swap_reference)
registry.register_lazy("scatter_swap", "triton", lambda: _tabled("triton", _triton_launch()))
registry.register_lazy("scatter_swap", "cpu", lambda: _tabled("cpu", _native_launch("cpu")))
registry.register_lazy("scatter_swap", "cuda", lambda: _tabled("cuda", _native_launch("cuda")))


def swap_unchecked(weights, indices, values) -> None:
    """The swap on the selected backend without the Python checks, for ops whose arguments
    were validated at their own entry (e.g. sparse_delta_linear's "swap" strategy). The kernels
    still check every index against its weight: if one is outside (an index tensor written
    since its check was cached, e.g. through .data or numpy, which torch does not count), the
    swap is undone (it is its own inverse and skipped the bad entries) and ValueError raised."""
    skipped = swap_in_range(weights, indices, values)
    if skipped:
        swap_in_range(weights, indices, values)
        raise_outside(skipped, indices)


def swap_in_range(weights, indices, values) -> int:
    """The swap of every entry whose index lies inside its weight, on the selected backend;
    returns how many entries were skipped for an index outside (none written). On CUDA tensors
    Triton's kernel is tried first: it measured faster (tuning.py "triton_first")."""
    return registry.kernel("scatter_swap", weights[0].device, backends.TRITON_FIRST)(
        weights, indices, values)


def raise_outside(count: int, indices) -> None:
    """The error for indices that a kernel found outside their weight (after the caller has
    restored everything); drops the cached checks of ``indices`` so the next call rechecks."""
    for index in indices:
        forget_index_checks(index)
    raise ValueError(f"{count} indices are outside their weight; nothing was changed. The "
                     "indices were written after they were checked, in a way torch does not "
                     "count (through .data or a numpy view): write them in place with torch "
                     "ops, or pass new tensors")


# ---------------------------------------------------------------------------------------------
# Validation: cheap metadata checks on every call; range and uniqueness via _checks' cache.
# ---------------------------------------------------------------------------------------------
def _as_tensor_list(seq, name: str) -> list[torch.Tensor]:
    if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
    for i, t in enumerate(seq):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return list(seq)


def _check_disjoint(weights, values) -> None:
    # Weights and values are all written: no two of them may share memory, or the parallel
    # swap would race (values may be views into one flat buffer as long as they do not overlap).
    spans = []
    for name, seq in (("weights", weights), ("values", values)):
        for i, t in enumerate(seq):
            if t.numel():
                start = t.data_ptr()
                spans.append((start, start + t.numel() * t.element_size(), f"{name}[{i}]"))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{a} and {b} overlap in memory; every weight and value tensor "
                             "must be distinct")


def _check_swap_args(weights, indices, values):
    weights = _as_tensor_list(weights, "weights")
    indices = _as_tensor_list(indices, "indices")
    values = _as_tensor_list(values, "values")
    if not len(weights) == len(indices) == len(values):
        raise ValueError("weights, indices and values must have the same length, got "
                         f"{len(weights)}, {len(indices)} and {len(values)}")
    if not weights:
        return weights, indices, values
    device = weights[0].device
    for i, (w, idx, v) in enumerate(zip(weights, indices, values)):
        check_float_tensor(f"weights[{i}]", w, device=device)
        if not w.is_contiguous():
            raise ValueError(f"weights[{i}] must be contiguous (it is swapped in place)")
        if idx.device != device:
            raise ValueError(f"indices[{i}] is on {idx.device} but weights[0] is on {device}")
        if v.dtype != w.dtype:
            raise TypeError(f"values[{i}] has dtype {v.dtype} but weights[{i}] has {w.dtype}")
        if v.device != device:
            raise ValueError(f"values[{i}] is on {v.device} but weights[0] is on {device}")
        if v.dim() != 1 or not v.is_contiguous():
            raise ValueError(f"values[{i}] must be a contiguous 1-D tensor, got shape "
                             f"{tuple(v.shape)}")
        validate_indices(idx, w.numel(), name=f"indices[{i}]")
        if v.numel() != idx.numel():
            raise ValueError(f"values[{i}] has {v.numel()} entries but indices[{i}] has "
                             f"{idx.numel()}")
    _check_disjoint(weights, values)
    return weights, [idx.contiguous() for idx in indices], values


# ---------------------------------------------------------------------------------------------
# The op (torch.library), with a fake kernel so torch.compile can trace it.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("shira::scatter_swap_", mutates_args=("weights", "values"))
def _scatter_swap_op(weights: list[torch.Tensor], indices: list[torch.Tensor],
                     values: list[torch.Tensor]) -> None:
    if weights:
        with writing(*weights, *values):  # values are written too
            swap_unchecked(weights, indices, values)


@_scatter_swap_op.register_fake
def _(weights, indices, values) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------
def scatter_swap_(weights: Sequence[torch.Tensor], indices: Sequence[torch.Tensor],
                  values: Sequence[torch.Tensor]) -> None:
    """For every i at once, swap ``weights[i].view(-1)[indices[i]]`` with ``values[i]`` in place.

    Lists of equal length; weights contiguous fp32/fp16/bf16 on one device, values 1-D of the
    weight's dtype, indices 1-D int32/int64, unique and in range. Calling it twice restores
    both lists bit for bit. All arguments are checked before anything is written, so a call
    that raises leaves every tensor as it was.
    """
    weights, indices, values = _check_swap_args(weights, indices, values)
    if not weights:
        return
    # A state operation, not part of any graph: detach so parameters can be swapped in place.
    with torch.no_grad():
        torch.ops.shira.scatter_swap_([w.detach() for w in weights], indices,
                                      [v.detach() for v in values])


def adapted_entries(base: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """round(base + scale·values) in base's dtype, the sum in fp32: the entries that stand in W
    while an adapter is merged or active (ShiraLinear, the PEFT layers, AdapterBank)."""
    return (base.float() + scale * values.float()).to(base.dtype)


def merge_by_swap(weight: torch.Tensor, flat: torch.Tensor, values: torch.Tensor, scale: float,
                  commit: Callable[[torch.Tensor], None], where: str) -> None:
    """Put W + scale·S into ``weight``'s entries at ``flat`` as one swap_transaction; then
    ``commit(held)`` records ``held``, the base entries, which a later swap of the same
    (weight, flat, held) puts back bit for bit. Entries that would overflow W's dtype are
    refused first (ValueError starting with ``where``), with nothing changed."""
    with torch.inference_mode(False), torch.no_grad():  # held may be swapped outside it
        held = torch.empty(flat.shape, dtype=weight.dtype, device=weight.device)
        # The base entries are read and the new ones swapped in under one hold of W's lock: a
        # "swap" forward of another thread could otherwise have W's entries adapted while they
        # are read, and the merge would add the adapter twice.
        with writing(weight, held):
            base = weight.detach().view(-1)[flat.long()]
            held.copy_(adapted_entries(base, values.detach(), scale))
            check_representable(held, where, base=base)
            swap_transaction([weight], [flat], [held], lambda: commit(held))


def swap_transaction(weights: Sequence[torch.Tensor], indices: Sequence[torch.Tensor],
                     values: Sequence[torch.Tensor], commit: Callable[[], None]) -> None:
    """scatter_swap_, then ``commit()`` (the caller's bookkeeping), as one step: if the swap
    raises, nothing changed; if ``commit`` raises anything (MemoryError, an error of the
    caller's), the swap is undone (it is its own inverse) before the exception goes on; a
    KeyboardInterrupt arriving meanwhile is delivered after the step. ``commit`` must itself
    change nothing before it can fail, or undo its own changes when it does. This is how
    merges and adapter switches stay restorable whatever interrupts them."""
    # The locks first, all at once in stripe order: the swaps inside take them again.
    with interrupts_deferred(), writing(*weights, *values):
        scatter_swap_(weights, indices, values)
        try:
            commit()
        except BaseException:
            scatter_swap_(weights, indices, values)
            raise
