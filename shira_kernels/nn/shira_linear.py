"""ShiraLinear: a drop-in nn.Linear with a SHiRA sparse adapter, and helpers to apply it.

The base weight and bias stay the very Parameters of the original layer (frozen), so
isinstance checks, .weight, .bias and the base's state_dict keys are unchanged. The adapter is
a trainable vector ``shira_values`` over the entries named by the buffer ``shira_flat_indices``
(sorted flat indices into W.view(-1); saved in the state_dict). Its old name ``shira_indices``
(PEFT's ShiRA uses that name for COO [2, nnz] pairs) is a deprecated alias, and state_dicts
saved under it still load. The derived CSR structure lives in non-persistent buffers, so .to()
moves it and torch.compile sees plain tensors.

Unfused, forward runs sparse_delta_linear (no clone of W, no dense gradient). merge() swaps the
adapted entries into W with scatter_swap_ (forward is then a plain linear: zero overhead) and
unmerge() swaps the base entries back, bit for bit.
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import FLOAT_DTYPES, check_scale, check_size, tensor_stamp
from .._concurrency import reading, writing
from ..formats import SparseDelta
from ..masks import check_seed, make_mask, mask_to_indices
from ..ops.scatter_swap import merge_by_swap, swap_transaction
from ..ops.sparse_delta import sparse_delta_linear_unpacked
from ._adapter_state import STRUCTURE_FIELDS, SparseAdapterState
from ._wrap import adopt_linear, check_copyable, check_strict_keys, load_is_strict
from .quantized import QuantizedShiraLinear, quantized_format

# Orders merge, unmerge and hotswap_ between threads (one lock for every layer: they are rare
# and short, and a lock attribute would make the module impossible to deepcopy or pickle).
# Without it two merges could both read the base and both swap: the second would hold the
# adapted entries aside as "the base", and unmerge() would never restore it. Forwards do not
# take it (see the README: no merge or unmerge while another thread runs the layer).
_state_lock = threading.RLock()


class ShiraLinear(SparseAdapterState, nn.Linear):
    """nn.Linear plus a sparse adapter: y = x·(W + scale·S)ᵀ + b, S trained on fixed entries."""

    shira_flat_indices: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 indices: torch.Tensor, scale: float = 1.0, device=None, dtype=None):
        super().__init__(check_size(in_features, "in_features"),
                         check_size(out_features, "out_features"), bias, device=device, dtype=dtype)
        self._init_adapter(indices, scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r: int | None = None, density: float | None = None,
                    mask: str | torch.Tensor = "rand", seed: int = 0, scale: float = 1.0,
                    grads: Iterable[torch.Tensor] | None = None
                    ) -> "ShiraLinear | QuantizedShiraLinear":
        """Wrap ``linear`` (its weight Parameter is reused, not copied, and frozen).

        mask: "rand" | "struct" | "wm" | "grad" | "snip" (grad/snip need ``grads``, gradients of
        the weight from calibration batches) or a bool tensor of the weight's shape; the budget
        is r·(out+in) entries (``r``) or a fraction of them (``density``).

        A quantized ``linear`` (bitsandbytes Linear8bitLt / Linear4bit, an nn.Linear quantized
        by torchao) gives a QuantizedShiraLinear: its own quantized forward plus the sparse
        product, no dense delta (nn/quantized.py).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, ShiraLinear):
            raise TypeError("linear is already a ShiraLinear")
        if quantized_format(linear) is not None:
            return QuantizedShiraLinear.from_quantized(linear, r=r, density=density, mask=mask,
                                                       seed=seed, scale=scale, grads=grads)
        if linear.weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"linear.weight has dtype {linear.weight.dtype}; supported: float32, "
                            "float16, bfloat16, or a quantized layer (bitsandbytes "
                            "Linear8bitLt / Linear4bit, torchao)")
        if not linear.weight.is_contiguous():
            raise ValueError("linear.weight must be contiguous (adapted entries are swapped into it)")
        scale = check_scale(scale)  # before adopt_linear freezes linear's parameters
        seed = check_seed(seed)
        if isinstance(mask, str) and r is None and density is None:
            r = 32
        chosen = make_mask(mask, linear.weight.detach(), r=r, density=density, seed=seed, grads=grads)
        indices = mask_to_indices(chosen).to(linear.weight.device)
        return adopt_linear(cls, linear, lambda layer: layer._init_adapter(indices, scale))

    def _init_adapter(self, indices: torch.Tensor, scale: float) -> None:
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a tensor, got {type(indices).__name__}")
        # The layer's own copy, before the structure is derived (it is cached per index
        # tensor): hotswap_ and load_state_dict write these buffers in place, which must not
        # reach the caller's tensor or a SparseDelta built on it.
        indices = indices.clone()
        delta = SparseDelta(self.weight.shape, indices, torch.zeros(
            indices.numel(), dtype=self.weight.dtype, device=self.weight.device))
        self.scale = check_scale(scale)
        self.strategy = "auto"
        self.merged = False
        # SHiRA starts from zero: the adapted model equals the base until it is trained.
        self.shira_values = nn.Parameter(delta.values)
        self.register_buffer("shira_flat_indices", indices)
        self._set_structure(delta.structure)
        # While merged: the base entries and the indices they came from (the layer's own may
        # be written meanwhile; unmerge puts the entries back where they were taken).
        self.register_buffer("_shira_swapped", None, persistent=False)
        self.register_buffer("_shira_merged_flat", None, persistent=False)
        self.register_load_state_dict_post_hook(ShiraLinear._after_load)

    @property
    def adapted_shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def _adapter_writes_excluded(self):
        return reading(self.weight)  # hotswap_ writes the adapter holding it exclusively

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Everything this layer would take from state_dict is checked before torch copies any
        # of it: a rejected load leaves the layer as it was (torch copies the indices before a
        # post-hook could object; bad indices would then corrupt W on the next forward).
        old, new = prefix + "shira_indices", prefix + "shira_flat_indices"
        if old in state_dict and new not in state_dict:  # saved before the buffer's rename
            state_dict = {(new if key == old else key): t for key, t in state_dict.items()}
        self._check_loadable(state_dict, prefix,
                             local_metadata.get("assign_to_params_buffers", False))
        if load_is_strict():  # torch's `strict` here is always True
            check_strict_keys(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:  # W holds W + scale·S: save the base, or a load would add S twice
            with torch.no_grad():
                base = self.weight.detach().clone()
                base.view(-1)[self._merged_flat().long()] = self._shira_swapped
            destination[prefix + "weight"] = base

    def _check_loadable(self, state_dict, prefix: str, assign: bool = False) -> None:
        names = {key: prefix + key for key in ("weight", "shira_flat_indices", "shira_values")}
        if not any(name in state_dict for name in names.values()):
            return
        if self.merged:
            raise RuntimeError(f"{prefix or 'layer'}: unmerge() before load_state_dict (the "
                               "held-aside base entries belong to the current weight)")
        # torch would skip only a tensor it cannot copy (not a tensor, of the wrong size, without
        # data) and copy the others (the adapter's entries, unchecked): refuse the whole load
        # before anything is copied.
        for name, own in (("weight", self.weight), ("bias", self.bias)):
            key = prefix + name
            if own is None or key not in state_dict:
                continue
            t = state_dict[key]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{key} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != tuple(own.shape):
                raise RuntimeError(f"load_state_dict: size mismatch for {key}: the state_dict's "
                                   f"has shape {tuple(t.shape)}, this layer's "
                                   f"{tuple(own.shape)}; nothing was loaded")
            if not assign:  # assign=True puts the tensor in place, whatever its data
                check_copyable(key, t, own)
        indices = state_dict.get(names["shira_flat_indices"], self.shira_flat_indices)
        values = state_dict.get(names["shira_values"], self.shira_values)
        self._check_loadable_entries(indices, values, names["shira_flat_indices"],
                                     names["shira_values"], "ShiraLinear(..., indices=...)")

    @property
    def shira_indices(self) -> torch.Tensor:
        """Deprecated: the buffer ``shira_flat_indices`` (renamed: these are flat indices, not
        PEFT's COO pairs of the same name)."""
        warnings.warn("ShiraLinear.shira_indices is deprecated, use .shira_flat_indices",
                      DeprecationWarning, stacklevel=2)
        return self.shira_flat_indices

    @shira_indices.setter
    def shira_indices(self, value: torch.Tensor) -> None:
        warnings.warn("ShiraLinear.shira_indices is deprecated, use .shira_flat_indices",
                      DeprecationWarning, stacklevel=2)
        self.shira_flat_indices = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        structure = self._structure_for_forward()
        weight = self.weight
        return sparse_delta_linear_unpacked(x, weight, self.bias, weight.shape,
                                            self.shira_values, self.shira_flat_indices,
                                            structure, self.scale, self.strategy)

    @torch.no_grad()
    def merge(self) -> None:
        """Put W + scale·S into the weight (only S's entries are written); forward is then a
        plain linear. The base entries are kept for unmerge()."""
        def commit(held):  # `held` now holds the base entries
            self._shira_swapped, self._shira_merged_flat = held, flat
            self.merged = True
        with _state_lock:
            if self.merged:
                return
            flat = self.shira_flat_indices.clone()
            # One step: whatever interrupts it, the weight and the flags agree afterwards.
            merge_by_swap(self.weight, flat, self.shira_values, self.scale, commit, "merge")

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit for bit."""
        def commit():
            self.merged = False
            self._shira_swapped = self._shira_merged_flat = None
        with _state_lock:
            if not self.merged:
                return
            swap_transaction([self.weight], [self._merged_flat()], [self._shira_swapped], commit)

    def _merged_flat(self) -> torch.Tensor:
        """Where merge() took the base entries it holds (a layer pickled merged by a version
        that did not keep them apart: its own indices)."""
        flat = self._buffers.get("_shira_merged_flat")
        return self.shira_flat_indices if flat is None else flat

    @torch.no_grad()
    def hotswap_(self, delta: SparseDelta) -> None:
        """Put ``delta`` (any mask of at most this layer's entry count) in the adapter's place,
        in place: the indices, values and derived structure are copied into the existing
        tensors, so a compiled model keeps its graphs (no recompile, as PEFT's
        prepare_model_for_compiled_hotswap offers for LoRA). A smaller delta is padded with
        entries of value 0 at positions outside its mask (they add nothing; they would train
        like any entry, so hot-swap to serve). Not while merged; nothing changes on an error."""
        with _state_lock:  # not while another thread merges the layer
            self._hotswap(delta)

    def _hotswap(self, delta: SparseDelta) -> None:
        if self.merged:
            raise RuntimeError("unmerge() before hotswap_ (the held-aside base entries belong to "
                               "the current mask)")
        if not isinstance(delta, SparseDelta):
            raise TypeError(f"delta must be a SparseDelta, got {type(delta).__name__}")
        if tuple(delta.shape) != tuple(self.weight.shape):
            raise ValueError(f"delta has shape {tuple(delta.shape)}, the layer's weight "
                             f"{tuple(self.weight.shape)}")
        capacity, nnz = self.shira_values.numel(), delta.values.numel()
        if nnz > capacity:
            raise ValueError(f"delta has {nnz} entries, more than this layer's {capacity}; build "
                             "the layer with a budget of at least that many")
        device = self.shira_flat_indices.device
        indices = delta.flat_indices.to(device=device, dtype=torch.int64)
        values = delta.values.to(device=device, dtype=self.shira_values.dtype)
        if nnz < capacity:  # pad with the first positions outside the mask, value 0
            free = torch.ones(self.weight.numel(), dtype=torch.bool, device=device)
            free[indices] = False
            pad = free.nonzero().view(-1)[:capacity - nnz]
            indices, order = torch.sort(torch.cat([indices, pad]))
            values = torch.cat([values, values.new_zeros(capacity - nnz)])[order]
        structure = SparseDelta(self.weight.shape, indices.to(self.shira_flat_indices.dtype),
                                values).structure
        buffers = self._buffers
        for name in STRUCTURE_FIELDS:
            if buffers[f"_shira_{name}"].dtype != getattr(structure, name).dtype:
                raise RuntimeError("the layer's structure buffers are of another type; rebuild "
                                   "the layer")
        # The weight's lock, exclusively: a forward in another thread holds it for its call (the
        # "swap" strategy swaps W's entries at these indices out and back in), so the indices
        # and structure never change under one.
        with writing(self.weight):
            buffers["shira_flat_indices"].copy_(indices)
            self.shira_values.copy_(values)
            for name in STRUCTURE_FIELDS:
                buffers[f"_shira_{name}"].copy_(getattr(structure, name))
            indices = buffers["shira_flat_indices"]
            self._shira_derived_from = (indices, tensor_stamp(indices))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, nnz={self.shira_flat_indices.numel()}, "
                f"scale={self.scale}"
                f"{', merged' if self.merged else ''}")


def replace_linear(model: nn.Module, target_modules: Iterable[str] | None = None, *,
                   filter: Callable[[str, nn.Module], bool] | None = None,
                   factory: Callable[[nn.Linear], nn.Module] | None = None,
                   **from_linear_kwargs) -> list[str]:
    """Replace the nn.Linear layers of ``model`` chosen by ``target_modules`` (names or name
    suffixes, as in PEFT) or ``filter(fqn, module)`` with ``factory(linear)`` (default:
    ShiraLinear.from_linear with ``from_linear_kwargs``; each layer's mask gets its own seed).
    Quantized layers become QuantizedShiraLinear (see ShiraLinear.from_linear). All or nothing:
    every new layer is built before any is put in place, so a refused layer leaves the model
    (and its requires_grad flags) as it was. Returns the replaced names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if (target_modules is None) == (filter is None):
        raise ValueError("give exactly one of target_modules or filter")
    if target_modules is not None:
        targets = [target_modules] if isinstance(target_modules, str) else target_modules
        try:
            targets = list(targets)
        except TypeError:
            raise TypeError("target_modules must be a name or an iterable of names, got "
                            f"{type(target_modules).__name__}") from None
        for t in targets:
            if not isinstance(t, str):
                raise TypeError(f"target_modules must hold names (str), got {t!r}")
        filter = lambda name, _: any(name == t or name.endswith("." + t) for t in targets)  # noqa: E731
    elif not callable(filter):
        raise TypeError(f"filter must be callable (fqn, module) -> bool, got "
                        f"{type(filter).__name__}")
    if factory is not None:
        if not callable(factory):
            raise TypeError(f"factory must be callable (linear) -> nn.Module, got "
                            f"{type(factory).__name__}")
        if from_linear_kwargs:  # they would be ignored silently
            raise TypeError(f"factory= builds the layers itself: the from_linear arguments "
                            f"{sorted(from_linear_kwargs)} would be ignored; pass them to factory")
    seed = from_linear_kwargs.pop("seed", 0)
    # A quantized base inside a QuantizedShiraLinear (its base_layer) is adapted already.
    adapted = tuple(name + "." for name, module in model.named_modules()
                    if isinstance(module, QuantizedShiraLinear))
    # nn.MultiheadAttention reads out_proj.weight itself (F.multi_head_attention_forward): an
    # adapter in out_proj's place would never run.
    attention_out = {id(m.out_proj) for m in model.modules()
                     if isinstance(m, nn.MultiheadAttention)}
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and not isinstance(module, ShiraLinear)
              and not name.startswith(adapted) and filter(name, module)]
    if not chosen:
        raise ValueError("no nn.Linear layer of the model matches target_modules / filter")
    for name, module in chosen:
        if name == "":
            raise ValueError("the model itself is the nn.Linear chosen: replace_linear replaces "
                             "layers inside a model; wrap it with ShiraLinear.from_linear(model)")
        if id(module) in attention_out:
            raise ValueError(f"layer {name!r} is the out_proj of an nn.MultiheadAttention, which "
                             "uses its weight directly: an adapter there would never run; leave "
                             "it out of target_modules / filter")
    if factory is None:
        seed = check_seed(seed, count=len(chosen))
    # Build every new layer first: from_linear freezes each base it wraps, so a refusal puts
    # the flags back and replaces nothing.
    params = list({id(p): p for _, module in chosen for p in module.parameters()}.values())
    flags = [p.requires_grad for p in params]
    new_layers = []
    try:
        for i, (name, module) in enumerate(chosen):
            new = (factory(module) if factory is not None
                   else ShiraLinear.from_linear(module, seed=seed + i, **from_linear_kwargs))
            if not isinstance(new, nn.Module):
                raise TypeError(f"factory returned {type(new).__name__} for layer {name!r}; it "
                                "must return an nn.Module")
            new_layers.append(new)
    except BaseException:
        for param, flag in zip(params, flags):
            param.requires_grad_(flag)
        raise
    for (name, _), new in zip(chosen, new_layers):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return [name for name, _ in chosen]


def mark_only_adapters_trainable(model: nn.Module) -> int:
    """Freeze every parameter but the adapters' (``shira_values``); returns how many stay
    trainable. A model without any is refused (and left as it was): freezing it all would
    leave nothing to train."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not any(name.rsplit(".", 1)[-1] == "shira_values" for name, _ in model.named_parameters()):
        raise ValueError("model has no adapter (no shira_values parameter): apply "
                         "replace_linear first; nothing was frozen")
    count = 0
    for name, param in model.named_parameters():
        train = name.rsplit(".", 1)[-1] == "shira_values"
        param.requires_grad_(train)
        count += param.numel() if train else 0
    return count
