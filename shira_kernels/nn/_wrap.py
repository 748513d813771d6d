"""What every drop-in adapter layer does to the nn.Linear it wraps."""
from __future__ import annotations

import warnings

import torch
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


def check_loadable(module: nn.Module, state_dict, prefix: str, strict: bool,
                   finite: tuple[str, ...] = (), hint: str = "") -> None:
    """Raise before torch copies anything unless ``state_dict`` fits ``module``'s own parameters
    and persistent buffers (torch copies every tensor that fits and reports the others after,
    which leaves a layer half loaded): each present key a tensor of the same shape and kind (an
    integer buffer only its own dtype; a float one any float dtype), with ``strict`` none
    missing (``hint`` appended to that message), and the names in ``finite`` finite."""
    own = {**module._parameters, **{name: b for name, b in module._buffers.items()
                                     if name not in module._non_persistent_buffers_set}}
    for name, current in own.items():
        key = prefix + name
        if current is None:
            continue
        if key not in state_dict:
            if strict:
                raise ValueError(f"load_state_dict: {key} is missing{hint}")
            continue
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"load_state_dict: {key} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(current.shape):
            raise ValueError(f"load_state_dict: {key} has shape {tuple(t.shape)}, this layer's "
                             f"{tuple(current.shape)}")
        if (t.is_floating_point() != current.is_floating_point()
                or (not current.is_floating_point() and t.dtype != current.dtype)):
            raise TypeError(f"load_state_dict: {key} has dtype {t.dtype}, this layer's "
                            f"{current.dtype}")
        if name in finite and not t.is_meta and not bool(torch.isfinite(t).all()):
            raise ValueError(f"load_state_dict: {key} holds non-finite values")


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
