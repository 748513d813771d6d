"""The shira_kernels adapter file (shira_kernels.io.shira_format) and AdapterBank.save/load:
round trips, the base checksum, corrupt files that must be refused without changing anything,
and the size against PEFT's SHiRA layout."""
import copy
import functools
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save, save_file
from torch import nn

from shira_kernels import AdapterBank, SparseDelta
from shira_kernels.io import load_adapter, save_adapter
from shira_kernels.io.shira_format import (CHECKSUM_KEY, FORMAT_NAME, FORMAT_VERSION, base_checksum,
                                          content_checksum, read_adapter)

from test_adapters import bits, random_adapter, small_model, snapshot, assert_bits_equal


def _adapter(seed=0, density=0.2):
    return random_adapter(torch.Generator().manual_seed(seed), density=density)


def _metadata(path):
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size))["__metadata__"]


def test_round_trip_keeps_indices_values_scales_and_writes_the_metadata(tmp_path):
    model = small_model(torch.bfloat16)
    adapter = _adapter()
    adapter["0"] = adapter["0"].to(torch.bfloat16)
    path = tmp_path / "a.safetensors"
    save_adapter(path, adapter, {"0": 2.0, "4": -0.5}, base_model=model)

    loaded = load_adapter(path, model)
    assert list(loaded) == list(adapter)
    for layer, (delta, scale) in loaded.items():
        assert scale == {"0": 2.0, "4": -0.5}.get(layer, 1.0)
        assert delta.shape == adapter[layer].shape and delta.flat_indices.dtype == torch.int32
        assert torch.equal(delta.flat_indices, adapter[layer].flat_indices)
        assert delta.values.dtype == adapter[layer].values.dtype
        assert torch.equal(bits(delta.values), bits(adapter[layer].values))

    meta = _metadata(path)
    assert meta["format"] == FORMAT_NAME == "shira_kernels.adapter"
    assert meta["format_version"] == FORMAT_VERSION == "2"
    assert set(meta) == {"format", "format_version", "layers", CHECKSUM_KEY}
    assert meta[CHECKSUM_KEY] == content_checksum(load_file(path), meta)
    layers = json.loads(meta["layers"])
    assert layers["0"]["shape"] == [24, 16] and layers["0"]["dtype"] == "bfloat16"
    assert layers["2"]["dtype"] == "float32" and layers["0"]["scale"] == 2.0
    assert layers["2"]["base_dtype"] == "bfloat16"
    touched = model[2].weight.detach().view(-1)[adapter["2"].flat_indices.long()]
    assert layers["2"]["base_sha256"] == base_checksum(touched)
    assert set(load_file(path)) == {f"{layer}.{part}" for layer in adapter
                                    for part in ("indices", "values")}


def test_scales_in_tuples_and_a_single_scale(tmp_path):
    adapter = _adapter()
    save_adapter(tmp_path / "a.safetensors", {"0": (adapter["0"], 3.0), "2": adapter["2"]}, 0.25)
    loaded = load_adapter(tmp_path / "a.safetensors")
    assert loaded["0"][1] == 3.0 and loaded["2"][1] == 0.25
    with pytest.raises(ValueError, match="no delta"):
        save_adapter(tmp_path / "b.safetensors", {"0": adapter["0"]}, {"2": 1.0})
    assert not (tmp_path / "b.safetensors").exists()


@pytest.mark.parametrize("share", ["one delta", "with_values"])
def test_layers_whose_deltas_share_tensors_round_trip(tmp_path, share):
    # Two layers' deltas sharing a tensor (the same delta twice, or with_values sharing the
    # indices): safetensors refused to write tensors that share memory.
    d = _adapter()["0"]
    e = d if share == "one delta" else d.with_values(torch.randn_like(d.values))
    save_adapter(tmp_path / "a.safetensors", {"q": d, "k": (e, 0.5)})
    loaded = load_adapter(tmp_path / "a.safetensors")
    for layer, delta, scale in (("q", d, 1.0), ("k", e, 0.5)):
        assert loaded[layer][1] == scale
        assert torch.equal(loaded[layer][0].flat_indices, delta.flat_indices)
        assert torch.equal(bits(loaded[layer][0].values), bits(delta.values))


def test_huge_layers_store_int64_indices(tmp_path):
    shape = (2**16, 2**16)  # out·in = 2³², past int32 (only the delta exists, no weight)
    flat = torch.tensor([5, 2**31 + 7, 2**32 - 1], dtype=torch.int64)
    save_adapter(tmp_path / "big.safetensors", {"huge": SparseDelta(shape, flat, torch.ones(3))})
    assert load_file(tmp_path / "big.safetensors")["huge.indices"].dtype == torch.int64
    delta, _ = load_adapter(tmp_path / "big.safetensors")["huge"]
    assert delta.flat_indices.dtype == torch.int64 and torch.equal(delta.flat_indices, flat)


def test_loading_onto_another_base_names_the_first_mismatching_layer(tmp_path):
    model = small_model(torch.float16)
    adapter = _adapter()
    path = tmp_path / "a.safetensors"
    save_adapter(path, adapter, 1.0, base_model=model)

    other = copy.deepcopy(model)
    with torch.no_grad():  # an entry the adapter does not touch: the checksum does not cover it
        untouched = torch.ones(24 * 16, dtype=torch.bool)
        untouched[adapter["0"].flat_indices.long()] = False
        other[0].weight.view(-1)[torch.nonzero(untouched)[0]] += 1
    load_adapter(path, other)

    with torch.no_grad():  # touched entries of layers 2 and 4: layer 2 is reported first
        other[2].weight.view(-1)[adapter["2"].flat_indices[0].long()] += 1
        other[4].weight.view(-1)[adapter["4"].flat_indices[0].long()] += 1
    with pytest.raises(ValueError, match="layer '2'.*differ"):
        load_adapter(path, other)
    with pytest.raises(ValueError, match="layer '0'.*float32.*float16"):
        load_adapter(path, copy.deepcopy(model).float())
    with pytest.raises(ValueError, match="no layer '4'"):
        load_adapter(path, model[:3])
    wider = copy.deepcopy(model)
    wider[2] = nn.Linear(25, 12).half()
    with pytest.raises(ValueError, match="layer '2'.*shape"):
        load_adapter(path, wider)


def test_a_file_saved_without_a_base_loads_anywhere(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(path, _adapter())
    assert all(entry["base_sha256"] is None for entry in json.loads(_metadata(path)["layers"]).values())
    assert set(load_adapter(path, small_model())) == set(SHAPES_LAYERS)


SHAPES_LAYERS = ("0", "2", "4")


# -- corrupt files ---------------------------------------------------------------------------------
def _valid_parts():
    adapter = _adapter(seed=1)
    tensors = {}
    layers = {}
    for layer, delta in adapter.items():
        tensors[f"{layer}.indices"] = delta.flat_indices.clone()
        tensors[f"{layer}.values"] = delta.values.clone()
        layers[layer] = {"shape": list(delta.shape), "dtype": "float32", "scale": 1.0,
                         "nnz": delta.nnz, "base_dtype": None, "base_sha256": None}
    return tensors, layers


def _write(path, tensors, layer_meta, version=FORMAT_VERSION, **metadata):
    """A file by hand; version "2" gets a correct content checksum over what is written (unless
    metadata gives sha256), so that its other checks are the ones under test."""
    layers = layer_meta if isinstance(layer_meta, str) else json.dumps(layer_meta)
    meta = {"format": FORMAT_NAME, "format_version": version, "layers": layers}
    meta.update(metadata)
    meta = {k: v for k, v in meta.items() if v is not None}
    if version == "2" and CHECKSUM_KEY not in metadata:
        meta[CHECKSUM_KEY] = content_checksum(tensors, meta)
    save_file(tensors, path, metadata=meta)


def _corrupt(case, path, version=FORMAT_VERSION):
    tensors, layers = _valid_parts()
    _write = functools.partial(globals()["_write"], version=version)
    if case == "empty file":
        path.write_bytes(b"")
        return
    if case.startswith("truncated"):
        _write(path, tensors, layers)
        raw = path.read_bytes()
        cut = {"truncated in the length": 5, "truncated in the header": 40,
               "truncated in the data": len(raw) - 100, "truncated by one byte": len(raw) - 1}[case]
        path.write_bytes(raw[:cut])
        return
    if case == "bad header":
        _write(path, tensors, layers)
        raw = bytearray(path.read_bytes())
        raw[8:12] = b"\xff{]x"
        path.write_bytes(bytes(raw))
        return
    if case == "huge header length":
        _write(path, tensors, layers)
        raw = path.read_bytes()
        path.write_bytes((2**62).to_bytes(8, "little") + raw[8:])
        return
    if case == "trailing garbage":
        _write(path, tensors, layers)
        path.write_bytes(path.read_bytes() + b"\0" * 16)
        return
    metadata = {}
    if case == "wrong format":
        metadata["format"] = "peft.shira"
    elif case == "wrong version":
        metadata["format_version"] = "3"
    elif case == "no metadata":
        save_file(tensors, path)
        return
    elif case == "bad layers json":
        metadata["layers"] = "{not json"
    elif case == "missing key":
        del tensors["2.values"]
    elif case == "extra key":
        tensors["9.indices"] = torch.zeros(1, dtype=torch.int32)
    elif case == "index out of range":
        tensors["2.indices"][-1] = 12 * 24
    elif case == "negative index":
        tensors["2.indices"][0] = -1
    elif case == "repeated index":
        tensors["2.indices"][1] = tensors["2.indices"][0]
    elif case == "unsorted indices":
        tensors["2.indices"] = tensors["2.indices"].flip(0).contiguous()
    elif case == "length mismatch":
        tensors["2.values"] = tensors["2.values"][:-1].clone()
    elif case == "nnz mismatch":
        layers["2"]["nnz"] += 1
    elif case == "values dtype":
        tensors["2.values"] = tensors["2.values"].half()
    elif case == "float indices":
        tensors["2.indices"] = tensors["2.indices"].float()
    elif case == "bad shape":
        layers["2"]["shape"] = [12, 0]
    elif case == "bad scale":
        layers["2"]["scale"] = "big"
    elif case == "bad dtype name":
        layers["2"]["dtype"] = "int8"
    elif case == "infinite scale":
        layers["2"]["scale"] = float("inf")  # json writes Infinity, which json.loads accepts
    elif case == "huge integer scale":
        layers["2"]["scale"] = 10**400  # past float's range: float() overflows
    elif case == "bool scale":
        layers["2"]["scale"] = True  # a bad file: ValueError, though check_scale's is TypeError
    elif case == "bool nnz":
        layers["0"]["nnz"] = True
        tensors["0.indices"] = tensors["0.indices"][:1].clone()
        tensors["0.values"] = tensors["0.values"][:1].clone()
    elif case in ("nan value", "inf value"):
        tensors["2.values"][3] = float("nan" if case == "nan value" else "-inf")
    elif case == "repeated layer":
        # the layer "2" twice: json.loads would silently keep the second
        text = json.dumps(layers)
        second = json.dumps({"2": {**layers["2"], "scale": 5.0}})[1:-1]
        metadata["layers"] = text[:-1] + ", " + second + "}"
    elif case == "repeated field":
        text = json.dumps(layers)
        metadata["layers"] = text.replace('"scale": 1.0', '"scale": 1.0, "scale": 2.0', 1)
    _write(path, tensors, layers, **metadata)


CORRUPT = ["empty file", "truncated in the length", "truncated in the header",
           "truncated in the data", "truncated by one byte", "bad header", "huge header length",
           "trailing garbage", "wrong format", "wrong version", "no metadata", "bad layers json",
           "missing key", "extra key", "index out of range", "negative index", "repeated index",
           "unsorted indices", "length mismatch", "nnz mismatch", "values dtype", "float indices",
           "bad shape", "bad scale", "bad dtype name", "infinite scale", "huge integer scale",
           "bool scale", "bool nnz", "nan value", "inf value", "repeated layer", "repeated field"]
NAMES_LAYER_2 = ("missing key", "index out of range", "repeated index", "length mismatch",
                 "values dtype", "bad shape", "bad scale", "infinite scale", "huge integer scale",
                 "bool scale", "nan value", "inf value", "repeated layer")


@pytest.mark.parametrize("version", ["1", "2"])
def test_the_corrupt_file_helper_writes_valid_files_when_unchanged(tmp_path, version):
    tensors, layers = _valid_parts()
    _write(tmp_path / "ok.safetensors", tensors, layers, version=version)
    assert _metadata(tmp_path / "ok.safetensors")["format_version"] == version
    loaded = load_adapter(tmp_path / "ok.safetensors", small_model())
    assert set(loaded) == {"0", "2", "4"}
    for layer, (delta, scale) in loaded.items():
        assert scale == 1.0
        assert torch.equal(delta.flat_indices, tensors[f"{layer}.indices"])
        assert torch.equal(bits(delta.values), bits(tensors[f"{layer}.values"]))


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_files_raise_value_error_and_leave_the_bank_unchanged(tmp_path, case, version):
    path = tmp_path / "bad.safetensors"
    _corrupt(case, path, version)
    with pytest.raises(ValueError, match="bad.safetensors") as info:
        load_adapter(path)
    if case in NAMES_LAYER_2:
        assert "'2'" in str(info.value)
    # a well-formed version-2 file with a correct checksum is refused by the check under test,
    # not by the checksum
    assert "content checksum" not in str(info.value)

    model = small_model(torch.bfloat16)
    bank = AdapterBank(model)
    bank.add("a", _adapter(seed=2))
    bank.activate("a")
    before = snapshot(model)
    with pytest.raises(ValueError):
        bank.load("b", path)
    assert bank.names == ("a",) and bank.active == "a"
    assert_bits_equal(model, before)
    bank.deactivate()


# -- integrity: the content checksum, repeated keys, non-finite values, overflow -------------------
def _tensor_span(path, key):
    """(start, end) of tensor ``key``'s bytes in the file."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + size])[key]["data_offsets"]
    return 8 + size + begin, 8 + size + end


def _rewrite_metadata(path, edit):
    """Rewrite ``path`` with safetensors, its tensors unchanged and its metadata edit(metadata):
    a valid safetensors file that someone edited (the old sha256 is kept as it was)."""
    meta = _metadata(path)
    tensors = load_file(path)
    edit(meta)
    save_file(tensors, path, metadata=meta)


def test_the_content_checksum_is_computed_as_the_module_docstring_says(tmp_path):
    # Recomputed from the file's own bytes (header dtypes and offsets), not from tensors.
    import hashlib

    model = small_model(torch.bfloat16)
    adapter = _adapter(seed=7)
    adapter["4"] = adapter["4"].to(torch.float16)
    path = tmp_path / "a.safetensors"
    save_adapter(path, adapter, {"0": -2.0}, base_model=model)
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    meta = header.pop("__metadata__")
    digest = hashlib.sha256(b"shira_kernels.adapter content v2\n")

    def record(data):
        digest.update(len(data).to_bytes(8, "little") + data)
    for name in sorted(header):
        entry = header[name]
        record(json.dumps([name, entry["dtype"], entry["shape"]], separators=(",", ":")).encode())
        begin, end = entry["data_offsets"]
        record(raw[8 + size + begin:8 + size + end])
    record(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True,
                      separators=(",", ":")).encode())
    assert {header[k]["dtype"] for k in header} == {"I32", "F32", "F16"}
    assert meta["sha256"] == digest.hexdigest()


def test_a_flipped_bit_in_a_value_is_refused(tmp_path):
    # Regression: the checksum covered only the base entries, so this loaded silently.
    model = small_model()
    path = tmp_path / "a.safetensors"
    save_adapter(path, _adapter(), base_model=model)
    raw = bytearray(path.read_bytes())
    start, _ = _tensor_span(path, "2.values")
    raw[start + 5] ^= 0x10  # one bit of a mantissa: still a finite float32
    path.write_bytes(bytes(raw))
    assert torch.isfinite(load_file(path)["2.values"]).all()  # the file is still well formed
    for base in (None, model):
        with pytest.raises(ValueError, match=r"a\.safetensors.*checksum.*corrupted or .*edited"):
            load_adapter(path, base)
    bank = AdapterBank(model)
    with pytest.raises(ValueError, match="corrupted"):
        bank.load("a", path)
    assert bank.names == ()


def test_a_flipped_bit_in_an_index_is_refused(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(path, _adapter())
    raw = bytearray(path.read_bytes())
    start, end = _tensor_span(path, "4.indices")
    raw[end - 4] ^= 0x01  # the last index (int32, little-endian): max - 1 or max + 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted"):
        load_adapter(path)


def test_a_scale_edited_from_1_to_9_is_refused(tmp_path):
    # Regression: the metadata was not covered, so the edited scale loaded as 9.0.
    path = tmp_path / "a.safetensors"
    save_adapter(path, _adapter(), 1.0)

    def edit(meta):
        layers = json.loads(meta["layers"])
        assert layers["2"]["scale"] == 1.0
        layers["2"]["scale"] = 9.0
        meta["layers"] = json.dumps(layers)
    _rewrite_metadata(path, edit)
    assert json.loads(_metadata(path)["layers"])["2"]["scale"] == 9.0
    with pytest.raises(ValueError, match="a.safetensors.*corrupted or was edited"):
        load_adapter(path)
    with pytest.raises(ValueError, match="corrupted or was edited"):
        read_adapter(path)


@pytest.mark.parametrize("edit", ["drop the checksum", "bad checksum text", "downgrade to 1",
                                  "add a metadata key", "rename a tensor"])
def test_other_edits_of_a_saved_file_are_refused(tmp_path, edit):
    path = tmp_path / "a.safetensors"
    save_adapter(path, _adapter())
    if edit == "rename a tensor":  # "2" ↔ "4" would need both renamed; rename one layer fully
        tensors, meta = load_file(path), _metadata(path)
        layers = json.loads(meta["layers"])
        layers["9"] = layers.pop("4")
        tensors["9.indices"] = tensors.pop("4.indices")
        tensors["9.values"] = tensors.pop("4.values")
        meta["layers"] = json.dumps(layers)
        save_file(tensors, path, metadata=meta)
        message = "corrupted or was edited"
    else:
        changes = {"drop the checksum": ({CHECKSUM_KEY: None}, "checksum.*missing"),
                   "bad checksum text": ({CHECKSUM_KEY: "0" * 63 + "g"}, "not a SHA-256"),
                   "downgrade to 1": ({"format_version": "1"}, "corrupted or was edited"),
                   "add a metadata key": ({"note": "x"}, "corrupted or was edited")}
        change, message = changes[edit]

        def apply(meta):
            for key, value in change.items():
                meta.pop(key) if value is None else meta.__setitem__(key, value)
        _rewrite_metadata(path, apply)
    with pytest.raises(ValueError, match=f"a.safetensors.*{message}"):
        load_adapter(path)


def test_version_1_files_still_load(tmp_path):
    tensors, layers = _valid_parts()
    layers["4"]["scale"] = -0.5
    path = tmp_path / "old.safetensors"
    _write(path, tensors, layers, version="1")
    assert CHECKSUM_KEY not in _metadata(path)
    loaded = load_adapter(path, small_model())
    assert loaded["4"][1] == -0.5
    for layer, (delta, _) in loaded.items():
        assert torch.equal(delta.flat_indices, tensors[f"{layer}.indices"])
        assert torch.equal(bits(delta.values), bits(tensors[f"{layer}.values"]))
    # saving it again writes version 2 with the checksum
    save_adapter(tmp_path / "new.safetensors", loaded)
    assert _metadata(tmp_path / "new.safetensors")["format_version"] == "2"
    assert set(load_adapter(tmp_path / "new.safetensors")) == {"0", "2", "4"}


@pytest.mark.parametrize("version", ["1", "2"])
def test_a_repeated_layer_key_is_refused(tmp_path, version):
    # Regression: json.loads kept the last "2" silently (here: with scale 5.0).
    tensors, layers = _valid_parts()
    text = json.dumps(layers)
    repeated = text[:-1] + ", " + json.dumps({"2": {**layers["2"], "scale": 5.0}})[1:-1] + "}"
    assert json.loads(repeated)["2"]["scale"] == 5.0  # what plain json.loads makes of it
    path = tmp_path / "dup.safetensors"
    _write(path, tensors, repeated, version=version)  # version 2: a correct checksum over it
    with pytest.raises(ValueError, match="dup.safetensors.*repeats the key '2'"):
        load_adapter(path)


def test_a_repeated_tensor_key_in_the_header_is_refused(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(path, {"0": _adapter()["0"]})
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header, data = raw[8:8 + size].decode(), raw[8 + size:]
    entry = json.loads(header)["0.values"]
    # The same key again, describing the same bytes: every offset stays valid.
    header = header.rstrip()[:-1] + ',"0.values":' + json.dumps(entry) + "}"
    header += " " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + data)
    with pytest.raises(ValueError, match="a.safetensors.*repeats the key '0.values'"):
        load_adapter(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_non_finite_values_are_refused_without_a_base(tmp_path, bad):
    # Regression: without a base, load_adapter returned the NaN.
    tensors, layers = _valid_parts()
    tensors["4.values"][2] = bad
    path = tmp_path / "nan.safetensors"
    _write(path, tensors, layers)  # a correct checksum: the values check must catch it
    with pytest.raises(ValueError, match=r"nan.safetensors.*layer '4'.*finite.*position 2"):
        load_adapter(path)
    adapter = _adapter()
    values = adapter["4"].values.clone()
    values[2] = bad
    adapter["4"] = SparseDelta(adapter["4"].shape, adapter["4"].flat_indices, values)
    with pytest.raises(ValueError, match="layer '4'.*finite"):
        save_adapter(tmp_path / "out.safetensors", adapter)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 10**400, True, "1.0", None],
                         ids=repr)
@pytest.mark.parametrize("given_as", ["tuple", "mapping", "single"])
def test_save_refuses_a_scale_that_is_not_a_finite_number(tmp_path, scale, given_as):
    # As every scale of the package (_checks.check_scale): TypeError for what is not a real
    # number (a bool, a string, None), ValueError for a number that is not finite.
    delta = _adapter()["0"]
    adapter, scales = {"0": delta}, scale
    if given_as == "tuple":
        adapter, scales = {"0": (delta, scale)}, 1.0
    elif given_as == "mapping":
        scales = {"0": scale}
    if given_as == "tuple" and scale is None:  # (delta, None): no scale of its own, the default
        save_adapter(tmp_path / "a.safetensors", adapter, 3.0)
        assert load_adapter(tmp_path / "a.safetensors")["0"][1] == 3.0
        return
    error = TypeError if scale is True or scale is None or isinstance(scale, str) else ValueError
    where = "scales" if given_as == "single" else "layer '0': scale"
    with pytest.raises(error, match=f"^{where}.* must be"):
        save_adapter(tmp_path / "a.safetensors", adapter, scales)
    assert list(tmp_path.iterdir()) == []


def test_an_update_that_overflows_the_base_dtype_is_refused(tmp_path):
    model = small_model(torch.float16)
    with torch.no_grad():
        model[2].weight.view(-1)[7] = 60000.0  # fp16's largest finite is 65504
    values = torch.tensor([0.5, 3000.0])
    delta = SparseDelta((12, 24), torch.tensor([3, 7], dtype=torch.int32), values)
    path = tmp_path / "a.safetensors"
    save_adapter(path, {"2": delta}, 1.0, base_model=model)  # 63000: fits
    assert load_adapter(path, model)["2"][1] == 1.0

    with pytest.raises(ValueError, match=r"layer '2'.*overflows torch.float16 at flat index 7"):
        save_adapter(tmp_path / "b.safetensors", {"2": delta}, 2.0, base_model=model)
    assert not (tmp_path / "b.safetensors").exists()
    save_adapter(tmp_path / "b.safetensors", {"2": delta}, 2.0)  # no base: nothing to check
    load_adapter(tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match=r"b.safetensors: layer '2'.*overflows.*flat index 7"):
        load_adapter(tmp_path / "b.safetensors", model)
    # the bank's hook sees the same: nothing is added
    bank = AdapterBank(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="layer '2'.*overflows"):
        bank.load("b", tmp_path / "b.safetensors")
    assert bank.names == ()
    assert_bits_equal(model, before)
    # an fp32 base holds the same sum
    load_adapter(tmp_path / "b.safetensors", copy.deepcopy(model).float())


# -- AdapterBank.save / load ------------------------------------------------------------------------
def test_bank_save_uses_the_base_entries_and_load_gives_the_same_adapter(tmp_path):
    model = small_model(torch.bfloat16)
    fresh = copy.deepcopy(model)
    bank = AdapterBank(model)
    bank.add("a", _adapter(seed=3, density=0.5), scale=2.0)
    bank.add("b", _adapter(seed=4, density=0.5))
    bank.activate("a")  # W holds a's values now; the checksum must still be the base's
    bank.save("b", tmp_path / "b.safetensors")
    bank.save("a", tmp_path / "a.safetensors")
    with pytest.raises(KeyError):
        bank.save("nope", tmp_path / "nope.safetensors")

    other = AdapterBank(fresh)
    other.load("b", tmp_path / "b.safetensors")
    other.load("a", tmp_path / "a.safetensors")
    for name in ("a", "b"):
        for layer, (idx, values) in bank.prepared(name).items():
            idx2, values2 = other.prepared(name)[layer]
            assert torch.equal(idx, idx2) and torch.equal(bits(values), bits(values2))
        assert {k: s for k, (_, s) in bank.deltas(name).items()} == \
               {k: s for k, (_, s) in other.deltas(name).items()}
    with pytest.raises(ValueError, match="already"):
        other.load("a", tmp_path / "a.safetensors")
    bank.deactivate()
    assert_bits_equal(model, snapshot(fresh))


def test_bank_load_onto_another_base_is_refused_and_changes_nothing(tmp_path):
    model = small_model(torch.float16)
    bank = AdapterBank(model)
    adapter = _adapter(seed=5)
    bank.add("a", adapter)
    bank.save("a", tmp_path / "a.safetensors")

    other_model = small_model(torch.float16, seed=99)  # another base
    other = AdapterBank(other_model)
    other.add("x", _adapter(seed=6))
    other.activate("x")
    before = snapshot(other_model)
    with pytest.raises(ValueError, match="layer '0'"):
        other.load("a", tmp_path / "a.safetensors")
    assert other.names == ("x",) and other.active == "x"
    assert_bits_equal(other_model, before)


# -- size against PEFT's layout -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_file_is_smaller_than_peft_shira_layout(tmp_path, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 1024), nn.Linear(1024, 512)).to(dtype)
    gen = torch.Generator().manual_seed(0)
    adapter = {}
    for name, module in model.named_children():
        out_f, in_f = module.weight.shape
        nnz = 8 * (out_f + in_f)  # r = 8: 1.2-2.3% of the entries, a usual SHiRA budget
        flat = torch.randperm(out_f * in_f, generator=gen)[:nnz]
        adapter[name] = SparseDelta.from_flat(flat, (out_f, in_f), torch.randn(nnz, generator=gen)
                                              .to(dtype))
    ours = tmp_path / "ours.safetensors"
    save_adapter(ours, adapter, 2.0, base_model=model)  # checksums included

    peft = {}
    for name, delta in adapter.items():
        rows = delta.structure.rows
        cols = delta.structure.cols.to(torch.int32)
        peft[f"base_model.model.{name}.shira_indices"] = torch.stack([rows, cols]).contiguous()
        peft[f"base_model.model.{name}.shira_weight"] = delta.values
    peft_path = tmp_path / "peft.safetensors"
    save_file(peft, peft_path)
    ours_size, peft_size = os.path.getsize(ours), os.path.getsize(peft_path)
    print(f"\n{dtype} values, {sum(d.nnz for d in adapter.values())} entries: ours {ours_size} B, "
          f"PEFT layout {peft_size} B, ratio {ours_size / peft_size:.3f}")
    assert ours_size < peft_size
    assert len(save(peft)) == peft_size  # the figure is the real serialized size
