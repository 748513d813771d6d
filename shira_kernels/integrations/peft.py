"""Hugging Face PEFT's SHiRA adapters: checkpoints in and out of an AdapterBank, and PEFT's own
ShiRA layers run on this package's kernels.

PEFT's SHiRA checkpoint (what ``PeftModel.save_pretrained`` writes for a ShiraConfig adapter) is
a directory with
  ``adapter_config.json``        the ShiraConfig: ``"peft_type": "SHIRA"``, ``r``, ``mask_type``,
                                 ``target_modules``, ... (no scaling: see below)
  ``adapter_model.safetensors``  per adapted nn.Linear at module path P of the base model:
                                 ``base_model.model.P.shira_weight``   values [nnz], the layer's
                                                                       dtype unless upcast
                                 ``base_model.model.P.shira_indices``  COO int32 [2, nnz]
                                                                       (rows; columns)
                                 (``adapter_model.bin``, a torch pickle, with safe_serialization
                                 off; PEFT on Windows stores the indices as float32)
PEFT gives every layer nnz = r·(in + out) entries, one r for the whole adapter, and applies
W + scaling·S with a per-layer ``scaling`` that is 1.0 when an adapter is created or loaded
(only ``set_scale`` changes it, and it is not saved). Non-default adapters are saved in a
subdirectory named after the adapter.

``load_peft_into_bank`` / ``save_bank_as_peft`` (AdapterBank.add_peft / save_peft) translate
between that layout and the bank's {layer: (SparseDelta, scale)}: P is the bank's layer name.

``accelerate(peft_model)`` swaps the class of every ``peft.tuners.shira.Linear`` in a model for
a subclass whose unfused forward is one sparse_delta_linear (no copy of W, no dense delta, no
dense gradient) and whose merge / unmerge swap entries with scatter_swap_ (unmerge restores W
bit for bit). Parameters, buffers, state_dict and PEFT's bookkeeping stay as they are; what it
does not accelerate goes to PEFT's own code.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .._checks import FLOAT_DTYPES, tensor_stamp, unchanged
from ..formats import SparseDelta, flat_index_dtype
from ..io._files import write_atomically
from ..ops.scatter_swap import adapted_entries, merge_by_swap, swap_transaction
from ..ops.sparse_delta import STRATEGIES, linear_of_parts

__all__ = ["CONFIG_NAME", "PEFT_PREFIX", "SAFETENSORS_NAME", "accelerate", "accelerated_layers",
           "load_peft_into_bank", "peft_adapter_deltas", "read_peft_adapter", "restore",
           "save_bank_as_peft", "write_peft_adapter"]

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
_WEIGHT_SUFFIX = ".shira_weight"
_INDEX_SUFFIX = ".shira_indices"


# =============================================================================================
# Checkpoints
# =============================================================================================
def _bad(path, why: str) -> ValueError:
    return ValueError(f"{path}: {why}")


def _finite(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        hint = ""
        if directory.is_dir():
            subdirs = sorted(p.name for p in directory.iterdir() if (p / CONFIG_NAME).is_file())
            if subdirs:
                hint = (f" (PEFT saves non-default adapters in a subdirectory per adapter; found "
                        f"{subdirs[:4]})")
        raise ValueError(f"{path}: no such file; expected the directory PEFT's save_pretrained "
                         f"wrote{hint}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"cannot read it as JSON ({e})") from None
    if not isinstance(config, dict):
        raise _bad(path, "not a JSON object")
    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "SHIRA":
        raise _bad(path, f"peft_type is {peft_type!r}; only SHiRA adapters (\"SHIRA\") can be read")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise _bad(path, f"r must be a positive integer, got {r!r}")
    if config.get("fan_in_fan_out"):
        raise _bad(path, "fan_in_fan_out is set: only nn.Linear layers ([out, in] weights) are "
                         "supported")
    return config


def _read_tensors(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    st_path, bin_path = directory / SAFETENSORS_NAME, directory / BIN_NAME
    if st_path.is_file():
        from safetensors.torch import load

        try:
            return st_path, load(st_path.read_bytes())
        except Exception as e:  # safetensors raises its own error type for a damaged file
            raise _bad(st_path, f"safetensors cannot read it ({e})") from None
    if bin_path.is_file():
        try:
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise _bad(bin_path, f"torch.load cannot read it ({e})") from None
        if not isinstance(tensors, Mapping) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
            raise _bad(bin_path, "not a mapping of names to tensors")
        return bin_path, dict(tensors)
    raise ValueError(f"{directory}: no {SAFETENSORS_NAME} (or {BIN_NAME}) in it")


def _module_path(key: str) -> tuple[str, str]:
    """'base_model.model.P.shira_weight' → (P, 'weight'); P alone when there is no prefix."""
    for suffix, kind in ((_WEIGHT_SUFFIX, "weight"), (_INDEX_SUFFIX, "indices")):
        if key.endswith(suffix):
            path = key[: -len(suffix)]
            return (path[len(PEFT_PREFIX):] if path.startswith(PEFT_PREFIX) else path), kind
    return "", ""


def read_peft_adapter(path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]], Path]:
    """Read a PEFT SHiRA checkpoint directory without interpreting it against a model:
    (config, {module path P: (indices as stored [2, nnz], values [nnz])}, tensor file).

    Checks the config (SHiRA, r), that every tensor is a shira_weight or shira_indices and that
    each layer has both; ValueError naming the file and key otherwise."""
    directory = Path(path)
    config = _read_config(directory)
    file, tensors = _read_tensors(directory)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, kind = _module_path(key)
        if not kind or not module:
            raise _bad(file, f"tensor {key!r} is not a SHiRA weight or index tensor (a "
                             "modules_to_save layer or another tuner's weight?); only SHiRA "
                             "layers can be read into an AdapterBank")
        if kind in parts.setdefault(module, {}):
            raise _bad(file, f"layer {module!r} has two {kind} tensors")
        parts[module][kind] = tensor
    if not parts:
        raise _bad(file, "no SHiRA tensors in it")
    out = {}
    for module, found in sorted(parts.items()):
        for kind, suffix in (("weight", _WEIGHT_SUFFIX), ("indices", _INDEX_SUFFIX)):
            if kind not in found:
                raise _bad(file, f"layer {module!r}: missing tensor "
                                 f"{PEFT_PREFIX + module + suffix!r}")
        out[module] = (found["indices"], found["weight"])
    return config, out, file


def _coo_rows_cols(file, module: str, indices: torch.Tensor, nnz: int):
    if indices.dim() != 2 or indices.shape[0] != 2:
        raise _bad(file, f"layer {module!r}: shira_indices must have shape [2, nnz], got "
                         f"{tuple(indices.shape)}")
    if indices.shape[1] != nnz:
        raise _bad(file, f"layer {module!r}: {indices.shape[1]} index pairs but {nnz} values")
    if indices.dtype.is_floating_point:  # PEFT on Windows saves them as float32
        if not bool(torch.isfinite(indices).all()) or not bool((indices == indices.round()).all()):
            raise _bad(file, f"layer {module!r}: shira_indices ({indices.dtype}) are not whole "
                             "numbers")
    elif indices.dtype not in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        raise _bad(file, f"layer {module!r}: shira_indices must be integers, got {indices.dtype}")
    idx = indices.long()
    return idx[0], idx[1]


def _resolve_layer(layers: set[str], module: str) -> str | None:
    # The bank's model is normally the base model itself (P is its layer name); when it is a
    # PEFT-wrapped model, the nn.Linear is P's base_layer.
    for candidate in (module, f"{module}.base_layer", f"{PEFT_PREFIX}{module}.base_layer"):
        if candidate in layers:
            return candidate
    return None


def peft_adapter_deltas(path, layer_shapes: Mapping[str, tuple[int, int]], *,
                        scale: float = 1.0) -> dict[str, tuple[SparseDelta, float]]:
    """A PEFT SHiRA checkpoint as {layer: (SparseDelta, scale)} for the layers named in
    ``layer_shapes`` (layer → (out, in) of its weight). Every check happens here: unknown
    layers, shapes (indices in range, nnz = r·(in + out) as PEFT requires), dtypes, non-finite
    values, repeated entries; ValueError naming the file, the key and the layer."""
    scale = _finite(scale, "scale")
    config, layers, file = read_peft_adapter(path)
    r = config["r"]
    known = set(layer_shapes)
    out: dict[str, tuple[SparseDelta, float]] = {}
    for module, (indices, values) in layers.items():
        key = PEFT_PREFIX + module + _WEIGHT_SUFFIX
        layer = _resolve_layer(known, module)
        if layer is None:
            sample = sorted(known)[:6]
            raise _bad(file, f"tensor {key!r}: the model has no nn.Linear layer {module!r} "
                             f"(its layers include {sample})")
        if layer in out:
            raise _bad(file, f"two checkpoint layers map to layer {layer!r}")
        shape = tuple(int(s) for s in layer_shapes[layer])
        if values.dim() != 1 or not values.dtype.is_floating_point:
            raise _bad(file, f"tensor {key!r}: shira_weight must be a 1-D float tensor, got "
                             f"{values.dtype} of shape {tuple(values.shape)}")
        nnz = values.numel()
        rows, cols = _coo_rows_cols(file, module, indices, nnz)
        expected = r * (shape[0] + shape[1])
        if nnz != expected:
            raise _bad(file, f"layer {layer!r}: shape mismatch: the checkpoint has {nnz} entries "
                             f"but r={r} on the model's {shape[0]}x{shape[1]} weight gives "
                             f"r·(out+in) = {expected} (a checkpoint of another model?)")
        for what, t, extent in (("row", rows, shape[0]), ("column", cols, shape[1])):
            if nnz and (int(t.min()) < 0 or int(t.max()) >= extent):
                raise _bad(file, f"layer {layer!r}: shape mismatch: {what} indices span "
                                 f"[{int(t.min())}, {int(t.max())}] but the model's weight is "
                                 f"{shape[0]}x{shape[1]}")
        if not bool(torch.isfinite(values).all()):
            raise _bad(file, f"tensor {key!r}: non-finite values")
        if values.dtype not in FLOAT_DTYPES:
            values = values.float()
        try:
            delta = SparseDelta.from_coo(rows, cols, shape, values.contiguous())
        except (TypeError, ValueError) as e:  # e.g. repeated (row, column) pairs
            raise _bad(file, f"layer {layer!r}: {e}") from None
        out[layer] = (delta, scale)
    return out


def load_peft_into_bank(bank, name: str, path, *, scale: float = 1.0) -> None:
    """AdapterBank.add_peft: add the PEFT SHiRA checkpoint in directory ``path`` as ``name``.

    Layers are matched by module path (``base_model.model.`` stripped). ``scale`` is PEFT's
    scaling (1.0 unless the adapter was used with ``set_scale``; it is not in the checkpoint).
    Everything is checked before the bank is touched; any problem is a ValueError and leaves the
    bank and the model unchanged.
    """
    with bank.lock:
        bank._check_new_name(name)
        shapes = {layer: tuple(bank.model.get_submodule(layer).weight.shape)
                  for layer in bank.layers}
        bank.add(name, peft_adapter_deltas(path, shapes, scale=scale))


def write_peft_adapter(path, deltas: Mapping[str, object], *,
                       base_model_name_or_path: str | None = None,
                       task_type: str | None = None) -> int:
    """Write {layer: SparseDelta or (SparseDelta, scale)} as a PEFT SHiRA checkpoint directory
    that ``PeftModel.from_pretrained(base_model, path)`` loads; returns r.

    PEFT needs nnz = r·(in + out) on every layer with one r (else ValueError naming the layer).
    The scale is folded into the values (PEFT loads with scaling 1.0): values are written in
    their dtype when the scale is 1, else as float32 scale·values. ``target_modules`` is a regular
    expression matching exactly the written layers (a list would also match longer paths ending
    in the same names).
    """
    from safetensors.torch import save

    if not isinstance(deltas, Mapping) or not deltas:
        raise ValueError("deltas must be a non-empty mapping of layer name → SparseDelta")
    tensors: dict[str, torch.Tensor] = {}
    r = None
    for layer, item in deltas.items():
        scale = 1.0
        if isinstance(item, tuple) and len(item) == 2:
            item, scale = item
        scale = _finite(scale, f"layer {layer!r}: scale")
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"layer names must be non-empty strings, got {layer!r}")
        if not isinstance(item, SparseDelta):
            raise TypeError(f"layer {layer!r}: expected a SparseDelta, got {type(item).__name__}")
        out_f, in_f = item.shape
        if item.nnz % (out_f + in_f):
            raise ValueError(
                f"layer {layer!r}: {item.nnz} entries on a {out_f}x{in_f} weight; PEFT's SHiRA "
                f"needs r·(out+in) = a multiple of {out_f + in_f} entries")
        layer_r = item.nnz // (out_f + in_f)
        if r is None:
            r = layer_r
        elif layer_r != r:
            raise ValueError(f"layer {layer!r} has r = {layer_r} but an earlier layer has r = {r}; "
                             "PEFT's ShiraConfig has one r for all layers")
        flat = item.flat_indices.detach().long()
        values = item.values.detach()
        if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
            order = torch.argsort(flat)
            flat, values = flat[order], values[order]
        if scale != 1.0:
            values = values.float() * scale
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"layer {layer!r}: non-finite values")
        rows = torch.div(flat, in_f, rounding_mode="floor")
        coo = torch.stack([rows, flat - rows * in_f]).to(torch.int32)
        tensors[f"{PEFT_PREFIX}{layer}{_WEIGHT_SUFFIX}"] = values.cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{layer}{_INDEX_SUFFIX}"] = coo.cpu().contiguous()
    config = {
        "peft_type": "SHIRA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "mask_type": "random",
        "random_seed": None,
        "target_modules": "^(?:" + "|".join(re.escape(layer) for layer in deltas) + ")$",
        "fan_in_fan_out": False,
        "init_weights": True,
        "modules_to_save": None,
    }
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    data = save(tensors, metadata={"format": "pt"})
    write_atomically(directory / SAFETENSORS_NAME, data)
    write_atomically(directory / CONFIG_NAME,
                      (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return r


def save_bank_as_peft(bank, name: str, path, *, base_model_name_or_path: str | None = None,
                      task_type: str | None = None) -> int:
    """AdapterBank.save_peft: write adapter ``name`` as a PEFT SHiRA checkpoint directory
    (see write_peft_adapter); returns its r."""
    with bank.lock:
        deltas = bank.deltas(name)
    return write_peft_adapter(path, deltas, base_model_name_or_path=base_model_name_or_path,
                              task_type=task_type)


# =============================================================================================
# accelerate: PEFT's ShiRA layers on this package's kernels
# =============================================================================================
class _Plan:
    """An adapter's index pattern in this package's form, derived once per index tensor:
    sorted flat indices, the permutation from PEFT's order to it (None when PEFT's order is
    already sorted, as its masks give) and the kernels' structure. ``ok`` is False when the
    indices cannot be accelerated (PEFT's forward then runs and reports any error itself).

    Built outside torch.inference_mode even when called inside it: the plan outlives the call,
    and its tensors must serve later calls outside inference mode too (autograd refuses to
    save inference tensors). ``stamp`` tells whether the source was written since: its version,
    or for an inference tensor (no version counter) a copy of its contents."""

    __slots__ = ("source", "stamp", "device", "flat", "perm", "structure", "ok")

    def __init__(self, source: torch.Tensor, shape: tuple[int, int], device: torch.device):
        self.source, self.stamp, self.device = source, tensor_stamp(source), device
        self.flat = self.perm = self.structure = None
        self.ok = False
        with torch.inference_mode(False):
            self._derive(source, shape, device)

    def _derive(self, source: torch.Tensor, shape: tuple[int, int], device: torch.device):
        if source.dim() != 2 or source.shape[0] != 2 or source.dtype.is_floating_point:
            return
        idx = source.to(device).long()
        rows, cols = idx[0], idx[1]
        if rows.numel():
            if int(rows.min()) < 0 or int(rows.max()) >= shape[0]:
                return
            if int(cols.min()) < 0 or int(cols.max()) >= shape[1]:
                return
        flat = rows * shape[1] + cols
        order = torch.argsort(flat)
        flat = flat[order]
        if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
            return  # repeated entries: PEFT sums them, the kernels do not
        if not bool((order == torch.arange(order.numel(), device=device)).all()):
            self.perm = order
        self.flat = flat.to(flat_index_dtype(shape))
        zeros = torch.zeros(self.flat.numel(), device=device)
        self.structure = SparseDelta(shape, self.flat, zeros).structure
        self.ok = True

    def fresh(self, source: torch.Tensor, device: torch.device) -> bool:
        return self.source is source and self.device == device and unchanged(source, self.stamp)


def _warn_hooks(layer) -> None:
    try:
        from peft.tuners.shira.layer import _warn_once_about_module_hooks
    except ImportError:
        return
    _warn_once_about_module_hooks(layer)


class _AcceleratedShira:
    """Mixed in before peft.tuners.shira.Linear (see _accelerated_class). State, set by
    accelerate() as plain attributes (not parameters or buffers, so state_dict is unchanged):
    _sk_strategy (sparse_delta_linear's strategy), _sk_plans {adapter: _Plan} and _sk_held
    {adapter: (flat indices, W's entries before that adapter's merge)}."""

    # -- planning ---------------------------------------------------------------------------------
    def _sk_plan(self, adapter: str) -> _Plan | None:
        source = self.shira_indices.get(adapter)
        weight = self.get_base_layer().weight
        if not isinstance(source, torch.Tensor):
            return None
        plan = self._sk_plans.get(adapter)
        if plan is None or not plan.fresh(source, weight.device):
            plan = self._sk_plans[adapter] = _Plan(source, tuple(weight.shape), weight.device)
        return plan if plan.ok else None

    def _sk_values(self, adapter: str, plan: _Plan) -> torch.Tensor:
        values = self.shira_weight[adapter]
        return values if plan.perm is None else values[plan.perm]

    def _sk_plain_weight(self) -> torch.Tensor | None:
        if self.quantization_backend is not None:
            return None
        weight = getattr(self.get_base_layer(), "weight", None)
        if (not isinstance(weight, torch.Tensor) or weight.dim() != 2
                or weight.dtype not in FLOAT_DTYPES or not weight.is_contiguous()):
            return None
        return weight

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged or not isinstance(x, torch.Tensor):
            return super().forward(x, *args, **kwargs)
        weight = self._sk_plain_weight()
        adapters = [a for a in self.active_adapters if a in self.shira_weight.keys()]
        if weight is None or len(adapters) > 1:  # several adapters: PEFT sums them densely
            return super().forward(x, *args, **kwargs)
        bias = self.get_base_layer().bias
        autocast = torch.is_autocast_enabled(x.device.type)
        if (x.device != weight.device or x.dim() == 0 or x.shape[-1] != weight.shape[1]
                or (not autocast and (x.dtype != weight.dtype
                                      or (bias is not None and bias.dtype != weight.dtype)))):
            return super().forward(x, *args, **kwargs)
        if not adapters:  # as PEFT: the base weight alone (it ignores the base layer's hooks)
            _warn_hooks(self)
            return torch.nn.functional.linear(x, weight, bias)
        adapter = adapters[0]
        plan = self._sk_plan(adapter)
        if plan is None:
            return super().forward(x, *args, **kwargs)
        _warn_hooks(self)
        values = self._sk_values(adapter, plan)
        if values.dtype != weight.dtype and not autocast:
            values = values.to(weight.dtype)  # PEFT adds an upcast adapter into W's dtype too
        return linear_of_parts(x, weight, bias, weight.shape, values, plan.flat, plan.structure,
                               float(self.scaling[adapter]), self._sk_strategy)

    # -- merge / unmerge --------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge

        weight = self._sk_plain_weight()
        if weight is None:
            return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.shira_weight.keys():
                continue
            plan = self._sk_plan(adapter)
            if plan is None:
                super().merge(safe_merge=safe_merge, adapter_names=[adapter])
                continue
            values = self._sk_values(adapter, plan).detach()
            scale = float(self.scaling[adapter])
            if safe_merge:  # PEFT's own check and message, before anything is written
                with torch.no_grad():
                    base = weight.detach().view(-1).index_select(0, plan.flat)
                    if not bool(torch.isfinite(adapted_entries(base, values, scale)).all()):
                        raise ValueError(f"NaNs detected in the merged weights. The adapter "
                                         f"{adapter} seems to be broken")

            def commit(held, adapter=adapter, flat=plan.flat):  # held: the entries before
                self._sk_held[adapter] = (flat, held)
                self.merged_adapters.append(adapter)
            merge_by_swap(weight, plan.flat, values, scale, commit, f"adapter {adapter!r}")

    def unmerge(self) -> None:
        if not self.merged:
            return super().unmerge()  # PEFT's "Already unmerged" warning
        while self.merged_adapters:
            adapter = self.merged_adapters[-1]
            held = self._sk_held.get(adapter)
            if held is not None:
                weight = self.get_base_layer().weight
                flat, entries = held

                def commit(adapter=adapter):  # the books change with the swap, or not at all
                    self._sk_held.pop(adapter)
                    self.merged_adapters.pop()
                swap_transaction([weight], [flat.to(weight.device)],
                                 [entries.to(device=weight.device, dtype=weight.dtype)], commit)
                continue
            self.merged_adapters.pop()
            if adapter in self.shira_weight.keys():
                # Merged by PEFT's own code (before accelerate): undone its way.
                with torch.no_grad():
                    weight = self.get_base_weight()
                    weight -= self.get_delta_weight(adapter)
                    self.set_base_weight(weight)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._sk_plans.pop(adapter_name, None)


_CLASS = None


def _peft_linear():
    try:
        from peft.tuners.shira.layer import Linear
    except ImportError as e:
        raise ImportError("accelerating PEFT's SHiRA layers needs the peft package with SHiRA "
                          "support: pip install -U peft") from e
    return Linear


def _accelerated_class():
    global _CLASS
    if _CLASS is None:
        cls = type("AcceleratedShiraLinear", (_AcceleratedShira, _peft_linear()), {
            "__module__": __name__,
            "__doc__": "peft.tuners.shira.Linear running on shira_kernels (see accelerate()).",
        })
        _CLASS = cls
    return _CLASS


def __getattr__(name: str):
    # The class exists once peft is importable; built on first use so that importing this module
    # does not import peft (and pickles of accelerated models find it by name).
    if name == "AcceleratedShiraLinear":
        return _accelerated_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def accelerate(peft_model: nn.Module, *, strategy: str = "auto") -> nn.Module:
    """Run every PEFT SHiRA layer (``peft.tuners.shira.Linear``) of ``peft_model`` on this
    package's kernels, in place; returns the model (``accelerated_layers`` lists the layers).

    - Unfused forward with one active adapter: sparse_delta_linear(x, W, b, S, scaling,
      strategy) instead of PEFT's clone of W plus a dense sum of a sparse COO tensor; the
      gradient of ``shira_weight`` comes from the sampled product (no dense m×n gradient).
      ``strategy``: "auto" (sparse_delta.auto_strategy: on the CPU "fold" for fp32 and fp16,
      bf16 at 1 token; else spmm for few tokens and swap for many), "fold" (S added to
      W's panels inside one matmul), "spmm", "swap" (W briefly holds W + scaling·S during the
      call: no other thread may read W meanwhile) or "merge" (a scratch copy of W).
    - merge() / unmerge(): scatter_swap_ of the adapted entries; unmerge restores W bit for bit
      (PEFT's subtracts the delta again, which rounds in 16-bit weights).
    - Everything else runs PEFT's own code: disabled adapters, merged layers, several active
      adapters, quantized or non-contiguous weights, inputs of another dtype, indices the kernels
      cannot take (out of range or repeated), layers merged by PEFT before accelerate().
    The parameters stay the same objects (``shira_weight`` is still what PEFT trains and saves),
    so state_dict, save_pretrained, loading and optimizers are unaffected. Layers added later
    (a new adapter on new target modules) need another call. Calling it again only updates
    the strategy.
    """
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model must be an nn.Module, got {type(peft_model).__name__}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    base_cls, cls = _peft_linear(), _accelerated_class()
    count = 0
    for name, module in peft_model.named_modules():
        if isinstance(module, cls):
            module._sk_strategy = strategy
            count += 1
        elif type(module) is base_cls:
            module.__class__ = cls
            module._sk_strategy = strategy
            module._sk_plans = {}
            module._sk_held = {}
            count += 1
        elif isinstance(module, base_cls):
            log.info("layer %r is a %s, a subclass of PEFT's SHiRA Linear: left as it is",
                     name, type(module).__name__)
    if count == 0:
        raise ValueError("the model has no PEFT SHiRA layer (peft.tuners.shira.Linear); build "
                         "it with get_peft_model(model, ShiraConfig(...)) or "
                         "PeftModel.from_pretrained")
    log.info("accelerated %d PEFT SHiRA layers (strategy %r)", count, strategy)
    return peft_model


def accelerated_layers(model: nn.Module) -> list[str]:
    """Names of the layers of ``model`` that accelerate() has switched."""
    if _CLASS is None:
        return []
    return [name for name, module in model.named_modules() if isinstance(module, _CLASS)]


def restore(model: nn.Module) -> nn.Module:
    """Undo accelerate(): the layers become plain PEFT SHiRA layers again. A layer merged by
    accelerate's merge is unmerged exactly and merged again by PEFT's code (so PEFT's unmerge
    can undo it later)."""
    if _CLASS is None:
        return model
    base_cls = _peft_linear()
    for module in model.modules():
        if not isinstance(module, _CLASS):
            continue
        remerge = list(module.merged_adapters) if module._sk_held else []
        if remerge:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module.unmerge()
        module.__class__ = base_cls
        for attr in ("_sk_strategy", "_sk_plans", "_sk_held"):
            module.__dict__.pop(attr, None)
        for adapter in remerge:
            module.merge(adapter_names=[adapter])
    return model
