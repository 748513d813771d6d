"""The CPU kernels as a machine without AVX-512 builds them (-march=x86-64-v3: AVX2, FMA, F16C).

vec.h then gives 8-lane vectors instead of 16: other register blocks, token chunks, transposes
and horizontal sums. The machines that run these tests have AVX-512, so the package's own
(-march=native) build never runs that code: this test builds it too and checks each kernel
against float64 within the forward-error bound of tests/tolerance.py, or twice the native
build's error where that is larger (its lanes sum in another order, so the bits differ)."""
import platform
import subprocess

import pytest
import torch

from shira_kernels import _machine, _native
from shira_kernels.harness.cpu_variant import build_cpu_variant
from shira_kernels.formats import BinaryWeight
from shira_kernels.ops import binary as binary_ops

from conftest import DTYPES
from test_binary import binary_abs, binary_k
from test_sparse_delta import delta_linear_bound, make_delta, randn
from tolerance import abs64, assert_within_error_bound

MARCH = "x86-64-v3"
NEEDS = ("avx2", "fma", "f16c", "bmi2")  # what x86-64-v3 code may use


def _why_not() -> str | None:
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"{MARCH} is an x86 target; this is {platform.machine()}"
    flags = _machine.cpu_flags().split()
    missing = [f for f in NEEDS if f not in flags]
    if missing:
        return f"this CPU lacks {missing}, so it cannot run {MARCH} code"
    probe = subprocess.run(["c++", f"-march={MARCH}", "-x", "c++", "-E", "-"], input="",
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"the compiler does not know -march={MARCH}: {probe.stderr.strip()[:200]}"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


@pytest.fixture(scope="module")
def builds():
    avx2 = build_cpu_variant(_native.csrc_dir() / "cpu", march=MARCH)
    return _native.module("cpu"), avx2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# 70: a chunk of 64 and a partial one; 300: a chunk of the fold kernel's 192 and a partial one.
@pytest.mark.parametrize("tokens", [1, 3, 70, 300])
def test_sparse_kernels(builds, dtype, tokens):
    native, avx2 = builds
    delta = make_delta(45, 4097, torch.float32, density=0.05)
    s, values = delta.structure, delta.values
    x, gy = randn(tokens, 4097, dtype=dtype, seed=1), randn(tokens, 45, dtype=dtype, seed=2)
    y, gx = randn(tokens, 45, dtype=dtype, seed=3), randn(tokens, 4097, dtype=dtype, seed=4)
    dense = delta.to_dense().double()

    weight, bias = randn(45, 4097, dtype=dtype, seed=5), randn(45, dtype=dtype, seed=6)
    adapted = weight.double() + 0.5 * dense

    def run(mod):
        g = mod.spmm_t_sddmm(gx.clone(), gy, x, s.t_offsets, s.t_cols, s.t_perm, values, 0.5,
                             False)
        return (mod.spmm(y.clone(), x, s.row_offsets, s.cols, values, 0.5, False),
                mod.sddmm(gy, x, s.rows, s.cols, s.row_offsets), *g,
                mod.folded_linear(x, weight, bias, s.row_offsets, s.cols, None, values, 0.5, False),
                mod.folded_linear(gy, weight, None, s.t_offsets, s.t_cols, s.t_perm, values, 0.5,
                                 True))
    exact = (y.double() + 0.5 * x.double() @ dense.T,
             (gy.double().T @ x.double())[s.rows.long(), s.cols.long()],
             gx.double() + 0.5 * gy.double() @ dense,
             (gy.double().T @ x.double())[s.rows.long(), s.cols.long()],
             x.double() @ adapted.T + bias.double(), gy.double() @ adapted)
    d_abs, entries = dense.abs(), (s.rows.long(), s.cols.long())
    adapted_abs = abs64(weight) + 0.5 * d_abs
    magnitude = (abs64(y) + 0.5 * abs64(x) @ d_abs.T, (abs64(gy).T @ abs64(x))[entries],
                 abs64(gx) + 0.5 * abs64(gy) @ d_abs, (abs64(gy).T @ abs64(x))[entries],
                 abs64(x) @ adapted_abs.T + abs64(bias), abs64(gy) @ adapted_abs)
    # spmm: the sum, the scale, the add to y (gx); sddmm: the sum over the tokens; the fold
    # kernel: delta_linear_bound's steps, with no intermediate stored in the dtype.
    ks = (4097 + 2, tokens, 45 + 2, tokens, delta_linear_bound(4097)[0], delta_linear_bound(45)[0])
    names = ("spmm", "sddmm", "spmm_t_sddmm gx", "spmm_t_sddmm values' gradient",
             "folded_linear", "folded_linear gradient of x")
    for name, ours, theirs, ref, m, k in zip(names, run(avx2), run(native), exact, magnitude, ks):
        assert_within_error_bound(ours, ref, m, k, f"{MARCH} {name}", torch_result=theirs)


@pytest.mark.parametrize("shape", [(1, 100, 45), (7, 33, 4097), (130, 300, 768)])
@pytest.mark.parametrize("scaled", [False, True], ids=["", "scaled"])
def test_binary_kernel(builds, shape, scaled):
    # "scaled": tokens from subnormal to 1e30, one with an outlier feature: the AVX2 build sums
    # in fixed point on a grid set by each token's largest |x| (binary.cpp).
    native, avx2 = builds
    tokens, out_f, in_f = shape
    g = torch.Generator().manual_seed(5)
    bw = BinaryWeight.from_float(torch.randn(out_f, in_f, generator=g), "row")
    x, bias = torch.randn(tokens, in_f, generator=g), torch.randn(out_f, generator=g)
    panels, panels_t = binary_ops._sign_panels(bw.packed), binary_ops._sign_panels_t(bw.packed)
    gy = torch.randn(tokens, out_f, generator=g)
    if scaled:
        scales = torch.tensor([1e30, 1e-30, 1e-39, 0.0, 1.0]).repeat(tokens)[:tokens, None]
        x, gy = x * scales, gy * scales
        x[0, in_f // 2] = 3e4 * x[0].abs().max()
    w = bw.dequantize(torch.float64)
    exact = x.double() @ w.T + bias.double()
    ours, theirs = (mod.binary_linear(x, bw.packed, panels, bw.alpha, bw.mu, bias, 1.0)
                    for mod in (avx2, native))
    magnitude = abs64(x) @ binary_abs(bw).T + abs64(bias)
    assert_within_error_bound(ours, exact, magnitude, binary_k(in_f), f"{MARCH} binary_linear",
                              torch_result=theirs)
    ours, theirs = (mod.binary_linear_grad_x(gy, panels_t, bw.alpha, bw.mu, in_f)
                    for mod in (avx2, native))
    assert_within_error_bound(ours, gy.double() @ w, abs64(gy) @ binary_abs(bw), binary_k(out_f),
                              f"{MARCH} binary_linear_grad_x", torch_result=theirs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_binary_dequantize_is_exact(builds, dtype):
    # Without AVX-512 BW the kernel takes its AVX2 loop (64 of the 77 columns; the rest scalar):
    # the same bits.
    native, avx2 = builds
    bw = BinaryWeight.from_float(torch.randn(9, 77, generator=torch.Generator().manual_seed(6)))
    hi = (bw.mu + bw.alpha).to(dtype).expand(9).contiguous()
    lo = (bw.mu - bw.alpha).to(dtype).expand(9).contiguous()
    for mod in (avx2, native):
        ours = mod.binary_dequantize(bw.packed, hi, lo, 77)
        assert torch.equal(ours.view(torch.uint8), bw.dequantize(dtype).view(torch.uint8))


def test_add_at_indices_is_exact(builds):
    weight = torch.randn(50, 70).to(torch.bfloat16)
    delta = make_delta(50, 70, torch.bfloat16)
    outs = []
    for mod in builds:
        w, saved = weight.clone(), torch.empty_like(delta.values)
        mod.add_at_indices(w, w, delta.flat_indices, delta.values, 0.5, saved)
        outs.append((w, saved))
    assert all(torch.equal(a, b) for a, b in zip(*outs))  # one rounding per entry, no sums
    assert torch.equal(outs[0][1], weight.view(-1)[delta.flat_indices.long()])


# The 1-bit kernels' 16-entry tables of floats (one permute per 16 lanes) are what AVX-512
# builds and builds without AVX2 run; the AVX2 build sums in fixed point instead. On a
# CPU with AVX-512 the native build runs them in every 1-bit test; elsewhere this builds them
# for a target without AVX2 (the scalar lookup of the same tables).
@pytest.fixture(scope="module")
def generic_build():
    return build_cpu_variant(_native.csrc_dir() / "cpu", march="x86-64")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64")
                    or "avx512f" in _machine.cpu_flags().split(),
                    reason="the native build runs the 16-entry tables here (AVX-512)")
@pytest.mark.parametrize("shape", [(1, 100, 45), (9, 130, 4100)])
def test_binary_kernel_16_entry_tables(generic_build, shape):
    tokens, out_f, in_f = shape
    g = torch.Generator().manual_seed(7)
    bw = BinaryWeight.from_float(torch.randn(out_f, in_f, generator=g), "row")
    x, gy = torch.randn(tokens, in_f, generator=g), torch.randn(tokens, out_f, generator=g)
    w = bw.dequantize(torch.float64)
    ours = generic_build.binary_linear(x, bw.packed, binary_ops._sign_panels(bw.packed), bw.alpha,
                                 bw.mu, None, 1.0)
    assert_within_error_bound(ours, x.double() @ w.T, abs64(x) @ binary_abs(bw).T,
                              binary_k(in_f), "x86-64 binary_linear")
    ours = generic_build.binary_linear_grad_x(gy, binary_ops._sign_panels_t(bw.packed), bw.alpha,
                                        bw.mu, in_f)
    assert_within_error_bound(ours, gy.double() @ w, abs64(gy) @ binary_abs(bw),
                              binary_k(out_f), "x86-64 binary_linear_grad_x")
