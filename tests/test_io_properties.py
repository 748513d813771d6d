"""Property-based tests (Hypothesis) of the checkpoint readers and writers in shira_kernels.io.

For random small inputs, random index sets (sorted, unsorted, repeated, out of range), random
value bit patterns (NaN and Inf included) and randomly corrupted files, every call must give
either a correct result (a bit-identical round trip, or exactly what the file's bytes say) or a
ValueError/TypeError whose message names the culprit (the layer, module or file), and must leave
every input tensor bit-identical to before (bit patterns are compared, so NaN payloads count).

Hypothesis runs many examples per test, and pytest's function-scoped fixtures (tmp_path) are not
reset between them, so each example makes its own temporary folder.
"""
import json
import math
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shira_kernels import SparseDelta
from shira_kernels.formats import BinaryWeight
from shira_kernels.io import load_petl_vit, petl_vit_layout, save_petl_vit
from shira_kernels.io.petl_vit import METHODS
from shira_kernels.io.shira_format import (CHECKSUM_KEY, base_checksum, load_adapter,
                                          read_adapter, save_adapter)
from shira_kernels.quant import PETL_LEVEL

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# (integer dtype of the same width, exponent shift, exponent mask) per float dtype
_LAYOUT = {torch.float32: (torch.int32, 23, 0xFF), torch.float16: (torch.int16, 10, 0x1F),
           torch.bfloat16: (torch.int16, 7, 0xFF)}


def raw_bits(t: torch.Tensor) -> bytes:
    """A tensor's bit pattern (with its dtype and shape) for exact comparisons."""
    t = t.detach().cpu().contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return repr((t.dtype, tuple(t.shape))).encode() + data


def names_one_of(message: str, names) -> bool:
    return any(repr(name) in message for name in names)


# -- strategies: SHiRA adapters --------------------------------------------------------------------
@st.composite
def float_tensor(draw, dtype, n, finite=None):
    """``n`` values of ``dtype`` from random bit patterns; finite=True clears the top exponent
    bit of every Inf/NaN pattern, finite=None lets the draw decide."""
    int_dtype, shift, mask = _LAYOUT[dtype]
    width = 32 if int_dtype == torch.int32 else 16
    patterns = draw(st.lists(st.integers(-2**(width - 1), 2**(width - 1) - 1), min_size=n,
                             max_size=n))
    if finite is None:
        finite = draw(st.booleans())
    if finite:
        top = 1 << (shift + (mask.bit_length() - 1))
        patterns = [p & ~top if (p >> shift) & mask == mask else p for p in patterns]
    return torch.tensor(patterns, dtype=int_dtype).view(dtype)


@st.composite
def layer_spec(draw, name):
    """(name, SparseDelta as the caller hands it over, scale, kind of index set)."""
    out_f, in_f = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    numel = out_f * in_f
    dtype = draw(st.sampled_from(FLOATS))
    kind = draw(st.sampled_from(["sorted", "unsorted", "repeated", "out of range", "negative"]))
    smallest = {"sorted": 0, "unsorted": 2, "repeated": 2}.get(kind, 1)
    assume(numel >= smallest)
    order = draw(st.permutations(range(numel)))
    nnz = draw(st.integers(smallest, numel))
    chosen = sorted(order[:nnz])
    index_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    values = draw(float_tensor(dtype, nnz, finite=draw(st.sampled_from([True, True, None]))))
    delta = SparseDelta((out_f, in_f), torch.tensor(chosen, dtype=index_dtype), values)
    # The delta's indices edited in place after it was built (what SparseDelta cannot see):
    # the only way a bad index set reaches save_adapter.
    edited = list(chosen)
    if kind == "unsorted":
        edited = list(order[:nnz])
        if edited == chosen:
            edited.reverse()
    elif kind == "repeated":
        edited[draw(st.integers(1, nnz - 1))] = edited[0]
    elif kind == "out of range":
        edited[draw(st.integers(0, nnz - 1))] = numel + draw(st.integers(0, 5))
    elif kind == "negative":
        edited[draw(st.integers(0, nnz - 1))] = -1 - draw(st.integers(0, 5))
    with torch.no_grad():
        delta.flat_indices.copy_(torch.tensor(edited, dtype=index_dtype))
    scale = draw(st.one_of(st.floats(-1e4, 1e4), st.floats(-1e4, 1e4), st.integers(-100, 100),
                           st.sampled_from([float("nan"), float("inf"), -float("inf"), 10**400,
                                            True, "1.0", 1e38])))
    return name, delta, scale, kind


def scale_ok(scale) -> bool:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        return False
    try:
        return math.isfinite(float(scale))
    except OverflowError:
        return False


def layer_is_bad(delta, scale, kind) -> bool:
    return (kind in ("repeated", "out of range", "negative") or not scale_ok(scale)
            or not bool(torch.isfinite(delta.values).all()))


def overflows(base: torch.Tensor, values: torch.Tensor, scale: float) -> bool:
    """base + scale·value overflows base's dtype where base is finite (fp32 math, one rounding:
    what AdapterBank stores in the weight)."""
    if base.numel() == 0:
        return False
    result = (base.float() + float(scale) * values.float()).to(base.dtype)
    return bool((torch.isfinite(base) & ~torch.isfinite(result)).any())


class DenseBase:
    """A base_entries hook over dense tensors (layer → weight), naming the layer it lacks."""

    def __init__(self, weights: dict):
        self.weights = weights

    def __call__(self, layer, shape, indices):
        if layer not in self.weights:
            raise ValueError(f"the base has no layer {layer!r}")
        weight = self.weights[layer]
        if tuple(weight.shape) != tuple(shape):
            raise ValueError(f"layer {layer!r}: shape {tuple(weight.shape)} != {tuple(shape)}")
        return weight.reshape(-1)[indices.long()]


@st.composite
def adapters(draw):
    names = draw(st.sampled_from([["a"], ["blocks.0.q"], ["a", "blocks.0.q"]]))
    specs = [draw(layer_spec(name)) for name in names]
    base = None
    if draw(st.booleans()):
        weights = {}
        for name, delta, _, _ in specs:
            dtype = draw(st.sampled_from(FLOATS))
            numel = delta.shape[0] * delta.shape[1]
            weights[name] = draw(float_tensor(dtype, numel, finite=True)).reshape(delta.shape)
        base = DenseBase(weights)
    return specs, base


# -- save_adapter / load_adapter / read_adapter: round trips --------------------------------------
@SETTINGS
@given(adapters(), st.booleans())
def test_save_then_load_is_a_bit_identical_round_trip_or_an_error_naming_the_layer(drawn,
                                                                                   scale_in_tuple):
    specs, base = drawn
    before = {name: (raw_bits(delta.flat_indices), raw_bits(delta.values))
              for name, delta, _, _ in specs}
    base_before = {k: raw_bits(w) for k, w in base.weights.items()} if base else {}
    if scale_in_tuple:
        adapter, scales = {name: (delta, scale) for name, delta, scale, _ in specs}, 1.0
    else:
        adapter = {name: delta for name, delta, _, _ in specs}
        scales = {name: scale for name, _, scale, _ in specs}
    bad = [name for name, delta, scale, kind in specs if layer_is_bad(delta, scale, kind)]
    if not bad and base is not None:
        bad = [name for name, delta, scale, _ in specs
               if overflows(base(name, delta.shape, delta.flat_indices), delta.values, scale)]

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "adapter.safetensors"
        try:
            save_adapter(path, adapter, scales, base_entries=base)
        except (ValueError, TypeError) as e:
            event("save refused")
            assert bad, f"a valid adapter was refused: {e}"
            assert names_one_of(str(e), bad), str(e)
            assert list(Path(folder).iterdir()) == []  # nothing written, no temporary left
        else:
            event("saved and loaded back")
            assert not bad, f"saved an adapter with bad layers {bad}"
            assert [p.name for p in Path(folder).iterdir()] == [path.name]
            loaded = load_adapter(path, base_entries=base)
            deltas, checksums = read_adapter(path)
            assert list(loaded) == list(deltas) == [name for name, _, _, _ in specs]
            for name, delta, scale, _ in specs:
                got, got_scale = loaded[name]
                order = torch.argsort(delta.flat_indices)
                assert got.shape == delta.shape and got_scale == float(scale)
                assert got.flat_indices.dtype == torch.int32
                assert torch.equal(got.flat_indices, delta.flat_indices[order].int())
                assert raw_bits(got.values) == raw_bits(delta.values[order])
                assert raw_bits(deltas[name][0].values) == raw_bits(got.values)
                if base is not None:
                    entries = base(name, delta.shape, got.flat_indices)
                    assert checksums[name][1] == base_checksum(entries)
                else:
                    assert checksums == {}
    for name, delta, _, _ in specs:  # the caller's tensors are untouched
        assert (raw_bits(delta.flat_indices), raw_bits(delta.values)) == before[name]
    if base is not None:
        assert {k: raw_bits(w) for k, w in base.weights.items()} == base_before


# -- corrupted adapter files -----------------------------------------------------------------------
@st.composite
def valid_adapter(draw):
    """A valid adapter ({name: (SparseDelta, scale)}) and an optional dense base for it."""
    out = {}
    for name in draw(st.sampled_from([["a"], ["a", "b.c"]])):
        out_f, in_f = draw(st.integers(1, 5)), draw(st.integers(1, 5))
        dtype = draw(st.sampled_from(FLOATS))
        order = draw(st.permutations(range(out_f * in_f)))
        flat = torch.tensor(order[:draw(st.integers(0, out_f * in_f))], dtype=torch.int64)
        values = draw(float_tensor(dtype, flat.numel(), finite=True))
        out[name] = (SparseDelta.from_flat(flat, (out_f, in_f), values),
                     draw(st.floats(-10, 10, allow_nan=False)))
    return out


def _header(raw: bytes) -> dict:
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + size])


@st.composite
def corruption(draw, raw: bytes):
    """(description, corrupted bytes): byte flips anywhere or inside a tensor's data, a
    truncation, appended bytes, or an edit of the metadata written back with safetensors."""
    how = draw(st.sampled_from(["flip", "flip data", "non-finite value", "truncate", "append",
                                "edit"]))
    if how == "non-finite value":
        size = int.from_bytes(raw[:8], "little")
        spans = [(entry["dtype"], entry["data_offsets"])
                 for key, entry in _header(raw).items()
                 if key.endswith(".values") and entry["data_offsets"][1] > entry["data_offsets"][0]]
        if spans:
            dtype, (begin, end) = draw(st.sampled_from(spans))
            pattern = draw(st.sampled_from(NON_FINITE[dtype]))
            at = 8 + size + begin + len(pattern) * draw(st.integers(0, (end - begin)
                                                                     // len(pattern) - 1))
            return how, raw[:at] + pattern + raw[at + len(pattern):]
        how = "flip"
    if how == "flip" or (how == "flip data" and len(raw) <= 8 + int.from_bytes(raw[:8], "little")):
        out = bytearray(raw)
        for _ in range(draw(st.integers(1, 3))):
            out[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
        return "flip", bytes(out)
    if how == "flip data":
        start = 8 + int.from_bytes(raw[:8], "little")
        out = bytearray(raw)
        out[draw(st.integers(start, len(raw) - 1))] ^= 1 << draw(st.integers(0, 7))
        return how, bytes(out)
    if how == "truncate":
        return how, raw[:draw(st.integers(0, len(raw) - 1))]
    if how == "append":
        return how, raw + draw(st.binary(min_size=1, max_size=16))
    return "edit", None  # done by the test, which has a file to rewrite


# little-endian NaN, +Inf and -Inf per safetensors dtype
NON_FINITE = {"F32": [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff"],
              "F16": [b"\x00\x7e", b"\x00\x7c", b"\x00\xfc"],
              "BF16": [b"\xc0\x7f", b"\x80\x7f", b"\x80\xff"]}
METADATA_EDITS = ["scale", "nnz", "shape", "dtype", "drop base", "add layer", "repeat layer",
                  "version 1 keeping sha256", "version 1 without sha256", "drop sha256",
                  "swap tensors"]


def _edit_metadata(path: Path, edit: str, new_scale: float) -> None:
    """Rewrite ``path`` with safetensors, the metadata edited (the saved sha256 kept unless the
    edit drops it)."""
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata())
    layers = json.loads(meta["layers"])
    first = next(iter(layers))
    if edit == "scale":
        layers[first]["scale"] = new_scale
    elif edit == "nnz":
        layers[first]["nnz"] += 1
    elif edit == "shape":
        layers[first]["shape"][1] += 1
    elif edit == "dtype":
        layers[first]["dtype"] = "float16" if layers[first]["dtype"] != "float16" else "float32"
    elif edit == "drop base":
        layers[first]["base_sha256"] = layers[first]["base_dtype"] = None
    elif edit == "add layer":
        layers["extra"] = dict(layers[first])
        tensors["extra.indices"] = tensors[f"{first}.indices"].clone()
        tensors["extra.values"] = tensors[f"{first}.values"].clone()
    elif edit.startswith("version 1"):
        meta["format_version"] = "1"
        if edit == "version 1 without sha256":
            meta.pop(CHECKSUM_KEY, None)
    elif edit == "drop sha256":
        meta.pop(CHECKSUM_KEY, None)
    elif edit == "swap tensors":  # values ↔ a same-length, same-dtype copy reversed
        tensors[f"{first}.values"] = tensors[f"{first}.values"].flip(0).contiguous()
    meta["layers"] = json.dumps(layers)
    if edit == "repeat layer":
        meta["layers"] = meta["layers"][:-1] + ", " + json.dumps({first: layers[first]})[1:-1] + "}"
    save_file(tensors, path, metadata=meta)


def _invariants(deltas: dict) -> None:
    for name, (delta, scale) in deltas.items():
        assert isinstance(delta, SparseDelta) and isinstance(scale, float)
        assert math.isfinite(scale)
        assert bool(torch.isfinite(delta.values).all())
        idx = delta.flat_indices
        if idx.numel():
            assert int(idx.min()) >= 0 and int(idx.max()) < delta.shape[0] * delta.shape[1]
            assert bool((idx[1:] > idx[:-1]).all())


def _as_version_1(path: Path) -> None:
    """Rewrite a saved file as a version-1 file (no content checksum), as older releases wrote."""
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata())
    del meta[CHECKSUM_KEY]
    meta["format_version"] = "1"
    save_file(tensors, path, metadata=meta)


@SETTINGS
@given(valid_adapter(), st.booleans(), st.booleans(), st.data())
def test_a_corrupted_file_is_refused_naming_it_or_reads_as_its_bytes_say(adapter, with_base,
                                                                         version_1, data):
    base = None
    if with_base:  # small base entries: base + scale·value never overflows a float32 base
        base = DenseBase({name: torch.full(d.shape, 0.25) for name, (d, _) in adapter.items()})
        assume(not any(overflows(base(n, d.shape, d.flat_indices), d.values, s)
                       for n, (d, s) in adapter.items()))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.safetensors"
        save_adapter(path, adapter, base_entries=base)
        if version_1:  # no checksum: the structural checks meet the corruption
            _as_version_1(path)
        original = path.read_bytes()
        description, corrupted = data.draw(corruption(original))
        if corrupted is None:
            description = data.draw(st.sampled_from(METADATA_EDITS))
            _edit_metadata(path, description, data.draw(st.floats(-10, 10, allow_nan=False)))
        else:
            path.write_bytes(corrupted)
        base_before = {k: raw_bits(w) for k, w in base.weights.items()} if base else {}
        written = path.read_bytes()
        try:
            loaded = load_adapter(path, base_entries=base)
        except ValueError as e:
            event(f"refused ({'v1' if version_1 else 'v2'}, {description})")
            assert str(path) in str(e), str(e)
            loaded = None
        assert path.read_bytes() == written  # reading never writes
        if base is not None:
            assert {k: raw_bits(w) for k, w in base.weights.items()} == base_before
        if loaded is None:
            return
        event(f"loaded ({'v1' if version_1 else 'v2'}, {description})")
        _invariants(loaded)
        meta = _header(written).get("__metadata__", {})
        if meta.get("format_version") == "2" or CHECKSUM_KEY in meta:
            # a checksummed file that loads holds exactly what was saved
            assert list(loaded) == list(adapter)
            for name, (delta, scale) in adapter.items():
                got, got_scale = loaded[name]
                assert got.shape == delta.shape and got_scale == scale
                assert torch.equal(got.flat_indices, delta.flat_indices)
                assert raw_bits(got.values) == raw_bits(delta.values)
        else:
            # version 1 (no checksum): exactly what the bytes say, decoded independently
            tensors = load_file(path)
            layers = json.loads(meta["layers"])
            assert list(loaded) == list(layers)
            for name, (got, got_scale) in loaded.items():
                assert got_scale == layers[name]["scale"]
                assert list(got.shape) == layers[name]["shape"]
                assert torch.equal(got.flat_indices.long(), tensors[f"{name}.indices"].long())
                assert raw_bits(got.values) == raw_bits(tensors[f"{name}.values"])


# -- PETL-ViT ------------------------------------------------------------------------------------
@st.composite
def petl_configs(draw):
    method = draw(st.sampled_from(METHODS))
    config = {"method": method, "bit": 1, "dim": draw(st.integers(1, 2))}
    if method.endswith("-bihead"):
        config["num_class"] = draw(st.integers(1, 12))
    return config


SPECIAL_STATS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -0.05]


@st.composite
def petl_weights(draw, config):
    """(weights, {module: drawn (alpha, mu)}) from a seed: random signs, ordinary stats except
    for a few modules whose α and μ are drawn (special values included)."""
    layout = petl_vit_layout(config)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    special = draw(st.lists(st.integers(0, len(layout) - 1), max_size=3, unique=True))
    weights, drawn = {}, {}
    for i, (name, (rows, cols)) in enumerate(layout):
        signs = torch.rand(rows, cols, generator=gen) < 0.5
        alpha, mu = 0.05, -0.01
        if i in special:
            alpha = draw(st.one_of(st.floats(2.0 ** -100, 2.0 ** 100, width=32),
                                   st.sampled_from(SPECIAL_STATS)))
            mu = draw(st.one_of(st.floats(-2.0 ** 100, 2.0 ** 100, width=32),
                                st.sampled_from(SPECIAL_STATS[:3])))
            drawn[name] = (alpha, mu)
        weights[name] = BinaryWeight.from_signs(signs, alpha, mu)
    return weights, drawn


def _stats_bad(alpha: float, mu: float) -> bool:
    return not (math.isfinite(mu) and math.isfinite(alpha) and alpha > 0)


@SETTINGS
@given(st.data())
def test_petl_save_then_load_round_trips_or_names_the_module(data):
    config = data.draw(petl_configs())
    weights, drawn = data.draw(petl_weights(config))
    before = {name: tuple(raw_bits(t) for t in (w.packed, w.alpha, w.mu))
              for name, w in weights.items()}
    bad = [name for name, (alpha, mu) in drawn.items() if _stats_bad(alpha, mu)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "petl.bin"
        try:
            save_petl_vit(path, weights, config)
        except (ValueError, TypeError) as e:
            event("save refused")
            assert bad, f"valid weights were refused: {e}"
            assert names_one_of(str(e), bad), str(e)
            assert list(Path(folder).iterdir()) == []
        else:
            event("saved and loaded back")
            assert not bad, f"wrote weights with bad stats in {bad}"
            ckpt = load_petl_vit(path, config)
            assert list(ckpt.weights) == list(weights)
            for name, w in weights.items():
                got = ckpt.weights[name]
                assert torch.equal(got.signs(), w.signs())
                assert raw_bits(got.mu) == raw_bits(w.mu)
                # α comes back exactly when a float32 std maps onto it, else within one step
                a, b = float(got.alpha), float(w.alpha)
                assert a == b or abs(a - b) <= abs(b) * 2.0 ** -22
            # what was read is written back byte for byte
            again = Path(folder) / "again.bin"
            save_petl_vit(again, ckpt)
            assert again.read_bytes() == path.read_bytes()
    for name, w in weights.items():
        assert tuple(raw_bits(t) for t in (w.packed, w.alpha, w.mu)) == before[name]


def _decode_petl(raw: bytes, layout):
    """Independent decoding: [(name, signs bool array, mean, std)] with numpy."""
    out, offset = [], 0
    for name, (rows, cols) in layout:
        nbytes = (rows * cols + 7) // 8
        bits = np.unpackbits(np.frombuffer(raw, np.uint8, nbytes, offset), bitorder="little")
        offset += nbytes
        mean, std = struct.unpack_from("<2f", raw, offset)
        offset += 8
        out.append((name, bits[:rows * cols].reshape(rows, cols).astype(bool), mean, std))
    return out


def _petl_stats_ok(mean: float, std: float) -> bool:
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        return False
    alpha = np.float32(PETL_LEVEL * std)
    with np.errstate(over="ignore"):
        levels = np.float32(mean) + np.array([alpha, -alpha], dtype=np.float32)
    return bool(np.isfinite(levels).all())


@SETTINGS
@given(st.data())
def test_a_corrupted_petl_file_is_refused_naming_the_module_or_reads_as_its_bytes_say(data):
    config = data.draw(petl_configs())
    weights, _ = data.draw(petl_weights(config))
    for name in list(weights):  # ordinary stats everywhere: the corruption makes the bad ones
        weights[name] = BinaryWeight.from_signs(weights[name].signs(), 0.05, -0.01)
    layout = petl_vit_layout(config)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "petl.bin"
        save_petl_vit(path, weights, config)
        raw = bytearray(path.read_bytes())
        how = data.draw(st.sampled_from(["flip", "flip stats", "set stats", "truncate",
                                         "append"]))
        if how == "truncate":
            raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
        elif how == "append":
            raw += data.draw(st.binary(min_size=1, max_size=8))
        else:
            stats_at = []
            offset = 0
            for _, (rows, cols) in layout:
                offset += (rows * cols + 7) // 8
                stats_at.append(offset)
                offset += 8
            for _ in range(data.draw(st.integers(1, 3))):
                if how == "flip":
                    raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
                else:
                    at = data.draw(st.sampled_from(stats_at))
                    if how == "flip stats":
                        raw[at + data.draw(st.integers(0, 7))] ^= 1 << data.draw(st.integers(0, 7))
                    else:
                        struct.pack_into("<2f", raw, at,
                                         data.draw(st.sampled_from(SPECIAL_STATS + [1e-3, 3e38])),
                                         data.draw(st.sampled_from(SPECIAL_STATS + [1e-3, 3e38])))
        path.write_bytes(bytes(raw))
        expected_size = sum((r * c + 7) // 8 + 8 for _, (r, c) in layout)
        try:
            ckpt = load_petl_vit(path, config)
        except ValueError as e:
            message = str(e)
            assert str(path) in message, message
            if len(raw) != expected_size:
                assert f"expected {expected_size} bytes" in message
                return
            decoded = _decode_petl(bytes(raw), layout)
            first_bad = next((name for name, _, m, s in decoded if not _petl_stats_ok(m, s)),
                             None)
            event("refused: bad stats")
            assert first_bad is not None, f"a readable file was refused: {message}"
            assert f"module {first_bad!r}" in message
            return
        event(f"loaded ({how})")
        assert len(raw) == expected_size
        assert path.read_bytes() == bytes(raw)
        decoded = _decode_petl(bytes(raw), layout)
        assert list(ckpt.weights) == [name for name, _, _, _ in decoded]
        for name, signs, mean, std in decoded:
            assert _petl_stats_ok(mean, std), f"module {name!r} loaded with {mean}, {std}"
            w = ckpt.weights[name]
            assert np.array_equal(w.signs().numpy(), signs)
            assert ckpt.stats[name] == (mean, std)
            assert float(w.mu) == mean
            assert float(w.alpha) == float(np.float32(PETL_LEVEL * std))
