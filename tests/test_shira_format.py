"""The shira_kernels adapter file (shira_kernels.io.shira_format) and AdapterBank.save/load:
round trips, the base checksum, corrupt files that must be refused without changing anything,
and the size against PEFT's SHiRA layout."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save, save_file
from torch import nn

from shira_kernels import AdapterBank, SparseDelta
from shira_kernels.io import load_adapter, save_adapter
from shira_kernels.io.shira_format import FORMAT_NAME, FORMAT_VERSION, base_checksum

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
    assert meta["format_version"] == FORMAT_VERSION == "1"
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


def _write(path, tensors, layer_meta, **metadata):
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "layers": json.dumps(layer_meta)}
    meta.update(metadata)
    save_file(tensors, path, metadata={k: v for k, v in meta.items() if v is not None})


def _corrupt(case, path):
    tensors, layers = _valid_parts()
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
        metadata["format_version"] = "2"
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
    _write(path, tensors, layers, **metadata)


CORRUPT = ["empty file", "truncated in the length", "truncated in the header",
           "truncated in the data", "truncated by one byte", "bad header", "huge header length",
           "trailing garbage", "wrong format", "wrong version", "no metadata", "bad layers json",
           "missing key", "extra key", "index out of range", "negative index", "repeated index",
           "unsorted indices", "length mismatch", "nnz mismatch", "values dtype", "float indices",
           "bad shape", "bad scale", "bad dtype name"]


def test_the_corrupt_file_helper_writes_valid_files_when_unchanged(tmp_path):
    tensors, layers = _valid_parts()
    _write(tmp_path / "ok.safetensors", tensors, layers)
    assert set(load_adapter(tmp_path / "ok.safetensors", small_model())) == {"0", "2", "4"}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_files_raise_value_error_and_leave_the_bank_unchanged(tmp_path, case):
    path = tmp_path / "bad.safetensors"
    _corrupt(case, path)
    with pytest.raises(ValueError, match="bad.safetensors") as info:
        load_adapter(path)
    if case in ("missing key", "index out of range", "repeated index", "length mismatch",
                "values dtype", "bad shape"):
        assert "'2'" in str(info.value)

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
