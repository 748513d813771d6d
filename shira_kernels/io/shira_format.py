"""This package's own adapter checkpoint: one safetensors file per SHiRA adapter.

Tensors, per layer (the layer's name in ``model.named_modules()``):
  ``<layer>.indices``  sorted unique flat indices (row·in + col), int32 while out·in < 2³¹
                       else int64
  ``<layer>.values``   the delta's values in the same order (fp32, fp16 or bf16), all finite
String metadata (safetensors' ``__metadata__``), the keys save_adapter writes:
  ``format``          "shira_kernels.adapter"
  ``format_version``  "2"
  ``layers``          JSON object, layer → {"shape": [out, in], "dtype": values' dtype,
                      "scale": float, "nnz": int, "base_dtype": str | null,
                      "base_sha256": hex str | null}; no key may appear twice in it
  ``sha256``          the content checksum (below), 64 lowercase hex digits

The effective update of a layer is scale·S, scale a finite number.

Content checksum (``sha256``): SHA-256 over, in this order,
  * the tag ``b"shira_kernels.adapter content v2\\n"``;
  * for every tensor in the file, in sorted order of the tensor names (Python's ``sorted``),
    two length-prefixed records (each an 8-byte little-endian byte count, then the bytes):
    the compact JSON ``[name, dtype, shape]`` (dtype as safetensors spells it: "F32", "F16",
    "BF16", "I32", "I64"; shape a list of ints), then the tensor's raw bytes as stored
    (little-endian, row-major);
  * one length-prefixed record: the canonical JSON (sorted keys, separators "," and ":",
    ASCII only) of the metadata mapping without ``sha256`` itself, i.e. the exact strings of
    ``format``, ``format_version`` and ``layers``.
So any change to a value, an index, a scale, a shape, a layer's entry or a tensor's name,
dtype or shape is caught (content_checksum computes it). It protects against corruption and
accidental edits, not against someone who recomputes it after editing.

``base_sha256`` is the SHA-256 of the raw bytes of the base weight's entries at the adapter's
indices (``base.view(-1)[indices]``, in the base's dtype): the adapter's trained values only mean
something on the base they were trained on, so loading onto another base is refused, naming the
first layer that differs. It covers the touched entries only, so it costs O(nnz) to check,
whatever the size of the model.

Version 1 files (written before the content checksum existed) have the same tensors and
metadata without ``sha256``; they are still read, with every check below except the content
checksum (so a flipped bit in a version-1 file can go unnoticed: save it again to get one).
A version-1 file that does carry a ``sha256`` key has it verified like version 2.

One flat index per entry (4 bytes) instead of PEFT's COO pair (two int32, 8 bytes) makes the
file about a third smaller for fp32 values and 40% smaller for 16-bit values.

Reading checks everything before returning anything: the safetensors header (JSON with no
repeated key, offsets that cover the data exactly), the format name and version, the content
checksum, that the ``layers`` JSON has no repeated layer, that the tensor keys are exactly the
ones it announces, dtypes, lengths, that the indices are sorted, unique and in range, that the
values are finite and every scale a finite number. With a base (load_adapter's base_model or
base_entries), every layer must exist there with the saved shape, its touched entries must
match ``base_sha256`` where the file has one, and base + scale·value (computed as AdapterBank
computes it: float32, rounded once to the base's dtype) must stay finite wherever the base
entry is finite. Any failure is a ValueError that names the file and, where there is one, the
layer. Writing refuses what reading would refuse (non-finite values or scales, repeated or
out-of-range indices, an overflow on the given base), naming the layer.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .._checks import FLOAT_DTYPES, check_scale, validate_indices
from ..formats import SparseDelta, flat_index_dtype
from .._files import write_atomically

__all__ = ["CHECKSUM_KEY", "FORMAT_NAME", "FORMAT_VERSION", "READABLE_VERSIONS", "base_checksum",
           "check_base", "content_checksum", "load_adapter", "read_adapter", "save_adapter"]

FORMAT_NAME = "shira_kernels.adapter"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
CHECKSUM_KEY = "sha256"

# layer name, shape, sorted flat indices → the base weight's entries there (raises ValueError
# when the base has no such layer or its shape differs).
BaseEntries = Callable[[str, tuple[int, int], torch.Tensor], torch.Tensor]

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
assert set(_DTYPE_NAMES) == set(FLOAT_DTYPES)
# safetensors' names for the dtypes a file of this format holds
_TENSOR_DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int32: "I32", torch.int64: "I64"}
_CONTENT_TAG = b"shira_kernels.adapter content v2\n"
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def base_checksum(entries: torch.Tensor) -> str:
    """SHA-256 (hex) of the raw bytes of a 1-D tensor of base entries."""
    raw = entries.detach().contiguous().cpu().view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def _canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def content_checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """The ``sha256`` metadata of a version-2 file holding ``tensors`` and ``metadata`` (the
    module docstring gives the exact byte stream); ``metadata``'s own ``sha256`` is left out."""
    digest = hashlib.sha256(_CONTENT_TAG)

    def record(data) -> None:
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    for name in sorted(tensors):
        tensor = tensors[name]
        code = _TENSOR_DTYPE_CODES.get(tensor.dtype, str(tensor.dtype))
        record(json.dumps([name, code, list(tensor.shape)], separators=(",", ":"),
                          ensure_ascii=True).encode("ascii"))
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        record(memoryview(raw))
    record(_canonical_json({k: v for k, v in metadata.items() if k != CHECKSUM_KEY})
           .encode("ascii"))
    return digest.hexdigest()


def _first_non_finite(values: torch.Tensor) -> int | None:
    bad = ~torch.isfinite(values)
    return int(torch.nonzero(bad)[0, 0]) if bool(bad.any()) else None


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
    if base_entries is not None and not callable(base_entries):
        raise TypeError(f"base_entries must be callable, got {type(base_entries).__name__}")
    return base_entries


def _base_of(where: str, get_base: BaseEntries, layer: str, delta: SparseDelta) -> torch.Tensor:
    """The base entries under ``delta``, checked to be one per index. The hook's own
    ValueError (no such layer, another shape) is passed on with ``where`` (the file) before it."""
    try:
        base = get_base(layer, delta.shape, delta.flat_indices)
    except ValueError as e:
        if not where:
            raise
        raise ValueError(f"{where}{e}") from None
    if not isinstance(base, torch.Tensor) or base.dim() != 1 or base.numel() != delta.nnz:
        got = (f"shape {tuple(base.shape)}" if isinstance(base, torch.Tensor)
               else type(base).__name__)
        raise ValueError(f"{where}layer {layer!r}: the base entries must be a 1-D tensor with one "
                         f"entry per index ({delta.nnz}), got {got}")
    return base


def _check_fits(where: str, layer: str, delta: SparseDelta, scale: float,
                base: torch.Tensor) -> None:
    """ValueError naming the layer when base + scale·value overflows the base's dtype at an
    entry where the base is finite (float32 arithmetic, one rounding, as AdapterBank does)."""
    if not base.dtype.is_floating_point or base.numel() == 0:
        return
    with torch.no_grad():
        values = delta.values.detach().to(base.device)
        result = (base.float() + scale * values.float()).to(base.dtype)
        bad = torch.isfinite(base) & ~torch.isfinite(result)
    if bool(bad.any()):
        pos = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"{where}layer {layer!r}: base + scale·value overflows {base.dtype} at flat index "
            f"{int(delta.flat_indices[pos])} ({float(base[pos])!r} + {scale!r}·"
            f"{float(values[pos])!r}); the adapter cannot be applied to this base")


# -- writing ---------------------------------------------------------------------------------------
def _normalize(adapter_deltas, scales) -> dict[str, tuple[SparseDelta, float]]:
    if not isinstance(adapter_deltas, Mapping) or not adapter_deltas:
        raise ValueError("adapter_deltas must be a non-empty mapping of layer name → SparseDelta")
    if not isinstance(scales, Mapping):
        check_scale(scales, "scales (a number, or a mapping layer → scale)")
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
        finite = check_scale(scale, f"layer {layer!r}: scale")
        # The delta's tensors may have been edited or replaced since it was built.
        indices, values = item.flat_indices, item.values
        try:
            validate_indices(indices, item.shape[0] * item.shape[1], name="indices")
        except (TypeError, ValueError) as e:
            raise ValueError(f"layer {layer!r}: {e}") from None
        if not isinstance(values, torch.Tensor) or values.dim() != 1:
            raise ValueError(f"layer {layer!r}: values must be a 1-D tensor")
        if values.dtype not in FLOAT_DTYPES:
            raise TypeError(f"layer {layer!r}: values must be float32, float16 or bfloat16, "
                            f"got {values.dtype}")
        if values.numel() != indices.numel():
            raise ValueError(f"layer {layer!r}: {values.numel()} values for {indices.numel()} "
                             "indices")
        bad = _first_non_finite(values)
        if bad is not None:
            raise ValueError(f"layer {layer!r}: values must be finite, got "
                             f"{float(values[bad])!r} at position {bad}")
        out[layer] = (item, finite)
    if isinstance(scales, Mapping):
        unknown = sorted(set(scales) - set(out), key=repr)
        if unknown:
            raise ValueError(f"scales names layers that have no delta: {unknown[:4]}")
    return out


def save_adapter(path, adapter_deltas, scales=1.0, base_model: nn.Module | None = None, *,
                 base_entries: BaseEntries | None = None) -> None:
    """Write one adapter to ``path`` (a .safetensors file, format version 2).

    adapter_deltas: layer name → SparseDelta, or → (SparseDelta, scale). scales: one number for
    every layer, or a mapping layer → scale (a scale given in a tuple wins). base_model (or
    base_entries, a function (layer, shape, indices) → base entries, as AdapterBank uses):
    the base the adapter belongs to; the checksum of its touched entries goes into the file,
    and a layer whose base + scale·value would overflow the base's dtype is refused.
    Without one, the file carries no base checksum and loading cannot check the base.
    Everything is checked before anything is written (ValueError or TypeError naming the layer;
    the input tensors are never modified); the file is written to a temporary file beside
    ``path`` and renamed over it.
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
            sorted_delta = SparseDelta(delta.shape, indices, values)
            base = _base_of("", get_base, layer, sorted_delta)
            _check_fits("", layer, sorted_delta, scale, base)
            base_dtype = _DTYPE_NAMES.get(base.dtype, str(base.dtype))
            base_sha = base_checksum(base)
        # Copies of their own: two layers' deltas may share a tensor (one delta for both, or
        # one made by with_values, which shares the indices), which safetensors refuses.
        for name, t in (("indices", indices), ("values", values)):
            tensors[f"{layer}.{name}"] = t.detach().cpu().clone(
                memory_format=torch.contiguous_format)
        meta[layer] = {"shape": list(delta.shape), "dtype": _DTYPE_NAMES[delta.dtype],
                       "scale": scale, "nnz": int(indices.numel()), "base_dtype": base_dtype,
                       "base_sha256": base_sha}
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "layers": json.dumps(meta, allow_nan=False)}
    metadata[CHECKSUM_KEY] = content_checksum(tensors, metadata)
    write_atomically(Path(path), save(tensors, metadata=metadata))


# -- reading ---------------------------------------------------------------------------------------
def _bad(path, why: str) -> ValueError:
    return ValueError(f"{path}: not a valid shira_kernels adapter file: {why}")


class _RepeatedKey(ValueError):
    def __init__(self, key: str):
        super().__init__(f"the key {key!r} appears twice")
        self.key = key


def _unique_object(pairs: list[tuple[str, object]]) -> dict:
    """json's object_pairs_hook: a JSON object that repeats a key is refused (json.loads would
    silently keep the last one)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def _strict_json(text: str):
    """json.loads refusing repeated keys; raises ValueError (a repeated key: _RepeatedKey)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_object)
    except RecursionError:  # absurdly nested input
        raise ValueError("nested too deeply") from None


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
        header = _strict_json(raw[8:8 + size].decode("utf-8"))
    except _RepeatedKey as e:
        raise _bad(path, f"the header repeats the key {e.key!r} (a tensor or __metadata__ "
                         "given twice)") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise _bad(path, f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ is not a mapping of strings")
    ends = []
    for key, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if key == "__metadata__":
            continue
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0
                        for o in offsets)):
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


def _verify_content(path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    saved = metadata.get(CHECKSUM_KEY)
    if saved is None:
        raise _bad(path, f"format version {metadata.get('format_version')} needs the content "
                         f"checksum {CHECKSUM_KEY!r} in the metadata, and it is missing")
    if not _HEX_DIGEST.fullmatch(saved):
        raise _bad(path, f"the {CHECKSUM_KEY!r} metadata is not a SHA-256 hex digest: "
                         f"{saved!r:.80}")
    if not hmac.compare_digest(content_checksum(tensors, metadata), saved):
        raise ValueError(f"{path}: the content checksum does not match: the file is corrupted "
                         "or was edited after it was written (tensors or metadata changed)")


def _layer_meta(path, layer, entry) -> tuple[tuple[int, int], torch.dtype, float, str | None,
                                             str | None]:
    if not isinstance(entry, dict):
        raise _bad(path, f"layer {layer!r}: metadata entry is not an object")
    shape = entry.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise _bad(path, f"layer {layer!r}: shape must be [out, in] with both ≥ 1, got "
                         f"{shape!r:.80}")
    dtype = _DTYPES_BY_NAME.get(entry.get("dtype"))
    if dtype is None:
        raise _bad(path, f"layer {layer!r}: dtype must be one of {sorted(_DTYPES_BY_NAME)}, got "
                         f"{entry.get('dtype')!r:.80}")
    try:
        scale = check_scale(entry.get("scale"), f"layer {layer!r}: scale")
    except (TypeError, ValueError) as e:  # in a file: the file is bad, whatever the value
        raise _bad(path, str(e)) from None
    base_dtype, base_sha = entry.get("base_dtype"), entry.get("base_sha256")
    if (base_sha is None) != (base_dtype is None) or not (
            base_sha is None or (isinstance(base_sha, str) and isinstance(base_dtype, str))):
        raise _bad(path, f"layer {layer!r}: base_sha256 and base_dtype must both be strings or "
                         "both null")
    return (shape[0], shape[1]), dtype, scale, base_dtype, base_sha


def read_adapter(path) -> tuple[dict[str, tuple[SparseDelta, float]], dict[str, tuple[str, str]]]:
    """Read and check a file: ({layer: (SparseDelta, scale)}, {layer: (base dtype, sha256)}),
    the second holding only the layers that carry a base checksum. No base check (see
    load_adapter). Any problem is a ValueError naming the file (and the layer)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:  # missing, a directory, unreadable: a ValueError naming it, as documented
        raise ValueError(f"{path}: cannot read an adapter file there ({e.strerror or e})") \
            from None
    metadata, tensors = _read_safetensors(path, raw)
    if metadata.get("format") != FORMAT_NAME:
        raise _bad(path, f"format is {metadata.get('format')!r:.80}, expected {FORMAT_NAME!r}")
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise _bad(path, f"format_version is {version!r:.80}; this version of shira_kernels "
                         f"reads versions {', '.join(READABLE_VERSIONS)}")
    if version != "1" or CHECKSUM_KEY in metadata:
        _verify_content(path, metadata, tensors)
    try:
        layers_meta = _strict_json(metadata.get("layers", ""))
    except _RepeatedKey as e:
        raise _bad(path, f"the 'layers' metadata repeats the key {e.key!r} (a layer, or a field "
                         "of one, given twice)") from None
    except ValueError as e:
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
        if (values.numel() != indices.numel() or isinstance(nnz, bool)
                or not isinstance(nnz, int) or nnz != indices.numel()):
            raise _bad(path, f"layer {layer!r}: {indices.numel()} indices, {values.numel()} values "
                             f"and nnz {entry.get('nnz')!r:.80} disagree")
        numel = shape[0] * shape[1]
        if indices.numel():
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= numel:
                raise _bad(path, f"layer {layer!r}: indices out of range [{lo}, {hi}] for shape "
                                 f"{shape} ({numel} entries)")
            if not bool((indices[1:] > indices[:-1]).all()):
                raise _bad(path, f"layer {layer!r}: indices are not sorted and unique")
        bad = _first_non_finite(values)
        if bad is not None:
            raise _bad(path, f"layer {layer!r}: values must be finite, got "
                             f"{float(values[bad])!r} at position {bad}")
        try:
            deltas[layer] = (SparseDelta(shape, indices.to(flat_index_dtype(shape)), values),
                             scale)
        except (TypeError, ValueError) as e:
            raise _bad(path, f"layer {layer!r}: {e}") from None
        if base_sha is not None:
            checksums[layer] = (base_dtype, base_sha)
    return deltas, checksums


def check_base(path, deltas, checksums, get_base: BaseEntries) -> None:
    """Raise ValueError naming the first layer (in file order) that does not fit the base:
    its base entries differ from the ones the adapter was saved against, or base + scale·value
    overflows the base's dtype where the base entry is finite."""
    where = f"{path}: "
    for layer, (delta, scale) in deltas.items():
        base = _base_of(where, get_base, layer, delta)
        if layer in checksums:
            saved_dtype, saved_sha = checksums[layer]
            dtype = _DTYPE_NAMES.get(base.dtype, str(base.dtype))
            if dtype != saved_dtype:
                raise ValueError(f"{path}: layer {layer!r}: the base weight is {dtype} but the "
                                 f"adapter was saved against a {saved_dtype} base")
            if base_checksum(base) != saved_sha:
                raise ValueError(f"{path}: layer {layer!r}: the base weight's entries under the "
                                 "adapter differ from the base it was saved against (another "
                                 "base model?)")
        _check_fits(where, layer, delta, scale, base)


def load_adapter(path, base_model: nn.Module | None = None, *,
                 base_entries: BaseEntries | None = None) -> dict[str, tuple[SparseDelta, float]]:
    """Read an adapter file: {layer: (SparseDelta, scale)}, the form AdapterBank.add takes.

    The file must be intact (content checksum, version 2) and well formed (see the module
    docstring). With base_model (or base_entries), every layer must exist there with the saved
    shape, the checksum of its touched base entries must match the saved one (layers saved
    without one are only checked for existence and shape), and base + scale·value must not
    overflow the base's dtype. Any problem is a ValueError naming the file and the layer.
    """
    get_base = _resolve_base(base_model, base_entries)
    deltas, checksums = read_adapter(path)
    if get_base is not None:
        check_base(path, deltas, checksums, get_base)
    return deltas
