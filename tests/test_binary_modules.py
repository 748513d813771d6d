"""BinaryAdapter and BinaryLoRALinear: training with the STE, packing, size, equal outputs."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shira_kernels.nn import BinaryAdapter, BinaryLoRALinear

from test_binary import binary_k, lora_exact_and_magnitude
from tolerance import abs64, assert_within_error_bound


def _state_bytes(module, prefix=""):
    return sum(t.numel() * t.element_size() for k, t in module.state_dict().items()
               if k.startswith(prefix))


@pytest.mark.parametrize("method", ["petl", "row"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_packed_output_equals_fake_quantized_output(backend, device, method, activation):
    torch.manual_seed(0)
    adapter = BinaryAdapter(768, 32, scale=0.1, activation=activation, method=method)
    with torch.no_grad():
        adapter.up.normal_()
    adapter.to(device)
    x = torch.randn(3, 197, 768).to(device)
    with torch.no_grad():
        fake = adapter(x)
        adapter.pack()
        packed = adapter(x)
    assert packed.shape == fake.shape
    # Against float64 with the packed weights; the fake-quantized dense path is torch's own
    # formulation (on the same weights, μ ± α bit for bit).
    down, up = adapter.binary_weights()
    exact, magnitude, _ = lora_exact_and_magnitude(x.double(), down, up, 0.1,
                                                   activation == "relu")
    assert_within_error_bound(packed, exact, magnitude, binary_k(768) + binary_k(32) + 1,
                              "packed", torch_result=fake)


def test_packed_state_dict_is_16x_smaller_than_fp16():
    adapter = BinaryAdapter(768, 32, method="petl")
    fp16_bytes = _state_bytes(adapter.half())
    adapter.float().pack()
    assert set(adapter.state_dict()) == {"down_packed", "down_alpha", "down_mu",
                                         "up_packed", "up_alpha", "up_mu"}
    # 1 bit per entry against 16: the sign words are exactly 1/16 of the fp16 weights; the four
    # fp32 statistics (α, μ of down and up) add 16 bytes, so the whole is 15.96x smaller here.
    sign_bytes = sum(adapter.state_dict()[k].numel() * 4 for k in ("down_packed", "up_packed"))
    assert fp16_bytes == 16 * sign_bytes
    assert _state_bytes(adapter) == sign_bytes + 16
    assert fp16_bytes / _state_bytes(adapter) > 15.9
    buffer = io.BytesIO()
    torch.save(adapter.state_dict(), buffer)
    restored = BinaryAdapter(768, 32, method="petl").pack()
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer))
    x = torch.randn(4, 768)
    torch.testing.assert_close(restored(x), adapter(x), rtol=0, atol=0)


def test_bi_lora_trains_with_the_straight_through_estimator(backend, device):
    torch.manual_seed(0)
    base = nn.Linear(32, 8).to(device)
    layer = BinaryLoRALinear.from_linear(base, r=4, scale=1.0, method="row")
    assert layer.weight is base.weight and not layer.weight.requires_grad
    x, target = torch.randn(128, 32).to(device), torch.randn(128, 8).to(device)
    opt = torch.optim.Adam(layer.lora.parameters(), lr=0.02)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    with torch.no_grad():
        trained = layer(x)
        layer.pack()
        down, up = layer.lora.binary_weights()
        lora, lora_m, _ = lora_exact_and_magnitude(x.double(), down, up, layer.lora.scale,
                                                   layer.lora.activation == "relu")
        exact = F.linear(x.double(), layer.weight.double(), layer.bias.double()) + lora
        magnitude = F.linear(abs64(x), abs64(layer.weight), abs64(layer.bias)) + lora_m
        # The longer of the two branches (the base: 32 steps and the bias), then their join.
        k = max(32 + 1, binary_k(32) + binary_k(4) + 1) + 1
        assert_within_error_bound(layer(x), exact, magnitude, k, "packed", torch_result=trained)
    assert {"weight", "bias", "lora.down_packed", "lora.up_packed"} <= set(layer.state_dict())


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation must be one of"):
        BinaryAdapter(8, 2, activation="gelu")
    with pytest.raises(ValueError, match="method must be one of"):
        BinaryAdapter(8, 2, method="ternary")
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        BinaryLoRALinear.from_linear(nn.Conv1d(2, 2, 1), r=2)


# -- rank, r's old name: accepted with a DeprecationWarning --------------------------------------
def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_r_is_the_rank(recwarn):
    adapter = BinaryAdapter(8, r=3, out_features=6)
    assert adapter.r == 3 and adapter.down.shape == (3, 8) and adapter.up.shape == (6, 3)
    assert "r=3" in repr(adapter)
    assert BinaryAdapter(8, 3).r == 3
    layer = BinaryLoRALinear.from_linear(nn.Linear(8, 6), r=3)
    assert layer.r == layer.lora.r == 3
    assert BinaryLoRALinear.from_linear(nn.Linear(8, 6), 3).r == 3
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def test_rank_keyword_is_deprecated_and_builds_the_same_layer():
    torch.manual_seed(0)
    new = BinaryAdapter(8, r=3, out_features=6)
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match=r"rank= is deprecated, pass r=") as record:
        old = BinaryAdapter(8, rank=3, out_features=6)
    assert record[0].filename == __file__  # attributed to the caller
    _same_state(old, new)
    torch.manual_seed(1)
    new = BinaryLoRALinear.from_linear(nn.Linear(8, 6), r=3, method="row")
    torch.manual_seed(1)
    lin = nn.Linear(8, 6)
    with pytest.warns(DeprecationWarning, match=r"rank= is deprecated, pass r=") as record:
        old = BinaryLoRALinear.from_linear(lin, rank=3, method="row")
    assert record[0].filename == __file__
    assert old.r == new.r == 3
    _same_state(old, new)


def test_rank_attribute_is_a_deprecated_read_only_alias():
    layer = BinaryLoRALinear.from_linear(nn.Linear(8, 6), 3)
    with pytest.warns(DeprecationWarning, match=r"BinaryAdapter\.rank is deprecated, use \.r"):
        assert layer.lora.rank == layer.lora.r == layer.r == 3
    with pytest.raises(AttributeError, match="rank"):
        layer.lora.rank = 2
    assert not hasattr(BinaryLoRALinear, "rank")  # it never had one: no alias to keep


def test_r_and_rank_together_or_neither_are_refused():
    lin = nn.Linear(8, 6)
    with pytest.raises(TypeError, match=r"got both 'r' and 'rank'"):
        BinaryAdapter(8, 3, rank=3)
    with pytest.raises(TypeError, match=r"got both 'r' and 'rank'"):
        BinaryLoRALinear.from_linear(lin, 3, rank=3)
    with pytest.raises(TypeError, match=r"missing required argument: 'r'"):
        BinaryAdapter(8)
    with pytest.raises(TypeError, match=r"missing required argument: 'r'"):
        BinaryLoRALinear.from_linear(lin)
    assert lin.weight.requires_grad


def test_a_refused_rank_names_the_argument_used():
    lin = nn.Linear(8, 6)
    with pytest.raises(ValueError, match=r"^r must be ≥ 1"):
        BinaryAdapter(8, r=0)
    with pytest.raises(TypeError, match=r"^r must be an int"):
        BinaryLoRALinear.from_linear(lin, r=2.0)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"^rank must be ≥ 1"):
        BinaryAdapter(8, rank=0)
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match=r"^rank must be an int"):
        BinaryLoRALinear.from_linear(lin, rank=2.0)
    assert lin.weight.requires_grad  # refused before the base layer is frozen


@pytest.mark.parametrize("packed", [False, True])
def test_bi_lora_under_autocast_gives_autocast_dtype_packed_or_not(packed):
    # The base's F.linear runs in bf16 under autocast; the branch must give bf16 too (the
    # packed branch's op keeps x's dtype: the layer rounds its fp32 result once), or the sum
    # comes back fp32.
    torch.manual_seed(0)
    layer = BinaryLoRALinear.from_linear(nn.Linear(40, 24), r=4, scale=0.5)
    with torch.no_grad():
        layer.lora.up.normal_()
    if packed:
        layer.pack()
    x = torch.randn(6, 40)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        base = F.linear(x, layer.weight, layer.bias)
        branch = layer.lora(x)
    with torch.no_grad():
        plain_branch = layer.lora(x)
    assert y.dtype == branch.dtype == torch.bfloat16
    assert torch.equal(y, base + branch)
    if packed:  # the fp32 branch rounded once
        assert torch.equal(branch, plain_branch.to(torch.bfloat16))


def _stat_bits(adapter):
    return {name: adapter._buffers[name].detach().view(torch.int32).clone()
            for name in ("down_alpha", "down_mu", "up_alpha", "up_mu")}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("convert", ["to", "method"])
def test_packed_layer_keeps_fp32_alpha_and_mu_through_a_dtype_conversion(dtype, convert):
    # nn.Module.to(dtype) and .half() cast α and μ with the weights; BinaryWeight refused them
    # ("alpha must be a float32 tensor") and the converted layer no longer ran.
    torch.manual_seed(0)
    layer = BinaryLoRALinear.from_linear(nn.Linear(40, 20), r=4, scale=0.5, method="row")
    with torch.no_grad():
        layer.lora.up.normal_()
    layer.pack()
    stats = _stat_bits(layer.lora)
    x = torch.randn(3, 40).to(dtype)
    with torch.no_grad():
        branch = layer.lora(x)  # x in that dtype, before the conversion
        model = nn.Sequential(layer)
        if convert == "to":
            model.to(dtype)
        else:
            model.half() if dtype == torch.float16 else model.bfloat16()
        y = model(x)
    assert layer.weight.dtype == dtype
    for name, before in stats.items():
        assert layer.lora._buffers[name].dtype == torch.float32
        assert torch.equal(layer.lora._buffers[name].view(torch.int32), before)
    assert y.dtype == dtype
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias) + branch)


def test_packed_adapter_after_a_dtype_conversion_moves_devices_and_round_trips():
    torch.manual_seed(0)
    float_adapter = BinaryAdapter(40, 4, 20).to(torch.bfloat16)  # unpacked: weights converted
    assert float_adapter.down.dtype == float_adapter.up.dtype == torch.bfloat16
    assert float_adapter(torch.randn(2, 40, dtype=torch.bfloat16)).dtype == torch.bfloat16
    adapter = BinaryAdapter(40, 4, 20, scale=0.5)
    with torch.no_grad():
        adapter.up.normal_()
    adapter.pack()
    stats = _stat_bits(adapter)
    moved = copy.deepcopy(adapter).to("meta", torch.bfloat16)  # a device move still applies
    assert all(moved._buffers[name].is_meta and moved._buffers[name].dtype == torch.float32
               for name in stats)
    converted = copy.deepcopy(adapter).double()
    assert _stat_bits(converted).keys() == stats.keys()
    assert all(torch.equal(b, stats[name]) for name, b in _stat_bits(converted).items())
    restored = BinaryAdapter(40, 4, 20, scale=0.5).pack()
    restored.load_state_dict(converted.state_dict())
    converted.load_state_dict(adapter.state_dict())
    x = torch.randn(5, 40)
    with torch.no_grad():
        assert torch.equal(restored(x), adapter(x))
        assert torch.equal(converted(x), adapter(x))
