"""Adversarial cases of the 1-bit side (BinaryAdapter, BinaryLoRALinear, BinaryAdapterBank,
multi_binary_lora, quant) and DyLoRALinear: odd shapes, refused loads that must change nothing,
inference mode, adapters kept by the bank."""
import copy

import pytest
import torch
from torch import nn

from shira_kernels.binary_adapters import BinaryAdapterBank
from shira_kernels.formats import BinaryWeight
from shira_kernels.nn import BinaryAdapter, BinaryLoRALinear
from shira_kernels.nn.dylora import DyLoRALinear
from shira_kernels.ops.multi_binary import multi_binary_lora
from shira_kernels.quant import binarize, fake_quantize

from test_binary import binary_k, lora_exact_and_magnitude
from tolerance import assert_within_error_bound
from unchanged import assert_same_bits, state_bits

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# -- one output, rank 1: a [1, 1] weight ----------------------------------------------------------
@pytest.mark.parametrize("method", ["petl", "row"])
def test_a_single_entry_quantizes_exactly(method):
    w = torch.tensor([[0.375]], requires_grad=True)
    q = fake_quantize(w, method)
    assert torch.equal(q.detach(), w.detach())
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # the straight-through gradient
    signs, alpha, mu = binarize(w, method)
    assert torch.equal(BinaryWeight.from_signs(signs, alpha, mu).dequantize(), w.detach())


@pytest.mark.parametrize("method", ["petl", "row"])
@pytest.mark.parametrize("shape", [(33, 1), (1, 1), (1, 33)], ids=["in33-out1", "in1-out1",
                                                                   "in1-out33"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rank_one_branch_of_a_tiny_layer(method, shape, dtype):
    torch.manual_seed(0)
    in_f, out_f = shape
    layer = BinaryLoRALinear.from_linear(nn.Linear(in_f, out_f), r=1, scale=0.5, method=method)
    with torch.no_grad():
        layer.lora.up.normal_()
    x = torch.randn(2, 3, 2 * in_f)[..., ::2]  # leading dims, not contiguous
    with torch.no_grad():
        fake = layer.lora(x)
        layer.pack()
        packed = layer.lora(x)
        assert layer.lora(x.to(dtype)).dtype == dtype  # the packed branch runs in every dtype
    down, up = layer.lora.binary_weights()
    exact, magnitude, _ = lora_exact_and_magnitude(x.double(), down, up, 0.5, False)
    assert_within_error_bound(packed, exact, magnitude, binary_k(in_f) + binary_k(1) + 1,
                              "packed", torch_result=fake)


# -- a refused load_state_dict changes nothing ----------------------------------------------------
def _packed_layer(seed=0, method="row"):
    torch.manual_seed(seed)
    layer = BinaryLoRALinear.from_linear(nn.Linear(40, 6), r=4, method=method)
    with torch.no_grad():
        layer.lora.up.normal_()
    return layer.pack()


CORRUPTIONS = ["up_packed_shape", "alpha_shape", "float_packed", "nan_alpha", "inf_mu",
               "missing_key", "float_form", "alpha_not_tensor"]


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_rejected_load_into_binary_lora_linear_changes_nothing(corrupt):
    layer = _packed_layer()
    x = torch.randn(5, 40)
    y_before = layer(x)
    before = state_bits(layer)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v ^ 0x55
             for k, v in _packed_layer(seed=1).state_dict().items()}  # all would be copied
    if corrupt == "up_packed_shape":
        state["lora.up_packed"], key = torch.zeros(6, 2, dtype=torch.int32), "lora.up_packed"
    elif corrupt == "alpha_shape":
        state["lora.down_alpha"], key = torch.ones(1), "lora.down_alpha"
    elif corrupt == "float_packed":
        state["lora.down_packed"], key = state["lora.down_packed"].float(), "lora.down_packed"
    elif corrupt == "nan_alpha":
        state["lora.up_alpha"][1], key = float("nan"), "lora.up_alpha"
    elif corrupt == "inf_mu":
        state["lora.down_mu"][0], key = float("inf"), "lora.down_mu"
    elif corrupt == "missing_key":
        del state["lora.up_mu"]
        key = "lora.up_mu"
    elif corrupt == "float_form":  # an unpacked layer's state_dict
        state = BinaryLoRALinear.from_linear(nn.Linear(40, 6), r=4).state_dict()
        state["weight"] = torch.zeros(6, 40)
        key = "lora.down_packed"
    else:
        state["lora.up_alpha"], key = [1.0] * 6, "lora.up_alpha"
    with pytest.raises((ValueError, TypeError)) as info:
        layer.load_state_dict(state)
    assert key in str(info.value)
    assert_same_bits(state_bits(layer), before)
    assert torch.equal(layer(x), y_before)


def test_rejected_load_into_an_unpacked_layer_changes_nothing():
    layer = BinaryLoRALinear.from_linear(nn.Linear(40, 6), r=4)
    before = state_bits(layer)
    state = {k: torch.zeros_like(v) for k, v in _packed_layer().state_dict().items()}
    with pytest.raises(ValueError, match="pack"):
        layer.load_state_dict(state)
    assert_same_bits(state_bits(layer), before)


def test_rejected_load_into_a_binary_adapter_changes_nothing():
    adapter = _packed_layer().lora
    before = state_bits(adapter)
    state = {k: v ^ 0x55 if not v.is_floating_point() else v + 1
             for k, v in _packed_layer(seed=1).lora.state_dict().items()}
    state["up_packed"] = torch.zeros(6, 3, dtype=torch.int32)  # loaded after down_*
    with pytest.raises(ValueError, match="up_packed"):
        adapter.load_state_dict(state)
    assert_same_bits(state_bits(adapter), before)


def test_rejected_load_into_dylora_changes_nothing():
    layer = DyLoRALinear(10, 6, r=4, seed=1)
    before = state_bits(layer)
    state = DyLoRALinear(10, 6, r=8, seed=2).state_dict()  # another maximum rank
    with pytest.raises(ValueError, match="lora_A"):
        layer.load_state_dict(state)
    assert_same_bits(state_bits(layer), before)


def test_load_into_a_merged_dylora_is_refused():
    layer = DyLoRALinear(10, 6, r=4, seed=1).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    other = DyLoRALinear(10, 6, r=4, seed=2).eval()
    with torch.no_grad():
        other.lora_B.normal_()
    layer.merge()
    before = state_bits(layer)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.load_state_dict(other.state_dict())
    assert_same_bits(state_bits(layer), before)
    layer.unmerge()
    layer.load_state_dict(other.state_dict())
    x = torch.randn(3, 10)
    assert torch.equal(layer(x), other(x))


# -- inference mode --------------------------------------------------------------------------
@pytest.mark.parametrize("activation", [None, "relu"])
def test_pack_under_inference_mode_keeps_x_differentiable(activation):
    torch.manual_seed(0)
    adapter = BinaryAdapter(40, 4, 6, scale=0.5, activation=activation)
    with torch.no_grad():
        adapter.up.normal_()
    with torch.inference_mode():
        adapter.pack()
    x = torch.randn(3, 40, dtype=torch.float64).requires_grad_(True)
    y = adapter(x.float())
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    down, up = adapter.binary_weights()
    exact, magnitude, x_abs = lora_exact_and_magnitude(x, down, up, 0.5, activation == "relu")
    (gx_exact,) = torch.autograd.grad(exact, x, gy.double())
    (gx_magnitude,) = torch.autograd.grad(magnitude, x_abs, gy.double().abs())
    assert_within_error_bound(gx.float(), gx_exact, gx_magnitude,
                              binary_k(6) + binary_k(4) + 2, "gx")


def _bank_and_tuned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 5), nn.ReLU(), nn.Linear(5, 1))

    def tuned(seed):
        torch.manual_seed(seed)
        m = copy.deepcopy(model)
        m[0] = BinaryLoRALinear.from_linear(m[0], r=2, method="row")
        m[2] = BinaryLoRALinear.from_linear(m[2], r=2, method="petl")
        for i in (0, 2):
            with torch.no_grad():
                m[i].lora.up.normal_()
            m[i].pack()
        return m
    return model, BinaryAdapterBank(model), tuned


def test_bank_keeps_the_adapter_as_added(monkeypatch):
    # Tuning off: every 1-bit branch by table lookup, whose sums for a row do not depend on
    # the other rows, so each mixed row is the bits of its own model on the same batch.
    monkeypatch.setenv("SHIRA_KERNELS_TUNE", "off")
    model, bank, tuned = _bank_and_tuned()
    source = tuned(1)
    bank.add_from_model("a", source)
    x = torch.randn(3, 4, 37)
    with torch.no_grad(), bank.mixed(["a"] * 3):
        y = model(x)
    assert torch.equal(y, source(x).detach())
    source.load_state_dict(tuned(2).state_dict())  # the tuned copy reused for the next adapter
    bank.add_from_model("b", source)
    with torch.no_grad(), bank.mixed(["a", "b", None]):
        y2 = model(x)
    assert torch.equal(y2[0], y[0])
    assert torch.equal(y2[1], source(x).detach()[1])


# -- messages --------------------------------------------------------------------------------
def test_multi_binary_lora_names_the_bad_scale():
    bw = BinaryWeight.from_signs(torch.rand(2, 33) < 0.5, 0.1, 0.0)
    up = BinaryWeight.from_signs(torch.rand(4, 2) < 0.5, 0.1, 0.0)
    for bad in (float("nan"), True):
        with pytest.raises((ValueError, TypeError), match=r"adapters\[1\]'s scale"):
            multi_binary_lora(torch.randn(2, 33), [(bw, up, 1.0), (bw, up, bad)], [0, 1])


# -- transfer -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_sparse_diff_refuses_an_infinite_difference(bad):
    from shira_kernels.transfer import sparse_diff

    base = {"w": torch.randn(6, 5)}
    tuned = {"w": base["w"] + 0.1}
    tuned["w"][1, 2] = bad  # an fp16 fine-tune that overflowed
    with pytest.raises(ValueError, match="'w'.*inf"):
        sparse_diff(tuned, base, r=1)
