"""Eager calls of the composite ops without torch.library's dispatch.

A torch.library custom op with autograd costs tens of microseconds of Python per call and
direction, more than the GPU work of a decoding step. In eager mode the public functions run an
autograd.Function over the op's own implementation, setup and backward instead, and where no
input needs a gradient (inference) the implementation alone; the results are the same bits
(tests/test_sparse_delta.py, test_binary.py). torch.compile (which needs the op's schema and
fake kernel) and autocast (the op's autocast rule) still go through the op.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch


def via_op(x: torch.Tensor) -> bool:
    """Whether this call must go through the registered op."""
    return torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type)


def autocast_off(device_type: str):
    """A context that turns autocast off for an op's body where it is on: an op without an
    autocast rule (it keeps x's dtype, as its fake kernel says) must not have the torch matmuls
    inside its kernels recast to the autocast dtype (the result would be rounded to it, and
    have another dtype in eager mode than the compiled graph's)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# Each op's autocast kernels stay registered for the life of the process.
_autocast_libraries: dict[str, torch.library.Library] = {}
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def run_in_the_autocast_dtype(qualname: str) -> None:
    """Under autocast op ``qualname`` ("namespace::name") runs as F.linear does: its
    floating-point tensors on the autocast device (not float64) cast to the autocast dtype in
    force (torch.get_autocast_dtype), then the op with autocast off. torch.library's
    register_autocast fixes one dtype per device, so bf16 autocast on a GPU (or fp16 on the
    CPU) would run the op in the other 16-bit type."""
    namespace, name = qualname.split("::")
    if namespace not in _autocast_libraries:
        _autocast_libraries[namespace] = torch.library.Library(namespace, "FRAGMENT")
    library = _autocast_libraries[namespace]
    op = getattr(getattr(torch.ops, namespace), name).default
    for device_type, key in _AUTOCAST_KEYS.items():
        def kernel(_keyset, *args, device_type=device_type):
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                return op(*(_cast(a, device_type, dtype) for a in args))
        library.impl(name, kernel, key, with_keyset=True)


def _cast(value, device_type: str, dtype: torch.dtype):
    if (isinstance(value, torch.Tensor) and value.is_floating_point()
            and value.device.type == device_type and value.dtype is not torch.float64):
        return value.to(dtype)
    return value


def eager_function(name: str, impl, setup_context, backward,
                   differentiable: tuple[int, ...] | None = None) -> Callable:
    """A call of ``impl`` (the op's implementation, same arguments) that records the op's
    ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` as an
    autograd.Function (named ``name``) when an input needs a gradient: any input, or only
    those at the positions ``differentiable`` (the inputs the backward gives a gradient; the
    others' requires_grad cannot matter, and asking each costs microseconds per call).

    Inside torch.func transforms it goes through transformable(...) instead, which they take
    (torch.library's generated Function they refuse, so the op itself cannot serve them). For
    vmap(grad(...)) the backward must call its kernels through looped_under_vmap."""

    def forward(ctx, *inputs):
        setup_context(ctx, inputs, None)
        return impl(*inputs)

    function = type(name, (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    in_transforms = transformable(name, impl, setup_context, backward)

    def run(*inputs):
        if torch._C._are_functorch_transforms_active():
            return in_transforms.apply(*inputs)
        if torch.is_grad_enabled():
            asked = inputs if differentiable is None else [inputs[i] for i in differentiable]
            if any(isinstance(t, torch.Tensor) and t.requires_grad for t in asked):
                return function.apply(*inputs)
        return impl(*inputs)

    run.__name__ = run.__qualname__ = name
    return run


def transformable(name: str, impl, setup_context, backward) -> type:
    """``impl`` as an autograd.Function that torch.func's transforms take: setup_context a
    staticmethod of its own, and a vmap rule that runs it once per batch entry and stacks the
    results (the kernels know no batch dim: correct, not fast). Only for calls inside a
    transform: binding the arguments of such a Function costs tens of microseconds per call
    (autograd.Function.apply inspects forward's signature), which the ctx-first one does not."""
    function = type(name, (torch.autograd.Function,),
                    {"forward": staticmethod(lambda *inputs: impl(*inputs)),
                     "setup_context": staticmethod(setup_context),
                     "backward": staticmethod(backward)})
    function.vmap = staticmethod(_loop_over_batch(function))
    return function


def looped_under_vmap(name: str, impl) -> Callable:
    """``impl`` (a backward's kernel) as torch.func's vmap takes it: inside a transform through
    transformable(...) (no derivative of its own: no double backward); else ``impl`` itself."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"{name} has no derivative (double backward is not supported)")

    function = transformable(name, impl, setup_context, backward)

    def run(*inputs):
        if torch._C._are_functorch_transforms_active():
            return function.apply(*inputs)
        return impl(*inputs)

    run.__name__ = run.__qualname__ = name
    return run


def _loop_over_batch(function):
    """A vmap rule for ``function``: each batch entry's inputs through function.apply, the
    outputs stacked along dim 0 (a tuple of outputs: each stacked)."""

    def rule(info, in_dims, *inputs):
        results = []
        for b in range(info.batch_size):
            entry = [_entry_of(a, d, b) for a, d in zip(inputs, in_dims)]
            results.append(function.apply(*entry))
        if isinstance(results[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*results)), (0,) * len(results[0])
        return torch.stack(results), 0

    return rule


def _entry_of(value, in_dim, b: int):
    """Batch entry ``b`` of an input whose batch dim is ``in_dim`` (None: not batched; a tuple
    or list of inputs has one per element). Contiguous: the kernels take their operands that
    way, and a batch dim other than the first leaves a strided slice."""
    if in_dim is None:
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_entry_of(v, d, b) for v, d in zip(value, in_dim))
    return value.select(in_dim, b).contiguous()
