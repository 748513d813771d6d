"""What every drop-in adapter layer does to the nn.Linear it wraps."""
from __future__ import annotations

import sys
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


def _own_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors torch's load takes for ``module`` itself: parameters and persistent
    buffers that are not None."""
    own = {**module._parameters, **{name: b for name, b in module._buffers.items()
                                     if name not in module._non_persistent_buffers_set}}
    return {name: t for name, t in own.items() if t is not None}


def load_is_strict() -> bool:
    """The ``strict`` of the nn.Module.load_state_dict call that is loading now. torch passes
    strict=True to every module's _load_from_state_dict whatever its caller said and applies
    the caller's choice only once every module was loaded, so a layer that wants to refuse a
    strict load before anything is copied, and accept a lenient one, has to look it up. False
    where no such call is running (_load_from_state_dict called directly): torch's own handling
    of missing and unexpected keys then stands."""
    code = nn.Module.load_state_dict.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return bool(frame.f_locals.get("strict", False))
        frame = frame.f_back
    return False


def check_strict_keys(module: nn.Module, state_dict, prefix: str, hint: str = "") -> None:
    """Raise before torch copies anything where a strict load would report a key of
    ``module``'s own as missing or unexpected (``hint`` appended to the message). torch copies
    what fits and raises only after every module was loaded, which would leave the layer
    changed by a refused load. Its submodules' keys are theirs to check."""
    own = _own_state(module)
    extra = prefix + "_extra_state"  # torch's key for get_extra_state()
    takes_extra = type(module).set_extra_state is not nn.Module.set_extra_state
    missing = [prefix + name for name in own if prefix + name not in state_dict]
    if takes_extra and extra not in state_dict:
        missing.append(extra)
    if missing:
        raise ValueError(f"load_state_dict: {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} missing{hint}")
    unexpected = []
    for key in state_dict:
        if not key.startswith(prefix) or (takes_extra and key == extra):
            continue
        head, dot, _ = key[len(prefix):].partition(".")
        if (head not in module._modules) if dot else (head not in own):
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"load_state_dict: unexpected key(s) {', '.join(unexpected)} for "
                         f"{type(module).__name__}{hint}")


def check_copyable(key: str, t: torch.Tensor, current: torch.Tensor | None = None) -> None:
    """Raise ValueError naming ``key`` unless torch's load can copy ``t`` into ``current`` (of
    the same shape): a meta, sparse or quantized ``t`` fails in copy_, which torch reports only
    after copying the layer's other tensors. A meta ``t`` copies into a meta ``current`` (a
    no-op); without ``current`` (a tensor the layer reads before loading it) it needs data."""
    if (t.layout != torch.strided or t.is_quantized
            or (t.is_meta and (current is None or not current.is_meta))):
        raise ValueError(f"load_state_dict: {key} is not a dense tensor with data (layout "
                         f"{t.layout}, device {t.device}, dtype {t.dtype})")


def check_loadable(module: nn.Module, state_dict, prefix: str, finite: tuple[str, ...] = (),
                   hint: str = "", *, assign: bool = False) -> None:
    """Raise before torch copies anything unless ``state_dict`` fits ``module``'s own parameters
    and persistent buffers (torch copies every tensor that fits and reports the others after,
    which leaves a layer half loaded): each present key a tensor of the same shape and kind (an
    integer buffer only its own dtype; a float one any float dtype) that copies
    (check_copyable; with ``assign``, load_state_dict(assign=True), torch puts it in place
    instead, whatever its data), in a strict load none missing or unexpected
    (check_strict_keys), and the names in ``finite`` finite."""
    for name, current in _own_state(module).items():
        key = prefix + name
        if key not in state_dict:
            continue
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"load_state_dict: {key} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(current.shape):
            raise ValueError(f"load_state_dict: {key} has shape {tuple(t.shape)}, this layer's "
                             f"{tuple(current.shape)}")
        if not assign:
            check_copyable(key, t, current)
        if (t.is_floating_point() != current.is_floating_point()
                or (not current.is_floating_point() and t.dtype != current.dtype)):
            raise TypeError(f"load_state_dict: {key} has dtype {t.dtype}, this layer's "
                            f"{current.dtype}")
        if name in finite and not t.is_meta and not bool(torch.isfinite(t).all()):
            raise ValueError(f"load_state_dict: {key} holds non-finite values")
    if load_is_strict():  # torch's `strict` in _load_from_state_dict is always True
        check_strict_keys(module, state_dict, prefix, hint)


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
