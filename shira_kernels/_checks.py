"""Index checks shared by the ops and the formats. Reading indices costs a pass over them, so
the result is kept per index tensor and redone only when it changes (torch bumps a tensor's
_version on every in-place write): repeated calls with the same adapter stay cheap.

torch.inference_mode: an inference tensor (one created inside it) has no version counter, and
it can still be written in place inside inference mode, so for such a tensor the cache keeps a
private copy of its contents and a lookup compares them (one pass, cheaper than what is derived
from it). Normal tensors keep their version counter inside inference mode. Values derived
inside inference mode would be inference tensors, which autograd refuses to save and which
cannot be written outside it; the cache stores normal copies instead, so a first call under
inference_mode leaves nothing behind that breaks a later call outside it."""
from __future__ import annotations

import dataclasses
import math
import numbers
import weakref

import torch

INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _Contents:
    """The stamp of an inference tensor: a private copy of its contents."""

    __slots__ = ("copy",)

    def __init__(self, tensor: torch.Tensor):
        with torch.inference_mode(False):
            self.copy = tensor.detach().clone()

    def matches(self, tensor: torch.Tensor) -> bool:
        copy = self.copy
        return (copy.dtype == tensor.dtype and copy.shape == tensor.shape
                and copy.device == tensor.device and bool(torch.equal(copy, tensor)))


def tensor_stamp(tensor: torch.Tensor):
    """What tells later whether ``tensor`` has been written since: its version counter, or for
    an inference tensor (which has none) a copy of its contents. See ``unchanged``."""
    if tensor.is_inference():
        return _Contents(tensor)
    return tensor._version


def unchanged(tensor: torch.Tensor, stamp) -> bool:
    """Whether ``tensor`` (the same object ``stamp`` was taken of) is unchanged since."""
    if type(stamp) is int:
        return not tensor.is_inference() and tensor._version == stamp
    return tensor.is_inference() and stamp.matches(tensor)


def normal_tensors(value):
    """``value`` (a tensor, or tuples, lists and dataclasses of them) with every inference
    tensor replaced by a normal copy; the same object when there is none."""
    if isinstance(value, torch.Tensor):
        if not value.is_inference():
            return value
        with torch.inference_mode(False):
            return value.clone()
    if isinstance(value, (tuple, list)):
        items = [normal_tensors(v) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
            return type(value)(*items)
        return type(value)(items)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for field in dataclasses.fields(value):
            old = getattr(value, field.name)
            new = normal_tensors(old)
            if new is not old:
                changes[field.name] = new
        return dataclasses.replace(value, **changes) if changes else value
    return value


class TensorCache:
    """Values derived from tensors, each kept while its tensor lives and is not written to
    (torch bumps a tensor's _version on every in-place write), optionally for a given `extra`.
    Keyed by identity in a plain dict with a weakref per entry: a lookup is a dict get and two
    attribute reads, where torch's WeakIdKeyDictionary builds a key object per lookup (every
    op call looks up its tensors' derived data).

    Inference tensors (no version counter) are checked by content instead (see the module
    docstring), and stored values never hold inference tensors (``normal_tensors``)."""

    def __init__(self):
        self._entries: dict[int, tuple] = {}

    def get(self, tensor: torch.Tensor, extra=None):
        entry = self._entries.get(id(tensor))
        if entry is None or entry[0]() is not tensor or entry[2] != extra:
            return None
        stamp = entry[1]
        # The same object, so the same kind: an int stamp is a version (the fast path).
        if type(stamp) is int:
            return entry[3] if tensor._version == stamp else None
        return entry[3] if stamp.matches(tensor) else None

    def put(self, tensor: torch.Tensor, value, extra=None):
        """Store ``value`` for ``tensor`` as it is now; returns what was stored (``value``, or
        a copy of it without inference tensors)."""
        key, entries = id(tensor), self._entries
        value = normal_tensors(value)

        def forget(_ref):  # runs as the tensor is freed, before its id can be reused
            entries.pop(key, None)
        entries[key] = (weakref.ref(tensor, forget), tensor_stamp(tensor), extra, value)
        return value

    def forget(self, tensor: torch.Tensor) -> None:
        """Drop what is kept for ``tensor``."""
        self._entries.pop(id(tensor), None)


_INDEX_STATS = TensorCache()


def _index_stats(index: torch.Tensor) -> tuple[int, int, bool, bool]:
    """(min, max, all unique, sorted ascending) of a 1-D index tensor, cached while the
    tensor is unchanged."""
    cached = _INDEX_STATS.get(index)
    if cached is not None:
        return cached
    if index.numel() == 0:
        stats = (0, -1, True, True)
    else:
        lo, hi = torch.aminmax(index)
        steps = index[1:] - index[:-1]
        ascending = bool((steps > 0).all())
        unique = ascending or torch.unique(index).numel() == index.numel()
        stats = (int(lo), int(hi), unique, ascending)
    return _INDEX_STATS.put(index, stats)


def forget_index_checks(index: torch.Tensor) -> None:
    """Drop the cached check of ``index`` (a kernel found it stale: the tensor was written in
    a way its version counter does not see, e.g. through .data or a numpy view)."""
    _INDEX_STATS.forget(index)


def validate_indices(indices: torch.Tensor, numel: int, *, name: str = "indices",
                     ascending: bool = False) -> None:
    """Raise ValueError unless ``indices`` are 1-D int32/int64, in [0, numel) and unique (and,
    with ``ascending``, sorted: the canonical form of SparseDelta and ShiraLinear)."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(indices.shape)}")
    lo, hi, unique, is_sorted = _index_stats(indices)
    if lo < 0 or hi >= numel:
        raise ValueError(f"{name} has entries out of range: min {lo}, max {hi}, "
                         f"but the weight has {numel} entries")
    if not unique:
        raise ValueError(f"{name} has repeated entries; each weight entry may be swapped once")
    if ascending and not is_sorted:
        raise ValueError(f"{name} must be sorted ascending (the canonical form); "
                         "SparseDelta.from_flat sorts indices and values together")


# ---------------------------------------------------------------------------------------------
# Numbers entering the public API: scales, sizes, and adapted values that must fit a dtype.
# ---------------------------------------------------------------------------------------------
def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        grad = ", requires_grad=True" if value.requires_grad else ""
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}{grad}"
    return f"{type(value).__name__} {value!r:.60}"


def _is_bool(value) -> bool:
    # Python's bool and numpy's bool_ (not a numbers.Integral, but rejected by name all the same).
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def check_float_tensor(name: str, t, dtype=None, device=None) -> None:
    """``t`` is a float32/float16/bfloat16 tensor (of ``dtype`` and on ``device`` where given,
    those of the call's other inputs); TypeError or ValueError naming ``name`` otherwise."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the other inputs have {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def check_linear(x, weight, bias, *, contiguous: bool = True):
    """The inputs of a linear layer's op: x [..., in], weight [out, in] (contiguous where
    ``contiguous``) and bias [out] or None, float tensors on x's device of x's dtype, or of
    any float dtype under autocast (whose rule casts them). Returns that dtype (None under
    autocast)."""
    check_float_tensor("x", x)
    dtype = None if torch.is_autocast_enabled(x.device.type) else x.dtype
    check_float_tensor("weight", weight, dtype, x.device)
    if weight.dim() != 2 or (contiguous and not weight.is_contiguous()):
        kind = "a contiguous 2-D" if contiguous else "a 2-D"
        raise ValueError(f"weight must be {kind} tensor, got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dim must be in_features = "
                         f"{weight.shape[1]}")
    if bias is not None:
        check_float_tensor("bias", bias, dtype, x.device)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    return dtype


def check_scale(value, name: str = "scale") -> float:
    """``value`` as a Python float, for a scale or weight that multiplies an adapter.

    Accepted: int, float, numpy integer and floating scalars (any ``numbers.Real`` but bool),
    and a one-element real tensor that does not require grad (read with .item(), a device sync
    for a GPU tensor; a scale is a constant of the computation, so a tensor that requires grad
    is refused rather than silently cut from the graph). Refused with TypeError naming
    ``name``: bool (True is not a scale), str, None, complex, sequences, tensors that require
    grad, have more than one element or are bool/complex. Refused with ValueError: NaN, ±inf and
    numbers beyond float's range (an int such as 10**400).
    """
    if type(value) is float:  # the hot path (layers keep their scale as a float)
        # A comparison, not math.isfinite: torch.compile traces a float that changed between
        # calls (or any float under dynamic=True) as a symbol, which math.isfinite cannot take.
        if -math.inf < value < math.inf:
            return value
    elif isinstance(value, (torch.SymFloat, torch.SymInt)):
        return value  # traced (torch.compile with dynamic numbers): not read, not specialized
    elif isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise TypeError(f"{name} must be a number, got {_describe(value)} (a scale is not "
                            "trained here; pass a plain number or a detached tensor)")
        if (value.numel() != 1 or value.dtype == torch.bool or value.is_complex()):
            raise TypeError(f"{name} must be a real number, got {_describe(value)}")
        value = value.item()
    elif _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (int or float), got {_describe(value)}")
    try:
        value = float(value)
    except OverflowError:  # an int (or Fraction) past float's range
        raise ValueError(f"{name} must be finite, got {type(value).__name__} beyond float's "
                         "range") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def check_real_values(value, name: str, device: torch.device) -> torch.Tensor:
    """``value`` as a 1-D fp32 tensor on ``device``, for per-tensor or per-row statistics (a
    1-bit weight's α and μ): a real number, or real values (a tensor or a sequence). Refused
    with TypeError naming ``name``: anything torch cannot read as numbers (str, None, nested
    lists of unequal lengths), and bool and complex values, which the cast would take silently.
    """
    if (_is_bool(value) or isinstance(value, (str, bytes))
            or isinstance(value, torch.Tensor) and (value.dtype == torch.bool
                                                    or value.is_complex())):
        raise TypeError(f"{name} must be a real number or real values, got {_describe(value)}")
    try:
        return torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a real number or real values, got "
                        f"{_describe(value)}") from None


def check_size(value, name: str, *, minimum: int | None = 1) -> int:
    """``value`` as a Python int ≥ ``minimum``, for a size (a dimension, a rank, a count).

    Accepted: int, numpy integer scalars (any ``numbers.Integral`` but bool) and a 0-d integer
    tensor. Refused with TypeError naming ``name``: bool, every float, even an integral-valued
    one (40.0 is refused like 40.7: a size computed in floating point is a bug upstream, and
    truncating it would build a different layer), str, None, float and multi-element tensors.
    Refused with ValueError: a value below ``minimum`` (None: no lower bound, for callers
    whose own message covers it).
    """
    if type(value) is not int and not isinstance(value, torch.SymInt):  # SymInt: traced size
        if isinstance(value, torch.Tensor):
            if (value.dim() != 0 or value.dtype == torch.bool or value.is_floating_point()
                    or value.is_complex()):
                raise TypeError(f"{name} must be an int, got {_describe(value)}")
            value = value.item()
        elif _is_bool(value) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {_describe(value)}")
        value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")
    return value


def check_representable(adapted: torch.Tensor, where: str, *, base: torch.Tensor | None = None,
                        index: torch.Tensor | None = None) -> None:
    """Raise ValueError if ``adapted`` (new weight entries, already rounded to the weight's
    dtype, e.g. ``(base.float() + scale * values.float()).to(weight.dtype)``) holds an Inf or
    NaN: the values overflow the dtype (1e5 into float16). With ``base`` (the entries they
    replace, same shape), entries whose base is itself non-finite are not counted (the adapter
    did not make them so). ``where`` starts the message (e.g. "adapter 'a', layer 'fc1'").
    With ``index`` (the entries' flat indices in the weight, same shape), the message names
    the first bad entry by its flat index rather than by its position in ``adapted``.
    Reads the tensor once (a device sync for a GPU tensor)."""
    bad = ~torch.isfinite(adapted)
    if base is not None:
        bad &= torch.isfinite(base)
    count = int(bad.sum())
    if count == 0:
        return
    first = int(bad.reshape(-1).nonzero()[0])
    first = (f"position {first}" if index is None
             else f"flat index {int(index.reshape(-1)[first])}")
    nan = int((bad & torch.isnan(adapted)).sum())
    if nan:  # a finite base plus scale·value is NaN only for a NaN value (the scale is checked)
        raise ValueError(f"{where}: {nan} of the adapter's values are NaN (the first of "
                         f"{count} non-finite adapted entries at {first})")
    limit = torch.finfo(adapted.dtype).max  # integer tensors are always finite: not here
    raise ValueError(f"{where}: the adapted weight does not fit {adapted.dtype}: {count} of "
                     f"{adapted.numel()} entries become non-finite (first at {first}; "
                     f"{adapted.dtype} holds magnitudes up to {limit:.4g}); the values or the "
                     f"scale are too large for this weight")
