"""What every drop-in adapter layer does to the nn.Linear it wraps."""
from __future__ import annotations

from torch import nn


def adopt_linear(cls: type, linear: nn.Linear) -> nn.Linear:
    """A new ``cls`` (an nn.Linear subclass) that shares ``linear``'s weight and bias
    Parameters (no copy: isinstance checks, .weight, .bias and state_dict keys stay as they
    were) and freezes them. The caller adds the adapter's own state."""
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = linear.in_features, linear.out_features
    layer.weight, layer.bias = linear.weight, linear.bias
    for param in (layer.weight, layer.bias):
        if param is not None:
            param.requires_grad_(False)
    return layer
