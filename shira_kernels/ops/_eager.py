"""Eager calls of the composite ops without torch.library's dispatch.

A torch.library custom op with autograd costs tens of microseconds of Python per call and
direction, more than the GPU work of a decoding step. In eager mode the public functions run an
autograd.Function over the op's own implementation, setup and backward instead; the results
are the same bits (tests/test_sparse_delta.py, test_binary.py). torch.compile (which needs the
op's schema and fake kernel) and autocast (the op's autocast rule) still go through the op.
"""
from __future__ import annotations

import torch


def via_op(x: torch.Tensor) -> bool:
    """Whether this call must go through the registered op."""
    return torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type)


def eager_function(name: str, impl, setup_context, backward) -> type[torch.autograd.Function]:
    """An autograd.Function that runs ``impl`` (the op's implementation, same arguments),
    ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` as registered with
    the op."""

    def forward(ctx, *inputs):
        setup_context(ctx, inputs, None)
        return impl(*inputs)

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})
