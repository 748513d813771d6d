"""sparse_delta_linear: y = x·(W + scale·S)ᵀ + b with S a SparseDelta, from the parts
(parts.py); its strategies, op, backward and autograd, and the choice of strategy ("auto").

It runs one of four strategies, each one dense matmul plus extra work:
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
the strategy says), S's values (scale·sddmm), the bias, and W only if W asks: it never builds a
dense m×n gradient unless W requires grad, and never copies W beyond the one scratch buffer of
"merge".
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings

import torch
import torch.nn.functional as F

from ... import backends, tuning
from ..._checks import check_float_tensor, check_linear, check_scale
from ..._concurrency import weight_lock
from ...formats import SparseDelta, SparseStructure, flat_index_dtype
from .. import registry
from .._eager import eager_function, looped_under_vmap, run_in_the_autocast_dtype
from ..scatter_swap import raise_outside, swap_in_range, swap_unchecked
from .parts import _add_delta_holding, _check_delta, _check_delta_shape, _values_gradient

STRATEGIES = ("auto", "fold", "spmm", "swap", "merge")
# The measured decisions ("auto"'s token thresholds) are rows of the tuning table
# (shira_kernels/tuning.py, which names the reports that measured them). These names are
# read-only views of it, kept for code that reads them.
FOLD_TOKENS = tuning.view("fold_tokens")
FOLD_TRAINING_TOKENS = tuning.view("fold_training_tokens")
SWAP_FROM_TOKENS = tuning.view("swap_from_tokens")


# ---------------------------------------------------------------------------------------------
# The strategies; the op, its backward and autograd (and their eager twin, ops/_eager.py).
# ---------------------------------------------------------------------------------------------
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
    _add_delta_holding(weight, flat, values, scale, buf)
    return buf


@contextlib.contextmanager
def _adapted_in_place(weight, flat, values, scale):
    """W + scale·S stands in W's entries for the duration; then the base bits go back."""
    # .data: the temporary write is invisible to autograd's version counter, so W saved for
    # another backward stays valid (it is restored bit for bit before anyone could read it).
    w = weight.data
    saved = _scratch_buffer("swap", w, flat.shape)
    # One pass: W[idx] += scale·S (fp32, rounded once) while the base bits go to `saved`.
    skipped = registry.kernel("add_at_indices", w.device)(w, w, flat, values.contiguous(),
                                                          scale, saved)
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
run_in_the_autocast_dtype("shira::sparse_delta_linear")
_eager_linear = eager_function(
    "_EagerLinear", _linear, _setup_context,
    functools.partial(_backward, backward=looped_under_vmap("_LinearBackward", _linear_backward)))


# ---------------------------------------------------------------------------------------------
# The choice of strategy: the tuning table's (static_strategy) or measured here (auto_strategy).
# ---------------------------------------------------------------------------------------------
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
                  nnz: int | None = None, grad_x: bool = True) -> str:
    """The strategy "auto" runs for this many tokens of this dtype on ``device`` (a layer of
    ``shape`` with ``nnz`` adapted entries; ``training``: the call records a backward, which
    ``grad_x`` says includes x's gradient): measured on this machine for the layer's class
    (tuning.decide), or the table's choice (static_strategy) when tuning is off or the layer's
    shape is not given."""
    device = torch.device(device)
    default = static_strategy(device.type, dtype, tokens, training)
    if shape is None or nnz is None or not nnz or tuning.mode() == "off":
        return default
    return _tuned_strategy(str(device), dtype, int(shape[0]), int(shape[1]), int(nnz),
                           tuning.token_class(tokens), _backward_kind(training, grad_x), default)


def _backward_kind(training: bool, grad_x: bool) -> str:
    """What the call's backward computes, as the decision's key says it: the gradient of x
    costs a second matmul, as large as the forward's, so it changes which strategy wins."""
    return "training" if training and grad_x else "training, no grad of x" if training \
        else "inference"


STRATEGY_DECISION = "sparse_delta_linear.strategy"
def _strategy_key(device: torch.device, dtype: torch.dtype, out_f: int, in_f: int, nnz: int,
                  tokens: int, backward: str) -> tuple:
    """The decision's key: where it runs (the GPU, or the CPU threads torch uses), the backend
    asked for, the dtype, the layer's shape, its number of entries to the nearest power of two,
    the token class and the backward's kind (_backward_kind)."""
    nnz_class = min(1 << round(math.log2(max(nnz, 1))), out_f * in_f)
    return (tuning.place(device), backends.requested() or "auto", str(dtype).removeprefix("torch."),
            f"{out_f}x{in_f}", nnz_class, tuning.token_label(tokens), backward)


def strategy_entry(device, dtype: torch.dtype, tokens: int, training: bool, shape,
                   nnz: int, grad_x: bool = True) -> dict | None:
    """The tuned decision behind auto_strategy for these arguments (value, each candidate's
    ms, how it was measured), or None where none was made in this process."""
    key = _strategy_key(torch.device(device), dtype, int(shape[0]), int(shape[1]), int(nnz),
                        tuning.token_class(tokens), _backward_kind(training, grad_x))
    return tuning.entry(STRATEGY_DECISION, key)


_decided = tuning.memo()  # the arguments of _tuned_strategy → its result, for this process
_SLICE_BYTES = 4 * 2**20


@torch.compiler.assume_constant_result  # decided at trace time: no graph break, no recompile
def _tuned_strategy(device: str, dtype: torch.dtype, out_f: int, in_f: int, nnz: int,
                    tokens: int, backward: str, default: str) -> str:
    def measured() -> str:
        dev = torch.device(device)
        key = _strategy_key(dev, dtype, out_f, in_f, nnz, tokens, backward)
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None
        make = functools.partial(_strategy_calls, dev, dtype, (out_f, in_f), key[4], tokens,
                                 backward)
        # At least 4 MiB of W: a slice that fits a core's cache makes swap's scattered writes
        # look cheaper than on the whole layer.
        least = -(-_SLICE_BYTES // (in_f * dtype.itemsize))
        return tuning.decide(STRATEGY_DECISION, key, default,
                             lambda: tuning.measure_sliced(make, out_f, least=least, sync=sync),
                             candidates=STRATEGIES[1:])
    return tuning.remembered(_decided, (device, dtype, out_f, in_f, nnz, tokens, backward,
                                        default, backends.requested()), measured)


def _strategy_calls(device: torch.device, dtype: torch.dtype, shape: tuple[int, int], nnz: int,
                    tokens: int, backward: str, rows: int) -> dict:
    """{strategy: a call running it} on ``rows`` output rows of a layer like the one asked
    about (its width, dtype and density of entries, spread at random): the forward and the
    ``backward`` the key names (S's values' gradient, and x's), through the op bodies
    (lock-free: these tensors are the call's own). Values do not change the time: W is a
    constant."""
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
            if backward != "inference":
                _backward_holding(gy, x, weight, values, flat, *struct, 1.0, strategy,
                                  backward == "training", False)
        return run
    return {name: call(name) for name in names}


# ---------------------------------------------------------------------------------------------
# Public functions: validate once, then call the op.
# ---------------------------------------------------------------------------------------------
def sparse_delta_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        delta: SparseDelta, scale: float = 1.0, strategy: str = "auto"):
    """x·(W + scale·S)ᵀ + b for x of any leading shape [..., in]; differentiable in x, S's
    values, the bias and (only if it requires grad) W."""
    _check_delta(delta)
    return sparse_delta_linear_unpacked(x, weight, bias, delta.shape, delta.values,
                                        delta.flat_indices, delta.structure, scale, strategy)


def sparse_delta_linear_unpacked(x: torch.Tensor, weight: torch.Tensor,
                                 bias: torch.Tensor | None, delta_shape, values: torch.Tensor,
                                 flat_indices: torch.Tensor, structure, scale: float = 1.0,
                                 strategy: str = "auto"):
    """sparse_delta_linear with the delta unpacked into its fields (shape, values, flat indices
    and their SparseStructure), which the caller keeps canonical, as ShiraLinear does with its
    buffers: no SparseDelta is built per call (its checks take longer than a small layer's
    matmul)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    dtype = check_linear(x, weight, bias)
    autocast = dtype is None
    _check_delta_shape(delta_shape, weight.shape, "weight")
    check_float_tensor("delta.values", values, dtype, x.device)
    x2 = x.reshape(-1, x.shape[-1])
    if strategy == "auto":
        run_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        training = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or values.requires_grad
            or (bias is not None and bias.requires_grad))
        strategy = auto_strategy(x.device, run_dtype, x2.shape[0], training, weight.shape,
                                 values.shape[0], x.requires_grad)
    s = structure
    # _eager.via_op's test, with check_linear's autocast answer instead of asking again
    run = _linear_op if autocast or torch.compiler.is_compiling() else _eager_linear
    y = run(x2, weight, bias, values, flat_indices, s.row_offsets, s.cols, s.rows,
            s.t_offsets, s.t_cols, s.t_perm, check_scale(scale), strategy)
    return y.view(*x.shape[:-1], weight.shape[0])


def linear_of_parts(*args, **kwargs):
    """Deprecated name of sparse_delta_linear_unpacked."""
    warnings.warn("linear_of_parts is deprecated, use sparse_delta_linear_unpacked",
                  DeprecationWarning, stacklevel=2)
    return sparse_delta_linear_unpacked(*args, **kwargs)
