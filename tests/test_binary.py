"""1-bit weights: the packed format, the quantizers, binary_linear and binary_lora on every
backend against float64, within the forward-error bound of tests/tolerance.py."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import shira_kernels
from shira_kernels.formats import BinaryWeight, pack_signs, unpack_signs
from shira_kernels.ops import registry
from shira_kernels.ops import binary as binary_ops
from shira_kernels.ops.binary import binary_linear, binary_lora
from shira_kernels.quant import PETL_LEVEL, fake_quantize

from conftest import DTYPES, with_threads
from tolerance import abs64, assert_within_error_bound
from unchanged import bits


@pytest.mark.parametrize("width", [1, 31, 32, 33, 4097])
def test_pack_unpack_are_exact_inverses(width):
    g = torch.Generator().manual_seed(width)
    signs = torch.rand(5, width, generator=g) < 0.5
    packed = pack_signs(signs)
    assert packed.dtype == torch.int32 and packed.shape == (5, (width + 31) // 32)
    assert torch.equal(unpack_signs(packed, width), signs)


def test_bit_order_is_lsb_first_and_rows_are_padded_alone():
    signs = torch.zeros(2, 33, dtype=torch.bool)
    signs[0, 0] = signs[0, 31] = signs[0, 32] = True
    signs[1, 1] = True
    packed = pack_signs(signs)
    assert packed[0].tolist() == [1 | -(2**31), 1]  # bit 31 set: a negative int32
    assert packed[1].tolist() == [2, 0]


def test_petl_quantizer_levels():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 3 + 1
    bw = BinaryWeight.from_float(w, "petl")
    mean, std = w.mean(), w.std()
    deq = bw.dequantize()
    assert bw.alpha.shape == (1,) and bw.mu.shape == (1,)
    torch.testing.assert_close(bw.mu, mean.view(1))
    torch.testing.assert_close(bw.alpha, (PETL_LEVEL * std).view(1))
    torch.testing.assert_close(deq, torch.where(w >= mean, mean + PETL_LEVEL * std, mean - PETL_LEVEL * std))
    assert abs(PETL_LEVEL - 0.6744897501960817) < 1e-12
    assert torch.equal(fake_quantize(w, "petl"), deq)


def test_row_quantizer():
    w = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    bw = BinaryWeight.from_float(w, "row")
    mu = w.mean(1)
    torch.testing.assert_close(bw.mu, mu)
    torch.testing.assert_close(bw.alpha, (w - mu[:, None]).abs().mean(1))
    assert torch.equal(fake_quantize(w, "row"), bw.dequantize())


def straight_through_gradient(w: torch.Tensor, g: torch.Tensor, method: str) -> torch.Tensor:
    """fake_quantize's gradient written out: w_q = w + spread·D with D = (code − z) held
    constant, so the gradient is g plus the path through the spread (std or α) and, by the
    centring, the mean."""
    w2 = w.detach().clone().requires_grad_(True)
    if method == "petl":
        mu, spread = w2.mean(), w2.std() + 1e-5
        level = PETL_LEVEL * w2.std() / spread
    else:
        mu = w2.mean(1, keepdim=True)
        alpha = (w2 - mu).abs().mean(1, keepdim=True)
        spread, level = alpha + 1e-5, alpha / (alpha + 1e-5)
    z = (w2 - mu) / spread
    D = (torch.where(w2 - mu >= 0, level, -level) - z).detach()
    ((w2 + spread * D) * g).sum().backward()
    return w2.grad


@pytest.mark.parametrize("method", ["petl", "row"])
def test_straight_through_gradient_reaches_w_through_mean_and_scale(method):
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    g = torch.randn(6, 40, generator=torch.Generator().manual_seed(3))
    (fake_quantize(w, method) * g).sum().backward()
    torch.testing.assert_close(w.grad, straight_through_gradient(w, g, method))
    assert not torch.allclose(w.grad, g)  # the statistics' path is really there


def _outlier_row():
    w = torch.randn(1, 4096, generator=torch.Generator().manual_seed(35))
    w[0, 0] = 1e3
    return w


@pytest.mark.parametrize("method", ["petl", "row"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("make", [lambda: torch.tensor([[3e3, -3e3, 0.0, 1e-42]]), _outlier_row,
                                  lambda: torch.randn(64, 96) * 3 + 1],
                         ids=["tiny mean", "outlier", "randn"])
def test_fake_quantize_is_the_packed_weight_bit_for_bit(method, dtype, make):
    # The forward is what the packed layer runs: the same sign rule, where (w − μ)/spread
    # could round a tiny negative w − μ to −0 and count it +1 (the 0.0 of "tiny mean", whose
    # mean is a subnormal), and μ ± α rounded once, where the straight-through form rounded
    # at |z|'s scale (66 ulps off beside the outlier). The gradient stays the
    # straight-through one (written out in fp32).
    torch.manual_seed(0)
    w = make().to(dtype).requires_grad_(True)
    q = fake_quantize(w, method)
    assert q.dtype == dtype
    assert torch.equal(bits(q), bits(BinaryWeight.from_float(w, method).dequantize(dtype)))
    if dtype == torch.float32:
        g = torch.randn(w.shape, generator=torch.Generator().manual_seed(4))
        (q * g).sum().backward()
        torch.testing.assert_close(w.grad, straight_through_gradient(w, g, method))


def test_binary_weight_checks():
    with pytest.raises(ValueError, match="cannot hold in_features=65"):
        BinaryWeight(torch.zeros(2, 2, dtype=torch.int32), torch.ones(1), torch.zeros(1), 65)
    with pytest.raises(ValueError, match=r"alpha must have shape \(1,\) or \(2,\)"):
        BinaryWeight(torch.zeros(2, 2, dtype=torch.int32), torch.ones(3), torch.zeros(1), 40)
    with pytest.raises(TypeError, match="mu must be a float32 tensor"):
        BinaryWeight(torch.zeros(2, 2, dtype=torch.int32), torch.ones(1), torch.zeros(1).double(), 40)
    with pytest.raises(ValueError, match="method must be one of"):
        BinaryWeight.from_float(torch.randn(3, 3), "ternary")


@pytest.mark.parametrize("call, error, message", [
    (lambda s: BinaryWeight.from_signs(s, "a", 0.0), TypeError, "alpha must be a real number"),
    (lambda s: BinaryWeight.from_signs(s, 1.0, None), TypeError, "mu must be a real number"),
    (lambda s: BinaryWeight.from_signs(s, True, 0.0), TypeError, "alpha .* got bool"),
    (lambda s: BinaryWeight.from_signs(s, torch.ones(3, dtype=torch.complex64), 0.0), TypeError,
     "alpha must be a real number"),
    (lambda s: BinaryWeight.from_signs(s.tolist(), 1.0, 0.0), TypeError,
     "signs must be a 2-D bool tensor, got list"),
    (lambda s: BinaryWeight.from_float([[1.0, 2.0]]), TypeError,
     "weight must be a 2-D floating-point tensor, got list"),
    (lambda s: BinaryWeight.from_float(torch.ones(3, dtype=torch.int32)), ValueError,
     r"weight must be a 2-D floating-point tensor, got torch.int32 of shape \(3,\)"),
    (lambda s: BinaryWeight([[0]], torch.ones(1), torch.zeros(1), 5), TypeError,
     "packed must be a 2-D int32 tensor, got list"),
    (lambda s: BinaryWeight(torch.zeros(1, 1, dtype=torch.int32), [1.0], torch.zeros(1), 5),
     TypeError, "alpha must be a float32 tensor, got list"),
    (lambda s: BinaryWeight.from_signs(s, 1.0, 0.0).to(torch.float16), TypeError,
     "BinaryWeight.to takes a device, got the dtype torch.float16"),
    (lambda s: BinaryWeight.from_signs(s, 1.0, 0.0).to(None), TypeError,
     "device must be a torch.device, str or int, got NoneType"),
    (lambda s: BinaryWeight.from_signs(s, 1.0, 0.0).to("nowhere"), ValueError,
     "device 'nowhere'"),
], ids=["alpha str", "mu None", "alpha bool", "alpha complex", "signs list", "weight list",
        "weight int", "packed list", "alpha list", "to dtype", "to None", "to unknown"])
def test_binary_weight_errors_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.ones(3, 5, dtype=torch.bool))


def _weight(out_f, in_f, method, seed, device="cpu"):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    return BinaryWeight.from_float(w, method).to(device)


def binary_abs(bw: BinaryWeight) -> torch.Tensor:
    """|μ| + |α| [out, in] in float64: the magnitude of μ + α·s, term by term, as the kernels
    sum α·(x·sᵀ) and μ·Σx apart (μ ± α can cancel; the two sums do not)."""
    out_f, in_f = bw.shape
    return (abs64(bw.mu).view(-1, 1) + abs64(bw.alpha).view(-1, 1)).expand(out_f, in_f)


def binary_k(steps: int) -> int:
    """fp32 roundings along a term of one 1-bit product over `steps`: the sum, then α·, μ·
    and their join (or μ ± α rounded to fp32 and the product), and the bias or a scale."""
    return steps + 3


def lora_exact_and_magnitude(x, down, up, scale, relu):
    """scale·up(act(down(x))) in float64, and the same on absolute values (ReLU is the
    identity there); x should require grad for gradients."""
    act = torch.relu if relu else (lambda t: t)
    exact = scale * F.linear(act(F.linear(x, down.dequantize(torch.float64))),
                             up.dequantize(torch.float64))
    x_abs = abs64(x).requires_grad_(x.requires_grad)
    magnitude = abs(scale) * F.linear(F.linear(x_abs, binary_abs(down)), binary_abs(up))
    return exact, magnitude, x_abs


def _x(tokens, in_f, dtype, seed, device="cpu"):
    return torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 9, 768), (1, 5, 4097), (197, 33, 768), (3, 1, 31),
                                   (7, 100, 45)],
                         ids=["T0", "T1-in4097", "T197", "T3-out1", "T7-out100-in45"])
@pytest.mark.parametrize("method", ["petl", "row"])
def test_binary_linear(backend, device, dtype, shape, method):
    tokens, out_f, in_f = shape
    bw = _weight(out_f, in_f, method, seed=tokens, device=device)
    x = _x(tokens, in_f, dtype, seed=1, device=device).requires_grad_(True)
    bias = _x(1, out_f, dtype, seed=3, device=device)[0]
    y = binary_linear(x, bw, bias)
    assert y.shape == (tokens, out_f) and y.dtype == dtype
    w = bw.dequantize()
    theirs = F.linear(x, w.to(dtype), bias)
    exact = F.linear(x.double(), w.double(), bias.double())
    magnitude = abs64(x) @ binary_abs(bw).T + abs64(bias)
    assert_within_error_bound(y, exact, magnitude, binary_k(in_f), "y", torch_result=theirs)
    gy = _x(tokens, out_f, dtype, seed=2, device=device)
    (gx,) = torch.autograd.grad(y, x, gy)
    (gx_torch,) = torch.autograd.grad(theirs, x, gy)
    assert_within_error_bound(gx, gy.double() @ w.double(), abs64(gy) @ binary_abs(bw),
                              binary_k(out_f), "grad x", torch_result=gx_torch)


@pytest.mark.parametrize("in_f", [45, 3000])  # 3000: the AVX2 kernel's sums in 3 chunks
def test_binary_linear_at_any_scale(backend, device, in_f):
    # Each token at its own scale, from subnormal to 1e30, one with a single large feature and
    # one all zero: the AVX2 CPU kernel sums in fixed point on a grid set by each token's
    # largest |x|, which must hold the fp32 bound at every scale (its gradient of x too: the
    # rows of gy at those scales).
    scales = torch.tensor([1.0, 1e30, 1e-30, 1e-39, 0.0, 1.0]).view(-1, 1)
    bw = _weight(70, in_f, "row", seed=in_f, device=device)
    x = (_x(6, in_f, torch.float32, seed=4) * scales)
    x[5, in_f // 2] = 3e4  # one feature far above the others (|x| ~ 1)
    x = x.to(device).requires_grad_(True)
    y = binary_linear(x, bw)
    w = bw.dequantize()
    assert_within_error_bound(y, F.linear(x.double(), w.double()), abs64(x) @ binary_abs(bw).T,
                              binary_k(in_f), "y")
    gy = (_x(6, 70, torch.float32, seed=5) * scales).to(device)
    (gx,) = torch.autograd.grad(y, x, gy)
    assert_within_error_bound(gx, gy.double() @ w.double(), abs64(gy) @ binary_abs(bw),
                              binary_k(70), "grad x")
    # Near fp32's largest value: W = μ + α = 0.5 where s = +1 (α = 2, μ = −1.5; one −3.5 in the
    # second row), so α·(x·sᵀ) and μ·Σx overflow fp32 where y fits (the sums themselves fit).
    signs = torch.ones(2, in_f, dtype=torch.bool)
    signs[1, 0] = False
    top = BinaryWeight.from_signs(signs, 2.0, -1.5).to(device)
    x = (torch.rand(3, in_f, generator=torch.Generator().manual_seed(6)) + 3) * (0.7e38 / in_f)
    x = x.to(device).requires_grad_(True)
    y = binary_linear(x, top)
    w = top.dequantize()
    assert_within_error_bound(y, F.linear(x.double(), w.double()), abs64(x) @ binary_abs(top).T,
                              binary_k(in_f), "y near fp32's largest value")
    gy = torch.full((3, 2), 5e37, device=device)
    (gx,) = torch.autograd.grad(y, x, gy)
    assert_within_error_bound(gx, gy.double() @ w.double(), abs64(gy) @ binary_abs(top),
                              binary_k(2), "grad x near fp32's largest value")


def test_binary_linear_propagates_inf_and_nan(backend, device):
    # A token holding inf or NaN gives non-finite outputs where float64 does, though not
    # always float64's: NaN where α·(x·sᵀ) + μ·Σx meets inf − inf or 0·inf and x·Wᵀ is ±inf
    # (the AVX2 kernel's fixed-point lookups are meaningless for such a token). The other
    # tokens stay within their bound; the gradient alike. μ = 0: μ·Σx would carry the inf or
    # NaN past a lookup that lost it.
    signs = _weight(40, 300, "row", seed=6)
    bw = BinaryWeight(signs.packed, signs.alpha, torch.zeros_like(signs.mu), 300).to(device)
    x = _x(4, 300, torch.float32, seed=7)
    x[1, 17], x[2, 200] = float("inf"), float("nan")
    x = x.to(device).requires_grad_(True)
    y = binary_linear(x, bw)
    w = bw.dequantize(torch.float64)
    exact = F.linear(x.double(), w)
    assert not torch.isfinite(y[1:3]).any() and not torch.isfinite(exact[1:3]).any()
    rows = [0, 3]
    assert_within_error_bound(y[rows], exact[rows], abs64(x[rows]) @ binary_abs(bw).T,
                              binary_k(300), "y of the finite tokens")
    gy = _x(4, 40, torch.float32, seed=8)
    gy[1, 5], gy[2, 30] = float("inf"), float("nan")
    gy = gy.to(device)
    (gx,) = torch.autograd.grad(y, x, gy)
    assert not torch.isfinite(gx[1:3]).any() and not torch.isfinite((gy.double() @ w)[1:3]).any()
    assert_within_error_bound(gx[rows], gy[rows].double() @ w, abs64(gy[rows]) @ binary_abs(bw),
                              binary_k(40), "grad x of the finite tokens")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 9, 768), (1, 5, 4097), (197, 33, 768), (7, 100, 45)],
                         ids=["T0", "T1-in4097", "T197", "T7-out100-in45"])
@pytest.mark.parametrize("blocks", ["one block", "blocks of 16 rows"])
def test_binary_linear_dequantize_strategy(backend, device, dtype, shape, blocks, monkeypatch):
    # The weight rounded once to x's dtype (one rounding of u_dtype along every term), then
    # torch's matmul: within the bound of F.linear on bw.dequantize(dtype), blocked or not.
    if blocks != "one block":
        monkeypatch.setattr(binary_ops, "_DEQUANTIZE_BLOCK_BYTES", 1)  # 16 rows (the least)
    tokens, out_f, in_f = shape
    bw = _weight(out_f, in_f, "row", seed=tokens, device=device)
    x = _x(tokens, in_f, dtype, seed=1, device=device).requires_grad_(True)
    bias = torch.randn(out_f).to(device, dtype)
    y = binary_linear(x, bw, bias, strategy="dequantize")
    assert y.shape == (tokens, out_f) and y.dtype == dtype
    w = bw.dequantize()
    theirs = F.linear(x, bw.dequantize(dtype), bias)
    exact = F.linear(x.double(), w.double(), bias.double())
    magnitude = abs64(x) @ binary_abs(bw).T + abs64(bias)
    assert_within_error_bound(y, exact, magnitude, binary_k(in_f), "y", torch_result=theirs,
                              roundings=1)
    gy = _x(tokens, out_f, dtype, seed=2, device=device)
    (gx,) = torch.autograd.grad(y, x, gy)  # through the 1-bit kernel, as with "lut"
    (gx_lut,) = torch.autograd.grad(binary_linear(x, bw, bias, strategy="lut"), x, gy)
    assert torch.equal(gx, gx_lut)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_f", [1, 31, 32, 33, 77, 4097])
@pytest.mark.parametrize("method", ["petl", "row"])
def test_cpu_dequantize_kernel_equals_dequantize(dtype, in_f, method):
    # The CPU kernel copies μ ± α (rounded once to the dtype) by each sign bit: bit for bit
    # BinaryWeight.dequantize(dtype), the last word's padding bits unused.
    bw = _weight(37, in_f, method, seed=in_f)
    hi = (bw.mu + bw.alpha).to(dtype).expand(37).contiguous()
    lo = (bw.mu - bw.alpha).to(dtype).expand(37).contiguous()
    ours = shira_kernels._native.module("cpu").binary_dequantize(bw.packed, hi, lo, in_f)
    assert ours.dtype == dtype
    assert torch.equal(ours.view(torch.uint8), bw.dequantize(dtype).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", [1, 32])
@pytest.mark.parametrize("tokens", [0, 1, 197])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_binary_lora(backend, device, dtype, rank, tokens, activation):
    down = _weight(rank, 768, "petl", seed=rank, device=device)
    up = _weight(768, rank, "row", seed=rank + 1, device=device)
    x = _x(tokens, 768, dtype, seed=3, device=device).requires_grad_(True)
    y = binary_lora(x, down, up, 0.5, activation)
    assert y.shape == (tokens, 768) and y.dtype == dtype
    act = torch.relu if activation == "relu" else (lambda t: t)

    def dense(x, d, u):
        return 0.5 * F.linear(act(F.linear(x, d)), u)

    theirs = dense(x, down.dequantize(dtype), up.dequantize(dtype))
    x64 = x.detach().double().requires_grad_(True)
    exact, magnitude, x_abs = lora_exact_and_magnitude(x64, down, up, 0.5, activation == "relu")
    # Two chained 1-bit products and the scale; the backward (gy·up, the scale, the ReLU's
    # mask, ·down) runs the same chain in fp32 with no intermediate in x's dtype.
    k = binary_k(768) + binary_k(rank) + 1
    assert_within_error_bound(y, exact, magnitude, k, "y", torch_result=theirs)
    gy = _x(tokens, 768, dtype, seed=4, device=device)
    (gx,) = torch.autograd.grad(y, x, gy)
    (gx_torch,) = torch.autograd.grad(theirs, x, gy)
    (gx_exact,) = torch.autograd.grad(exact, x64, gy.double())
    (gx_magnitude,) = torch.autograd.grad(magnitude, x_abs, abs64(gy))
    assert_within_error_bound(gx, gx_exact, gx_magnitude, k, "grad x", torch_result=gx_torch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [0, 1, 197])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_binary_lora_dequantize_strategy(backend, device, dtype, tokens, activation):
    # The dense adapter in x's dtype: both weights and the intermediate rounded to it (three
    # roundings of u_dtype along a term), within the bound of that same chain in torch.
    down = _weight(32, 768, "petl", seed=32, device=device)
    up = _weight(100, 32, "row", seed=33, device=device)
    x = _x(tokens, 768, dtype, seed=3, device=device).requires_grad_(True)
    y = binary_lora(x, down, up, 0.5, activation, strategy="dequantize")
    assert y.shape == (tokens, 100) and y.dtype == dtype
    act = torch.relu if activation == "relu" else (lambda t: t)
    theirs = 0.5 * F.linear(act(F.linear(x, down.dequantize(dtype))), up.dequantize(dtype))
    x64 = x.detach().double().requires_grad_(True)
    exact, magnitude, _ = lora_exact_and_magnitude(x64, down, up, 0.5, activation == "relu")
    k = binary_k(768) + binary_k(32) + 1
    assert_within_error_bound(y, exact, magnitude, k, "y", torch_result=theirs, roundings=3)
    if backend == "cpu":  # one C++ call making the same torch calls on the same weights
        assert torch.equal(y, theirs)
    gy = _x(tokens, 100, dtype, seed=4, device=device)
    (gx,) = torch.autograd.grad(y, x, gy)  # through the 1-bit kernels, as with "lut"
    lut = binary_lora(x, down, up, 0.5, activation, strategy="lut")
    assert torch.equal(gx, torch.autograd.grad(lut, x, gy)[0])


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_kernel_does_not_depend_on_the_thread_count(threads):
    # Each output is summed by one thread in a fixed order, so the bits are the same however
    # the blocks of outputs and tokens are split.
    reason = shira_kernels.backends.unavailable_reason("cpu", "cpu")
    assert reason is None, f"the cpu backend is unavailable: {reason}"
    bw = _weight(200, 301, "row", seed=8)
    down, up = _weight(32, 301, "petl", seed=9), _weight(200, 32, "row", seed=10)
    x, bias = _x(50, 301, torch.float32, seed=11), torch.randn(200)
    linear, lora = registry.lookup("binary_linear", "cpu"), registry.lookup("binary_lora", "cpu")
    grad_x, gy = registry.lookup("binary_linear_grad_x", "cpu"), _x(50, 200, torch.float32, seed=12)

    def run():
        return (linear(x, bw.packed, bw.alpha, bw.mu, bias, 301),
                grad_x(gy, bw.packed, bw.alpha, bw.mu, 301),
                lora(x, (down.packed, down.alpha, down.mu, 301), (up.packed, up.alpha, up.mu, 32),
                     0.5, True))
    expected, got = with_threads(run, threads)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_leading_dims_and_opcheck(backend, device):
    bw = _weight(6, 40, "row", seed=5, device=device)
    x = torch.randn(2, 3, 40, device=device)
    y = binary_linear(x, bw)
    assert y.shape == (2, 3, 6)
    assert_within_error_bound(y, F.linear(x.double(), bw.dequantize(torch.float64)),
                              abs64(x) @ binary_abs(bw).T, binary_k(40), "y",
                              torch_result=F.linear(x, bw.dequantize()))
    opcheck(torch.ops.shira.binary_linear.default,
            (x.view(6, 40).requires_grad_(), bw.packed, bw.alpha, bw.mu, None, 40))
    opcheck(torch.ops.shira.binary_linear_grad_x.default,
            (torch.randn(5, 6, device=device), bw.packed, bw.alpha, bw.mu, 40))
    down, up = _weight(4, 40, "petl", 6, device), _weight(6, 4, "petl", 7, device)
    opcheck(torch.ops.shira.binary_lora.default,
            (x.view(6, 40).requires_grad_(), down.packed, down.alpha, down.mu, 40, up.packed,
             up.alpha, up.mu, 4, 0.5, True))


def test_eager_path_equals_the_op(backend, device):
    # Eager calls run an autograd.Function over the op's implementation (ops/_eager.py).
    bw, bias = _weight(6, 40, "row", seed=5, device=device), torch.randn(6, device=device)
    down, up = _weight(4, 40, "petl", 6, device), _weight(6, 4, "petl", 7, device)
    x = torch.randn(5, 40, device=device, requires_grad=True)
    gy = torch.randn(5, 6, device=device)
    pairs = [(binary_linear(x, bw, bias),
              torch.ops.shira.binary_linear(x, bw.packed, bw.alpha, bw.mu, bias, 40)),
             (binary_lora(x, down, up, 0.5, "relu"),
              torch.ops.shira.binary_lora(x, down.packed, down.alpha, down.mu, 40, up.packed,
                                          up.alpha, up.mu, 4, 0.5, True))]
    for eager, op in pairs:
        assert eager.grad_fn.name().startswith("_EagerBinary")  # 2-D x: no reshape, no view
        assert torch.equal(eager, op)
        assert torch.equal(*(torch.autograd.grad(y, x, gy)[0] for y in (eager, op)))


def test_bad_inputs():
    bw = _weight(6, 40, "row", seed=5)
    with pytest.raises(ValueError, match="last dim must be bw's in_features = 40"):
        binary_linear(torch.randn(3, 41), bw)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        binary_linear(torch.zeros(3, 40, dtype=torch.int64), bw)
    with pytest.raises(ValueError, match="strategy must be one of .*'gemm'"):
        binary_linear(torch.randn(3, 40), bw, strategy="gemm")
    down, up = _weight(4, 40, "petl", 6), _weight(6, 4, "petl", 7)
    with pytest.raises(ValueError, match="strategy must be one of .*'gemm'"):
        binary_lora(torch.randn(3, 40), down, up, strategy="gemm")
    with pytest.raises(TypeError, match="bw must be a BinaryWeight"):
        binary_linear(torch.randn(3, 40), bw.dequantize())
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(6,\)"):
        binary_linear(torch.randn(3, 40), bw, torch.zeros(5))
    down, up = _weight(4, 40, "petl", 6), _weight(6, 5, "petl", 7)
    with pytest.raises(ValueError, match="up has in_features 5 but down has 4 outputs"):
        binary_lora(torch.randn(2, 40), down, up)
    with pytest.raises(ValueError, match="activation must be one of"):
        binary_lora(torch.randn(2, 40), down, _weight(6, 4, "petl", 7), activation="gelu")
