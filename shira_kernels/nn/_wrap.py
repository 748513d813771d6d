"""What every drop-in adapter layer does to the nn.Linear it wraps."""
from __future__ import annotations

import warnings

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


class _Required:
    """The default of a renamed argument: "not passed" (None can be a value passed, and refused)."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()


def renamed_argument(owner: str, new_name: str, new, old_name: str, old) -> tuple[object, str]:
    """(value, the name the caller used) of an argument renamed old_name → new_name.

    The old keyword is accepted with a DeprecationWarning (attributed to owner's caller); both
    at once, or neither, is a TypeError, like Python's own for a duplicate or missing argument.
    The name is returned so that a refused value's message names the argument the caller wrote.
    """
    if old is REQUIRED:
        if new is REQUIRED:
            raise TypeError(f"{owner}() missing required argument: {new_name!r}")
        return new, new_name
    if new is not REQUIRED:
        raise TypeError(f"{owner}() got both {new_name!r} and {old_name!r}, its deprecated old "
                        f"name; pass only {new_name!r}")
    warnings.warn(f"{owner}(): {old_name}= is deprecated, pass {new_name}=",
                  DeprecationWarning, stacklevel=3)
    return old, old_name
