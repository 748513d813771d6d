"""Numbers that do not fit: scales and sizes of the wrong kind are refused by name (TypeError,
ValueError for a non-finite scale or a size below its minimum) rather than converted or
truncated; adapter values that overflow the weight's dtype are refused before anything is stored
or written; an unknown SHIRA_KERNELS_BACKEND fails at import. Every refused call leaves its
inputs, the model and the bank bit for bit as they were."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import shira_kernels
from shira_kernels import AdapterBank, BinaryWeight, SparseDelta, backends
from shira_kernels.nn import BinaryLoRALinear, DyLoRALinear, ShiraLinear
from shira_kernels.nn.binary import BinaryAdapter
from shira_kernels.ops.sparse_delta import add_delta, sparse_delta_linear, spmm, spmm_t

from conftest import DTYPES

ROOT = Path(__file__).resolve().parents[1]
BAD_SCALES = [pytest.param("2.0", id="str"), pytest.param(True, id="bool"),
              pytest.param(None, id="None"), pytest.param([2.0], id="list"),
              pytest.param(torch.tensor(2.0, requires_grad=True), id="tensor-requires-grad"),
              pytest.param(torch.tensor([1.0, 2.0]), id="tensor-2-elements"),
              pytest.param(torch.tensor(True), id="bool-tensor")]
NON_FINITE = [float("nan"), float("inf"), -float("inf")]
BAD_SIZES = [pytest.param(40.7, id="40.7"), pytest.param(40.0, id="40.0"),
             pytest.param(True, id="bool"), pytest.param("40", id="str"),
             pytest.param(np.float64(40.0), id="np.float64"),
             pytest.param(torch.tensor(40.0), id="float-tensor")]


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if not t.is_floating_point():
        return t.clone()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def snapshot(*tensors):
    return [bits(t) for t in tensors]


def assert_unchanged(tensors, saved):
    for i, (t, s) in enumerate(zip(tensors, saved)):
        assert torch.equal(bits(t), s), f"input {i} changed"


def model_bits(model):
    return {name: bits(p) for name, p in model.named_parameters()}


def assert_model_unchanged(model, saved):
    for name, p in model.named_parameters():
        assert torch.equal(bits(p), saved[name]), f"{name} changed"


# ---------------------------------------------------------------------------------------------
# The checkers themselves.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    (2, 2.0), (-0.5, -0.5), (0, 0.0), (np.float32(0.25), 0.25), (np.int64(3), 3.0),
    (np.float64(1.5), 1.5), (torch.tensor(2.5), 2.5), (torch.tensor(3), 3.0),
    (torch.tensor([4.0]), 4.0), (torch.tensor(0.5, dtype=torch.bfloat16), 0.5)])
def test_check_scale_accepts_real_numbers(value, expected):
    from shira_kernels._checks import check_scale
    got = check_scale(value)
    assert type(got) is float and got == expected


@pytest.mark.parametrize("value", BAD_SCALES + [pytest.param(np.bool_(True), id="np.bool_"),
                                                pytest.param(1 + 2j, id="complex")])
def test_check_scale_rejects_non_numbers_by_name(value):
    from shira_kernels._checks import check_scale
    with pytest.raises(TypeError, match=r"^scale must be"):
        check_scale(value)
    with pytest.raises(TypeError, match=r"^my weight must be"):
        check_scale(value, "my weight")


@pytest.mark.parametrize("value", NON_FINITE + [torch.tensor(float("nan"))])
def test_check_scale_rejects_non_finite_values(value):
    from shira_kernels._checks import check_scale
    with pytest.raises(ValueError, match=r"^scale must be finite"):
        check_scale(value)


@pytest.mark.parametrize("value", [7, np.int32(7), np.int64(7), torch.tensor(7),
                                   torch.tensor(7, dtype=torch.int32)])
def test_check_size_accepts_integers(value):
    from shira_kernels._checks import check_size
    got = check_size(value, "in_features")
    assert type(got) is int and got == 7


@pytest.mark.parametrize("value", BAD_SIZES + [pytest.param(None, id="None"),
                                               pytest.param(torch.tensor([4]), id="1-D tensor")])
def test_check_size_rejects_non_integers_by_name(value):
    from shira_kernels._checks import check_size
    with pytest.raises(TypeError, match=r"^in_features must be an int"):
        check_size(value, "in_features")


def test_check_size_minimum():
    from shira_kernels._checks import check_size
    for value in (0, -3):
        with pytest.raises(ValueError, match=r"^rank must be ≥ 1, got"):
            check_size(value, "rank")
    assert check_size(0, "count", minimum=0) == 0
    with pytest.raises(ValueError, match="count must be ≥ 0"):
        check_size(-1, "count", minimum=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_check_representable_names_place_and_dtype(dtype):
    from shira_kernels._checks import check_representable
    big = torch.finfo(dtype).max
    base = torch.tensor([1.0, 2.0, float("inf"), 3.0], dtype=dtype)
    ok = (base.float() + torch.tensor([1.0, 1.0, 1.0, 1.0])).to(dtype)
    check_representable(ok, "layer 'x'", base=base)  # an Inf already in the base is not new
    bad = (base.float() + torch.tensor([0.0, 2 * big, 0.0, -2 * big])).to(dtype)
    with pytest.raises(ValueError, match=rf"^layer 'x': .*2 of 4 entries.*{dtype}"):
        check_representable(bad, "layer 'x'", base=base)
    with pytest.raises(ValueError, match=rf"{dtype}"):
        check_representable(bad, "layer 'x'")
    # A NaN value is named as such, not as a magnitude the dtype cannot hold.
    nan = (base.float() + torch.tensor([0.0, float("nan"), 0.0, 0.0])).to(dtype)
    with pytest.raises(ValueError, match=r"^layer 'x': 1 of the adapter's values are NaN"):
        check_representable(nan, "layer 'x'", base=base)


# ---------------------------------------------------------------------------------------------
# Sizes: rejected by name, never truncated.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4.5, 4), (4, 4.0), (True, 4), ("4", 4),
                                   (4, torch.tensor(4.0))])
def test_sparse_delta_shapes_must_be_integers(shape):
    idx, values = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([1.0, 2.0])
    saved = snapshot(idx, values)
    with pytest.raises(TypeError, match=r"shape"):
        SparseDelta(shape, idx, values)
    with pytest.raises(TypeError, match=r"shape"):
        SparseDelta.from_flat(idx, shape, values)
    with pytest.raises(TypeError, match=r"shape"):
        SparseDelta.from_coo(torch.tensor([0, 0]), torch.tensor([0, 3]), shape, values)
    assert_unchanged((idx, values), saved)


def test_sparse_delta_accepts_integer_kinds():
    idx = torch.tensor([0, 3], dtype=torch.int32)
    for shape in ((4, 4), (np.int64(4), np.int32(4)), torch.Size([4, 4]),
                  (torch.tensor(4), torch.tensor(4))):
        delta = SparseDelta(shape, idx, torch.ones(2))
        assert delta.shape == (4, 4) and all(type(s) is int for s in delta.shape)


@pytest.mark.parametrize("in_features", BAD_SIZES)
def test_binary_weight_in_features_is_not_truncated(in_features):
    packed = torch.zeros(3, 2, dtype=torch.int32)
    alpha, mu = torch.ones(1), torch.zeros(1)
    with pytest.raises(TypeError, match=r"^in_features must be an int"):
        BinaryWeight(packed, alpha, mu, in_features)
    assert BinaryWeight(packed, alpha, mu, np.int64(40)).shape == (3, 40)


@pytest.mark.parametrize("field", ["in_features", "out_features"])
@pytest.mark.parametrize("value", BAD_SIZES)
def test_layer_constructor_sizes(field, value):
    sizes = {"in_features": 8, "out_features": 6}
    sizes[field] = value
    idx = torch.tensor([0, 5])
    with pytest.raises(TypeError, match=rf"^{field} must be an int"):
        ShiraLinear(sizes["in_features"], sizes["out_features"], indices=idx)
    with pytest.raises(TypeError, match=rf"^{field} must be an int"):
        DyLoRALinear(sizes["in_features"], sizes["out_features"], r=2)
    with pytest.raises(TypeError, match=rf"^{field} must be an int"):
        BinaryAdapter(sizes["in_features"], 2, sizes["out_features"])


@pytest.mark.parametrize("rank", BAD_SIZES)
def test_binary_adapter_rank(rank):
    with pytest.raises(TypeError, match=r"^r must be an int"):
        BinaryAdapter(8, rank)
    with pytest.raises(TypeError, match=r"^r must be an int"):
        BinaryLoRALinear.from_linear(nn.Linear(8, 6), rank)
    with pytest.raises(ValueError, match=r"^r must be ≥ 1"):
        BinaryAdapter(8, 0)


# ---------------------------------------------------------------------------------------------
# Scales: TypeError naming `scale`, not float()'s message, inputs untouched.
# ---------------------------------------------------------------------------------------------
def _delta(dtype, shape=(6, 10), nnz=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randperm(shape[0] * shape[1], generator=gen)[:nnz]
    return SparseDelta.from_flat(flat, shape, torch.randn(nnz, generator=gen).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", BAD_SCALES + [pytest.param(float("nan"), id="nan"),
                                                pytest.param(float("inf"), id="inf")])
def test_ops_reject_bad_scales(dtype, scale):
    error = ValueError if isinstance(scale, float) else TypeError
    delta = _delta(dtype)
    x, y = torch.randn(3, 10).to(dtype), torch.randn(3, 6).to(dtype)
    gx, gy = torch.randn(3, 10).to(dtype), torch.randn(3, 6).to(dtype)
    weight, out = torch.randn(6, 10).to(dtype), torch.zeros(6, 10, dtype=dtype)
    inputs = (delta.values, delta.flat_indices, x, y, gx, gy, weight, out)
    saved = snapshot(*inputs)
    calls = {"spmm": lambda: spmm(y, x, delta, scale),
             "spmm_t": lambda: spmm_t(gx, gy, delta, scale),
             "add_delta": lambda: add_delta(weight, delta, scale, out=out),
             "sparse_delta_linear": lambda: sparse_delta_linear(x, weight, None, delta, scale),
             "fold": lambda: sparse_delta_linear(x, weight, None, delta, scale, "fold"),
             "swap": lambda: sparse_delta_linear(x, weight, None, delta, scale, "swap")}
    for what, call in calls.items():
        with pytest.raises(error, match=r"^scale must be") as info:
            call()
        assert "scale" in str(info.value), what
        assert_unchanged(inputs, saved)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", BAD_SCALES)
def test_binary_lora_and_modules_reject_bad_scales(dtype, scale):
    gen = torch.Generator().manual_seed(1)
    down = BinaryWeight.from_float(torch.randn(4, 40, generator=gen))
    up = BinaryWeight.from_float(torch.randn(6, 4, generator=gen))
    x = torch.randn(3, 40, generator=gen).to(dtype)
    saved = snapshot(x, down.packed, down.alpha, up.packed, up.alpha)
    with pytest.raises(TypeError, match=r"^scale must be"):
        shira_kernels.binary_lora(x, down, up, scale)
    assert_unchanged((x, down.packed, down.alpha, up.packed, up.alpha), saved)
    with pytest.raises(TypeError, match=r"^scale must be"):
        BinaryAdapter(40, 4, scale=scale)
    lin = nn.Linear(40, 6).to(dtype)
    before = model_bits(lin)
    with pytest.raises(TypeError, match=r"^scale must be"):
        BinaryLoRALinear.from_linear(lin, 4, scale=scale)
    assert_model_unchanged(lin, before)
    assert lin.weight.requires_grad and lin.bias.requires_grad  # not frozen by the failed call
    with pytest.raises(TypeError, match=r"^scale must be"):
        ShiraLinear(10, 6, indices=torch.tensor([1, 2]), scale=scale)
    lin = nn.Linear(10, 6).to(dtype)
    before = model_bits(lin)
    with pytest.raises(TypeError, match=r"^scale must be"):
        ShiraLinear.from_linear(lin, r=1, scale=scale)
    assert_model_unchanged(lin, before)
    assert type(lin) is nn.Linear
    assert lin.weight.requires_grad and lin.bias.requires_grad  # not frozen by the failed call


def test_good_scales_of_other_kinds_still_work():
    layer = ShiraLinear(10, 6, indices=torch.tensor([1, 2]), scale=np.float32(0.5))
    assert type(layer.scale) is float and layer.scale == 0.5
    delta = _delta(torch.float32)
    x, y = torch.randn(3, 10), torch.randn(3, 6)
    assert torch.allclose(spmm(y, x, delta, torch.tensor(2.0)), spmm(y, x, delta, 2.0))


# ---------------------------------------------------------------------------------------------
# AdapterBank: scales, overflow at add / load / fusion; nothing stored or written on failure.
# ---------------------------------------------------------------------------------------------
def small_model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12)).to(dtype)


def _bank_delta(shape, magnitude, seed, nnz=10, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randperm(shape[0] * shape[1], generator=gen)[:nnz]
    values = torch.full((nnz,), float(magnitude)) * torch.sign(torch.randn(nnz, generator=gen))
    return SparseDelta.from_flat(flat, shape, values.to(dtype))


def _overflowing(dtype):
    """(magnitude, scale): finite fp32 delta values whose scale·value added to a small weight
    entry the weight's dtype cannot hold."""
    return {torch.float16: (1e5, 1.0), torch.bfloat16: (3.4e38, 1.0),
            torch.float32: (3.4e38, 1.01)}[dtype]


def _big(dtype):
    """A value the weight's dtype holds, but not twice it."""
    return 4e4 if dtype == torch.float16 else 2e38


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).split(".")[-1])
def bank_setup(request):
    dtype = request.param
    model = small_model(dtype)
    bank = AdapterBank(model)
    bank.add("good", {"0": _bank_delta((24, 16), 0.5, 1)})
    bank.activate("good")
    return dtype, model, bank


def _assert_bank_unchanged(bank, model, saved_model, saved_prepared, names=("good",),
                           active="good"):
    assert bank.names == names and bank.active == active
    assert_model_unchanged(model, saved_model)
    for layer, (idx, values) in bank.prepared("good").items():
        assert torch.equal(bits(values), saved_prepared[layer])


@pytest.mark.parametrize("where", ["default", "layer", "values"])
def test_bank_add_rejects_overflow(bank_setup, where):
    dtype, model, bank = bank_setup
    saved_model = model_bits(model)
    saved_prepared = {k: bits(v) for k, (_, v) in bank.prepared("good").items()}
    fine = _bank_delta((12, 24), 0.25, 2)
    magnitude, factor = _overflowing(dtype)
    if where == "values":
        over, scale, layer_scale = _bank_delta((24, 16), magnitude, 3), factor, None
    else:
        over, scale, layer_scale = _bank_delta((24, 16), magnitude / 4, 3), 4 * factor, None
        if where == "layer":
            scale, layer_scale = 1.0, 4 * factor
    entry = over if layer_scale is None else (over, layer_scale)
    saved_inputs = snapshot(over.values, over.flat_indices, fine.values, fine.flat_indices)
    with pytest.raises(ValueError) as info:
        bank.add("over", {"2": fine, "0": entry}, scale=scale)
    message = str(info.value)
    assert "'over'" in message and "'0'" in message and str(dtype) in message
    assert_unchanged((over.values, over.flat_indices, fine.values, fine.flat_indices), saved_inputs)
    _assert_bank_unchanged(bank, model, saved_model, saved_prepared)
    bank.add("later", {"0": _bank_delta((24, 16), 0.5, 4)})  # the bank still works
    bank.activate("later")
    bank.deactivate()


def test_bank_fp16_example_from_the_issue():
    model = small_model(torch.float16)
    bank = AdapterBank(model)
    saved = model_bits(model)
    with pytest.raises(ValueError, match=r"adapter 'a', layer '0'.*float16"):
        bank.add("a", {"0": _bank_delta((24, 16), 1e5, 5, nnz=1)})
    assert bank.names == ()
    assert_model_unchanged(model, saved)


def test_bank_load_rejects_overflow(bank_setup, tmp_path, monkeypatch):
    from shira_kernels.io import shira_format
    dtype, model, bank = bank_setup
    path = tmp_path / "over.safetensors"
    # A file as another tool could write it, against this very base, so only the values are
    # wrong: save_adapter's own overflow check is switched off while it is written.
    magnitude, factor = _overflowing(dtype)
    with monkeypatch.context() as patch:
        patch.setattr(shira_format, "_check_fits", lambda *args, **kwargs: None, raising=False)
        shira_format.save_adapter(path, {"0": (_bank_delta((24, 16), magnitude, 6), factor)},
                                  base_entries=bank._file_base)
    saved_model = model_bits(model)
    saved_prepared = {k: bits(v) for k, (_, v) in bank.prepared("good").items()}
    with pytest.raises(ValueError, match=rf"layer '0'.*{dtype}"):  # names the file or adapter
        bank.load("over", path)
    _assert_bank_unchanged(bank, model, saved_model, saved_prepared)


def test_bank_fusion_rejects_overflow(bank_setup):
    dtype, model, bank = bank_setup
    bank.add("a", {"0": _bank_delta((24, 16), _big(dtype), 7)})
    bank.add("b", {"0": _bank_delta((24, 16), _big(dtype), 7)})  # same signs: sums overflow
    saved_model = model_bits(model)
    saved_prepared = {k: bits(v) for k, (_, v) in bank.prepared("good").items()}
    with pytest.raises(ValueError, match=rf"fusion.*'a'.*'b'.*layer '0'.*{dtype}"):
        bank.activate(["a", "b"])
    _assert_bank_unchanged(bank, model, saved_model, saved_prepared, names=("good", "a", "b"))
    assert not bank._fusions
    bank.activate(["a", "b"], weights=[1.0, -1.0])  # cancels: fine
    bank.deactivate()


def test_bank_cache_sizes_are_integers():
    model = small_model(torch.float32)
    for field in ("max_fusions", "max_pairs"):
        with pytest.raises(TypeError, match=rf"^{field} must be an int"):
            AdapterBank(model, **{field: 2.5})
        with pytest.raises(ValueError, match=rf"^{field} must be ≥ 0"):
            AdapterBank(model, **{field: -1})
    assert AdapterBank(model, max_fusions=np.int64(3)).max_fusions == 3


@pytest.mark.parametrize("scale", BAD_SCALES)
def test_bank_scales_are_type_checked(bank_setup, scale):
    dtype, model, bank = bank_setup
    bank.add("a", {"0": _bank_delta((24, 16), 0.5, 8)})
    saved_model = model_bits(model)
    saved_prepared = {k: bits(v) for k, (_, v) in bank.prepared("good").items()}
    d = _bank_delta((24, 16), 0.5, 9)
    with pytest.raises(TypeError, match=r"adapter 'x'.*scale must be"):
        bank.add("x", {"0": d}, scale=scale)
    with pytest.raises(TypeError, match=r"adapter 'x', layer '0'.*scale must be"):
        bank.add("x", {"0": (d, scale)})
    with pytest.raises(TypeError, match=r"fusion weight"):
        bank.activate(["good", "a"], weights=[1.0, scale])
    _assert_bank_unchanged(bank, model, saved_model, saved_prepared, names=("good", "a"))


# ---------------------------------------------------------------------------------------------
# Merges: the overflow check for ShiraLinear.merge is check_representable (see the checker
# tests above); DyLoRALinear.merge refuses and leaves the layer as it was.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_dylora_merge_rejects_overflow(dtype):
    layer = DyLoRALinear.from_linear(nn.Linear(8, 6).to(dtype), 2, alpha=2.0, seed=0)
    layer.set_rank(1)
    with torch.no_grad():
        layer.lora_A.fill_(2.0)
        layer.lora_A[1].fill_(0.0)
        layer.lora_B.fill_(_big(dtype) if dtype == torch.float16 else 3e38)  # ·2 overflows
    layer.eval()
    saved = model_bits(layer)
    with pytest.raises(ValueError, match=rf"merge.*{dtype}"):
        layer.merge(2)
    assert not layer.merged and layer.rank == 1 and layer._merge_backup is None
    assert_model_unchanged(layer, saved)


# ---------------------------------------------------------------------------------------------
# SHIRA_KERNELS_BACKEND: an unknown name fails at import, listing the valid ones.
# ---------------------------------------------------------------------------------------------
def _import_with(value):
    env = dict(os.environ)
    if value is None:
        env.pop(backends.ENV_VAR, None)
    else:
        env[backends.ENV_VAR] = value
    return subprocess.run([sys.executable, "-c", "import shira_kernels"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_unknown_backend_in_the_environment_fails_at_import():
    result = _import_with("bogus")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError") and "bogus" in last and backends.ENV_VAR in last
    for name in backends.BACKENDS:
        assert repr(name) in last or name in last


@pytest.mark.parametrize("value", [None, "", "  ", "auto", "reference"])
def test_valid_or_empty_backend_variable_imports(value):
    result = _import_with(value)
    assert result.returncode == 0, result.stderr


def test_shira_linear_merge_that_overflows_is_refused_and_changes_nothing():
    from shira_kernels.nn import ShiraLinear
    torch.manual_seed(0)
    layer = ShiraLinear.from_linear(torch.nn.Linear(16, 8).half(), r=2, scale=2.0)
    with torch.no_grad():
        layer.shira_values.fill_(6e4)
    before = layer.weight.detach().view(torch.int16).clone()
    with pytest.raises(ValueError, match="float16"):
        layer.merge()
    assert not layer.merged
    assert torch.equal(layer.weight.detach().view(torch.int16), before)


def test_dylora_from_linear_refused_leaves_the_linear_trainable():
    from shira_kernels.nn import DyLoRALinear
    linear = torch.nn.Linear(8, 4)
    for bad in ({"r": 0}, {"r": 2, "alpha": float("nan")}, {"r": 2, "seed": 1.5}):
        with pytest.raises((ValueError, TypeError)):
            DyLoRALinear.from_linear(linear, **bad)
        assert linear.weight.requires_grad and linear.bias.requires_grad, bad
