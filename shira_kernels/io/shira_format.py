"""This package's own adapter checkpoint: one safetensors file per SHiRA adapter.

Tensors, per layer (the layer's name in ``model.named_modules()``):
  ``<layer>.indices``  sorted unique flat indices (row·in + col), int32 while out·in < 2³¹
                       else int64
  ``<layer>.values``   the delta's values in the same order (fp32, fp16 or bf16)
String metadata (safetensors' ``__metadata__``):
  ``format``          "shira_kernels.adapter"
  ``format_version``  "1"
  ``layers``          JSON object, layer → {"shape": [out, in], "dtype": values' dtype,
                      "scale": float, "nnz": int, "base_dtype": str | null,
                      "base_sha256": hex str | null}

The effective update of a layer is scale·S. ``base_sha256`` is the SHA-256 of the raw bytes of
the base weight's entries at the adapter's indices (``base.view(-1)[indices]``, in the base's
dtype): the adapter's trained values only mean something on the base they were trained on, so
loading onto another base is refused, naming the first layer that differs. It covers the
touched entries only, so it costs O(nnz) to check, whatever the size of the model.

One flat index per entry (4 bytes) instead of PEFT's COO pair (two int32, 8 bytes) makes the
file about a third smaller for fp32 values and 40% smaller for 16-bit values.

Reading checks everything before returning anything: the safetensors header, the format name and
version, that the tensor keys are exactly the ones the metadata announces, dtypes, lengths, and
that the indices are sorted, unique and in range. Any failure is a ValueError that names the file
and, where there is one, the layer.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .._checks import FLOAT_DTYPES, validate_indices
from ..formats import SparseDelta, flat_index_dtype
from ._files import write_atomically

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "base_checksum", "check_base", "load_adapter",
           "read_adapter", "save_adapter"]

FORMAT_NAME = "shira_kernels.adapter"
FORMAT_VERSION = "1"

# layer name, shape, sorted flat indices → the base weight's entries there (raises ValueError
# when the base has no such layer or its shape differs).
BaseEntries = Callable[[str, tuple[int, int], torch.Tensor], torch.Tensor]

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
assert set(_DTYPE_NAMES) == set(FLOAT_DTYPES)
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def base_checksum(entries: torch.Tensor) -> str:
    """SHA-256 (hex) of the raw bytes of a 1-D tensor of base entries."""
    raw = entries.detach().contiguous().cpu().view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def _model_entries(base_model: nn.Module) -> BaseEntries:
    """A BaseEntries that reads ``base_model``'s layers' weights as they are now."""
    def entries(layer: str, shape: tuple[int, int], indices: torch.Tensor) -> torch.Tensor:
        try:
            module = base_model.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"the base model has no layer {layer!r}") from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"layer {layer!r} of the base model has no 2-D weight")
        if tuple(weight.shape) != shape:
            raise ValueError(f"layer {layer!r}: the base weight has shape {tuple(weight.shape)} "
                             f"but the adapter's delta has {shape}")
        return weight.detach().reshape(-1)[indices.to(weight.device).long()]
    return entries


def _resolve_base(base_model, base_entries) -> BaseEntries | None:
    if base_model is not None and base_entries is not None:
        raise ValueError("give base_model or base_entries, not both")
    if base_model is not None:
        if not isinstance(base_model, nn.Module):
            raise TypeError(f"base_model must be an nn.Module, got {type(base_model).__name__}")
        return _model_entries(base_model)
    return base_entries


# -- writing ---------------------------------------------------------------------------------------
def _normalize(adapter_deltas, scales) -> dict[str, tuple[SparseDelta, float]]:
    if not isinstance(adapter_deltas, Mapping) or not adapter_deltas:
        raise ValueError("adapter_deltas must be a non-empty mapping of layer name → SparseDelta")
    out: dict[str, tuple[SparseDelta, float]] = {}
    for layer, item in adapter_deltas.items():
        if not isinstance(layer, str):
            raise TypeError(f"layer names must be strings, got {layer!r}")
        scale = None
        if isinstance(item, tuple) and len(item) == 2:
            item, scale = item
        if not isinstance(item, SparseDelta):
            raise TypeError(f"layer {layer!r}: expected a SparseDelta, got {type(item).__name__}")
        if scale is None:
            scale = scales.get(layer, 1.0) if isinstance(scales, Mapping) else scales
        if (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                or not math.isfinite(scale)):
            raise ValueError(f"layer {layer!r}: scale must be a finite number, got {scale!r}")
        try:  # the delta's tensors may have been edited since it was built
            validate_indices(item.flat_indices, item.shape[0] * item.shape[1], name="indices")
        except (TypeError, ValueError) as e:
            raise ValueError(f"layer {layer!r}: {e}") from None
        if item.dtype not in FLOAT_DTYPES:
            raise TypeError(f"layer {layer!r}: values must be float32, float16 or bfloat16, "
                            f"got {item.dtype}")
        out[layer] = (item, float(scale))
    if isinstance(scales, Mapping):
        unknown = sorted(set(scales) - set(out))
        if unknown:
            raise ValueError(f"scales names layers that have no delta: {unknown[:4]}")
    return out


def save_adapter(path, adapter_deltas, scales=1.0, base_model: nn.Module | None = None, *,
                 base_entries: BaseEntries | None = None) -> None:
    """Write one adapter to ``path`` (a .safetensors file).

    adapter_deltas: layer name → SparseDelta, or → (SparseDelta, scale). scales: one number for
    every layer, or a mapping layer → scale (a scale given in a tuple wins). base_model (or
    base_entries, a function (layer, shape, indices) → base entries, as AdapterBank uses):
    the base the adapter belongs to; the checksum of its touched entries goes into the file.
    Without one, the file carries no checksum and loading cannot check the base.
    """
    from safetensors.torch import save

    layers = _normalize(adapter_deltas, scales)
    get_base = _resolve_base(base_model, base_entries)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    for layer, (delta, scale) in layers.items():
        indices, values = delta.flat_indices, delta.values
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            # SparseDelta's canonical form is sorted; one built around it is sorted here.
            order = torch.argsort(indices)
            indices, values = indices[order], values[order]
        indices = indices.to(flat_index_dtype(delta.shape))
        base_dtype = base_sha = None
        if get_base is not None:
            base = get_base(layer, delta.shape, indices)
            base_dtype = _DTYPE_NAMES.get(base.dtype, str(base.dtype))
            base_sha = base_checksum(base)
        tensors[f"{layer}.indices"] = indices.detach().cpu().contiguous()
        tensors[f"{layer}.values"] = values.detach().cpu().contiguous()
        meta[layer] = {"shape": list(delta.shape), "dtype": _DTYPE_NAMES[delta.dtype],
                       "scale": scale, "nnz": int(indices.numel()), "base_dtype": base_dtype,
                       "base_sha256": base_sha}
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "layers": json.dumps(meta)}
    write_atomically(Path(path), save(tensors, metadata=metadata))


# -- reading ---------------------------------------------------------------------------------------
def _bad(path, why: str) -> ValueError:
    return ValueError(f"{path}: not a valid shira_kernels adapter file: {why}")


def _read_safetensors(path, raw: bytes) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors). Parses the header itself so that a bad one gets a clear message,
    then lets safetensors decode (and check) the data."""
    from safetensors.torch import load

    if len(raw) < 8:
        raise _bad(path, f"{len(raw)} bytes, shorter than the 8-byte header length")
    size = int.from_bytes(raw[:8], "little")
    if size > min(len(raw) - 8, _HEADER_LIMIT):
        raise _bad(path, f"the header claims {size} bytes but the file has {len(raw) - 8} after "
                         "the length (truncated?)")
    try:
        header = json.loads(raw[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ is not a mapping of strings")
    ends = []
    for key, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if key == "__metadata__":
            continue
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and o >= 0 for o in offsets)):
            raise _bad(path, f"tensor {key!r} has no valid data_offsets")
        ends.append(offsets[1])
    data_size = len(raw) - 8 - size
    if max(ends, default=0) != data_size:
        raise _bad(path, f"the tensors need {max(ends, default=0)} bytes of data but the file has "
                         f"{data_size} (truncated or padded?)")
    try:
        tensors = load(raw)
    except Exception as e:  # safetensors raises its own error type; report it as a bad file
        raise _bad(path, f"safetensors cannot read it ({e})") from None
    return metadata, tensors


def _layer_meta(path, layer, entry) -> tuple[tuple[int, int], torch.dtype, float, str | None,
                                             str | None]:
    if not isinstance(entry, dict):
        raise _bad(path, f"layer {layer!r}: metadata entry is not an object")
    shape = entry.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise _bad(path, f"layer {layer!r}: shape must be [out, in] with both ≥ 1, got {shape!r}")
    dtype = _DTYPES_BY_NAME.get(entry.get("dtype"))
    if dtype is None:
        raise _bad(path, f"layer {layer!r}: dtype must be one of {sorted(_DTYPES_BY_NAME)}, got "
                         f"{entry.get('dtype')!r}")
    scale = entry.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise _bad(path, f"layer {layer!r}: scale must be a finite number, got {scale!r}")
    base_dtype, base_sha = entry.get("base_dtype"), entry.get("base_sha256")
    if (base_sha is None) != (base_dtype is None) or not (
            base_sha is None or (isinstance(base_sha, str) and isinstance(base_dtype, str))):
        raise _bad(path, f"layer {layer!r}: base_sha256 and base_dtype must both be strings or "
                         "both null")
    return (shape[0], shape[1]), dtype, float(scale), base_dtype, base_sha


def read_adapter(path) -> tuple[dict[str, tuple[SparseDelta, float]], dict[str, tuple[str, str]]]:
    """Read and check a file: ({layer: (SparseDelta, scale)}, {layer: (base dtype, sha256)}),
    the second holding only the layers that carry a checksum. No base check (see load_adapter)."""
    raw = Path(path).read_bytes()
    metadata, tensors = _read_safetensors(path, raw)
    if metadata.get("format") != FORMAT_NAME:
        raise _bad(path, f"format is {metadata.get('format')!r}, expected {FORMAT_NAME!r}")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise _bad(path, f"format_version is {metadata.get('format_version')!r}; this version of "
                         f"shira_kernels reads version {FORMAT_VERSION!r}")
    try:
        layers_meta = json.loads(metadata.get("layers", ""))
    except json.JSONDecodeError as e:
        raise _bad(path, f"the 'layers' metadata is not JSON ({e})") from None
    if not isinstance(layers_meta, dict) or not layers_meta:
        raise _bad(path, "the 'layers' metadata must be a non-empty JSON object")
    expected = {f"{layer}.{part}" for layer in layers_meta for part in ("indices", "values")}
    for key in (f"{layer}.{part}" for layer in layers_meta for part in ("indices", "values")):
        if key not in tensors:
            raise _bad(path, f"layer {key.rpartition('.')[0]!r}: missing tensor {key!r}")
    extra = sorted(set(tensors) - expected)
    if extra:
        raise _bad(path, f"tensors not described by the metadata: {extra[:4]}")

    deltas: dict[str, tuple[SparseDelta, float]] = {}
    checksums: dict[str, tuple[str, str]] = {}
    for layer, entry in layers_meta.items():
        shape, dtype, scale, base_dtype, base_sha = _layer_meta(path, layer, entry)
        indices, values = tensors[f"{layer}.indices"], tensors[f"{layer}.values"]
        if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
            raise _bad(path, f"layer {layer!r}: indices must be 1-D int32/int64, got "
                             f"{indices.dtype} of shape {tuple(indices.shape)}")
        if values.dtype != dtype or values.dim() != 1:
            raise _bad(path, f"layer {layer!r}: values must be 1-D {dtype}, got {values.dtype} of "
                             f"shape {tuple(values.shape)}")
        nnz = entry.get("nnz", indices.numel())
        if values.numel() != indices.numel() or nnz != indices.numel():
            raise _bad(path, f"layer {layer!r}: {indices.numel()} indices, {values.numel()} values "
                             f"and nnz {entry.get('nnz')!r} disagree")
        numel = shape[0] * shape[1]
        if indices.numel():
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= numel:
                raise _bad(path, f"layer {layer!r}: indices out of range [{lo}, {hi}] for shape "
                                 f"{shape} ({numel} entries)")
            if not bool((indices[1:] > indices[:-1]).all()):
                raise _bad(path, f"layer {layer!r}: indices are not sorted and unique")
        deltas[layer] = (SparseDelta(shape, indices.to(flat_index_dtype(shape)), values), scale)
        if base_sha is not None:
            checksums[layer] = (base_dtype, base_sha)
    return deltas, checksums


def check_base(path, deltas, checksums, get_base: BaseEntries) -> None:
    """Raise ValueError naming the first layer (in file order) whose base entries differ from
    the ones the adapter was saved against."""
    for layer, (delta, _) in deltas.items():
        base = get_base(layer, delta.shape, delta.flat_indices)
        if layer not in checksums:
            continue
        saved_dtype, saved_sha = checksums[layer]
        dtype = _DTYPE_NAMES.get(base.dtype, str(base.dtype))
        if dtype != saved_dtype:
            raise ValueError(f"{path}: layer {layer!r}: the base weight is {dtype} but the adapter "
                             f"was saved against a {saved_dtype} base")
        if base_checksum(base) != saved_sha:
            raise ValueError(f"{path}: layer {layer!r}: the base weight's entries under the "
                             "adapter differ from the base it was saved against (another base "
                             "model?)")


def load_adapter(path, base_model: nn.Module | None = None, *,
                 base_entries: BaseEntries | None = None) -> dict[str, tuple[SparseDelta, float]]:
    """Read an adapter file: {layer: (SparseDelta, scale)}, the form AdapterBank.add takes.

    With base_model (or base_entries), every layer must exist there with the saved shape, and
    the checksum of its touched base entries must match the saved one (layers saved without a
    checksum are only checked for existence and shape). Any problem is a ValueError.
    """
    deltas, checksums = read_adapter(path)
    get_base = _resolve_base(base_model, base_entries)
    if get_base is not None:
        check_base(path, deltas, checksums, get_base)
    return deltas
