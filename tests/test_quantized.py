"""SHiRA adapters on quantized bases (issue 20): QuantizedShiraLinear = the base's own quantized
forward + the sparse product.

The quantized base's output (and its own gradient of x) is taken as given: each check compares
the layer against base_layer(x) plus the exact (float64) sparse product on the same inputs,
within tests/tolerance.py's bound for the sparse part. bitsandbytes and torchao come from the
[quant] extra; without them their cases skip, saying which package is missing.
"""
from __future__ import annotations

import importlib.util
import threading

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from shira_kernels import masks
from shira_kernels.nn import ShiraLinear, replace_linear
from shira_kernels.nn import quantized as q
from shira_kernels import sparse_product_add
from shira_kernels.nn.quantized import QuantizedShiraLinear

from tolerance import abs64, assert_within_error_bound

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
OUT_F, IN_F = 80, 96  # in_features a multiple of the 4-bit group sizes (32, 64)
SCALE = 0.75


def _bnb_int8(linear):
    import bitsandbytes as bnb
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=True,
                                has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False,
                                     has_fp16_weights=False)
    layer.bias = nn.Parameter(linear.bias.data.clone())
    return layer.to("cpu")  # bitsandbytes quantizes on the move to the device


def _bnb_4bit(quant_type):
    def make(linear):
        import bitsandbytes as bnb
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=True,
                                  compute_dtype=linear.weight.dtype, quant_type=quant_type)
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                         quant_type=quant_type)
        layer.bias = nn.Parameter(linear.bias.data.clone())
        return layer.to("cpu")
    return make


def _torchao(kind):
    def make(linear):
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup
        config = (Int8WeightOnlyConfig() if kind == "int8" else
                  IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
        quantize_(linear, config)
        return linear
    return make


_NEEDS = {"bitsandbytes": HAS_BNB, "torchao": HAS_TORCHAO}
KINDS = {  # id: (package, maker)
    "bnb-int8": ("bitsandbytes", _bnb_int8),
    "bnb-nf4": ("bitsandbytes", _bnb_4bit("nf4")),
    "bnb-fp4": ("bitsandbytes", _bnb_4bit("fp4")),
    "torchao-int8": ("torchao", _torchao("int8")),
    "torchao-int4": ("torchao", _torchao("int4")),  # IntxWeightOnlyConfig(int4): runs on CPU
}
DTYPES = (torch.float32, torch.bfloat16)


def kind_params(*names):
    return [pytest.param(name, id=name, marks=pytest.mark.skipif(
        not _NEEDS[KINDS[name][0]], reason=f"{KINDS[name][0]} not installed"))
        for name in (names or KINDS)]


def make_base(kind, dtype=torch.float32, seed=0, out_f=OUT_F, in_f=IN_F):
    """A quantized linear of ``kind`` from a float linear of ``dtype`` (torchao's int4 runs
    inputs of its weight's dtype only: the base is built in the test's dtype)."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f).to(dtype)
    return KINDS[kind][1](linear)


def adapted(kind, dtype=torch.float32, seed=0, **kwargs):
    """A QuantizedShiraLinear on a fresh base, its values set to nonzero random numbers."""
    layer = ShiraLinear.from_linear(make_base(kind, dtype, seed), r=kwargs.pop("r", 4),
                                    scale=SCALE, seed=seed, **kwargs)
    with torch.no_grad():
        layer.shira_values.copy_(torch.randn(layer.shira_values.shape,
                                             generator=torch.Generator().manual_seed(seed + 1)))
    return layer


def dense_delta(layer) -> torch.Tensor:
    """S in float64 from the values as the forward uses them (cast to the output dtype)."""
    return layer.delta.to_dense(torch.float64)


def base_output(layer, x):
    """(y, base_layer's output inside that same forward)."""
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda m, i, out: seen.append(out.detach()
                                                                                  .clone()))
    try:
        y = layer(x)
    finally:
        handle.remove()
    assert len(seen) == 1
    return y, seen[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", kind_params())
def test_forward_is_base_plus_exact_sparse_product(kind, dtype):
    layer = adapted(kind, dtype)
    assert isinstance(layer, QuantizedShiraLinear)
    x = torch.randn(2, 3, IN_F, generator=torch.Generator().manual_seed(5)).to(dtype)
    y, y_base = base_output(layer, x)
    assert y.shape == (2, 3, OUT_F) and y.dtype == y_base.dtype
    # The sparse part in the output's dtype: x and the values cast to it (the spec).
    s = layer.delta.with_values(layer.shira_values.detach().to(y.dtype)).to_dense(torch.float64)
    x64 = x.to(y.dtype).double()
    exact = y_base.double() + SCALE * x64 @ s.T
    magnitude = abs64(y_base) + SCALE * x64.abs() @ s.abs().T
    # K: the products and their sum, the scale, the add to the base's output.
    assert_within_error_bound(y, exact, magnitude, IN_F + 2, f"{kind} forward")
    assert not torch.equal(y, y_base)  # the adapter adds something


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", kind_params())
def test_gradients_of_values_and_x(kind, dtype):
    layer = adapted(kind, dtype)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, IN_F, generator=gen).to(dtype).requires_grad_()
    y = layer(x)
    gy = torch.randn(y.shape, generator=gen).to(y.dtype)
    y.backward(gy)
    # The base's own gradient of x, taken as given (the same base, the same gy).
    xb = x.detach().clone().requires_grad_()
    layer.base_layer(xb).backward(gy)
    gx_base = xb.grad
    s = layer.delta.with_values(layer.shira_values.detach().to(y.dtype)).to_dense(torch.float64)
    gy64, x64 = gy.double(), x.detach().to(y.dtype).double()
    # gx: the sparse part gy·S (its products and sum, the scale), rounded once to the working
    # dtype, then added to the base's gradient.
    assert_within_error_bound(x.grad, gx_base.double() + SCALE * gy64 @ s,
                              abs64(gx_base) + SCALE * gy64.abs() @ s.abs(), OUT_F + 2,
                              f"{kind} grad x", roundings=1)
    rows, cols = layer.delta.structure.rows.long(), layer.delta.structure.cols.long()
    exact = SCALE * (gy64.T @ x64)[rows, cols]
    magnitude = SCALE * (gy64.abs().T @ x64.abs())[rows, cols]
    # The values' gradient: sddmm over the tokens (fp32), the scale, then (values of another
    # dtype than the output) the cast's backward from the output's dtype: compare it there.
    g = layer.shira_values.grad
    assert g is not None and g.dtype == layer.shira_values.dtype
    assert_within_error_bound(g.to(y.dtype), exact, magnitude, x.shape[0] + 2,
                              f"{kind} grad values")


@pytest.mark.parametrize("kind", kind_params())
def test_only_the_adapter_trains(kind):
    base = make_base(kind)
    assert any(p.requires_grad for p in base.parameters())  # bitsandbytes' and torchao's bias
    layer = ShiraLinear.from_linear(base, r=4)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["shira_values"]
    layer(torch.randn(4, IN_F, requires_grad=True)).sum().backward()
    assert all(p.grad is None for p in layer.base_layer.parameters())
    assert layer.shira_values.grad is not None


class _LargeTensors(TorchDispatchMode):
    """Counts the ops whose output has at least ``numel`` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                self.count += 1
        return out


def _large_in_step(step, numel):
    with _LargeTensors(numel) as mode:
        step()
    return mode.count


@pytest.mark.parametrize("kind", kind_params())
def test_no_dense_delta_in_forward_or_backward(kind):
    # A training step of the adapted layer makes exactly as many m×n-sized tensors as the
    # quantized base's own step (some bases dequantize per call: that is theirs); a dense
    # formulation of the same adapter makes more, so this check can fail.
    layer = adapted(kind)
    numel = OUT_F * IN_F
    x = torch.randn(4, IN_F)
    gy = torch.randn(4, OUT_F)

    def base_step():
        xb = x.clone().requires_grad_()
        layer.base_layer(xb).backward(gy)

    def adapted_step():
        xa = x.clone().requires_grad_()
        layer(xa).backward(gy)

    def dense_step():
        xd = x.clone().requires_grad_()
        delta = layer.delta
        s = torch.zeros(delta.shape).index_put((delta.structure.rows.long(),
                                                delta.structure.cols.long()),
                                               layer.shira_values)
        (layer.base_layer(xd) + SCALE * xd @ s.T).backward(gy)

    adapted_step()  # first calls may set up state (bitsandbytes moves its scales)
    base = _large_in_step(base_step, numel)
    assert _large_in_step(adapted_step, numel) == base
    assert _large_in_step(dense_step, numel) > base
    with torch.no_grad():
        assert _large_in_step(lambda: layer(x), numel) == _large_in_step(
            lambda: layer.base_layer(x), numel)


@pytest.mark.parametrize("kind", kind_params())
def test_merge_refused_and_nothing_changes(kind):
    layer = adapted(kind)
    x = torch.randn(3, IN_F)
    before = layer(x)
    values = layer.shira_values.detach().clone()
    with pytest.raises(RuntimeError, match="requantize") as info:
        layer.merge()
    assert layer.quant_format in str(info.value) and "dequantize" in str(info.value)
    assert not layer.merged
    assert torch.equal(layer.shira_values, values) and torch.equal(layer(x), before)
    layer.unmerge()  # never merged: nothing to undo
    assert torch.equal(layer(x), before)


@pytest.mark.parametrize("kind", kind_params())
def test_dequantize_gives_a_mergeable_shira_linear(kind):
    layer = adapted(kind)
    plain = layer.dequantize()
    assert type(plain) is ShiraLinear
    assert torch.equal(plain.weight, q.dequantize_weight(layer.base_layer).to(plain.weight.dtype))
    assert torch.equal(plain.shira_flat_indices, layer.shira_flat_indices)
    assert torch.equal(plain.shira_values, layer.shira_values.to(plain.shira_values.dtype))
    assert plain.shira_values.data_ptr() != layer.shira_values.data_ptr()  # a copy
    weight = plain.weight.detach().clone()
    plain.merge()
    plain.unmerge()
    assert torch.equal(plain.weight, weight)


@pytest.mark.parametrize("kind", kind_params())
def test_masks_without_and_with_the_weight(kind, monkeypatch):
    base = make_base(kind)
    expected = masks.wm_mask(q.dequantize_weight(base), r=4)
    wm = ShiraLinear.from_linear(base, r=4, mask="wm")
    assert torch.equal(wm.shira_flat_indices.long(), masks.mask_to_indices(expected).long())

    def refuse(layer):
        raise AssertionError("dequantized")
    monkeypatch.setattr(q, "dequantize_weight", refuse)
    wm(torch.randn(2, IN_F)).sum().backward()  # the forward and backward never dequantize
    rand = ShiraLinear.from_linear(make_base(kind), r=4, mask="rand", seed=3)
    assert torch.equal(rand.shira_flat_indices.long(), masks.mask_to_indices(
        masks.rand_mask((OUT_F, IN_F), r=4, seed=3)).long())


@pytest.mark.parametrize("kind", kind_params())
def test_adapter_state_dict_round_trip(kind):
    layer = adapted(kind, seed=0)
    adapter = {k: v for k, v in layer.state_dict().items() if k.startswith("shira_")}
    assert set(adapter) == {"shira_values", "shira_flat_indices"}
    # Another mask on the same base: the load brings this layer's.
    other = ShiraLinear.from_linear(make_base(kind, seed=0), r=4, seed=9, scale=SCALE)
    assert not torch.equal(other.shira_flat_indices, layer.shira_flat_indices)
    result = other.load_state_dict(adapter, strict=False)
    assert not result.unexpected_keys
    x = torch.randn(3, IN_F)
    assert torch.equal(other(x), layer(x))  # same base, mask and values: same bits


@pytest.mark.parametrize("kind", kind_params("bnb-int8", "torchao-int8", "torchao-int4"))
def test_full_state_dict_round_trip(kind):
    # bitsandbytes' 4-bit layer itself does not load its state_dict into a quantized layer
    # (its quant_state keys are unexpected there): the adapter-only round trip covers it.
    layer = adapted(kind, seed=0)
    other = ShiraLinear.from_linear(make_base(kind, seed=1), r=4, seed=9, scale=SCALE)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(3, IN_F)
    assert torch.equal(other(x), layer(x))


@pytest.mark.parametrize("kind", kind_params("torchao-int8", "bnb-int8"))
def test_the_layer_owns_a_copy_of_the_indices_it_was_given(kind):
    """QuantizedShiraLinear(base, indices=t) used to register t itself as its buffer: a
    load_state_dict, which copies into the buffer in place, overwrote the caller's tensor."""
    given = torch.tensor([0, 5, 9])
    layer = QuantizedShiraLinear(make_base(kind), indices=given)
    loaded = torch.tensor([2, 3, 4])
    layer.load_state_dict({**layer.state_dict(), "shira_flat_indices": loaded})
    assert layer.shira_flat_indices.tolist() == [2, 3, 4]
    assert given.tolist() == [0, 5, 9]


@pytest.mark.parametrize("kind", kind_params("torchao-int8", "bnb-int8"))
def test_bad_load_leaves_the_layer_as_it_was(kind):
    layer = adapted(kind)
    x = torch.randn(3, IN_F)
    before = layer(x)
    state = layer.state_dict()
    bad = dict(state, shira_flat_indices=state["shira_flat_indices"].flip(0))  # unsorted
    with pytest.raises(ValueError, match="load_state_dict"):
        layer.load_state_dict(bad)
    fewer = dict(state, shira_flat_indices=state["shira_flat_indices"][:-1],
                 shira_values=state["shira_values"][:-1])
    with pytest.raises(ValueError, match="entries"):
        layer.load_state_dict(fewer)
    assert torch.equal(layer(x), before)


@pytest.mark.parametrize("kind", kind_params("torchao-int8", "bnb-int8", "bnb-nf4"))
def test_every_cpu_backend(kind, backend, device):
    # The sparse product and its gradients through each backend's kernels.
    layer = adapted(kind)
    x = torch.randn(5, IN_F, requires_grad=True)
    y, y_base = base_output(layer, x)
    s = dense_delta(layer)
    assert_within_error_bound(y, y_base.double() + SCALE * x.detach().double() @ s.T,
                              abs64(y_base) + SCALE * abs64(x) @ s.abs().T, IN_F + 2, backend)
    gy = torch.randn(y.shape)
    y.backward(gy)
    rows, cols = layer.delta.structure.rows.long(), layer.delta.structure.cols.long()
    x64 = x.detach().double()
    assert_within_error_bound(layer.shira_values.grad, SCALE * (gy.double().T @ x64)[rows, cols],
                              SCALE * (gy.double().abs().T @ x64.abs())[rows, cols], 5 + 2,
                              f"{backend} grad values")


@pytest.mark.parametrize("kind", kind_params("bnb-int8", "torchao-int8"))
def test_autocast_goes_through_the_ops(kind):
    # Under autocast the product runs through the shira::spmm / sddmm ops (as under
    # torch.compile), in the base output's dtype.
    layer = adapted(kind)
    x = torch.randn(4, IN_F, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_base = base_output(layer, x)
    s = layer.delta.with_values(layer.shira_values.detach().to(y.dtype)).to_dense(torch.float64)
    x64 = x.detach().to(y.dtype).double()
    assert_within_error_bound(y, y_base.double() + SCALE * x64 @ s.T,
                              abs64(y_base) + SCALE * x64.abs() @ s.abs().T, IN_F + 2, "autocast")
    gy = torch.randn(y.shape).to(y.dtype)
    y.backward(gy)
    rows, cols = layer.delta.structure.rows.long(), layer.delta.structure.cols.long()
    gy64 = gy.double()
    assert_within_error_bound(layer.shira_values.grad.to(y.dtype),
                              SCALE * (gy64.T @ x64)[rows, cols],
                              SCALE * (gy64.abs().T @ x64.abs())[rows, cols], 4 + 2,
                              "autocast grad values")


@pytest.mark.parametrize("kind", kind_params("torchao-int8"))
def test_threads_get_the_serial_result(kind):
    layer = adapted(kind)
    xs = [torch.randn(4, IN_F, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        expected = [layer(x) for x in xs]
    got = [None] * len(xs)

    def run(i):
        with torch.no_grad():
            for _ in range(5):
                got[i] = layer(xs[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("kind", kind_params("torchao-int8", "bnb-nf4"))
def test_replace_linear_adapts_quantized_layers_once(kind):
    model = nn.Sequential(make_base(kind, seed=0), nn.ReLU(), make_base(kind, seed=1, in_f=OUT_F))
    assert replace_linear(model, filter=lambda name, m: True, r=2) == ["0", "2"]
    assert all(isinstance(model[i], QuantizedShiraLinear) for i in (0, 2))
    # The quantized bases inside are adapted already: nothing is left to replace.
    with pytest.raises(ValueError, match="no nn.Linear"):
        replace_linear(model, filter=lambda name, m: True, r=2)
    model(torch.randn(2, IN_F)).sum().backward()


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_unquantized_bitsandbytes_layers_are_refused():
    import bitsandbytes as bnb
    four = bnb.nn.Linear4bit(IN_F, OUT_F)  # quantized only when moved to its device
    with pytest.raises(ValueError, match="not quantized yet"):
        ShiraLinear.from_linear(four, r=2)
    eight = bnb.nn.Linear8bitLt(IN_F, OUT_F, has_fp16_weights=True)
    with pytest.raises(ValueError, match="has_fp16_weights"):
        ShiraLinear.from_linear(eight, r=2)


@pytest.mark.parametrize("kind", kind_params("torchao-int8", "bnb-int8"))
def test_bad_arguments(kind):
    base = make_base(kind)
    flags = [p.requires_grad for p in base.parameters()]
    bad = torch.tensor([5, 3], dtype=torch.int32)  # not ascending
    with pytest.raises(ValueError, match="indices"):
        QuantizedShiraLinear(base, indices=bad)
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        QuantizedShiraLinear(base, indices=bad.flip(0), dtype=torch.float64)
    with pytest.raises(ValueError, match="scale"):
        ShiraLinear.from_linear(base, r=2, scale=float("nan"))
    assert [p.requires_grad for p in base.parameters()] == flags  # nothing changed
    with pytest.raises(TypeError, match="quantized linear"):
        QuantizedShiraLinear(nn.Linear(4, 3), indices=torch.tensor([0], dtype=torch.int32))
    layer = ShiraLinear.from_linear(base, r=2)
    with pytest.raises(ValueError, match="in_features"):
        sparse_product_add(torch.zeros(2, OUT_F), torch.zeros(2, IN_F + 1), layer.delta)
    with pytest.raises(ValueError, match="y has shape"):
        sparse_product_add(torch.zeros(3, OUT_F), torch.zeros(2, IN_F), layer.delta)
    with pytest.raises(TypeError, match="SparseDelta"):
        sparse_product_add(torch.zeros(2, OUT_F), torch.zeros(2, IN_F), "delta")


def test_integer_weights_that_are_no_known_format_are_refused():
    linear = nn.Linear(4, 3)
    linear.weight = nn.Parameter(torch.zeros(3, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="quantized"):
        ShiraLinear.from_linear(linear, r=1)


@pytest.mark.parametrize("kind", kind_params("torchao-int8"))
def test_compiles_without_graph_breaks(kind):
    # Traced, the product goes through the shira::spmm / sddmm ops inside the autograd.Function
    # (aot_eager: the same eager kernels for the base, so its output is the eager one).
    layer = adapted(kind)
    x = torch.randn(5, IN_F, requires_grad=True)
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0
    torch._dynamo.reset()
    y = torch.compile(layer, backend="aot_eager")(x)
    with torch.no_grad():
        y_base = layer.base_layer(x)
    s = dense_delta(layer)
    x64 = x.detach().double()
    assert_within_error_bound(y, y_base.double() + SCALE * x64 @ s.T,
                              abs64(y_base) + SCALE * x64.abs() @ s.abs().T, IN_F + 2, "compiled")
    gy = torch.randn(y.shape)
    y.backward(gy)
    rows, cols = layer.delta.structure.rows.long(), layer.delta.structure.cols.long()
    assert_within_error_bound(layer.shira_values.grad, SCALE * (gy.double().T @ x64)[rows, cols],
                              SCALE * (gy.double().abs().T @ x64.abs())[rows, cols], 5 + 2,
                              "compiled grad values")


@pytest.mark.parametrize("kind", kind_params("torchao-int8", "bnb-int8"))
def test_inference_mode_gives_the_same_bits(kind):
    layer = adapted(kind)
    x = torch.randn(2, 3, IN_F)
    with torch.inference_mode():
        served = layer(x)
    trained = layer(x)
    assert trained.requires_grad and torch.equal(served, trained.detach())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", kind_params("bnb-int8", "bnb-nf4", "bnb-fp4"))
def test_accelerated_peft_shira_on_a_quantized_base(kind, dtype):
    # PEFT's SHiRA on a bitsandbytes base dequantizes W and adds a dense delta per forward;
    # accelerated, it is QuantizedShiraLinear's computation: the same bits, forward and
    # gradients, no m×n tensor beyond the base's own, and merge refused (PEFT's requantizes).
    # (PEFT takes torchao bases only through transformers' quantization config: not here.)
    peft = pytest.importorskip("peft")
    from shira_kernels.integrations import peft as skpeft
    model = nn.Sequential(make_base(kind, dtype))
    pm = peft.get_peft_model(model, peft.ShiraConfig(r=4, target_modules=["0"]))
    layer = pm.base_model.model[0]
    assert layer.quantization_backend is not None
    values = layer.shira_weight["default"]
    with torch.no_grad():
        values.copy_(torch.randn(values.shape, generator=torch.Generator().manual_seed(3)))
    rows, cols = layer.shira_indices["default"].to(torch.int64)  # PEFT's [2, nnz]
    flat = rows * IN_F + cols
    order = flat.argsort()
    ours = QuantizedShiraLinear(make_base(kind, dtype), indices=flat[order],
                                scale=layer.scaling["default"], dtype=values.dtype)
    with torch.no_grad():
        ours.shira_values.copy_(values[order])
    skpeft.accelerate(pm)
    x = torch.randn(5, IN_F, generator=torch.Generator().manual_seed(4)).to(dtype)
    xa, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = pm(xa)
    assert torch.equal(y, ours(xo)) and not torch.equal(y, layer.get_base_layer()(x))
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
    y.backward(gy)
    ours(xo).backward(gy)
    assert torch.equal(xa.grad, xo.grad)
    assert torch.equal(values.grad[order], ours.shira_values.grad)
    with torch.no_grad():
        assert _large_in_step(lambda: pm(x), OUT_F * IN_F) == _large_in_step(
            lambda: layer.get_base_layer()(x), OUT_F * IN_F)
    before = values.detach().clone()
    with pytest.raises(RuntimeError, match="requantize"):
        pm.merge_adapter()
    assert not layer.merged and torch.equal(values, before) and torch.equal(pm(x), y.detach())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", kind_params("bnb-nf4", "bnb-fp4"))
def test_4bit_weight_packed_for_the_cpu_kernel_dequantizes_as_bitsandbytes_saves_it(kind,
                                                                                     dtype):
    # An inference forward on a CPU repacks a Linear4bit's weight in place for bitsandbytes'
    # CPU kernel (another layout, absmax in bf16, quant_state.dtype bf16). dequantize_weight,
    # the score masks and the values' dtype read the weight as bitsandbytes saves it (its
    # _save_to_state_dict unpacks), and leave the layer packed.
    import copy
    import bitsandbytes as bnb
    base = make_base(kind, dtype, out_f=64, in_f=128)
    base.eval()
    with torch.no_grad():
        base(torch.randn(3, 128).to(dtype))
    state = base.weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):  # no avx512bf16 here: pack it
        pack = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
        if pack is None:
            pytest.skip("this bitsandbytes has no CPU packing")
        base.weight.data, base.weight.quant_state = pack(base.weight.data, state)
        state = base.weight.quant_state
    unpacked = copy.deepcopy(base)
    unpacked.state_dict()  # bitsandbytes unpacks the weight in place to save it
    assert not unpacked.weight.quant_state.packing_format_for_cpu
    codes, absmax = base.weight.data.clone(), state.absmax.clone()
    expected = q.dequantize_weight(unpacked)
    assert expected.dtype == dtype
    assert torch.equal(q.dequantize_weight(base), expected)
    wm = ShiraLinear.from_linear(base, r=4, mask="wm")
    assert torch.equal(wm.shira_flat_indices.long(), masks.mask_to_indices(
        masks.wm_mask(expected, r=4)).long())
    assert wm.shira_values.dtype == dtype
    assert torch.equal(wm.dequantize().weight, expected)
    # the layer was left as it was: packed, the same codes and state
    assert base.weight.quant_state is state and state.packing_format_for_cpu
    assert state.dtype == torch.bfloat16 and torch.equal(state.absmax, absmax)
    assert torch.equal(base.weight.data, codes)


@pytest.mark.parametrize("kind", kind_params())
def test_adapter_bank_holds_no_adapter_of_a_quantized_layer_and_hotswap_zeroes_it(kind):
    # The bank switches adapters into weights, which a quantized one cannot take: a
    # QuantizedShiraLinear's adapter is refused by add_from_model (not dropped unseen), and
    # hotswap, which never writes a weight, gives it the all-zero adapter (the base).
    from shira_kernels import AdapterBank
    torch.manual_seed(0)
    model = nn.Sequential(adapted(kind), nn.ReLU(), ShiraLinear.from_linear(
        nn.Linear(OUT_F, 16), r=2))
    with torch.no_grad():
        model[2].shira_values.normal_()
    bank = AdapterBank(model)
    with pytest.raises(ValueError, match=r"layer '0' is a QuantizedShiraLinear"):
        bank.add_from_model("task", model)
    assert "task" not in bank
    bank.add("plain", {"2": model[2].delta})
    x = torch.randn(3, IN_F)
    with torch.no_grad():
        base = model[0].base_layer(x)
    bank.hotswap("plain")
    assert not model[0].shira_values.any()
    assert torch.equal(model[2].shira_values, bank.deltas("plain")["2"][0].values)
    with torch.no_grad():
        model[0].shira_values.normal_()
    bank.hotswap(None)
    assert not model[0].shira_values.any() and not model[2].shira_values.any()
    with torch.no_grad():
        assert torch.equal(model[0](x), base)


@pytest.mark.parametrize("kind", kind_params("bnb-int8"))
def test_int8_assign_load_that_bitsandbytes_refuses_changes_nothing(kind):
    # assign=True would put the state_dict's plain weight tensor in the Int8Params' place
    # (bitsandbytes then refuses its SCB, after the adapter was replaced): refused first.
    src = adapted(kind, seed=0)
    layer = ShiraLinear.from_linear(make_base(kind, seed=1), r=4, seed=9, scale=SCALE)
    x = torch.randn(3, IN_F)
    before = layer(x)
    weight = layer.base_layer.weight
    values, indices = layer.shira_values.detach().clone(), layer.shira_flat_indices.clone()
    with pytest.raises(RuntimeError, match=r"assign=True.*base_layer\.weight"):
        layer.load_state_dict(src.state_dict(), assign=True)
    assert layer.base_layer.weight is weight
    assert torch.equal(layer.shira_values, values)
    assert torch.equal(layer.shira_flat_indices, indices)
    assert torch.equal(layer(x), before)


@pytest.mark.parametrize("config", ["Int8WeightOnlyConfig", "Float8WeightOnlyConfig"])
@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed")
def test_adapter_bank_refuses_a_torchao_weight_clearly(config):
    # A torchao tensor subclass reports a float dtype: refused as a quantized weight, with the
    # layer named, before torchao is asked to index it.
    import torchao.quantization as tq
    from shira_kernels import AdapterBank, SparseDelta
    if not hasattr(tq, config):
        pytest.skip(f"this torchao has no {config}")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN_F, OUT_F))
    try:
        tq.quantize_(model, getattr(tq, config)())
    except Exception as e:  # a config without a CPU path here
        pytest.skip(f"{config} does not quantize on this machine: {e}")
    bank = AdapterBank(model)
    delta = SparseDelta.from_flat(torch.tensor([0, 5, 97]), (OUT_F, IN_F),
                                  torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"layer '0'.*quantized"):
        bank.add("a", {"0": delta})
    assert "a" not in bank


@pytest.mark.parametrize("kind", kind_params("torchao-int8", "torchao-int4"))
def test_torchao_assign_load_of_a_plain_weight_is_refused(kind):
    # assign=True of a float base weight would dequantize the base unseen (quant_format still
    # naming torchao, merge and dequantize failing): refused before anything is copied.
    layer = adapted(kind, seed=0)
    x = torch.randn(3, IN_F)
    before = layer(x)
    weight = layer.base_layer.weight
    values = layer.shira_values.detach().clone()
    state = dict(layer.state_dict(), shira_values=torch.zeros_like(values))
    state["base_layer.weight"] = torch.randn(OUT_F, IN_F)
    with pytest.raises(RuntimeError, match=r"assign=True.*base_layer\.weight"):
        layer.load_state_dict(state, assign=True)
    assert layer.base_layer.weight is weight and torch.equal(layer.shira_values, values)
    assert torch.equal(layer(x), before)
    assert type(layer.dequantize()) is ShiraLinear
    # a weight of the layer's own kind still assigns
    other = adapted(kind, seed=1)
    layer.load_state_dict(other.state_dict(), assign=True)
    assert torch.equal(layer(x), other(x))


@pytest.mark.parametrize("kind", kind_params())
def test_forward_names_x_of_an_unsupported_dtype(kind):
    layer = adapted(kind)
    ran = []
    layer.base_layer.register_forward_pre_hook(lambda m, i: ran.append(1))
    with pytest.raises(TypeError, match=r"^x has dtype torch\.float64"):
        layer(torch.randn(3, IN_F, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^x must be a torch\.Tensor"):
        layer([[0.0] * IN_F])
    assert not ran  # checked before the base's forward
