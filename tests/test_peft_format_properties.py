"""Property-based tests (Hypothesis) of the PEFT SHiRA checkpoint reader
(shira_kernels.io.peft_format) and of AdapterBank.add_peft, which reads through it.

Random checkpoints as PEFT's save_pretrained lays them out (adapter_config.json beside
adapter_model.safetensors or .bin; per layer P ``base_model.model.P.shira_weight`` values and
``base_model.model.P.shira_indices`` COO pairs [2, nnz], nnz = r·(out + in)) for random layer
shapes and r, with COO pairs in any order and of any integer dtype (or whole float32, as PEFT on
Windows writes them), values of any float dtype, and at most one corruption: repeated, out of
range, negative or fractional pairs, values of another length, dtype or shape, non-finite
values, wrong or missing keys, an unknown layer, missing or wrong config fields. Each must give
either exactly what was written (the sorted flat indices and their values, bit for bit; through
the bank, a forward equal to the float64 reference within tests/tolerance.py's bound) or a
ValueError naming the offending key, layer or config field, with the bank and its model bit for
bit unchanged.

Hypothesis runs many examples per test, and pytest's function-scoped fixtures (tmp_path) are not
reset between them, so each example makes its own temporary folder.
"""
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402

from shira_kernels import AdapterBank, SparseDelta  # noqa: E402
from shira_kernels.io.peft_format import (BIN_NAME, CONFIG_NAME, PEFT_PREFIX,  # noqa: E402
                                          SAFETENSORS_NAME, peft_adapter_deltas)

from tolerance import assert_within_error_bound  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Each corruption is a parameter of its own, so that every one is tried whatever Hypothesis
# draws; fewer examples each.
CORRUPT_SETTINGS = settings(SETTINGS, max_examples=6)

LAYERS = ("fc", "blocks.0.q", "blocks.1")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int32, torch.int64, torch.int16, torch.uint8, torch.float32)
VALUE_DTYPES = FLOATS + (torch.float32, torch.float64)
LAYER_CORRUPTIONS = ("repeated pair", "row out of range", "column out of range", "negative",
                     "fractional", "index count", "indices shape", "indices dtype",
                     "values length", "values dtype", "values shape", "non-finite value",
                     "beyond float32", "wrong weight key", "wrong index key", "missing weight",
                     "missing indices", "unknown layer")
CONFIG_CORRUPTIONS = ("no r", "r as a string", "r is 0", "another r", "no peft_type",
                      "another peft_type", "fan_in_fan_out", "no config file", "extra tensor")
CORRUPTIONS = LAYER_CORRUPTIONS + CONFIG_CORRUPTIONS


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.dtype == torch.bool or not t.is_floating_point():
        return t.clone()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()


def snapshot(module: nn.Module) -> dict:
    return {k: bits(v) for k, v in module.state_dict().items()}


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# -- strategies ----------------------------------------------------------------------------------
@st.composite
def checkpoints(draw, corruption="none"):
    """A checkpoint with ``corruption`` ("none": a valid one) as (config or None, {key: tensor},
    file kind, corruption, culprits, layers written {P: (sorted flat indices, values as the
    reader returns them)}, shapes of every layer in LAYERS). ``culprits``: strings of which a
    refusal must name one."""
    shapes = {name: (draw(st.integers(2, 6)), draw(st.integers(2, 6))) for name in LAYERS}
    written = draw(st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3, unique=True))
    r = draw(st.integers(1, min(o * i // (o + i) for o, i in (shapes[p] for p in written))))
    prefix = draw(st.sampled_from([PEFT_PREFIX, PEFT_PREFIX, ""]))  # P alone is read as well
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tensors, expected = {}, {}
    for layer in written:
        out_f, in_f = shapes[layer]
        nnz = r * (out_f + in_f)
        order = draw(st.sampled_from(["shuffled", "sorted"]))
        flat = torch.randperm(out_f * in_f, generator=gen)[:nnz]
        if order == "sorted":
            flat = flat.sort().values
        coo = torch.stack([flat // in_f, flat % in_f]).to(draw(st.sampled_from(INDEX_DTYPES)))
        values = (torch.randn(nnz, generator=gen) * draw(st.sampled_from([0.01, 0.5, 2.0]))).to(
            draw(st.sampled_from(VALUE_DTYPES)))
        tensors[f"{prefix}{layer}.shira_weight"] = values
        tensors[f"{prefix}{layer}.shira_indices"] = coo
        sort = torch.argsort(flat)
        kept = values if values.dtype in FLOATS else values.float()
        expected[layer] = (flat[sort], kept[sort])
    config = {"peft_type": "SHIRA", "r": r, "mask_type": "random", "target_modules": written,
              "fan_in_fan_out": False, "task_type": None, "inference_mode": False}
    for field in draw(st.lists(st.sampled_from(["mask_type", "target_modules", "fan_in_fan_out",
                                                "task_type", "inference_mode"]), unique=True)):
        del config[field]  # fields the reader does not need
    layer = draw(st.sampled_from(written))
    weight_key, index_key = f"{prefix}{layer}.shira_weight", f"{prefix}{layer}.shira_indices"
    culprits = [repr(layer)]
    coo, values = tensors[index_key], tensors[weight_key]
    nnz = values.numel()
    j = draw(st.integers(1, nnz - 1))  # nnz ≥ 4: r ≥ 1, out and in ≥ 2
    wide = coo.to(torch.int64)
    if corruption == "repeated pair":
        wide[:, j] = wide[:, 0]
    elif corruption == "row out of range":
        wide[0, j] = shapes[layer][0] + draw(st.integers(0, 3))
    elif corruption == "column out of range":
        wide[1, j] = shapes[layer][1] + draw(st.integers(0, 3))
    if corruption in ("repeated pair", "row out of range", "column out of range"):
        tensors[index_key] = wide.to(coo.dtype)
    elif corruption == "negative":  # signed dtypes only: uint8 would wrap to an in-range value
        wide[draw(st.integers(0, 1)), j] = -1 - draw(st.integers(0, 3))
        tensors[index_key] = wide.to(draw(st.sampled_from([torch.int16, torch.int32,
                                                           torch.int64, torch.float32])))
    elif corruption == "fractional":
        bent = coo.to(torch.float32)
        bent[draw(st.integers(0, 1)), j] += draw(st.sampled_from([0.5, float("nan"),
                                                                  float("inf")]))
        tensors[index_key] = bent
    elif corruption == "index count":
        tensors[index_key] = coo[:, :-1].clone()
    elif corruption == "indices shape":
        tensors[index_key] = coo.reshape(-1).clone() if draw(st.booleans()) \
            else torch.cat([coo, coo[:1]])
    elif corruption == "indices dtype":
        tensors[index_key] = coo.to(torch.bool)
    elif corruption == "values length":
        extra = draw(st.sampled_from([-1, 1, 2]))
        tensors[weight_key] = values[:extra].clone() if extra < 0 else \
            torch.cat([values, values[:extra]])
        culprits.append(repr(weight_key))
    elif corruption == "values dtype":
        tensors[weight_key] = values.to(draw(st.sampled_from([torch.int32, torch.int64,
                                                              torch.bool])))
        culprits.append(repr(weight_key))
    elif corruption == "values shape":
        tensors[weight_key] = values.reshape(1, -1) if draw(st.booleans()) else values[0].clone()
        culprits.append(repr(weight_key))
    elif corruption == "non-finite value":
        bad = values.clone()
        bad[j] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        tensors[weight_key] = bad
        culprits.append(repr(weight_key))
    elif corruption == "beyond float32":
        bad = values.double()
        bad[j] = draw(st.sampled_from([1e39, -1e300]))
        tensors[weight_key] = bad
        culprits.append(repr(weight_key))
    elif corruption in ("wrong weight key", "wrong index key"):
        old = weight_key if corruption == "wrong weight key" else index_key
        new = old.replace(".shira_", draw(st.sampled_from([".shira_values.", ".lora_A.",
                                                           ".Shira_"])))
        tensors[new] = tensors.pop(old)
        culprits = [repr(new)]
    elif corruption == "missing weight":
        del tensors[weight_key]
        culprits.append(repr(PEFT_PREFIX + layer + ".shira_weight"))
    elif corruption == "missing indices":
        del tensors[index_key]
        culprits.append(repr(PEFT_PREFIX + layer + ".shira_indices"))
    elif corruption == "unknown layer":
        for key in (weight_key, index_key):
            tensors[key.replace(layer, "head.proj")] = tensors.pop(key)
        culprits = ["'head.proj'"]
    elif corruption == "extra tensor":
        key = f"{prefix}{draw(st.sampled_from(['head', layer]))}.weight"
        tensors[key] = torch.zeros(3)
        culprits = [repr(key)]
    elif corruption in ("no r", "r as a string", "r is 0"):
        if corruption == "no r":
            del config["r"]
        else:
            config["r"] = str(r) if corruption == "r as a string" else 0
        culprits = ["r must be a positive integer"]
    elif corruption == "another r":
        config["r"] = r + 1
        culprits = [f"{name!r}: shape mismatch" for name in written]
    elif corruption == "no peft_type":
        del config["peft_type"]
        culprits = ["peft_type"]
    elif corruption == "another peft_type":
        config["peft_type"] = draw(st.sampled_from(["LORA", "SHIRA2", None, 3]))
        culprits = ["peft_type"]
    elif corruption == "fan_in_fan_out":
        config["fan_in_fan_out"] = True
        culprits = ["fan_in_fan_out"]
    elif corruption == "no config file":
        config = None
        culprits = [CONFIG_NAME]
    kind = draw(st.sampled_from(["safetensors", "safetensors", "bin"]))
    return config, tensors, kind, corruption, culprits, expected, shapes


def write(folder: Path, config, tensors: dict, kind: str) -> None:
    if config is not None:
        (folder / CONFIG_NAME).write_text(json.dumps(config))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if kind == "safetensors":
        save_file(tensors, folder / SAFETENSORS_NAME)
    else:
        torch.save(tensors, folder / BIN_NAME)


def refused_naming(error: Exception, culprits) -> bool:
    return any(culprit in str(error) for culprit in culprits)


# -- the reader alone: shapes in, {layer: (SparseDelta, scale)} out -------------------------------
SCALES = st.one_of(st.floats(-4, 4, allow_nan=False), st.integers(-3, 3))


def check_reader(drawn, scale) -> None:
    """Read the checkpoint with peft_adapter_deltas: exactly what was written, or a ValueError
    naming the file and one of the culprits."""
    config, tensors, kind, corruption, culprits, expected, shapes = drawn
    with tempfile.TemporaryDirectory() as folder:
        write(Path(folder), config, tensors, kind)
        try:
            deltas = peft_adapter_deltas(folder, shapes, scale=scale)
        except ValueError as e:
            event(f"refused: {corruption}")
            assert corruption != "none", f"a valid checkpoint was refused: {e}"
            assert refused_naming(e, culprits), f"{corruption}: {e} names none of {culprits}"
            assert folder in str(e), str(e)  # and the file or directory
            return
    event("read")
    assert corruption == "none", f"a checkpoint with {corruption!r} was read"
    assert set(deltas) == set(expected)
    for layer, (delta, got_scale) in deltas.items():
        flat, values = expected[layer]
        assert isinstance(delta, SparseDelta) and delta.shape == shapes[layer]
        assert type(got_scale) is float and got_scale == scale
        assert delta.flat_indices.dtype == torch.int32
        assert torch.equal(delta.flat_indices.long(), flat)
        assert delta.values.dtype == values.dtype and torch.equal(bits(delta.values), bits(values))


@SETTINGS
@given(checkpoints(), SCALES)
def test_reader_gives_exactly_what_a_valid_checkpoint_holds(drawn, scale):
    check_reader(drawn, scale)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@CORRUPT_SETTINGS
@given(data=st.data())
def test_reader_refuses_a_bad_checkpoint_naming_the_key(corruption, data):
    check_reader(data.draw(checkpoints(corruption)), data.draw(SCALES))


# -- through an AdapterBank: the model gets the adapter, or nothing at all ------------------------
def model_of(shapes: dict, dtype: torch.dtype, seed: int) -> nn.Module:
    """A model with an nn.Linear of each shape under each (dotted) name."""
    torch.manual_seed(seed)
    root = nn.Module()
    for name, (out_f, in_f) in shapes.items():
        parent, *path = root, *name.split(".")
        for part in path[:-1]:
            children = dict(parent.named_children())
            if part not in children:
                parent.add_module(part, nn.Module())
            parent = parent.get_submodule(part)
        parent.add_module(path[-1], nn.Linear(in_f, out_f).to(dtype))
    return root


def assert_forward_is_base_plus_delta(model, base_state, deltas, dtype, scale) -> None:
    """Each adapted layer's output against x·(W + scale·S)ᵀ + b in float64 on the same
    (rounded) inputs. Bound: in + 3 fp32 steps (the products and sum, scale·S and its add to W,
    the bias) and two intermediates rounded to the dtype (the stored W + scale·S, torch's
    product before its bias)."""
    gen = torch.Generator().manual_seed(1)
    for layer, (flat, values) in deltas.items():
        module = model.get_submodule(layer)
        out_f, in_f = module.weight.shape
        x = torch.randn(3, in_f, generator=gen).to(dtype)
        dense = torch.zeros(out_f * in_f, dtype=torch.float64)
        dense[flat] = values.double()
        dense = dense.view(out_f, in_f)
        w = base_state[f"{layer}.weight"].double()
        b = base_state[f"{layer}.bias"].double()
        exact = x.double() @ (w + scale * dense).T + b
        magnitude = x.double().abs() @ (w.abs() + abs(scale) * dense.abs()).T + b.abs()
        with torch.no_grad():
            ours = module(x)
        assert_within_error_bound(ours, exact, magnitude, in_f + 3, f"layer {layer!r}",
                                  roundings=2)


def check_bank(drawn, dtype, other_active, scale) -> None:
    """AdapterBank.add_peft: the adapter exactly as written (and a forward within the bound of
    the float64 reference), or a ValueError naming a culprit with the bank and its model bit for
    bit unchanged (with or without another adapter active)."""
    config, tensors, kind, corruption, culprits, expected, shapes = drawn
    model = model_of(shapes, dtype, seed=len(tensors))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    bank = AdapterBank(model)
    if other_active:
        layer = LAYERS[0]
        numel = shapes[layer][0] * shapes[layer][1]
        bank.add("x", {layer: SparseDelta.from_flat(torch.arange(0, numel, 2), shapes[layer],
                                                    torch.full(((numel + 1) // 2,), 0.25))})
        bank.activate("x")
    before, names, active = snapshot(model), bank.names, bank.active
    with tempfile.TemporaryDirectory() as folder:
        write(Path(folder), config, tensors, kind)
        try:
            bank.add_peft("p", folder, scale=scale)
        except ValueError as e:
            event(f"refused: {corruption}")
            assert corruption != "none", f"a valid checkpoint was refused: {e}"
            assert refused_naming(e, culprits), f"{corruption}: {e} names none of {culprits}"
            assert bank.names == names and bank.active == active
            assert same_bits(snapshot(model), before), "a refused checkpoint changed the model"
            return
    event("added")
    assert corruption == "none", f"a checkpoint with {corruption!r} was added"
    assert bank.names == names + ("p",) and same_bits(snapshot(model), before)
    added = bank.deltas("p")
    assert set(added) == set(expected)
    for layer, (delta, got_scale) in added.items():
        flat, values = expected[layer]
        assert got_scale == scale and torch.equal(delta.flat_indices.long(), flat)
        assert delta.values.dtype == values.dtype and torch.equal(bits(delta.values), bits(values))
    bank.activate("p")
    assert_forward_is_base_plus_delta(model, base_state, expected, dtype, float(scale))
    bank.deactivate()
    assert same_bits(snapshot(model), {k: bits(v) for k, v in base_state.items()})


@SETTINGS
@given(checkpoints(), st.sampled_from(FLOATS), st.booleans(), SCALES)
def test_bank_add_peft_loads_a_valid_checkpoint_exactly(drawn, dtype, other_active, scale):
    check_bank(drawn, dtype, other_active, scale)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@CORRUPT_SETTINGS
@given(data=st.data())
def test_bank_add_peft_refuses_a_bad_checkpoint_and_changes_nothing(corruption, data):
    check_bank(data.draw(checkpoints(corruption)), data.draw(st.sampled_from(FLOATS)),
               data.draw(st.booleans()), data.draw(SCALES))
