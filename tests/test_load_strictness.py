"""load_state_dict's ``strict`` on every adapter layer, inside a model.

torch passes strict=True to each module's _load_from_state_dict whatever the caller said and
applies the caller's choice only after every module was loaded. So a strict load that misses
one of a layer's keys, or carries an unexpected one, must be refused before the layer copies
anything; a lenient load (strict=False) of part of the keys must load that part and report
the rest, as torch does for nn.Linear. Likewise a tensor torch's copy_ fails on (without data),
which torch reports only after copying the layer's other tensors.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from shira_kernels.methods.mosa import MoSABottleneck, MoSAShiraLinear
from shira_kernels.nn import BinaryLoRALinear, DyLoRALinear, ShiraLinear
from unchanged import assert_same_bits, state_bits

from test_quantized import kind_params, make_base


def _randomized(layer: nn.Module, seed: int) -> nn.Module:
    """Every float tensor of ``layer``'s state set to seeded random values (so that two layers
    built alike differ everywhere a load could copy)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in layer.state_dict(keep_vars=True).values():
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.bfloat16):
                t.copy_(torch.randn(t.shape, generator=g))
    return layer


def _shira(seed):
    torch.manual_seed(seed)
    return _randomized(ShiraLinear.from_linear(nn.Linear(24, 10), r=2, seed=seed), seed)


def _binary_lora(seed):
    torch.manual_seed(seed)
    return _randomized(BinaryLoRALinear.from_linear(nn.Linear(24, 10), r=3), seed).pack()


def _binary_lora_float(seed):
    torch.manual_seed(seed)
    return _randomized(BinaryLoRALinear.from_linear(nn.Linear(24, 10), r=3), seed)


def _dylora(seed):
    torch.manual_seed(seed)
    return _randomized(DyLoRALinear.from_linear(nn.Linear(24, 10), 4, seed=seed), seed)


def _mosa_shira(seed):
    torch.manual_seed(seed)
    return _randomized(MoSAShiraLinear.from_linear(nn.Linear(24, 10), k=2, active=1, r=2,
                                                   seed=seed), seed)


def _mosa_bottleneck(seed):
    torch.manual_seed(seed)
    return _randomized(MoSABottleneck(24, 2, k=4, active=2, seed=seed), seed)


LAYERS = {"shira": _shira, "binary_lora_packed": _binary_lora,
          "binary_lora_float": _binary_lora_float, "dylora": _dylora,
          "mosa_shira": _mosa_shira, "mosa_bottleneck": _mosa_bottleneck}


def _model(make, seed):
    """The layer between two plain linears, as in a network (prefix "1.")."""
    torch.manual_seed(seed + 100)
    return nn.Sequential(nn.Linear(24, 24), make(seed), nn.Linear(10, 5))


def _layer_keys(state):
    return [key for key in state if key.startswith("1.")]


@pytest.mark.parametrize("name", LAYERS)
def test_strict_load_of_the_models_own_state_round_trips(name):
    model, source = _model(LAYERS[name], 0), _model(LAYERS[name], 1)
    model.load_state_dict(source.state_dict(), strict=True)
    assert_same_bits(state_bits(model), state_bits(source))


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("fault", ["missing", "unexpected"])
def test_strict_load_that_torch_would_refuse_leaves_the_layer_as_it_was(name, fault):
    model = _model(LAYERS[name], 0)
    state = _model(LAYERS[name], 1).state_dict()
    if fault == "missing":
        key = _layer_keys(state)[-1]  # the layer's other tensors would be copied before it
        del state[key]
    else:
        key = "1.lora_A_extra"
        state[key] = torch.zeros(3)
    before = state_bits(model[1], derived=True)
    with pytest.raises((ValueError, RuntimeError)) as info:
        model.load_state_dict(state, strict=True)
    assert key in str(info.value)
    assert_same_bits(state_bits(model[1], derived=True), before)


@pytest.mark.parametrize("name", LAYERS)
def test_lenient_load_of_part_of_a_layer_loads_that_part_and_reports_the_rest(name):
    model, source = _model(LAYERS[name], 0), _model(LAYERS[name], 1)
    state = source.state_dict()
    keys = _layer_keys(state)
    kept, dropped = keys[1:], keys[:1]
    partial = {key: state[key] for key in kept}
    partial["1.not_a_tensor_of_this_layer"] = torch.zeros(2)
    before = state_bits(model)
    result = model.load_state_dict(partial, strict=False)
    assert set(result.missing_keys) == {k for k in state if k not in kept}
    assert result.unexpected_keys == ["1.not_a_tensor_of_this_layer"]
    after = state_bits(model)
    for key in kept:
        assert torch.equal(after[key], state_bits(source)[key]), f"{key} was not loaded"
    for key in dropped:
        assert torch.equal(after[key], before[key]), f"{key} changed though not in the load"


# bnb-int8 is left out: bitsandbytes refuses its scales (SCB) once the layer has run, which
# test_quantized covers.
@pytest.mark.parametrize("kind", kind_params("torchao-int8", "bnb-nf4"))
@pytest.mark.parametrize("fault", [None, "missing_base_bias", "missing_values", "unexpected"])
def test_quantized_layer_strict_load(kind, fault):
    def layer(seed):
        made = ShiraLinear.from_linear(make_base(kind, seed=seed, out_f=16, in_f=64), r=2,
                                       seed=seed)
        with torch.no_grad():
            made.shira_values.normal_(generator=torch.Generator().manual_seed(seed))
        return made
    model, state = layer(0), layer(1).state_dict()
    skip = ("base_layer.weight",)  # quantized: compared through the output instead
    before = state_bits(model, derived=True, skip=skip)
    x = torch.randn(3, 64)
    with torch.no_grad():
        y_before = model(x)
    if fault is None and kind == "torchao-int8":
        model.load_state_dict(state, strict=True)
        assert torch.equal(model.shira_values, state["shira_values"])
        return
    # A bnb 4-bit layer's own state_dict: torch's strict load refuses its quant-state keys as
    # unexpected in a bare Linear4bit too; here that refusal comes before anything is copied.
    key = {None: "base_layer.weight.absmax", "missing_base_bias": "base_layer.bias",
           "missing_values": "shira_values", "unexpected": "base_layer.extra"}[fault]
    if fault == "unexpected":
        state[key] = torch.zeros(1)
    elif fault is not None:
        del state[key]
    if kind == "bnb-nf4" and fault == "missing_values":
        key = "base_layer.weight.absmax"  # the base's keys are checked before the adapter's
    with pytest.raises((ValueError, RuntimeError)) as info:
        model.load_state_dict(state, strict=True)
    assert key in str(info.value)
    assert_same_bits(state_bits(model, derived=True, skip=skip), before)
    with torch.no_grad():
        assert torch.equal(model(x), y_before)


# A tensor without data (meta, sparse, quantized) has the right shape, so torch's own checks let
# it through to copy_, which fails only after the layer's other tensors were copied: each layer
# refuses it first, naming the key.
def _without_data(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "meta":
        return torch.empty_like(t, device="meta")
    if kind == "sparse":
        return t.to_sparse()
    with warnings.catch_warnings():  # torch deprecates quantized tensors; a pickle may hold one
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_tensor(t.float(), 0.1, 0, torch.qint8)


def _data_less_cases():
    cases = []
    for name, make in LAYERS.items():
        for key, t in make(0).state_dict().items():
            kinds = ("meta", "sparse") + (("quantized",) if t.is_floating_point() else ())
            cases += [pytest.param(name, key, kind, id=f"{name}-{key}-{kind}") for kind in kinds]
    return cases


@pytest.mark.parametrize("name, key, kind", _data_less_cases())
def test_load_of_a_tensor_without_data_is_refused_before_anything_is_copied(name, key, kind):
    model = _model(LAYERS[name], 0)
    state = _model(LAYERS[name], 1).state_dict()
    key = "1." + key
    state[key] = _without_data(state[key], kind)
    before = state_bits(model[1], derived=True)
    with pytest.raises((ValueError, TypeError)) as info:
        model.load_state_dict(state)
    assert key in str(info.value)
    assert_same_bits(state_bits(model[1], derived=True), before)


@pytest.mark.parametrize("name", ["binary_lora_packed", "binary_lora_float", "dylora"])
def test_assign_load_of_meta_tensors_puts_them_in_place_as_torch_does(name):
    model = _model(LAYERS[name], 0)
    state = {key: t.to("meta") for key, t in _model(LAYERS[name], 1).state_dict().items()}
    model.load_state_dict(state, assign=True)
    assert all(t.is_meta for t in model[1].state_dict().values())


def test_assign_load_of_a_meta_weight_into_a_shira_layer_puts_it_in_place():
    model, source = _model(_shira, 0), _model(_shira, 1)
    state = dict(source.state_dict(), **{"1.weight": torch.empty(10, 24, device="meta")})
    model.load_state_dict(state, assign=True)
    assert model[1].weight.is_meta
    assert torch.equal(model[1].shira_values, source[1].shira_values)


@pytest.mark.parametrize("key", ["shira_values", "shira_flat_indices"])
def test_assign_load_of_meta_adapter_entries_is_refused(key):
    # The entries are read (checked, and the structure derived from them) even when assigned.
    model = _model(_shira, 0)
    state = _model(_shira, 1).state_dict()
    state["1." + key] = state["1." + key].to("meta")
    before = state_bits(model[1], derived=True)
    with pytest.raises(ValueError, match=f"1.{key} is not a dense tensor with data"):
        model.load_state_dict(state, assign=True)
    assert_same_bits(state_bits(model[1], derived=True), before)


def test_meta_layer_loads_meta_tensors_and_takes_real_ones_by_assign():
    # Built on the meta device (as under accelerate's init_empty_weights): a meta state_dict
    # copies into it (a no-op, as torch allows), and assign=True puts real tensors in place.
    source = _binary_lora(1)
    with torch.device("meta"):
        layer = BinaryLoRALinear.from_linear(nn.Linear(24, 10), r=3).pack()
    layer.load_state_dict({key: t.to("meta") for key, t in source.state_dict().items()})
    layer.load_state_dict(source.state_dict(), assign=True)
    x = torch.randn(4, 24)
    assert torch.equal(layer(x), source(x))
