"""Index checks shared by the ops and the formats. Reading indices costs a pass over them, so
the result is kept per index tensor and redone only when it changes (torch bumps a tensor's
_version on every in-place write): repeated calls with the same adapter stay cheap."""
from __future__ import annotations

import weakref

import torch

INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TensorCache:
    """Values derived from tensors, each kept while its tensor lives and is not written to
    (torch bumps a tensor's _version on every in-place write), optionally for a given `extra`.
    Keyed by identity in a plain dict with a weakref per entry: a lookup is a dict get and two
    attribute reads, where torch's WeakIdKeyDictionary builds a key object per lookup (every
    op call looks up its tensors' derived data)."""

    def __init__(self):
        self._entries: dict[int, tuple] = {}

    def get(self, tensor: torch.Tensor, extra=None):
        entry = self._entries.get(id(tensor))
        if entry is not None and entry[0]() is tensor and entry[1] == (tensor._version, extra):
            return entry[2]
        return None

    def put(self, tensor: torch.Tensor, value, extra=None):
        key, entries = id(tensor), self._entries

        def forget(_ref):  # runs as the tensor is freed, before its id can be reused
            entries.pop(key, None)
        entries[key] = (weakref.ref(tensor, forget), (tensor._version, extra), value)
        return value


_INDEX_STATS = TensorCache()


def _index_stats(index: torch.Tensor) -> tuple[int, int, bool]:
    """(min, max, all unique) of a 1-D index tensor, cached while the tensor is unchanged."""
    cached = _INDEX_STATS.get(index)
    if cached is not None:
        return cached
    if index.numel() == 0:
        stats = (0, -1, True)
    else:
        lo, hi = torch.aminmax(index)
        steps = index[1:] - index[:-1]
        unique = bool((steps > 0).all()) or torch.unique(index).numel() == index.numel()
        stats = (int(lo), int(hi), unique)
    return _INDEX_STATS.put(index, stats)


def validate_indices(indices: torch.Tensor, numel: int, *, name: str = "indices") -> None:
    """Raise ValueError unless ``indices`` are 1-D int32/int64, in [0, numel) and unique."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(indices.shape)}")
    lo, hi, unique = _index_stats(indices)
    if lo < 0 or hi >= numel:
        raise ValueError(f"{name} has entries out of range: min {lo}, max {hi}, "
                         f"but the weight has {numel} entries")
    if not unique:
        raise ValueError(f"{name} has repeated entries; each weight entry may be swapped once")
