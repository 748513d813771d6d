"""What every drop-in adapter layer does to the nn.Linear it wraps."""
from __future__ import annotations

from torch import nn


def adopt_linear(cls: type, linear: nn.Linear, init=None) -> nn.Linear:
    """A new ``cls`` (an nn.Linear subclass) that shares ``linear``'s weight and bias
    Parameters (no copy: isinstance checks, .weight, .bias and state_dict keys stay as they
    were) and freezes them; then ``init(layer)`` adds the adapter's own state. If ``init``
    raises (a bad argument), ``linear``'s parameters get their requires_grad back: a refused
    call leaves the caller's layer as it was."""
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = linear.in_features, linear.out_features
    layer.weight, layer.bias = linear.weight, linear.bias
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    trainable = [p.requires_grad for p in params]
    for param in params:
        param.requires_grad_(False)
    if init is not None:
        try:
            init(layer)
        except BaseException:
            for param, flag in zip(params, trainable):
                param.requires_grad_(flag)
            raise
    return layer
