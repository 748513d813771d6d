"""Adversarial cases for methods/composed.py, methods/ranking_clip.py and the module helpers of
nn/shira_linear.py (replace_linear, mark_only_adapters_trainable, ShiraLinear.from_linear's
checks): a refused call names the argument and leaves the caller's model exactly as it was."""
import copy

import pytest
import torch
from torch import nn

from shira_kernels.methods.composed import change_masks, sparsify
from shira_kernels.nn.shira_linear import (ShiraLinear, mark_only_adapters_trainable,
                                           replace_linear)

from unchanged import state_bits


def three_layers(last_out=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, last_out))


def snapshot(model):
    """Everything a refused call must leave alone: module types, parameters' requires_grad and
    the state_dict's bits."""
    return ([(name, type(m)) for name, m in model.named_modules()],
            {name: p.requires_grad for name, p in model.named_parameters()},
            state_bits(model))


def assert_unchanged(model, before):
    types, flags, state = snapshot(model)
    assert types == before[0]
    assert flags == before[1]
    assert state.keys() == before[2].keys()
    assert all(torch.equal(state[k], before[2][k]) for k in state)


def _third_raises():
    calls = []

    def factory(linear):
        calls.append(linear)
        if len(calls) == 3:
            raise ValueError("refused by the factory")
        return ShiraLinear.from_linear(linear, r=1)
    return factory


# ---------------------------------------------------------------------------------------------
# replace_linear
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("last_out, kwargs, error, match", [
    (8, dict(factory=_third_raises), ValueError, "refused by the factory"),
    (2, dict(r=3), ValueError, "budget"),  # the third layer (2x8) is too small for r=3
    (8, dict(factory=lambda: (lambda linear: 5)), TypeError, "factory"),
])
def test_replace_linear_refusing_a_later_layer_replaces_none(last_out, kwargs, error, match):
    model = three_layers(last_out)
    before = snapshot(model)
    if "factory" in kwargs:
        kwargs = dict(kwargs, factory=kwargs["factory"]())
    with pytest.raises(error, match=match):
        replace_linear(model, filter=lambda name, m: True, **kwargs)
    assert_unchanged(model, before)


def test_replace_linear_refuses_the_model_itself():
    model = nn.Linear(4, 4)
    before = snapshot(model)
    with pytest.raises(ValueError, match="model itself"):
        replace_linear(model, filter=lambda name, m: True, r=1)
    assert dict(model.named_children()) == {}
    assert_unchanged(model, before)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(target_modules=3), TypeError, "target_modules"),
    (dict(target_modules=["0", 3]), TypeError, "target_modules"),
    (dict(filter=3), TypeError, "filter"),
    (dict(target_modules=["0"], factory="ShiraLinear"), TypeError, "factory"),
    (dict(target_modules=["0"], factory=lambda linear: ShiraLinear.from_linear(linear, r=1),
          r=5), TypeError, "factory"),  # r would be ignored silently
])
def test_replace_linear_refuses_bad_argument_types_naming_them(kwargs, error, match):
    model = three_layers()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        replace_linear(model, **kwargs)
    assert_unchanged(model, before)


def test_replace_linear_refuses_multihead_attentions_out_proj():
    # nn.MultiheadAttention reads out_proj.weight itself: an adapter there would never run.
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, 16)
    before = snapshot(model)
    with pytest.raises(ValueError, match="self_attn.out_proj.*MultiheadAttention"):
        replace_linear(model, filter=lambda name, m: True, density=0.5)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        replace_linear(model, ["out_proj"], density=0.5)
    assert_unchanged(model, before)


def test_seeds_beyond_torchs_range_are_refused_naming_seed():
    linear = nn.Linear(8, 6)
    with pytest.raises(ValueError, match="seed"):
        ShiraLinear.from_linear(linear, density=0.5, seed=2 ** 70)
    assert linear.weight.requires_grad
    # replace_linear gives layer i the seed seed + i: the second layer's would overflow.
    model = three_layers()
    before = snapshot(model)
    with pytest.raises(ValueError, match="seed"):
        replace_linear(model, filter=lambda name, m: True, density=0.5, seed=2 ** 64 - 2)
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------
# mark_only_adapters_trainable
# ---------------------------------------------------------------------------------------------
def test_mark_only_adapters_trainable_refuses_a_model_without_adapters():
    model = three_layers()
    before = snapshot(model)
    with pytest.raises(ValueError, match="no adapter"):
        mark_only_adapters_trainable(model)
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match="model"):
        mark_only_adapters_trainable([model])


# ---------------------------------------------------------------------------------------------
# change_masks and sparsify
# ---------------------------------------------------------------------------------------------
def test_change_masks_refusals_name_layers_and_the_layer():
    base = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    other = nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"layer '0'.*\(5, 8\) in tuned.*\(6, 8\) in base"):
        change_masks(base, other, density=0.5, layers=["0"])
    with pytest.raises(TypeError, match="layers"):
        change_masks(base, base, density=0.5, layers=3)


def test_sparsify_refuses_the_model_itself():
    model = nn.Linear(8, 6)
    before = snapshot(model)
    with pytest.raises(ValueError, match="model itself"):
        sparsify(model, {"": torch.ones(6, 8, dtype=torch.bool)})
    assert dict(model.named_children()) == {}
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------
# RankingCLIPAdapter
# ---------------------------------------------------------------------------------------------
def tiny_clip():
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=40, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=12,
                         bos_token_id=38, eos_token_id=39, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=16, patch_size=8),
        projection_dim=24)
    torch.manual_seed(0)
    return transformers.CLIPModel(config).eval()


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=20), "r"),                          # 20·(32+32) entries > a 32x32 weight's 1024
    (dict(seed=2 ** 70), "seed"),
    (dict(adapter="binary", seed=2 ** 70), "seed"),
])
def test_ranking_clip_refusal_late_in_the_constructor_leaves_clip_untouched(kwargs, match):
    from shira_kernels.methods.ranking_clip import RankingCLIPAdapter
    clip = tiny_clip()
    before = snapshot(clip)
    with pytest.raises(ValueError, match=match):
        RankingCLIPAdapter(clip, **kwargs)
    assert_unchanged(clip, before)


def test_ranking_clip_refuses_an_empty_batch_of_lists_naming_images():
    from shira_kernels.methods.ranking_clip import HashTokenizer, RankingCLIPAdapter
    model = RankingCLIPAdapter(tiny_clip(), tokenizer=HashTokenizer(40))
    with pytest.raises(ValueError, match="images"):
        model.score(torch.zeros(0, 3, 3, 16, 16), "how many dots")
