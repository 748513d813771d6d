"""Data formats: SparseDelta, a sparse [out, in] update to a weight, and BinaryWeight, a 1-bit
weight (packed signs and fp32 α, μ).

SparseDelta:
Canonical form: sorted unique flat indices (row·in + col; int32 while out·in < 2³¹, else int64)
and values in the same order. Because the indices are sorted, CSR order *is* flat order: the
values need no permutation for the row-wise kernels. Everything the kernels need beyond that
(COO rows, CSR offsets and columns, the transposed CSR for gy·S) is derived once per index
tensor and cached, never per call; the cache follows the index tensor (recomputed only if it is
written in place, which bumps its version, or replaced, e.g. by .to(device)).
"""
from __future__ import annotations

import sys
import threading
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._checks import (TensorCache, check_real_values, check_scale, check_size, tensor_stamp,
                      unchanged, validate_indices)

__all__ = ["BinaryWeight", "SparseDelta", "SparseDeltaSet", "SparseDeltaSetState", "SparseStructure", "flat_index_dtype", "pack_signs",
           "unpack_signs"]


def _weight_shape(shape) -> tuple[int, int]:
    """(out, in) as two ints ≥ 1, or an error that names the argument (a tensor passed where
    the shape goes, e.g. with the arguments swapped, would otherwise surface as a confusing
    index error)."""
    try:
        out_features, in_features = shape
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"shape must be (out_features, in_features), got {shape!r:.80}") from None
    # Integers only (4.5 or 4.0 is refused by name, not truncated by int()).
    out_features = check_size(out_features, "shape[0] (out_features)", minimum=None)
    in_features = check_size(in_features, "shape[1] (in_features)", minimum=None)
    if out_features < 1 or in_features < 1:
        raise ValueError(f"shape must be (out, in) with both ≥ 1, got {(out_features, in_features)}")
    return out_features, in_features


def flat_index_dtype(shape: tuple[int, int]) -> torch.dtype:
    return torch.int32 if shape[0] * shape[1] < 2**31 else torch.int64


@dataclass(frozen=True)
class SparseStructure:
    """The derived index arrays of a SparseDelta (all on the indices' device).

    rows:        int32 [nnz], the row of each entry (COO, for the sddmm)
    cols:        int32 [nnz], the column of each entry (CSR column indices too)
    row_offsets: int64 [out + 1], CSR offsets
    t_offsets:   int64 [in + 1], offsets of the transposed CSR (S as [in, out], for gy·S)
    t_cols:      int32 [nnz], its column indices (= rows of S, in column-major order)
    t_perm:      int64 [nnz], values[t_perm] are the values in transposed order

    Columns are int32 even where int16 would hold them: a module's buffers must be of a type
    torch.distributed can broadcast (DDP syncs buffers; neither gloo nor NCCL carries int16),
    and int16 columns measured no faster in the CPU kernels (their time goes to the gathered
    rows of x, not to the index bytes).
    """
    rows: torch.Tensor
    cols: torch.Tensor
    row_offsets: torch.Tensor
    t_offsets: torch.Tensor
    t_cols: torch.Tensor
    t_perm: torch.Tensor

    @staticmethod
    def build(flat_indices: torch.Tensor, shape: tuple[int, int]) -> "SparseStructure":
        out_features, in_features = shape
        flat = flat_indices.long()
        rows = torch.div(flat, in_features, rounding_mode="floor")
        cols = flat - rows * in_features
        row_offsets = torch.zeros(out_features + 1, dtype=torch.int64, device=flat.device)
        row_offsets[1:] = torch.cumsum(torch.bincount(rows, minlength=out_features), 0)
        # Transposed order: by column, then row (stable sort of the already row-sorted entries).
        t_perm = torch.sort(cols, stable=True).indices
        t_offsets = torch.zeros(in_features + 1, dtype=torch.int64, device=flat.device)
        t_offsets[1:] = torch.cumsum(torch.bincount(cols, minlength=in_features), 0)
        return SparseStructure(
            rows=rows.to(torch.int32), cols=cols.to(torch.int32),
            row_offsets=row_offsets, t_offsets=t_offsets,
            t_cols=rows[t_perm].to(torch.int32), t_perm=t_perm)


_STRUCTURES = TensorCache()


def _structure_of(flat_indices: torch.Tensor, shape: tuple[int, int]) -> SparseStructure:
    cached = _STRUCTURES.get(flat_indices, shape)
    if cached is not None:
        return cached
    return _STRUCTURES.put(flat_indices, SparseStructure.build(flat_indices, shape), shape)


_CHECKED_STRUCTURES = TensorCache()  # structure.rows → (indices, fields) found consistent
_STRUCTURE_FIELDS = ("rows", "cols", "row_offsets", "t_offsets", "t_cols", "t_perm")


def _check_structure(structure, flat_indices: torch.Tensor, shape: tuple[int, int]) -> None:
    """Raise unless ``structure`` is the one derived from ``flat_indices`` for ``shape``: the
    kernels read x and W through its columns and offsets, so a structure of another delta
    would read out of bounds. Compared with a fresh derivation once per (structure, indices)
    pair, and again after its rows or the indices are written."""
    if not isinstance(structure, SparseStructure):
        raise TypeError(f"structure must be a SparseStructure, got {type(structure).__name__}")
    fields = tuple(getattr(structure, name) for name in _STRUCTURE_FIELDS)
    if not all(isinstance(t, torch.Tensor) for t in fields):
        raise TypeError("structure's fields must be tensors")
    cached = _STRUCTURES.get(flat_indices, shape)
    if cached is structure:
        return
    key = (shape, tuple(id(t) for t in fields), id(flat_indices), flat_indices._version
           if not flat_indices.is_inference() else None)
    checked = _CHECKED_STRUCTURES.get(structure.rows, key)
    if checked is not None and checked() is flat_indices:
        return
    # Derived for the comparison only (not cached: the caller keeps its own copy).
    expected = cached if cached is not None else SparseStructure.build(flat_indices, shape)
    for name, got in zip(_STRUCTURE_FIELDS, fields):
        want = getattr(expected, name)
        if (got.dtype != want.dtype or got.shape != want.shape or got.device != want.device
                or not bool(torch.equal(got, want))):
            raise ValueError(f"structure.{name} was not derived from these flat_indices and "
                             "shape; leave structure out (it is derived and cached) or pass "
                             "the delta's own .structure")
    _CHECKED_STRUCTURES.put(structure.rows, weakref.ref(flat_indices), key)


def _holds_integers(t: torch.Tensor) -> bool:
    """Whether t's dtype is an integer type (bool is not: True would read as index 1)."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


class SparseDelta:
    """A sparse update S of shape (out, in): sorted unique flat indices and their values.

    Build one with from_flat, from_mask or from_coo (they sort and check); the constructor
    itself takes indices that are already canonical (sorted ascending, unique, in range) and
    checks them, rejecting unsorted ones (cached per index tensor). ``flat_indices`` and
    ``values`` may be replaced by assignment: the new tensor is checked the same way and the
    derived structure is dropped. A ``structure=`` passed in is checked against the indices
    (once per structure) so that no kernel reads through a structure of another delta.
    Inside torch.compile the checks are skipped and the structure must come with the delta
    (``structure=``, or ``with_values`` on a delta whose structure was used before), as
    ShiraLinear does with its buffers.
    """

    def __init__(self, shape, flat_indices: torch.Tensor, values: torch.Tensor, *,
                 structure: SparseStructure | None = None):
        shape = _weight_shape(shape)
        if not isinstance(flat_indices, torch.Tensor):
            raise TypeError(f"flat_indices must be a torch.Tensor, got {type(flat_indices).__name__}")
        if not isinstance(values, torch.Tensor) or values.dim() != 1:
            raise ValueError("values must be a 1-D tensor")
        if not values.is_floating_point():
            raise TypeError(f"values must be a floating-point tensor, got {values.dtype}")
        if values.numel() != flat_indices.numel():
            raise ValueError(f"values has {values.numel()} entries but flat_indices has "
                             f"{flat_indices.numel()}")
        if values.device != flat_indices.device:
            raise ValueError(f"values is on {values.device} but flat_indices on "
                             f"{flat_indices.device}")
        compiling = torch.compiler.is_compiling()
        if not compiling:
            validate_indices(flat_indices, shape[0] * shape[1], name="flat_indices",
                             ascending=True)
        self.shape = shape
        self._flat_indices = flat_indices
        self._values = values
        if structure is not None and not compiling:
            _check_structure(structure, flat_indices, shape)
        self._set_structure(structure)

    def _set_structure(self, structure: SparseStructure | None) -> None:
        # With the indices' stamp: an in-place write to them (which the setter does not see)
        # makes the structure stale, and the indices are checked and it derived again.
        self._structure = structure
        self._structure_stamp = (None if structure is None or torch.compiler.is_compiling()
                                 else tensor_stamp(self._flat_indices))

    def _current_structure(self) -> SparseStructure | None:
        """The structure kept, if the indices were not written since it was derived or checked
        (inside torch.compile: as kept, the check cannot run there)."""
        structure = self._structure
        if structure is None or torch.compiler.is_compiling():
            return structure
        stamp = self._structure_stamp
        return structure if stamp is not None and unchanged(self._flat_indices, stamp) else None

    @property
    def flat_indices(self) -> torch.Tensor:
        return self._flat_indices

    @flat_indices.setter
    def flat_indices(self, flat_indices: torch.Tensor) -> None:
        # Checked like the constructor's; the structure was derived from the old indices.
        SparseDelta(self.shape, flat_indices, self._values)
        self._flat_indices = flat_indices
        self._set_structure(None)

    @property
    def values(self) -> torch.Tensor:
        return self._values

    @values.setter
    def values(self, values: torch.Tensor) -> None:
        SparseDelta(self.shape, self._flat_indices, values, structure=self._current_structure())
        self._values = values

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def from_flat(cls, flat_indices, shape, values=None, *, dtype=torch.float32) -> "SparseDelta":
        """From flat indices in any order (values follow them), of any integer dtype; values
        as given where it is a tensor, else (a list, an array) in ``dtype``; zeros in ``dtype``
        when values is None."""
        shape = _weight_shape(shape)
        if not isinstance(flat_indices, torch.Tensor):
            flat_indices = torch.as_tensor(flat_indices)
            if flat_indices.numel() == 0:  # [] reads as float32: an empty adapter, no entries
                flat_indices = flat_indices.long()
        if not _holds_integers(flat_indices) or flat_indices.dim() != 1:
            raise TypeError(f"flat_indices must be a 1-D tensor of integers, got "
                            f"{flat_indices.dim()}-D {flat_indices.dtype}")
        if flat_indices.dtype not in (torch.int32, torch.int64):  # int8/16, uint8..64: widened
            flat_indices = flat_indices.long()
        validate_indices(flat_indices, shape[0] * shape[1], name="flat_indices")
        order = torch.argsort(flat_indices)
        flat = flat_indices[order].to(flat_index_dtype(shape))
        if values is None:
            values = torch.zeros(flat.numel(), dtype=dtype, device=flat.device)
        else:
            values = (values.to(flat.device) if isinstance(values, torch.Tensor)
                      else torch.as_tensor(values, dtype=dtype, device=flat.device))
            if values.shape != flat_indices.shape:
                raise ValueError(f"values has shape {tuple(values.shape)} but flat_indices has "
                                 f"{tuple(flat_indices.shape)}")
            values = values[order]
        return cls(shape, flat, values)

    @classmethod
    def from_coo(cls, rows, cols, shape, values=None, *, dtype=torch.float32) -> "SparseDelta":
        rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
        if rows.shape != cols.shape or rows.dim() != 1:
            raise ValueError("rows and cols must be 1-D tensors of the same length")
        out_features, in_features = _weight_shape(shape)
        for name, t, extent in (("rows", rows, out_features), ("cols", cols, in_features)):
            # .long() below would truncate 1.7 to row 1 and take True as 1 ([] reads as float).
            if t.numel() and not _holds_integers(t):
                raise TypeError(f"{name} must hold integers, got {t.dtype}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= extent):
                raise ValueError(f"{name} has entries outside [0, {extent})")
        return cls.from_flat(rows.long() * in_features + cols.long(), shape, values, dtype=dtype)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, values=None, *, dtype=torch.float32) -> "SparseDelta":
        """From a boolean [out, in] mask; values, if given, is a dense [out, in] tensor whose
        masked entries are taken."""
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise TypeError("mask must be a 2-D bool tensor")
        flat = torch.nonzero(mask.reshape(-1)).view(-1)
        if values is not None:
            if values.shape != mask.shape:
                raise ValueError(f"values has shape {tuple(values.shape)} but mask has "
                                 f"{tuple(mask.shape)}")
            values = values.reshape(-1)[flat]
        return cls.from_flat(flat, mask.shape, values, dtype=dtype)

    # -- views -----------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return self.flat_indices.numel()

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def structure(self) -> SparseStructure:
        """The derived index arrays, computed once per index tensor (and again, after the
        indices are checked again, once they were written in place)."""
        structure = self._current_structure()
        if structure is None:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    "a SparseDelta's structure is derived eagerly: touch delta.structure once "
                    "before torch.compile traces a call with it, or build the delta with "
                    "structure=... (ShiraLinear keeps its structure in buffers)")
            # Checked again if written in place since the constructor's check (cached per
            # version of the index tensor: free otherwise).
            validate_indices(self._flat_indices, self.shape[0] * self.shape[1],
                             name="flat_indices", ascending=True)
            structure = _structure_of(self._flat_indices, self.shape)
            self._set_structure(structure)
        return structure

    def with_values(self, values: torch.Tensor) -> "SparseDelta":
        """The same sparsity pattern (and structure) with other values."""
        return SparseDelta(self.shape, self.flat_indices, values, structure=self.structure)

    @classmethod
    def _of_checked_parts(cls, shape, flat_indices, values, structure) -> "SparseDelta":
        """A delta of parts already checked together, unchecked again: SparseDeltaSet's view
        of what it copied from a checked delta (its values and structure in the set's
        buffers)."""
        delta = cls.__new__(cls)
        delta.shape, delta._flat_indices, delta._values = shape, flat_indices, values
        delta._set_structure(structure)
        return delta

    def to(self, *args, **kwargs) -> "SparseDelta":
        values = self.values.to(*args, **kwargs)
        return SparseDelta(self.shape, self.flat_indices.to(values.device), values)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dense = torch.zeros(self.shape, dtype=dtype or self.dtype, device=self.device)
        dense.view(-1)[self.flat_indices.long()] = self.values.to(dense.dtype)
        return dense

    def __repr__(self) -> str:
        return (f"SparseDelta(shape={self.shape}, nnz={self.nnz}, density={self.density:.4f}, "
                f"dtype={self.dtype}, device={self.device})")


# ---------------------------------------------------------------------------------------------
# BinaryWeight: a 1-bit weight W ≈ μ + α·s, s = ±1.
# ---------------------------------------------------------------------------------------------
def _bit_shifts(device) -> torch.Tensor:
    # Made per call (not a module constant) so that fake-tensor tracing sees no real tensor.
    return torch.arange(32, dtype=torch.int64, device=device)


def _kind(value) -> str:
    """What a refused argument was, for the message: a tensor's dtype and shape, else its type."""
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} of shape {tuple(value.shape)}"
    return type(value).__name__


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Bool [out, in] (True = +1) → int32 [out, ceil(in/32)]: bit k of word j is column 32·j + k
    (least significant bit first); each row is padded with 0 bits on its own."""
    if not isinstance(signs, torch.Tensor) or signs.dtype != torch.bool or signs.dim() != 2:
        raise TypeError(f"signs must be a 2-D bool tensor, got {_kind(signs)}")
    out_features, in_features = signs.shape
    words = (in_features + 31) // 32
    padded = torch.zeros(out_features, words * 32, dtype=torch.int64, device=signs.device)
    padded[:, :in_features] = signs
    packed = (padded.view(out_features, words, 32) << _bit_shifts(signs.device)).sum(-1)
    # Two's complement: words with bit 31 set are negative int32 values.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_signs(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The inverse of pack_signs: int32 [out, words] → bool [out, in_features]."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise TypeError("packed must be a 2-D int32 tensor")
    if not (packed.shape[1] - 1) * 32 < in_features <= packed.shape[1] * 32:
        raise ValueError(f"{packed.shape[1]} words per row cannot hold {in_features} columns")
    if sys.byteorder == "little":  # byte b of a word holds its bits 8b .. 8b + 7
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        bits = (packed.contiguous().view(torch.uint8).unsqueeze(-1) >> shifts) & 1
    else:
        bits = (packed.long().unsqueeze(-1) >> _bit_shifts(packed.device)) & 1
    return bits.view(packed.shape[0], -1)[:, :in_features].bool()


class BinaryWeight:
    """W ≈ μ + α·s with s ∈ {−1, +1}: packed signs int32 [out, ceil(in/32)] and α, μ in fp32,
    either per tensor (shape [1]) or per output row (shape [out])."""

    def __init__(self, packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                 in_features: int):
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32 \
                or packed.dim() != 2:
            raise TypeError(f"packed must be a 2-D int32 tensor, got {_kind(packed)}")
        in_features = check_size(in_features, "in_features")
        if not (packed.shape[1] - 1) * 32 < in_features <= packed.shape[1] * 32:
            raise ValueError(f"packed has {packed.shape[1]} words per row, which cannot hold "
                             f"in_features={in_features}")
        out_features = packed.shape[0]
        for name, t in (("alpha", alpha), ("mu", mu)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                raise TypeError(f"{name} must be a float32 tensor, got {_kind(t)}")
            if t.shape not in ((1,), (out_features,)):
                raise ValueError(f"{name} must have shape (1,) or ({out_features},), got "
                                 f"{tuple(t.shape)}")
            if t.device != packed.device:
                raise ValueError(f"{name} is on {t.device} but packed is on {packed.device}")
        self.packed = packed.contiguous()
        self.alpha = alpha.contiguous()
        self.mu = mu.contiguous()
        self.shape = (out_features, in_features)

    @classmethod
    def from_signs(cls, signs: torch.Tensor, alpha, mu) -> "BinaryWeight":
        """From bool signs [out, in] (True = +1) and α, μ: each a real number or real values
        (a tensor or a sequence) of 1 or ``out`` entries."""
        packed = pack_signs(signs)  # signs checked first: α and μ go to its device
        return cls(packed, check_real_values(alpha, "alpha", signs.device),
                   check_real_values(mu, "mu", signs.device), signs.shape[1])

    @classmethod
    def from_float(cls, weight: torch.Tensor, method: str = "petl") -> "BinaryWeight":
        """Quantize a float [out, in] weight to 1 bit (shira_kernels.quant has the methods)."""
        from .quant import binarize

        signs, alpha, mu = binarize(weight, method)  # checks weight, and detaches it
        return cls.from_signs(signs, alpha, mu)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.alpha, self.mu))

    def signs(self) -> torch.Tensor:
        """Bool [out, in], True where s = +1."""
        return unpack_signs(self.packed, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # μ + α·s with s = ±1, as μ + α or μ − α (the same single rounding).
        mu, alpha = self.mu.view(-1, 1), self.alpha.view(-1, 1)
        return torch.where(self.signs(), mu + alpha, mu - alpha).to(dtype)

    def to(self, device) -> "BinaryWeight":
        """This weight on ``device`` (a torch.device, or its name or index). Devices only: the
        signs are packed bits and α, μ stay fp32 (dequantize(dtype) forms W in a dtype)."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"BinaryWeight.to takes a device, got the dtype {device}: its signs "
                            "are packed bits and α, μ stay fp32 (dequantize(dtype) forms W in a "
                            "dtype)")
        try:
            device = torch.device(device)
        except TypeError:
            raise TypeError(f"device must be a torch.device, str or int, got "
                            f"{_kind(device)}") from None
        except RuntimeError as exc:  # an unknown name, an index with no such device
            raise ValueError(f"device {device!r}: {exc}") from None
        return BinaryWeight(self.packed.to(device), self.alpha.to(device), self.mu.to(device),
                            self.shape[1])

    def __repr__(self) -> str:
        kind = "per row" if self.alpha.numel() > 1 else "per tensor"
        return f"BinaryWeight(shape={self.shape}, α/μ {kind}, {self.nbytes} bytes, device={self.device})"


class SparseDeltaSetState(NamedTuple):
    """One state of a SparseDeltaSet, what a multi_delta_linear call reads: replaced whole by
    add and remove, and nothing a state covers is ever written by them (add appends past its
    ``used`` entries, or into new buffers). The tensors are the whole buffers, of which the
    first ``used`` entries and ``used_offsets`` offsets are the state's (sliced per call, so
    that the slice of ``values`` follows its requires_grad); an adapter in slot s has its
    entries at [e0, e1) and its row offsets (out + 1, then the transposed structure's in + 1,
    both from 0) at [o0, o0 + out + in + 2) of ``offsets``, with (e0, e1, o0) = segments[s]
    (-1s for a free slot)."""
    slots: tuple            # (name, delta, scale) per slot, None where free; delta's values
                            # are a view of ``values``
    values: torch.Tensor | None   # the adapters' values one after the other
    cols: torch.Tensor | None     # int32
    rows: torch.Tensor | None     # int32
    t_cols: torch.Tensor | None   # int32
    t_perm: torch.Tensor | None   # int64, within the adapter's entries
    offsets: torch.Tensor | None  # int64
    segments: torch.Tensor        # int64 [slots, 3] on the CPU: (e0, e1, o0)
    scales: torch.Tensor          # float64 [slots] on the CPU (0 where free)
    used: int
    used_offsets: int


_ENTRY_FIELDS = ("values", "cols", "rows", "t_cols", "t_perm")


class SparseDeltaSet:
    """Many adapters' sparse deltas for one weight [out, in], each with its scale, packed in
    one set of buffers for a batch whose rows use different adapters (multi_delta_linear).

    Each adapter holds a slot, its index in ``row_adapter`` tensors (``index(name)``), and a
    segment of the buffers: its values, its CSR columns and rows and its transposed structure,
    copied in once by ``add``. Removing one frees its slot and leaves every other slot and
    segment as it was; ``add`` reuses the lowest free slot and appends its segment (when the
    buffers are full, they are made anew, twice the live entries, with the live segments
    only). So a call's inputs are the same dozen tensors however many adapters the set holds.

    The set owns its values: ``add`` copies them (later writes to the delta given are not
    seen), ``delta(name).values`` is a view of the set's ``values`` buffer (writes to it are
    seen by the next call), and training many adapters in one batch trains ``values``
    (``requires_grad_()``; adapter ``name``'s gradient is ``values.grad[segment(name)]``). A
    full buffer's replacement on ``add`` makes ``values`` a new tensor: add before building an
    optimizer over it.
    """

    BASE = "__base__"  # the name of "no adapter" in row_adapter lists, as PEFT's adapter_names

    def __init__(self, shape):
        self.shape = _weight_shape(shape)
        self._lock = threading.Lock()  # add/remove from several threads: one slot per name
        self._index: dict[str, int] = {}
        self._buffers: dict[str, torch.Tensor] | None = None  # _ENTRY_FIELDS and "offsets"
        self._used = self._used_offsets = 0
        self._state = SparseDeltaSetState((), *([None] * 6),
                                          torch.empty(0, 3, dtype=torch.int64),
                                          torch.empty(0, dtype=torch.float64), 0, 0)

    def __getstate__(self) -> dict:  # copy.deepcopy, pickle, torch.save: all but the lock
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def _offsets_per_adapter(self) -> int:
        return self.shape[0] + self.shape[1] + 2

    def add(self, name: str, delta: SparseDelta, scale: float = 1.0) -> int:
        """Add adapter ``name`` (a copy of its delta, and its scale); returns its slot."""
        if not isinstance(name, str) or not name or name == self.BASE:
            raise ValueError(f"an adapter name must be a non-empty str other than {self.BASE!r}, "
                             f"got {name!r}")
        if not isinstance(delta, SparseDelta):
            raise TypeError(f"delta must be a SparseDelta, got {type(delta).__name__}")
        if tuple(delta.shape) != self.shape:
            raise ValueError(f"adapter {name!r} has shape {tuple(delta.shape)}, this set's weight "
                             f"is {self.shape}")
        if delta.values.requires_grad:
            raise ValueError(f"adapter {name!r}: its values require grad, but the set keeps a "
                             "copy, which the gradient would not reach: add a delta of "
                             "values.detach() to serve it, or train the set's own values "
                             "(requires_grad_())")
        scale = check_scale(scale)
        # Derived here if the delta has none yet, and not kept beyond the copy: the buffers hold
        # it (the deltas the set hands out view them), so a bank of many adapters does not
        # hold each structure twice.
        structure = delta._current_structure()
        if structure is None:  # indices written in place since their check are checked again
            validate_indices(delta.flat_indices, self.shape[0] * self.shape[1],
                             name=f"adapter {name!r}: flat_indices", ascending=True)
            structure = (_STRUCTURES.get(delta.flat_indices, self.shape)
                         or SparseStructure.build(delta.flat_indices, self.shape))
        with self._lock, torch.inference_mode(False), torch.no_grad():
            if name in self._index:
                raise ValueError(f"adapter {name!r} is already in this set")
            state = self._state
            if self._index and (self._buffers["values"].device, self._buffers["values"].dtype) \
                    != (delta.device, delta.dtype):
                raise ValueError(f"adapter {name!r} is {delta.dtype} on {delta.device}, the "
                                 f"set's adapters are {self._buffers['values'].dtype} on "
                                 f"{self._buffers['values'].device}")
            nnz, per = delta.nnz, self._offsets_per_adapter
            buffers = self._buffers
            if (buffers is None or self._used + nnz > buffers["values"].numel()
                    or self._used_offsets + per > buffers["offsets"].numel()
                    or (buffers["values"].device, buffers["values"].dtype)
                    != (delta.device, delta.dtype)):
                state = self._repack(state, delta, nnz)
                buffers = self._buffers
            e0, o0 = self._used, self._used_offsets
            e1 = e0 + nnz
            for field, source in zip(_ENTRY_FIELDS, (delta.values, structure.cols, structure.rows,
                                                     structure.t_cols, structure.t_perm)):
                buffers[field][e0:e1].copy_(source)
            buffers["offsets"][o0:o0 + self.shape[0] + 1].copy_(structure.row_offsets)
            buffers["offsets"][o0 + self.shape[0] + 1:o0 + per].copy_(structure.t_offsets)
            self._used, self._used_offsets = e1, o0 + per
            slot = next((i for i, entry in enumerate(state.slots) if entry is None),
                        len(state.slots))
            entry = (name, self._view(delta, e0, e1, o0), scale)
            self._publish(state, slot, entry, (e0, e1, o0), scale)
            self._index[name] = slot
        return slot

    def remove(self, name: str) -> None:
        """Remove adapter ``name``; its slot becomes free, the others keep theirs (its segment
        is reclaimed when the buffers are next made anew)."""
        with self._lock:
            slot = self.index(name)
            self._publish(self._state, slot, None, (-1, -1, -1), 0.0)
            del self._index[name]

    def _publish(self, state: SparseDeltaSetState, slot: int, entry, segment, scale) -> None:
        """The next state: ``state`` with ``slot`` set to ``entry``, and the buffers' used
        parts (the caller holds the lock)."""
        slots, segments, scales = list(state.slots), state.segments.clone(), state.scales.clone()
        if slot == len(slots):
            slots.append(None)
            segments = torch.cat([segments, segments.new_full((1, 3), -1)])
            scales = torch.cat([scales, scales.new_zeros(1)])
        slots[slot] = entry
        segments[slot] = torch.tensor(segment, dtype=torch.int64)
        scales[slot] = scale
        b = self._buffers or {}
        self._state = SparseDeltaSetState(
            tuple(slots), *(b.get(f) for f in _ENTRY_FIELDS + ("offsets",)), segments, scales,
            self._used, self._used_offsets)

    def _repack(self, state: SparseDeltaSetState, delta: SparseDelta,
                nnz: int) -> SparseDeltaSetState:
        """New buffers, in ``delta``'s dtype and device, holding the live segments (moved to
        the front, in slot order) with room for twice them and ``nnz`` more entries; the state
        with the moved segments (the caller holds the lock)."""
        live = [(s, entry) for s, entry in enumerate(state.slots) if entry is not None]
        seg = state.segments.tolist()
        live_entries = sum(seg[s][1] - seg[s][0] for s, _ in live)
        per = self._offsets_per_adapter
        capacity = 2 * (live_entries + nnz) + 64
        slot_capacity = 2 * (len(live) + 1)
        old = self._buffers
        requires_grad = old is not None and old["values"].requires_grad
        device = delta.device
        new = {"values": torch.zeros(capacity, dtype=delta.dtype, device=device),
               "t_perm": torch.zeros(capacity, dtype=torch.int64, device=device),
               "offsets": torch.zeros(slot_capacity * per, dtype=torch.int64, device=device)}
        for field in ("cols", "rows", "t_cols"):
            new[field] = torch.zeros(capacity, dtype=torch.int32, device=device)
        slots, segments = list(state.slots), state.segments.clone()
        self._buffers = new  # _view reads it (the caller holds the lock); ``old`` is copied from
        e, o = 0, 0
        for s, (name, _, scale) in live:
            e0, e1, o0 = seg[s]
            for field in _ENTRY_FIELDS:
                new[field][e:e + e1 - e0].copy_(old[field][e0:e1])
            new["offsets"][o:o + per].copy_(old["offsets"][o0:o0 + per])
            segments[s] = torch.tensor([e, e + e1 - e0, o])
            slots[s] = (name, self._view(state.slots[s][1], e, e + e1 - e0, o), scale)
            e, o = e + e1 - e0, o + per
        new["values"].requires_grad_(requires_grad)
        self._used, self._used_offsets = e, o
        return state._replace(slots=tuple(slots), segments=segments)

    def _view(self, delta: SparseDelta, e0: int, e1: int, o0: int) -> SparseDelta:
        """``delta`` (its shape and indices) over segment [e0, e1) and offsets at o0 of the
        buffers: its values and structure views of them."""
        b, out_f = self._buffers, self.shape[0]
        t_at = o0 + out_f + 1
        structure = SparseStructure(
            rows=b["rows"][e0:e1], cols=b["cols"][e0:e1], row_offsets=b["offsets"][o0:t_at],
            t_offsets=b["offsets"][t_at:o0 + self._offsets_per_adapter],
            t_cols=b["t_cols"][e0:e1], t_perm=b["t_perm"][e0:e1])
        return SparseDelta._of_checked_parts(self.shape, delta.flat_indices,
                                             b["values"].detach()[e0:e1], structure)

    def snapshot(self) -> SparseDeltaSetState:
        """The set as one call reads it (the same object until the next add or remove)."""
        return self._state

    def index(self, name: str) -> int:
        """The slot of adapter ``name``."""
        try:
            return self._index[name]
        except (KeyError, TypeError):
            raise KeyError(f"no adapter {name!r} in this set (it has {self.names})") from None

    def segment(self, name: str) -> slice:
        """Where adapter ``name``'s entries are in ``values`` (and in its gradient)."""
        state = self._state
        e0, e1, _ = state.segments[self.index(name)].tolist()
        return slice(e0, e1)

    def delta(self, name: str) -> SparseDelta:
        """Adapter ``name``'s delta, its values a view of the set's ``values``."""
        return self._state.slots[self.index(name)][1]

    @property
    def values(self) -> torch.Tensor | None:
        """The buffer of every adapter's values (None before the first add); see
        ``segment``."""
        return None if self._buffers is None else self._buffers["values"]

    def requires_grad_(self, requires_grad: bool = True) -> "SparseDeltaSet":
        """Make ``values`` a leaf that takes the gradient of every adapter in the set."""
        if self._buffers is None:
            raise ValueError("this set has no adapters yet: add them first")
        self._buffers["values"].requires_grad_(requires_grad)
        return self

    @property
    def names(self) -> list[str]:
        return [entry[0] for entry in self._state.slots if entry is not None]

    @property
    def slots(self) -> list[tuple[str, SparseDelta, float] | None]:
        """(name, delta, scale) per slot, None where a slot is free (a copy of the list)."""
        return list(self._state.slots)

    def row_adapter(self, names, device=None, *, slots=None) -> torch.Tensor:
        """int64 slots for a list of adapter names, one per batch row (None or "__base__": -1),
        looked up in ``slots`` (a snapshot's slots) where given: one snapshot for the names and
        the adapters a call then runs, which another thread's remove and add could otherwise
        give to another adapter in between."""
        slots = self._state.slots if slots is None else slots
        index = {entry[0]: slot for slot, entry in enumerate(slots) if entry is not None}
        rows = []
        for n in names:
            try:
                rows.append(-1 if n is None or n == self.BASE else index[n])
            except (KeyError, TypeError):
                raise KeyError(f"no adapter {n!r} in this set (it has {list(index)})") from None
        return torch.tensor(rows, dtype=torch.int64, device=device)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name) -> bool:
        return name in self._index

    def __iter__(self):
        return (entry for entry in self._state.slots if entry is not None)

    def __repr__(self) -> str:
        return f"SparseDeltaSet(shape={self.shape}, adapters={self.names})"
