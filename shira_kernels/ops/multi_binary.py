"""Many 1-bit LoRA adapters in one batch: each row of x through its own adapter's branch.

  multi_binary_lora(x, adapters, row_adapter, activation=None)
      y[t] = scale_a·up_a(act(down_a(x[t])))  with a = row_adapter[t]; a = -1: zero

It is the branch only (the frozen base's x·Wᵀ + b is one dense matmul for the whole batch, the
caller's). The design is multi_delta_linear's: the rows are grouped by adapter (a stable sort,
one host sync inside the op, where the slots are checked) and each group runs the backend's
binary_lora kernel on its rows, in the strategy binary_lora's "auto" takes for that many rows;
per row the result is the same bits as binary_lora with that row's adapter on the same rows.
The backward gives x its gradient through both 1-bit weights per group (the adapters are
packed, so frozen: their signs and scales take no gradient).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .. import backends
from .._checks import check_scale
from . import registry
from .binary import (ACTIVATIONS, _check_binary, _check_x, binary_lora_reference, in_x_dtype,
                     lora_auto_strategy, lora_kernel)
from .multi_delta import _groups, row_slots


# ---------------------------------------------------------------------------------------------
# Reference: the specification.
# ---------------------------------------------------------------------------------------------
def multi_binary_lora_reference(x, adapters, row_adapter, relu: bool) -> torch.Tensor:
    """Row group by row group, binary_lora's reference (fp32) with the rows' adapter
    (adapters[a] = (down, up, scale) as (packed, alpha, mu, in_features) tuples); zero for -1.
    x [N, in], row_adapter [N]."""
    out = next(a[1][0].shape[0] for a in adapters if a is not None)
    y = x.new_zeros(x.shape[0], out)
    for a in torch.unique(row_adapter).tolist():
        if a >= 0:
            rows = (row_adapter == a).nonzero().view(-1)
            down, up, scale = adapters[a]
            y[rows] = binary_lora_reference(x[rows], down, up, scale, relu)
    return y


# ---------------------------------------------------------------------------------------------
# The op: the adapters' fields as lists, one entry per slot (a free slot: empty tensors).
# ---------------------------------------------------------------------------------------------
def _live(down_packed: list[torch.Tensor]) -> list[int]:
    return [a for a, p in enumerate(down_packed) if p.numel() > 0]


def _multi_binary_lora(x: torch.Tensor, row_adapter: torch.Tensor,
                       down_packed: list[torch.Tensor], down_alpha: list[torch.Tensor],
                       down_mu: list[torch.Tensor], up_packed: list[torch.Tensor],
                       up_alpha: list[torch.Tensor], up_mu: list[torch.Tensor], ranks: list[int],
                       in_features: int, out_features: int, scales: list[float],
                       relu: bool) -> torch.Tensor:
    x = x.contiguous()
    y = x.new_zeros((x.shape[0], out_features))
    for a, r in _groups(row_adapter, _live(down_packed)):
        down = (down_packed[a], down_alpha[a], down_mu[a], in_features)
        up = (up_packed[a], up_alpha[a], up_mu[a], ranks[a])
        # Each group as binary_lora's "auto" runs that many rows (its measured strategy).
        strategy = lora_auto_strategy(x.device, x.dtype, r.numel(), ranks[a], in_features,
                                      out_features)
        with in_x_dtype(strategy, x.device):
            y.index_copy_(0, r, lora_kernel(strategy, x.device)(x.index_select(0, r), down, up,
                                                                scales[a], relu))
    return y


def _multi_binary_lora_grad_x(gy: torch.Tensor, x: torch.Tensor, row_adapter: torch.Tensor,
                              down_packed: list[torch.Tensor], down_alpha: list[torch.Tensor],
                              down_mu: list[torch.Tensor], up_packed: list[torch.Tensor],
                              up_alpha: list[torch.Tensor], up_mu: list[torch.Tensor],
                              ranks: list[int], in_features: int, scales: list[float],
                              relu: bool) -> torch.Tensor:
    # Per group, binary_lora's backward: gx = scale·(gy·up ⊙ [down(x) > 0])·down, fp32 inside.
    gx = gy.new_zeros((gy.shape[0], in_features))
    grad_x = registry.kernel("binary_linear_grad_x", gy.device)
    linear = registry.kernel("binary_linear", gy.device)
    for a, r in _groups(row_adapter, _live(down_packed)):
        gh = scales[a] * grad_x(gy.index_select(0, r).float().contiguous(), up_packed[a],
                                up_alpha[a], up_mu[a], ranks[a])
        if relu:  # the forward's down(x), recomputed in fp32
            h = linear(x.index_select(0, r).float().contiguous(), down_packed[a], down_alpha[a],
                       down_mu[a], None, in_features)
            gh = gh * (h > 0)
        gx_a = grad_x(gh.contiguous(), down_packed[a], down_alpha[a], down_mu[a], in_features)
        gx.index_copy_(0, r, gx_a.to(gy.dtype))
    return gx


_multi_binary_lora_op = torch.library.custom_op("shira::multi_binary_lora",
                                                mutates_args=())(_multi_binary_lora)
_multi_binary_lora_grad_x_op = torch.library.custom_op(
    "shira::multi_binary_lora_grad_x", mutates_args=())(_multi_binary_lora_grad_x)


@_multi_binary_lora_op.register_fake
def _(x, row_adapter, down_packed, down_alpha, down_mu, up_packed, up_alpha, up_mu, ranks,
      in_features, out_features, scales, relu):
    return x.new_empty((x.shape[0], out_features))


@_multi_binary_lora_grad_x_op.register_fake
def _(gy, x, row_adapter, down_packed, down_alpha, down_mu, up_packed, up_alpha, up_mu, ranks,
      in_features, scales, relu):
    return gy.new_empty((gy.shape[0], in_features))


def _setup_context(ctx, inputs, output):
    x, row_adapter, *lists, ranks, in_features, out_features, scales, relu = inputs
    ctx.save_for_backward(x, row_adapter)
    ctx.lists, ctx.ranks, ctx.scales, ctx.relu = lists, ranks, scales, relu
    ctx.in_features = in_features
    ctx.backend = backends.requested()  # autograd's device thread does not see use_backend()


def _backward(ctx, gy):
    x, row_adapter = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[0]:
        with backends.use_backend(ctx.backend):
            gx = _multi_binary_lora_grad_x_op(gy, x, row_adapter, *ctx.lists, ctx.ranks,
                                              ctx.in_features, ctx.scales, ctx.relu)
    lists = [[None] * len(column) for column in ctx.lists]  # the list inputs' structure
    return (gx, None, *lists, None, None, None, None, None)


_multi_binary_lora_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function: validate (no host sync), then call the op.
# ---------------------------------------------------------------------------------------------
def _slots(adapters) -> tuple[list, dict[str, int] | None]:
    if isinstance(adapters, Mapping):
        names = list(adapters)
        return [adapters[n] for n in names], {n: i for i, n in enumerate(names)}
    if isinstance(adapters, Sequence) and not isinstance(adapters, str):
        return list(adapters), None
    raise TypeError(f"adapters must be a sequence (or a mapping by name) of (down, up, scale) "
                    f"or None, got {type(adapters).__name__}")


def multi_binary_lora(x: torch.Tensor, adapters, row_adapter,
                      activation: str | None = None) -> torch.Tensor:
    """Each row's own 1-bit LoRA branch: y[t] = scale_a·up_a(act(down_a(x[t]))) for
    a = row_adapter[t], zero for -1. ``adapters``: a sequence of (down, up, scale) with
    BinaryWeight down [r_a, in] and up [out, r_a] (None: a free slot), or a mapping name → such
    a triple; row_adapter as multi_delta_linear's (slots, or names with a mapping; None or
    "__base__": -1). The result has x's dtype, shape [..., out]; differentiable in x."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    slots, index = _slots(adapters)
    device = getattr(x, "device", None)
    fields, out_features, in_features = [], None, None
    for a, entry in enumerate(slots):
        if entry is None:
            fields.append(None)
            continue
        if not isinstance(entry, (tuple, list)) or len(entry) != 3:
            raise TypeError(f"adapters[{a}] must be (down, up, scale) or None")
        down, up, scale = entry
        _check_binary(f"adapters[{a}]'s down", down, device)
        _check_binary(f"adapters[{a}]'s up", up, device)
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"adapters[{a}]: up has in_features {up.shape[1]} but down has "
                             f"{down.shape[0]} outputs")
        if (in_features, out_features) == (None, None):
            in_features, out_features = down.shape[1], up.shape[0]
        elif (down.shape[1], up.shape[0]) != (in_features, out_features):
            raise ValueError(f"adapters[{a}] maps {down.shape[1]} → {up.shape[0]} features but "
                             f"the first adapter {in_features} → {out_features}")
        fields.append((down, up, check_scale(scale, f"adapters[{a}]'s scale")))
    if out_features is None:
        raise ValueError("adapters holds no adapter (every slot is None)")
    _check_x(x, in_features, "the adapters")

    def by_name(names, device=None):
        named = [n for n in names if n is not None and n != "__base__"]
        if index is None and named:
            raise TypeError("row_adapter holds names, but adapters is a sequence: give a mapping "
                            "name → (down, up, scale), or slots")
        unknown = [n for n in named if n not in index]
        if unknown:
            raise KeyError(f"no adapter {unknown[0]!r} (adapters: {list(index)})")
        empty = [n for n in named if fields[index[n]] is None]
        if empty:
            raise ValueError(f"row_adapter names {empty[0]!r}, whose entry in adapters is None")
        return torch.tensor([-1 if n is None or n == "__base__" else index[n] for n in names],
                            dtype=torch.int64, device=device)

    row_adapter = row_slots(x, row_adapter, by_name)
    empty_w, empty_f = torch.empty(0, 1, dtype=torch.int32, device=x.device), \
        torch.empty(0, device=x.device)
    lists = [[], [], [], [], [], []]
    ranks, scales = [], []
    for entry in fields:
        if entry is None:
            parts, rank, scale = (empty_w, empty_f, empty_f) * 2, 0, 0.0
        else:
            down, up, scale = entry
            parts = (down.packed, down.alpha, down.mu, up.packed, up.alpha, up.mu)
            rank = down.shape[0]
        for column, t in zip(lists, parts):
            column.append(t)
        ranks.append(rank)
        scales.append(scale)
    y = _multi_binary_lora_op(x.reshape(-1, in_features), row_adapter, *lists, ranks,
                              in_features, out_features, scales, activation == "relu")
    return y.view(*x.shape[:-1], out_features)
