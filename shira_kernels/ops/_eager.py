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


def eager_function(name: str, impl, setup_context, backward,
                   differentiable: tuple[int, ...] | None = None) -> Callable:
    """A call of ``impl`` (the op's implementation, same arguments) that records the op's
    ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` as an
    autograd.Function (named ``name``) when an input needs a gradient: any input, or only
    those at the positions ``differentiable`` (the inputs the backward gives a gradient; the
    others' requires_grad cannot matter, and asking each costs microseconds per call)."""

    def forward(ctx, *inputs):
        setup_context(ctx, inputs, None)
        return impl(*inputs)

    function = type(name, (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def run(*inputs):
        if torch.is_grad_enabled():
            asked = inputs if differentiable is None else [inputs[i] for i in differentiable]
            if any(isinstance(t, torch.Tensor) and t.requires_grad for t in asked):
                return function.apply(*inputs)
        return impl(*inputs)

    run.__name__ = run.__qualname__ = name
    return run
