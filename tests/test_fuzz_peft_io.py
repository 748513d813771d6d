"""Adversarial inputs to the PEFT bridge (integrations/peft.py) and the checkpoint formats
(io/): each case is one that went wrong before its fix. Bad input gets a clear error naming the
bad thing and changes nothing; accelerated layers answer as PEFT's own (or refuse)."""
import copy

import pytest
import torch

pytest.importorskip("peft")
from peft import ShiraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from shira_kernels import AdapterBank, SparseDelta  # noqa: E402
from shira_kernels.integrations import peft as skpeft  # noqa: E402
from shira_kernels.io.peft_format import peft_adapter_deltas, write_peft_adapter  # noqa: E402

from test_peft_integration import (TARGETS, _quiet, bits, randomize, same_bits,  # noqa: E402,F401
                                   shira, snapshot, tiny)

# =============================================================================================
# write_peft_adapter: never a checkpoint that the reader (or PEFT) refuses
# =============================================================================================
@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_peft_adapter_refuses_an_adapter_with_no_entries(tmp_path, shape, dtype):
    # It wrote r = 0, which neither peft_adapter_deltas nor PEFT loads.
    delta = SparseDelta.from_flat(torch.zeros(0, dtype=torch.long), shape,
                                  torch.zeros(0, dtype=dtype))
    with pytest.raises(ValueError, match="layer 'fc': no entries"):
        write_peft_adapter(tmp_path / "out", {"fc": delta})
    assert not (tmp_path / "out").exists()


def test_write_peft_adapter_writes_one_delta_for_two_layers(tmp_path):
    # The layers' values shared memory, which safetensors refused to write.
    delta = SparseDelta.from_flat(torch.tensor([0, 1, 3, 4, 6, 8, 11]), (3, 4),
                                  torch.randn(7))
    write_peft_adapter(tmp_path / "out", {"a": delta, "b": delta})
    loaded = peft_adapter_deltas(tmp_path / "out", {"a": (3, 4), "b": (3, 4)})
    for layer in ("a", "b"):
        assert torch.equal(loaded[layer][0].flat_indices, delta.flat_indices.to(torch.int64))
        assert torch.equal(bits(loaded[layer][0].values), bits(delta.values))


@pytest.mark.parametrize("edit, message", [(lambda f: f.__setitem__(1, 0), "repeated"),
                                           (lambda f: f.__setitem__(4, 99), "out of range")],
                         ids=["repeated", "out of range"])
def test_write_peft_adapter_refuses_indices_edited_into_a_bad_form(tmp_path, edit, message):
    # The delta's indices edited in place after it was built: written as they were, the
    # checkpoint was then refused by the reader (and would break PEFT's forward).
    delta = SparseDelta.from_flat(torch.arange(5), (2, 3), torch.randn(5))
    edit(delta.flat_indices)
    with pytest.raises(ValueError, match=f"layer 'l': flat_indices .*{message}"):
        write_peft_adapter(tmp_path / "out", {"l": delta})
    assert not (tmp_path / "out").exists()


# =============================================================================================
# Reading PEFT's torch-pickle checkpoints (adapter_model.bin)
# =============================================================================================
@pytest.mark.parametrize("kind", ["sparse values", "sparse indices", "meta values"])
def test_a_bin_checkpoint_with_tensors_without_dense_data_is_a_value_error(tmp_path, kind):
    # A pickle may hold sparse or meta tensors (a model saved under init_empty_weights): the
    # reader crashed with NotImplementedError / RuntimeError instead of naming the tensor.
    base = tiny()
    shira(base).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.fc2." + ("shira_indices" if "indices" in kind else "shira_weight")
    tensors[key] = tensors[key].to("meta") if "meta" in kind else tensors[key].to_sparse()
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=f"adapter_model.bin: tensor '{key}' is not a dense"):
        peft_adapter_deltas(tmp_path, {"fc1": (24, 16), "fc2": (12, 24), "blocks.0.0": (8, 12)})
    bank = AdapterBank(copy.deepcopy(base))
    before = snapshot(bank.model)
    with pytest.raises(ValueError, match=key):
        bank.add_peft("a", tmp_path)
    assert bank.names == () and same_bits(snapshot(bank.model), before)


# =============================================================================================
# adapter_names=
# =============================================================================================
def test_adapter_names_refused_while_a_shira_layer_is_not_accelerated():
    # An adapter added after accelerate() on a new target: its plain PEFT layer ignored the
    # names and ran the active adapter for every row (the "late" row got the base at fc2).
    pa = skpeft.accelerate(shira(tiny(), target_modules=["fc1"])).eval()
    pa.add_adapter("late", ShiraConfig(r=2, target_modules=["fc2"], random_seed=9))
    randomize(pa, seed=7, adapter="late")
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"adapter_names: the SHiRA layers \['model.fc2'\] "
                                             r"are not accelerated"):
            pa(x, adapter_names=["late", "__base__"])
        skpeft.accelerate(pa)
        assert pa(x, adapter_names=["late", "__base__"]).shape == (2, 8)


@pytest.mark.parametrize("names, error, message", [
    ("default", TypeError, "adapter_names must be a list .* got the string 'default'"),
    ([0, "default"], TypeError, r"adapter_names\[0\] must be an adapter name \(str\), got int"),
    (["default", None], TypeError, r"adapter_names\[1\] .* got NoneType"),
], ids=["a string", "an int", "None"])
def test_adapter_names_must_be_a_list_of_names(names, error, message):
    # A string was taken as one name per letter ("non-existing adapter(s): a, d, e, ..."), and
    # a name that is not a string failed inside the message (str.join).
    pa = skpeft.accelerate(shira(tiny())).eval()
    with torch.no_grad(), pytest.raises(error, match=message):
        pa(torch.randn(len(names), 16), adapter_names=names)


def test_adapter_names_with_beam_search_on_an_encoder_decoder():
    # As PEFT LoRA: the encoder sees the batch before beam expansion, the decoder after. The
    # encoder's layers got the expanded names and refused the call.
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=24, num_layers=1,
                                   num_decoder_layers=1, num_heads=2, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    base = transformers.T5ForConditionalGeneration(config).eval()
    pm = get_peft_model(base, ShiraConfig(r=1, target_modules=["q", "v"], random_seed=3))
    randomize(pm, std=0.5)
    pm.add_adapter("other", ShiraConfig(r=1, target_modules=["q", "v"], random_seed=4))
    randomize(pm, seed=9, std=0.5, adapter="other")
    pa = skpeft.accelerate(pm).eval()
    ids = torch.randint(2, 40, (3, 5), generator=torch.Generator().manual_seed(2))
    names = ["default", "other", "__base__"]
    settings = dict(num_beams=2, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        mixed = pa.generate(input_ids=ids, adapter_names=names, **settings)
        for i, name in enumerate(names):
            if name == "__base__":
                with pa.disable_adapter():
                    row = pa.generate(input_ids=ids[i:i + 1], **settings)
            else:
                pa.set_adapter(name)
                row = pa.generate(input_ids=ids[i:i + 1], **settings)
            assert torch.equal(mixed[i, :row.shape[1]], row[0]), name


# =============================================================================================
# merge: several adapters in one call, one of them refused
# =============================================================================================
@pytest.mark.parametrize("safe_merge", [True, False])
def test_merge_of_several_adapters_is_undone_when_one_is_refused(safe_merge):
    # The adapters before the refused one stayed merged (W changed, merged_adapters not empty).
    pm = shira(tiny())
    pm.add_adapter("other", ShiraConfig(r=2, target_modules=["fc1"], random_seed=9))
    randomize(pm, seed=7, adapter="other")
    layer = pm.base_model.model.fc1
    with torch.no_grad():  # NaN: safe_merge's check; the largest float times 4: an overflow
        layer.shira_weight["other"][3] = float("nan") if safe_merge else torch.finfo().max
        layer.set_scale("other", 4.0)
    skpeft.accelerate(pm)
    before = snapshot(pm)
    with pytest.raises(ValueError, match="other"):
        layer.merge(safe_merge=safe_merge, adapter_names=["default", "other"])
    assert layer.merged_adapters == [] and not layer._sk_held
    assert same_bits(snapshot(pm), before)
    layer.merge(adapter_names=["default"])  # and the layer still merges and unmerges exactly
    assert layer.merged_adapters == ["default"]
    layer.unmerge()
    assert same_bits(snapshot(pm), before)


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
@pytest.mark.parametrize("safe_merge", [True, False])
def test_a_model_wide_merge_refused_in_its_last_layer_changes_no_layer(how, safe_merge):
    # PEFT's loop merges layer after layer: fc1 and fc2 stayed merged when blocks.0.0 refused.
    pm = shira(tiny())
    last = pm.base_model.model.blocks[0][0]
    with torch.no_grad():  # NaN: safe_merge's check; the largest float times 4: an overflow
        last.shira_weight["default"][1] = float("nan") if safe_merge else torch.finfo().max
        last.set_scale("default", 4.0)
    skpeft.accelerate(pm)
    before = snapshot(pm)
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = pm(x)
    with pytest.raises(ValueError, match="default"):
        getattr(pm, how)(safe_merge=safe_merge)
    layers = [m for m in pm.modules() if isinstance(m, skpeft.AcceleratedShiraLinear)]
    assert len(layers) == 3  # none unloaded
    assert all(m.merged_adapters == [] and not m._sk_held for m in layers)
    assert same_bits(snapshot(pm), before)
    with torch.no_grad():  # bits: a NaN adapter gives NaN outputs
        assert torch.equal(bits(pm(x)), bits(y))
    with torch.no_grad():  # repaired, the model merges, and unloads the merged weights
        last.shira_weight["default"][1] = 0.5
        pm.merge_adapter()
        y = pm(x)
        pm.unmerge_adapter()
        assert same_bits(snapshot(pm), {**before, **{k: v for k, v in snapshot(pm).items()
                                                     if "shira_weight" in k}})
        merged = pm.merge_and_unload()
        assert not any(isinstance(m, skpeft.AcceleratedShiraLinear) for m in merged.modules())
        assert torch.equal(merged(x), y)


def test_restore_gives_the_model_its_own_merge_methods_back():
    pm = skpeft.accelerate(shira(tiny()))
    tuner = pm.base_model
    assert "merge_adapter" in tuner.__dict__ and "merge_and_unload" in tuner.__dict__
    skpeft.restore(pm)
    assert not {"merge_adapter", "merge_and_unload"} & set(tuner.__dict__)


# =============================================================================================
# accelerate: all layers or none
# =============================================================================================
def test_accelerate_with_a_weight_on_the_meta_device_switches_every_layer():
    # A base weight not loaded yet (meta): deriving its plan raised in the middle of
    # accelerate(), leaving the layers before it switched and the rest not.
    pm = shira(tiny())
    reference = copy.deepcopy(pm.base_model.model.fc2.base_layer.weight)
    layer = pm.base_model.model.fc2
    layer.base_layer.to("meta")
    skpeft.accelerate(pm)
    assert skpeft.accelerated_layers(pm) == [f"base_model.model.{t}" for t in TARGETS]
    layer.base_layer.to_empty(device="cpu")  # loaded later: the plan is made then
    with torch.no_grad():
        layer.base_layer.weight.copy_(reference)
    before = snapshot(pm)
    layer.merge(adapter_names=["default"])
    assert "default" in layer._sk_held  # merged by the kernels' swap, not PEFT's sum
    layer.unmerge()
    assert same_bits(snapshot(pm), before)
