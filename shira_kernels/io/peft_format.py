"""Hugging Face PEFT's SHiRA checkpoint: reading it, checking it against layer shapes, writing it.

What ``PeftModel.save_pretrained`` writes for a ShiraConfig adapter is a directory with
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

Nothing here needs a model or an AdapterBank:
  ``read_peft_adapter(path)``        the config and the raw per-layer tensors, checked for form
  ``peft_adapter_deltas(path, layer_shapes, scale=)``
                                     {layer: (SparseDelta, scale)} for layers of the given
                                     shapes (the form AdapterBank.add takes), every check done
  ``write_peft_adapter(path, deltas)``  the reverse, a directory PEFT loads
AdapterBank.add_peft / save_peft use them with the bank's layer shapes and deltas.
Any problem with a checkpoint is a ValueError naming the file and the key or layer.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .._checks import FLOAT_DTYPES, check_scale, check_size, validate_indices
from ..formats import SparseDelta
from .._files import write_atomically

__all__ = ["BIN_NAME", "CONFIG_NAME", "PEFT_PREFIX", "SAFETENSORS_NAME", "peft_adapter_deltas",
           "read_peft_adapter", "write_peft_adapter"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
_WEIGHT_SUFFIX = ".shira_weight"
_INDEX_SUFFIX = ".shira_indices"
_INDEX_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _bad(path, why: str) -> ValueError:
    return ValueError(f"{path}: {why}")


# -- reading -------------------------------------------------------------------------------------
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
        for key, tensor in tensors.items():
            # A pickle can hold what safetensors cannot: sparse tensors, meta tensors (no data).
            if tensor.layout != torch.strided or tensor.is_meta:
                raise _bad(bin_path, f"tensor {key!r} is not a dense tensor with data (layout "
                                     f"{tensor.layout}, device {tensor.device})")
        return bin_path, dict(tensors)
    raise ValueError(f"{directory}: no {SAFETENSORS_NAME} (or {BIN_NAME}) in it")


def _module_path(key: str) -> tuple[str, str]:
    """'base_model.model.P.shira_weight' → (P, 'weight'); P alone when there is no prefix."""
    for suffix, kind in ((_WEIGHT_SUFFIX, "weight"), (_INDEX_SUFFIX, "indices")):
        if key.endswith(suffix):
            path = key[: -len(suffix)]
            return (path[len(PEFT_PREFIX):] if path.startswith(PEFT_PREFIX) else path), kind
    return "", ""


def _read_layers(path) -> tuple[dict, dict[str, dict[str, tuple[str, torch.Tensor]]], Path]:
    """read_peft_adapter with each tensor's key as stored: {P: {"weight" | "indices": (key,
    tensor)}}."""
    directory = Path(path)
    config = _read_config(directory)
    file, tensors = _read_tensors(directory)
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        module, kind = _module_path(key)
        if not kind or not module:
            raise _bad(file, f"tensor {key!r} is not a SHiRA weight or index tensor (a "
                             "modules_to_save layer or another tuner's weight?); only SHiRA "
                             "layers can be read")
        if kind in parts.setdefault(module, {}):
            raise _bad(file, f"layer {module!r} has two {kind} tensors "
                             f"({parts[module][kind][0]!r} and {key!r})")
        parts[module][kind] = (key, tensor)
    if not parts:
        raise _bad(file, "no SHiRA tensors in it")
    for module, found in sorted(parts.items()):
        for kind, suffix in (("weight", _WEIGHT_SUFFIX), ("indices", _INDEX_SUFFIX)):
            if kind not in found:
                raise _bad(file, f"layer {module!r}: missing tensor "
                                 f"{PEFT_PREFIX + module + suffix!r}")
    return config, dict(sorted(parts.items())), file


def read_peft_adapter(path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]], Path]:
    """Read a PEFT SHiRA checkpoint directory without interpreting it against a model:
    (config, {module path P: (indices as stored [2, nnz], values [nnz])}, tensor file).

    Checks the config (SHiRA, r), that every tensor is a shira_weight or shira_indices and that
    each layer has both; ValueError naming the file and key otherwise."""
    config, parts, file = _read_layers(path)
    return config, {module: (found["indices"][1], found["weight"][1])
                    for module, found in parts.items()}, file


def _coo_pairs(file, layer: str, key: str, indices: torch.Tensor, nnz: int) -> torch.Tensor:
    """PEFT's COO pairs (tensor ``key``) checked for form: [2, nnz], integers or (PEFT on
    Windows) whole floats; returned as stored."""
    where = f"layer {layer!r}: tensor {key!r}"
    if indices.dim() != 2 or indices.shape[0] != 2:
        raise _bad(file, f"{where} must have shape [2, nnz], got {tuple(indices.shape)}")
    if indices.shape[1] != nnz:
        raise _bad(file, f"{where} has {indices.shape[1]} index pairs but there are {nnz} "
                         "values")
    if indices.dtype.is_floating_point:  # PEFT on Windows saves them as float32
        if not bool(torch.isfinite(indices).all()) or not bool((indices == indices.round()).all()):
            raise _bad(file, f"{where} ({indices.dtype}) holds numbers that are not whole")
    elif indices.dtype not in _INDEX_DTYPES:
        raise _bad(file, f"{where} must hold integers, got {indices.dtype}")
    return indices


def _check_range(file, layer: str, pairs: torch.Tensor, shape: tuple[int, int]) -> None:
    # In the stored dtype: a huge whole float would wrap when converted to int64.
    for what, t, extent in (("row", pairs[0], shape[0]), ("column", pairs[1], shape[1])):
        lo, hi = int(t.min().item()), int(t.max().item())
        if lo < 0 or hi >= extent:
            raise _bad(file, f"layer {layer!r}: shape mismatch: {what} indices span "
                             f"[{lo}, {hi}] but the layer's weight is {shape[0]}x{shape[1]}")


def _resolve_layer(layers: Mapping[str, object], module: str) -> str | None:
    # The layers are normally the base model's own (P is a layer name); when the model is a
    # PEFT-wrapped one, the nn.Linear is P's base_layer.
    for candidate in (module, f"{module}.base_layer", f"{PEFT_PREFIX}{module}.base_layer"):
        if candidate in layers:
            return candidate
    return None


def _layer_shapes(layer_shapes) -> dict[str, tuple[int, int]]:
    if not isinstance(layer_shapes, Mapping):
        raise TypeError(f"layer_shapes must be a mapping layer name → (out, in), got "
                        f"{type(layer_shapes).__name__}")
    out = {}
    for layer, shape in layer_shapes.items():
        if not isinstance(layer, str):
            raise TypeError(f"layer names must be strings, got {layer!r}")
        if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or len(shape) != 2:
            raise TypeError(f"layer {layer!r}: the shape must be (out, in), got {shape!r:.60}")
        out[layer] = (check_size(shape[0], f"layer {layer!r}: out"),
                      check_size(shape[1], f"layer {layer!r}: in"))
    return out


def peft_adapter_deltas(path, layer_shapes: Mapping[str, tuple[int, int]], *,
                        scale: float = 1.0) -> dict[str, tuple[SparseDelta, float]]:
    """A PEFT SHiRA checkpoint as {layer: (SparseDelta, scale)} for the layers named in
    ``layer_shapes`` (layer → (out, in) of its weight; a checkpoint's module path P matches
    layer P, or P's ``base_layer`` in a PEFT-wrapped model). Every layer of the checkpoint
    must match one of them.

    Checks: unknown layers, shapes (indices in range, nnz = r·(in + out) as PEFT requires),
    dtypes, non-finite values, repeated entries; ValueError naming the file, the key and the
    layer. ``scale``: PEFT's scaling (not in the checkpoint), a finite real number (TypeError
    for another kind of value, ValueError for NaN or ±inf). Values stay in their dtype where it
    is float32, float16 or bfloat16 and become float32 otherwise; indices are the sorted flat
    ones (row·in + column) of SparseDelta, on the CPU."""
    scale = check_scale(scale, "scale")
    shapes = _layer_shapes(layer_shapes)
    config, layers, file = _read_layers(path)
    r = config["r"]
    out: dict[str, tuple[SparseDelta, float]] = {}
    for module, found in layers.items():
        (key, values), (index_key, indices) = found["weight"], found["indices"]
        layer = _resolve_layer(shapes, module)
        if layer is None:
            sample = sorted(shapes)[:6]
            raise _bad(file, f"tensor {key!r}: no layer {module!r} to put it in (the layers "
                             f"include {sample})")
        if layer in out:
            raise _bad(file, f"two checkpoint layers map to layer {layer!r}")
        shape = shapes[layer]
        if values.dim() != 1 or not values.dtype.is_floating_point:
            raise _bad(file, f"layer {layer!r}: tensor {key!r} must be a 1-D float tensor, got "
                             f"{values.dtype} of shape {tuple(values.shape)}")
        nnz = values.numel()
        pairs = _coo_pairs(file, layer, index_key, indices, nnz)
        expected = r * (shape[0] + shape[1])
        if nnz != expected:
            raise _bad(file, f"layer {layer!r}: shape mismatch: the checkpoint has {nnz} entries "
                             f"but r={r} on the layer's {shape[0]}x{shape[1]} weight gives "
                             f"r·(out+in) = {expected} (a checkpoint of another model?)")
        _check_range(file, layer, pairs, shape)  # nnz ≥ 1: r ≥ 1 and the shape's sides ≥ 1
        rows, cols = pairs.long()
        if values.dtype not in FLOAT_DTYPES:
            values = values.float()  # float64 beyond float32's range becomes inf: caught next
        if not bool(torch.isfinite(values).all()):
            raise _bad(file, f"layer {layer!r}: tensor {key!r} has non-finite values (or "
                             "values beyond float32's range)")
        try:
            delta = SparseDelta.from_coo(rows, cols, shape, values.contiguous())
        except (TypeError, ValueError) as e:  # e.g. repeated (row, column) pairs
            raise _bad(file, f"layer {layer!r}: {e}") from None
        out[layer] = (delta, scale)
    return out


# -- writing -------------------------------------------------------------------------------------
def write_peft_adapter(path, deltas: Mapping[str, object], *,
                       base_model_name_or_path: str | None = None,
                       task_type: str | None = None) -> int:
    """Write {layer: SparseDelta or (SparseDelta, scale)} as a PEFT SHiRA checkpoint directory
    that ``PeftModel.from_pretrained(base_model, path)`` loads; returns r.

    PEFT needs nnz = r·(in + out) on every layer with one r ≥ 1 (else ValueError naming the
    layer; so do repeated or out-of-range indices).
    The scale (a finite real number: TypeError for another kind of value, ValueError for NaN
    or ±inf) is folded into the values (PEFT loads with scaling 1.0): values are written in
    their dtype when the scale is 1, else as float32 scale·values. ``target_modules`` is a
    regular expression matching exactly the written layers (a list would also match longer
    paths ending in the same names). Everything is checked before anything is written.
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
        scale = check_scale(scale, f"layer {layer!r}: scale")
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"layer names must be non-empty strings, got {layer!r}")
        if not isinstance(item, SparseDelta):
            raise TypeError(f"layer {layer!r}: expected a SparseDelta, got {type(item).__name__}")
        out_f, in_f = item.shape
        # The delta's tensors may have been edited since it was built: never write a
        # checkpoint that the reader (or PEFT) would refuse.
        try:
            validate_indices(item.flat_indices, out_f * in_f, name="flat_indices")
        except (TypeError, ValueError) as e:
            raise ValueError(f"layer {layer!r}: {e}") from None
        if item.nnz == 0:
            raise ValueError(f"layer {layer!r}: no entries; PEFT's SHiRA needs r·(out+in) "
                             f"entries with r ≥ 1 ({out_f + in_f} or a multiple)")
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
        # A copy of its own: two layers' deltas may share their values (one delta for both),
        # which safetensors refuses.
        tensors[f"{PEFT_PREFIX}{layer}{_WEIGHT_SUFFIX}"] = values.cpu().clone(
            memory_format=torch.contiguous_format)
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
