"""The SHiRA adapter's state as ShiraLinear and QuantizedShiraLinear both keep it.

``shira_values`` (trainable) over the entries named by the buffer ``shira_flat_indices``
(sorted flat indices into the [out, in] weight, saved in the state_dict); the structure derived
from them (CSR by rows and columns) in non-persistent buffers, so .to() moves it and
torch.compile sees plain tensors. Derived again whenever the indices change (a load, an in-place
write), before an eager forward's kernels could read through the old structure. A compiled
forward does not look (a version check would break the graph): there the mask changes by
hotswap_, which writes the structure with the indices.
"""
from __future__ import annotations

import contextlib

import torch

from .._checks import FLOAT_DTYPES, tensor_stamp, unchanged, validate_indices
from ..formats import SparseDelta, SparseStructure
from ._wrap import check_copyable

STRUCTURE_FIELDS = ("rows", "cols", "row_offsets", "t_offsets", "t_cols", "t_perm")
STRUCTURE_BUFFERS = tuple(f"_shira_{name}" for name in STRUCTURE_FIELDS)


class SparseAdapterState:
    """Mixed into an nn.Module that has ``shira_values``, the buffer ``shira_flat_indices`` and
    ``adapted_shape`` (out, in)."""

    adapted_shape: tuple[int, int]

    def _set_structure(self, structure: SparseStructure) -> None:
        for name in STRUCTURE_FIELDS:
            self.register_buffer(f"_shira_{name}", getattr(structure, name), persistent=False)
        # What the structure was derived from: the forward derives it again if they change.
        indices = self._buffers["shira_flat_indices"]
        self._shira_derived_from = (indices, tensor_stamp(indices))

    def _refresh_structure(self) -> None:
        """The indices were replaced or written in place since the structure was derived
        (e.g. ``layer.shira_flat_indices.copy_(other)``): check them and derive it again, so
        that no kernel reads through the old structure."""
        indices = self._buffers["shira_flat_indices"]
        out_f, in_f = self.adapted_shape
        validate_indices(indices, out_f * in_f, name="shira_flat_indices", ascending=True)
        if indices.numel() != self.shira_values.numel():
            raise ValueError(f"shira_flat_indices has {indices.numel()} entries but shira_values "
                             f"has {self.shira_values.numel()}")
        self._set_structure(SparseDelta(self.adapted_shape, indices, self.shira_values.detach())
                            .structure)

    def _structure_stale(self) -> bool:
        derived_from, stamp = self._shira_derived_from
        indices = self._buffers["shira_flat_indices"]
        return derived_from is not indices or not unchanged(indices, stamp)

    def _adapter_writes_excluded(self):
        """A context in which no other thread is half-way through writing the adapter in
        place (ShiraLinear: its weight's lock, which hotswap_ holds exclusively)."""
        return contextlib.nullcontext()

    def _structure_for_forward(self) -> SparseStructure:
        """The structure, derived again first if the indices changed (not while tracing: a
        compiled model changes its adapter by hotswap_, which keeps it current)."""
        if not torch.compiler.is_compiling() and self._structure_stale():
            # A hotswap_ in another thread writes the indices before the structure: wait for
            # it and look again, or this forward would derive the structure itself and put
            # new buffers in place of those hotswap_ writes into (and that other forwards hold).
            with self._adapter_writes_excluded():
                if self._structure_stale():
                    self._refresh_structure()
        return self._structure()

    def _structure(self) -> SparseStructure:
        buffers = self._buffers  # not getattr: nn.Module.__getattr__ would run per name, per call
        return SparseStructure(*(buffers[name] for name in STRUCTURE_BUFFERS))

    @property
    def delta(self) -> SparseDelta:
        """The adapter as a SparseDelta (shares the indices, values and structure)."""
        return SparseDelta(self.adapted_shape, self.shira_flat_indices, self.shira_values,
                           structure=self._structure())

    def _check_loadable_entries(self, indices, values, idx_key: str, val_key: str,
                                build_hint: str) -> None:
        """The adapter entries a load would copy in, checked before torch copies any of them
        (a refused load leaves the layer as it was; bad indices would reach the kernels). They
        need data even for load_state_dict(assign=True): they are read (checked, and the
        structure derived from them)."""
        for key, t in ((idx_key, indices), (val_key, values)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{key} must be a tensor, got {type(t).__name__}")
            check_copyable(key, t)
        out_f, in_f = self.adapted_shape
        try:
            validate_indices(indices, out_f * in_f, name=idx_key, ascending=True)
        except (TypeError, ValueError) as e:
            raise type(e)(f"load_state_dict: {e}") from None
        if values.dim() != 1 or values.numel() != indices.numel():
            raise ValueError(f"load_state_dict: {val_key} has shape {tuple(values.shape)} but "
                             f"{idx_key} has {indices.numel()} entries")
        if values.dtype not in FLOAT_DTYPES:
            raise TypeError(f"load_state_dict: {val_key} has dtype {values.dtype}")
        if indices.numel() != self.shira_flat_indices.numel():
            raise ValueError(f"load_state_dict: {idx_key} has {indices.numel()} entries but "
                             f"this layer has {self.shira_flat_indices.numel()}; build the layer "
                             f"with that mask ({build_hint}) to load it")

    @staticmethod
    def _after_load(module: "SparseAdapterState", incompatible_keys) -> None:
        # Loaded indices may differ from the ones the structure was derived from.
        module._refresh_structure()
