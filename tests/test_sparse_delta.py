"""Sparse-delta matmul and its parts, every backend against the reference. Each result is
checked against float64 with the forward-error bound of tests/tolerance.py (γ_K·M for the op's
reduction lengths K and magnitude M, or twice torch's own error where that is larger)."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import shira_kernels
from shira_kernels import _native
from shira_kernels.formats import SparseDelta
from shira_kernels.ops import registry
from shira_kernels.ops import sparse_delta as sd

from conftest import DTYPES, with_threads
from tolerance import abs64, assert_within_error_bound

# (tokens, out, in): odd sizes, 0 and 1 token, a wide layer, a long sequence.
# in 40000: a wide layer (columns past int16). The CPU kernels work on token chunks of
# 128 and column blocks of 1024 (at 128 tokens): T130-in4097 crosses both with partial ends.
# spmm of few tokens takes chunks whose whole tile fits L2 instead, by groups of 16 rows:
# T30-in4097 is two such chunks in fp32 (16 tokens each), one in fp16 and bf16; out 37 ends in
# partial groups.
# The fold kernel's panels are 64 outputs (out 131: two and a partial one; in 65 and 4097 for
# the gradient of x), 256 steps (in 4097) and chunks of 192 tokens (T2049).
SHAPES = [(0, 5, 7), (1, 3, 4097), (3, 33, 65), (2049, 17, 33), (5, 4, 40000), (130, 6, 4097),
          (30, 37, 4097), (7, 131, 50)]
SHAPE_IDS = ["T0", "T1-in4097", "T3", "T2049", "T5-in40000", "T130-in4097", "T30-in4097",
             "T7-out131"]


def delta_linear_bound(steps: int) -> tuple[int, int]:
    """(k, roundings) of x·(W + scale·S)ᵀ + b (or gy·(W + scale·S)) summed over `steps`, for
    every strategy: along any term at most steps + 3 fp32 roundings (scale·S and its add to W,
    the products and sum, the bias or the join of S's separate sum) and two intermediates
    stored in the working dtype (the merged weight or spmm's dense product, and torch's addmm
    product before its bias)."""
    return steps + 3, 2


def make_delta(out_f, in_f, dtype, density=0.2, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out_f, in_f, generator=g) < density
    mask[0, 0] = True
    values = torch.randn(out_f, in_f, generator=g).to(dtype)
    return SparseDelta.from_mask(mask, values).to(device)


def randn(*shape, dtype, seed, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def skip_wide_spmm_t_in_the_interpreter(backend, device, shape):
    # Triton's interpreter runs programs one by one: spmm_t's one program per input feature
    # takes about a minute for in 40000, and T130-in4097 (there for the CPU kernels' tiles)
    # half a minute per case. These kernels are still compiled for sm_80/sm_90 by
    # test_triton_compile.py and run compiled by the cuda-triton cases on a GPU.
    tokens, _, in_f = shape
    if backend == "triton" and device.type == "cpu" and (in_f > 32767 or tokens * in_f > 10**5):
        pytest.skip("spmm_t over this many inputs and tokens is too slow in Triton's interpreter")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_spmm_and_spmm_t(backend, device, dtype, shape):
    tokens, out_f, in_f = shape
    skip_wide_spmm_t_in_the_interpreter(backend, device, shape)
    delta = make_delta(out_f, in_f, dtype, device=device)
    x, y = randn(tokens, in_f, dtype=dtype, seed=1, device=device), randn(tokens, out_f, dtype=dtype, seed=2, device=device)
    dense = delta.to_dense()
    # K: the products and their sum, the scale, the add to y (gx).
    exact = y.double() + 0.5 * x.double() @ dense.double().T
    magnitude = abs64(y) + 0.5 * abs64(x) @ abs64(dense).T
    assert_within_error_bound(shira_kernels.spmm(y, x, delta, 0.5), exact, magnitude, in_f + 2,
                              "spmm", torch_result=y + 0.5 * (x @ dense.T))
    gy, gx = randn(tokens, out_f, dtype=dtype, seed=3, device=device), randn(tokens, in_f, dtype=dtype, seed=4, device=device)
    exact = gx.double() + 2.0 * gy.double() @ dense.double()
    magnitude = abs64(gx) + 2.0 * abs64(gy) @ abs64(dense)
    assert_within_error_bound(shira_kernels.spmm_t(gx, gy, delta, 2.0), exact, magnitude,
                              out_f + 2, "spmm_t", torch_result=gx + 2.0 * (gy @ dense))


def test_spmm_kernel_may_overwrite_y(backend, device):
    # The composite ops hand spmm a y they no longer need (F.linear's output, gy·W): the cpu
    # and triton kernels write the result there, so no second activation-sized tensor exists.
    delta = make_delta(6, 10, torch.float32, device=device)
    x, y = randn(7, 10, dtype=torch.float32, seed=1, device=device), randn(7, 6, dtype=torch.float32, seed=2, device=device)
    s = delta.structure
    spmm = registry.lookup("spmm", backend)
    expected = spmm(y, x, s.row_offsets, s.cols, delta.values, 0.5)
    assert not torch.equal(expected, y)
    out = spmm(y, x, s.row_offsets, s.cols, delta.values, 0.5, overwrite_y=True)
    assert torch.equal(out, expected)
    if backend in ("cpu", "triton"):
        assert out.data_ptr() == y.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_sddmm(backend, device, dtype, shape):
    tokens, out_f, in_f = shape
    delta = make_delta(out_f, in_f, dtype, device=device)
    gy, x = randn(tokens, out_f, dtype=dtype, seed=5, device=device), randn(tokens, in_f, dtype=dtype, seed=6, device=device)
    g = shira_kernels.sddmm(gy, x, delta)
    assert g.dtype == torch.float32 and g.shape == (delta.nnz,)
    s = delta.structure
    rows, cols = s.rows.long(), s.cols.long()
    exact = (gy.double().T @ x.double())[rows, cols]
    magnitude = (abs64(gy).T @ abs64(x))[rows, cols]
    assert_within_error_bound(g, exact, magnitude, tokens, "sddmm",
                              torch_result=(gy.T @ x)[rows, cols])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_spmm_t_sddmm(backend, device, dtype, shape):
    # The spmm strategy's backward: gx + scale·gy·S and S's value gradient (one pass on cpu).
    skip_wide_spmm_t_in_the_interpreter(backend, device, shape)
    tokens, out_f, in_f = shape
    delta = make_delta(out_f, in_f, dtype, device=device)
    s = delta.structure
    struct = (s.rows, s.cols, s.row_offsets, s.t_offsets, s.t_cols, s.t_perm)
    gy, x = randn(tokens, out_f, dtype=dtype, seed=5, device=device), randn(tokens, in_f, dtype=dtype, seed=6, device=device)
    gx0 = randn(tokens, in_f, dtype=dtype, seed=7, device=device)
    gx, g = registry.lookup("spmm_t_sddmm", backend)(gx0.clone(), gy, x, delta.values, struct, 2.0)
    dense = delta.to_dense()
    exact = gx0.double() + 2.0 * gy.double() @ dense.double()
    magnitude = abs64(gx0) + 2.0 * abs64(gy) @ abs64(dense)
    assert_within_error_bound(gx, exact, magnitude, out_f + 2, "gx",
                              torch_result=gx0 + 2.0 * (gy @ dense))
    rows, cols = s.rows.long(), s.cols.long()
    assert g.dtype == torch.float32 and g.shape == (delta.nnz,)
    exact = (gy.double().T @ x.double())[rows, cols]
    magnitude = (abs64(gy).T @ abs64(x))[rows, cols]
    assert_within_error_bound(g, exact, magnitude, tokens, "sddmm",
                              torch_result=(gy.T @ x)[rows, cols])


def _cpu_kernels():
    reason = shira_kernels.backends.unavailable_reason("cpu", "cpu")
    assert reason is None, f"the cpu backend is unavailable: {reason}"
    return {op: registry.lookup(op, "cpu") for op in ("spmm", "sddmm", "spmm_t_sddmm")}


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype, tokens, in_f", [(torch.float32, 300, 4097),
                                                 (torch.float32, 1, 4097),
                                                 (torch.bfloat16, 150, 1000),
                                                 (torch.float16, 150, 1000)], ids=str)
def test_cpu_kernels_do_not_depend_on_the_thread_count(threads, dtype, tokens, in_f):
    # Each row's (spmm), entry's (sddmm) and column's (spmm_t_sddmm) sum is formed by one thread
    # in a fixed order, so the bits are the same however the work is split. 16-bit spmm at 150
    # tokens: one thread splits them between the threads (all of them its own), three split S's
    # rows (too few tokens for each): both sum a row's entries in the same order.
    kernels = _cpu_kernels()
    delta = make_delta(45, in_f, dtype, density=0.05)
    s = delta.structure
    struct = (s.rows, s.cols, s.row_offsets, s.t_offsets, s.t_cols, s.t_perm)
    x, gy = randn(tokens, in_f, dtype=dtype, seed=1), randn(tokens, 45, dtype=dtype, seed=2)
    y, gx = randn(tokens, 45, dtype=dtype, seed=3), randn(tokens, in_f, dtype=dtype, seed=4)

    def run():
        return (kernels["spmm"](y, x, s.row_offsets, s.cols, delta.values, 0.5),
                kernels["sddmm"](gy, x, s.rows, s.cols),
                kernels["sddmm"](gy, x, s.rows, s.cols, s.row_offsets),  # offsets given, not derived
                *kernels["spmm_t_sddmm"](gx.clone(), gy, x, delta.values, struct, 0.5))
    expected, got = with_threads(run, threads)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert torch.equal(got[1], got[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpu_kernels_sum_a_token_alike_whatever_the_token_count(dtype):
    # A token's row of spmm (y) and of spmm_t_sddmm (gx) is summed entry by entry in one order
    # from 2 tokens up (1 token takes spmm's one-token path), whatever the chunk's length in
    # vectors: multi_delta_linear relies on it. (GCC's tuning for AMD Zen had left the 1-vector
    # instance of spmm's sums unfused on AVX2: 2-8 tokens gave other bits than 9 and more.)
    kernels = _cpu_kernels()
    tokens, out_f, in_f = 40, 45, 300
    delta = make_delta(out_f, in_f, dtype, density=0.1)
    s = delta.structure
    struct = (s.rows, s.cols, s.row_offsets, s.t_offsets, s.t_cols, s.t_perm)
    x, gy = randn(tokens, in_f, dtype=dtype, seed=1), randn(tokens, out_f, dtype=dtype, seed=2)
    y, gx = randn(tokens, out_f, dtype=dtype, seed=3), randn(tokens, in_f, dtype=dtype, seed=4)
    y_all = kernels["spmm"](y, x, s.row_offsets, s.cols, delta.values, 0.5)
    gx_all = kernels["spmm_t_sddmm"](gx.clone(), gy, x, delta.values, struct, 0.5)[0]
    for n in range(2, tokens):
        assert torch.equal(kernels["spmm"](y[:n], x[:n], s.row_offsets, s.cols, delta.values,
                                           0.5), y_all[:n]), n
        gx_n = kernels["spmm_t_sddmm"](gx[:n].clone(), gy[:n], x[:n], delta.values, struct, 0.5)[0]
        assert torch.equal(gx_n, gx_all[:n]), n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 37, 300])
def test_cpu_kernels_read_values_in_either_dtype_alike(dtype, tokens):
    # The kernels read S's values as they are where they share x's dtype, else as fp32: the
    # same numbers either way, so the same bits; except spmm's with bf16 values and rows where
    # the build has AVX512-BF16: two entries at a time by vdpbf16ps, exact products as fp32's
    # FMAs but summed in another order, so within the rounding of that sum.
    kernels = _cpu_kernels()
    delta = make_delta(45, 1000, dtype, density=0.05)
    s = delta.structure
    struct = (s.rows, s.cols, s.row_offsets, s.t_offsets, s.t_cols, s.t_perm)
    x, gy = randn(tokens, 1000, dtype=dtype, seed=1), randn(tokens, 45, dtype=dtype, seed=2)
    y, gx = randn(tokens, 45, dtype=dtype, seed=3), randn(tokens, 1000, dtype=dtype, seed=4)
    for values in (delta.values, delta.values.float()):
        got = (kernels["spmm"](y, x, s.row_offsets, s.cols, values, 0.7),
               *kernels["spmm_t_sddmm"](gx.clone(), gy, x, values, struct, 0.7))
        if values.dtype == dtype:
            first = got
    paired = dtype == torch.bfloat16 and _native.module("cpu").bf16_dot_products()
    for i, (a, b) in enumerate(zip(got, first)):
        if i == 0 and paired:  # spmm, both within its bound (K as test_spmm_and_spmm_t's)
            dense = delta.to_dense()
            exact = y.double() + 0.7 * x.double() @ dense.double().T
            magnitude = abs64(y) + 0.7 * abs64(x) @ abs64(dense).T
            for result in (a, b):
                assert_within_error_bound(result, exact, magnitude, 1000 + 2, "spmm")
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 37])
def test_cpu_kernels_take_int16_columns_alike(dtype, tokens):
    # The bindings take S's columns as int16 or int32 (the kernels are instantiated for both;
    # the one-token spmm gathers x by them a vector at a time): the same entries, so the same
    # bits. Rows of ~100 entries run the vector pairs, a single vector and the scalar tail.
    kernels = _cpu_kernels()
    delta = make_delta(45, 1000, dtype, density=0.1)
    s = delta.structure
    cols16 = s.cols.to(torch.int16)
    x, gy = randn(tokens, 1000, dtype=dtype, seed=1), randn(tokens, 45, dtype=dtype, seed=2)
    y = randn(tokens, 45, dtype=dtype, seed=3)
    assert torch.equal(kernels["spmm"](y, x, s.row_offsets, cols16, delta.values, 0.5),
                       kernels["spmm"](y, x, s.row_offsets, s.cols, delta.values, 0.5))
    assert torch.equal(kernels["sddmm"](gy, x, s.rows, cols16),
                       kernels["sddmm"](gy, x, s.rows, s.cols))


def test_cpu_kernels_reject_offsets_that_do_not_match_the_entries():
    # The native kernels trust the offsets to index the entries: a mismatch must be an error
    # before anything is read or written, not an out-of-bounds walk.
    kernels = _cpu_kernels()
    delta = make_delta(6, 10, torch.float32)
    s = delta.structure
    x, gy, gx = randn(4, 10, dtype=torch.float32, seed=1), randn(4, 6, dtype=torch.float32, seed=2), randn(4, 10, dtype=torch.float32, seed=3)
    short = s.row_offsets.clone()
    short[-1] -= 1
    with pytest.raises(RuntimeError, match="offsets must be contiguous int64"):
        kernels["sddmm"](gy, x, s.rows, s.cols, short)
    with pytest.raises(RuntimeError, match="row offsets must end at the number of entries"):
        kernels["spmm"](gy, x, short, s.cols, delta.values, 1.0)
    t_short = s.t_offsets.clone()
    t_short[-1] -= 1
    before = gx.clone()
    struct = (s.rows, s.cols, s.row_offsets, t_short, s.t_cols, s.t_perm)
    with pytest.raises(RuntimeError, match="row offsets must end at the number of entries"):
        kernels["spmm_t_sddmm"](gx, gy, x, delta.values, struct, 1.0)
    assert torch.equal(gx, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_delta(backend, device, dtype):
    delta = make_delta(37, 4097, dtype, density=0.05, device=device)
    weight = randn(37, 4097, dtype=dtype, seed=7, device=device)
    before = weight.clone()
    out = shira_kernels.add_delta(weight, delta, 0.25)
    assert torch.equal(weight, before)
    dense = delta.to_dense()
    exact = weight.double() + 0.25 * dense.double()
    # K = 2: the scale and the add, in fp32; then the one rounding to the dtype.
    assert_within_error_bound(out, exact, abs64(weight) + 0.25 * abs64(dense), 2, "add_delta",
                              torch_result=weight + 0.25 * dense)
    untouched = dense == 0
    assert torch.equal(out[untouched], weight[untouched])
    buffer = torch.full_like(weight, float("nan"))
    assert shira_kernels.add_delta(weight, delta, 0.25, out=buffer) is buffer
    assert torch.equal(buffer, out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_add_delta_rounds_to_nearest(backend, device, dtype):
    # The sum in fp32, then one rounding to nearest: wherever the exact sum is not within
    # fp32's error of a rounding midpoint, that is the exact sum rounded. (Triton's interpreter
    # truncates to bf16 unless the kernels round by hand: triton/_rounding.py.)
    delta = make_delta(64, 513, dtype, density=0.5, device=device)
    weight = randn(64, 513, dtype=dtype, seed=11, device=device)
    out = shira_kernels.add_delta(weight, delta, 0.3)
    dense = delta.to_dense().double()
    exact = weight.double() + 0.3 * dense
    # fp32's error: the scale, its product and the sum, each within half an fp32 ulp.
    margin = 4 * torch.finfo(torch.float32).eps / 2 * (abs64(weight) + 0.3 * dense.abs())
    clear = (exact + margin).to(dtype) == (exact - margin).to(dtype)
    assert clear.double().mean() > 0.9  # a tie is left out: exact sums of 2 values can be one
    assert torch.equal(out[clear], exact.to(dtype)[clear])


def test_old_names_are_deprecated_aliases():
    x, weight, bias, delta, _ = _linear_case((3, 6, 10), torch.float32)
    x, weight = x.detach(), weight.detach()
    new = shira_kernels.add_delta(weight, delta, 0.5)
    for csr_add in (shira_kernels.csr_add, shira_kernels.ops.csr_add, sd.csr_add):
        with pytest.warns(DeprecationWarning, match="add_delta"):
            assert torch.equal(csr_add(weight, delta, 0.5), new)
    parts = (weight.shape, delta.values, delta.flat_indices, delta.structure, 0.5, "spmm")
    new = sd.sparse_delta_linear_unpacked(x, weight, bias, *parts)
    with pytest.warns(DeprecationWarning, match="sparse_delta_linear_unpacked"):
        assert torch.equal(sd.linear_of_parts(x, weight, bias, *parts), new)


def _linear_case(shape, dtype, bias=True, weight_grad=False, seed=0, device="cpu"):
    tokens, out_f, in_f = shape
    delta = make_delta(out_f, in_f, dtype, seed=seed, device=device)
    values = delta.values.clone().requires_grad_(True)
    weight = randn(out_f, in_f, dtype=dtype, seed=seed + 1, device=device).requires_grad_(weight_grad)
    b = randn(out_f, dtype=dtype, seed=seed + 2, device=device).requires_grad_(True) if bias else None
    x = randn(2, tokens, in_f, dtype=dtype, seed=seed + 3, device=device).requires_grad_(True)
    gy = randn(2, tokens, out_f, dtype=dtype, seed=seed + 4, device=device)
    return x, weight, b, delta.with_values(values), gy


def _grads(y, gy, tensors):
    return torch.autograd.grad(y, tensors, gy, allow_unused=True)


@pytest.mark.parametrize("strategy", ["fold", "spmm", "swap", "merge"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_sparse_delta_linear_and_gradients(backend, device, dtype, shape, strategy):
    if strategy in ("spmm", "fold"):  # their backward runs spmm_t (composed "fold" too)
        skip_wide_spmm_t_in_the_interpreter(backend, device, shape)
    x, weight, bias, delta, gy = _linear_case(shape, dtype, weight_grad=(strategy != "spmm"),
                                              device=device)
    base = weight.detach().clone()
    inputs = [x, delta.values, bias] + ([weight] if weight.requires_grad else [])
    y = shira_kernels.sparse_delta_linear(x, weight, bias, delta, 0.5, strategy=strategy)
    assert y.shape == (*x.shape[:-1], weight.shape[0]) and y.dtype == dtype
    ours = [y] + list(_grads(y, gy, inputs))
    # torch's own result in this dtype (the clone-and-add formulation), and the exact one.
    ref = sd.sparse_delta_linear_reference(x, weight, bias, delta, 0.5)
    theirs = [ref] + list(_grads(ref, gy, inputs))
    as64 = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, weight, bias, delta.values)]
    x64, w64, b64, v64 = as64
    d64 = delta.with_values(v64)
    ref64 = sd.sparse_delta_linear_reference(x64, w64, b64, d64, 0.5)
    inputs64 = [x64, v64, b64] + ([w64] if weight.requires_grad else [])
    exact = [ref64] + list(_grads(ref64, gy.double(), inputs64))
    # The magnitudes: the same formula and gradients on the absolute values.
    abs_in = [abs64(t).requires_grad_(t.requires_grad) for t in (x, weight, bias, delta.values)]
    ref_abs = sd.sparse_delta_linear_reference(abs_in[0], abs_in[1], abs_in[2],
                                               delta.with_values(abs_in[3]), 0.5)
    magnitude = [ref_abs] + list(_grads(ref_abs, abs64(gy), [abs_in[0], abs_in[3], abs_in[2]]
                                        + ([abs_in[1]] if weight.requires_grad else [])))
    tokens, out_f, in_f = shape
    t2 = 2 * tokens  # x is [2, tokens, in]
    # y, grad x: delta_linear_bound; the values' gradient: sddmm's fp32 sum over the tokens
    # and the scale; the bias's and weight's: a sum over the tokens.
    bounds = [delta_linear_bound(in_f), delta_linear_bound(out_f), (t2 + 1, 0), (t2, 0), (t2, 0)]
    for name, o, t, e, m, (k, n) in zip(["y", "grad x", "grad values", "grad bias", "grad weight"],
                                        ours, theirs, exact, magnitude, bounds):
        assert_within_error_bound(o, e, m, k, name, torch_result=t, roundings=n)
    assert torch.equal(weight.detach(), base)  # "swap" restores W bit for bit


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fold_forward_at_each_few_token_count(dtype):
    # The CPU kernel's forward takes a row-by-row path for a few tokens (one instantiation per
    # count) and packed panels above: each count, with a tail of steps past the vectors.
    for tokens in range(1, 7):
        x, weight, bias, delta, _ = _linear_case((tokens, 37, 1000 + 3), dtype)
        x = x[0].detach()
        with torch.no_grad():
            y = shira_kernels.sparse_delta_linear(x, weight, bias, delta, 0.5, strategy="fold")
            ref = sd.sparse_delta_linear_reference(x, weight, bias, delta, 0.5)
            exact = sd.sparse_delta_linear_reference(
                x.double(), weight.double(), bias.double(),
                delta.with_values(delta.values.double()), 0.5)
            magnitude = sd.sparse_delta_linear_reference(
                abs64(x), abs64(weight), abs64(bias), delta.with_values(abs64(delta.values)), 0.5)
        k, n = delta_linear_bound(x.shape[1])
        assert_within_error_bound(y, exact, magnitude, k, f"{tokens} tokens", torch_result=ref,
                                  roundings=n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fold_at_its_token_chunk_boundaries(dtype):
    # The CPU fold kernel packs W once per chunk of tokens: one chunk up to 576 tokens, above
    # that chunks of 192 (fp32 and fp16 activations) or 576 (bf16 pair panels); each count on
    # either side of a boundary, forward and gradient of x (65 outputs: a panel and one line).
    for tokens in (192, 193, 576, 577):
        x, weight, bias, delta, gy = _linear_case((tokens, 65, 37), dtype)
        x, gy, delta = x[0], gy[0], delta.with_values(delta.values.detach())
        y = shira_kernels.sparse_delta_linear(x, weight, bias, delta, 0.5, strategy="fold")
        (gx,) = torch.autograd.grad(y, [x], gy)
        x64, gy64, w64, b64 = x.detach().double(), gy.double(), weight.double(), bias.detach().double()
        d64 = delta.with_values(delta.values.double())
        exact = sd.sparse_delta_linear_reference(x64.requires_grad_(True), w64, b64, d64, 0.5)
        (exact_gx,) = torch.autograd.grad(exact, [x64], gy64)
        a64 = abs64(x).requires_grad_(True)
        magnitude = sd.sparse_delta_linear_reference(a64, abs64(weight), abs64(bias),
                                                     delta.with_values(abs64(delta.values)), 0.5)
        (magnitude_gx,) = torch.autograd.grad(magnitude, [a64], abs64(gy))
        for name, ours, e, m, steps in (("y", y, exact, magnitude, 37),
                                        ("grad x", gx, exact_gx, magnitude_gx, 65)):
            k, n = delta_linear_bound(steps)
            assert_within_error_bound(ours, e, m, k, f"{name}, {tokens} tokens", roundings=n)


@pytest.mark.parametrize("strategy", ["fold", "spmm", "swap", "merge"])
def test_eager_path_equals_the_op(backend, device, strategy):
    # Eager calls skip torch.library's dispatch (an autograd.Function over the same forward and
    # backward); the op is what torch.compile and autocast run. Same bits either way.
    x, weight, bias, delta, gy = _linear_case((7, 6, 10), torch.float32, weight_grad=True,
                                              device=device)
    inputs = [x, weight, bias, delta.values]
    y = shira_kernels.sparse_delta_linear(x, weight, bias, delta, 0.5, strategy=strategy)
    assert y.grad_fn.next_functions[0][0].name() == "_EagerLinearBackward"  # under the view
    s = delta.structure
    y_op = torch.ops.shira.sparse_delta_linear(
        x.reshape(-1, 10), weight, bias, delta.values, delta.flat_indices, s.row_offsets, s.cols,
        s.rows, s.t_offsets, s.t_cols, s.t_perm, 0.5, strategy).view(y.shape)
    assert torch.equal(y, y_op)
    for ours, theirs in zip(_grads(y, gy, inputs), _grads(y_op, gy, inputs)):
        assert torch.equal(ours, theirs)


def test_gradient_of_weight_only_when_asked(backend, device):
    x, weight, bias, delta, gy = _linear_case((4, 6, 10), torch.float32, device=device)
    y = shira_kernels.sparse_delta_linear(x, weight, bias, delta)
    y.backward(gy)
    assert weight.grad is None and delta.values.grad is not None and x.grad is not None


def test_auto_strategy_switches_at_the_measured_token_counts():
    # CPU: the fold kernel at the counts of FOLD_TOKENS in calls without a backward, of
    # FOLD_TRAINING_TOKENS in calls that record one; elsewhere spmm below SWAP_FROM_TOKENS,
    # swap from there. Checked by the bits of the result, which differ between strategies
    # (their sums run in other orders).
    swap_from = sd.SWAP_FROM_TOKENS["cuda"]
    for training in (False, True):
        assert [sd.auto_strategy("cuda", torch.float16, t, training)
                for t in (1, swap_from - 1, swap_from)] == ["spmm", "spmm", "swap"]
    for training, table in ((False, sd.FOLD_TOKENS), (True, sd.FOLD_TRAINING_TOKENS)):
        for dtype in DTYPES:
            first, last = table["cpu"].get(dtype, (None, None))
            swap_from = sd.SWAP_FROM_TOKENS["cpu"][dtype]
            counts = sorted({1, 2, 3, 4, 5, 9, swap_from - 1, swap_from}
                            | ({first - 1, first} if first else set())
                            | ({last, last + 1} if last else set()))
            for tokens in counts:
                if tokens == 0:
                    continue
                folds = first is not None and first <= tokens and (last is None or tokens <= last)
                expected = "fold" if folds else "swap" if tokens >= swap_from else "spmm"
                assert sd.auto_strategy("cpu", dtype, tokens, training) == expected
                if tokens > 40:
                    continue  # the rule is checked; the bits at a few counts suffice
                _, weight, bias, delta, _ = _linear_case((1, 40, 300), dtype)
                x = torch.randn(tokens, 300, dtype=dtype)
                with torch.set_grad_enabled(training):  # delta.values requires grad
                    runs = {s: shira_kernels.sparse_delta_linear(x, weight, bias, delta,
                                                                 strategy=s).detach()
                            for s in ("auto", "fold", "spmm")}
                assert not torch.equal(runs["fold"], runs["spmm"]), (dtype, tokens)
                assert torch.equal(runs["auto"], runs[expected]), (dtype, tokens, training)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_runs_in_the_autocast_dtype(backend, device, dtype):
    # Whichever 16-bit dtype autocast is given, as F.linear (a rule fixed per device ran CPU
    # fp16 autocast in bf16 and GPU bf16 autocast in fp16).
    x, weight, bias, delta, _ = _linear_case((5, 6, 10), torch.float32, device=device)
    with torch.autocast(device.type, dtype=dtype):
        y = shira_kernels.sparse_delta_linear(x, weight, bias, delta)
        assert F.linear(x, weight, bias).dtype == dtype
    assert y.dtype == dtype
    exact = x.double() @ (weight.double() + delta.to_dense().double()).T + bias.double()
    magnitude = abs64(x) @ (abs64(weight) + abs64(delta.to_dense())).T + abs64(bias)
    # x, W and S rounded to dtype on the way in: one rounding each along every term.
    assert_within_error_bound(y, exact, magnitude, 10 + 3, "autocast", roundings=2)
    y.float().sum().backward()
    assert delta.values.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_torch_compile_fullgraph_traces_the_module():
    x, weight, bias, delta, gy = _linear_case((3, 6, 10), torch.float32)
    delta.structure  # derived eagerly, as ShiraLinear keeps it in buffers

    def f(x, values):
        return shira_kernels.sparse_delta_linear(x, weight, bias, delta.with_values(values))

    expected = f(x, delta.values)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    y = compiled(x, delta.values)
    torch.testing.assert_close(y, expected)
    y.backward(gy)
    assert delta.values.grad is not None


def test_opcheck_every_op(backend, device):
    x, weight, bias, delta, _ = _linear_case((3, 6, 10), torch.float32, device=device)
    s = delta.structure
    values = delta.values.detach()
    x2 = x.detach().reshape(-1, 10)
    y = torch.randn(x2.shape[0], 6, device=device)
    opcheck(torch.ops.shira.spmm.default, (y, x2, s.row_offsets, s.cols, values, 0.5))
    opcheck(torch.ops.shira.sddmm.default, (y, x2, s.rows, s.cols))
    opcheck(torch.ops.shira.add_delta.default, (weight, delta.flat_indices, values, 0.5, torch.empty_like(weight)))
    struct = (delta.flat_indices, s.row_offsets, s.cols, s.rows, s.t_offsets, s.t_cols, s.t_perm)
    for strategy in ("fold", "spmm", "swap", "merge"):
        opcheck(torch.ops.shira.sparse_delta_linear.default,
                (x2.requires_grad_(), weight, bias, delta.values, *struct, 0.5, strategy))


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument.
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    x, weight, bias, delta, _ = _linear_case((3, 6, 10), torch.float32)
    x, bias = x.detach(), bias.detach()
    with pytest.raises(ValueError, match="last dim must be in_features = 10"):
        shira_kernels.sparse_delta_linear(torch.randn(3, 9), weight, bias, delta)
    with pytest.raises(TypeError, match="weight has dtype torch.float16"):
        shira_kernels.sparse_delta_linear(x, weight.half(), bias, delta)
    with pytest.raises(TypeError, match="delta.values has dtype torch.bfloat16"):
        shira_kernels.sparse_delta_linear(x, weight, bias, delta.to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"bias has shape \(5,\)"):
        shira_kernels.sparse_delta_linear(x, weight, bias[:5], delta)
    with pytest.raises(ValueError, match=r"delta has shape \(6, 10\) but weight needs \(10, 6\)"):
        shira_kernels.sparse_delta_linear(torch.randn(2, 6), weight.T.contiguous(), None, delta)
    with pytest.raises(TypeError, match="delta must be a SparseDelta"):
        shira_kernels.sparse_delta_linear(x, weight, bias, delta.values)
    with pytest.raises(ValueError, match="strategy must be one of"):
        shira_kernels.sparse_delta_linear(x, weight, bias, delta, strategy="fast")
    with pytest.raises(ValueError, match="weight must be a contiguous 2-D tensor"):
        shira_kernels.sparse_delta_linear(x, torch.randn(10, 6).T, bias, delta)
    out = torch.zeros(6, 10)
    with pytest.raises(ValueError, match=r"out must be contiguous with shape \(6, 10\)"):
        shira_kernels.add_delta(weight, delta, out=torch.zeros(6, 11))
    assert torch.equal(out, torch.zeros(6, 10))


def test_sparse_delta_format():
    rows, cols = torch.tensor([2, 0, 1, 0]), torch.tensor([1, 3, 0, 0])
    delta = SparseDelta.from_coo(rows, cols, (3, 4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert delta.flat_indices.tolist() == [0, 3, 4, 9] and delta.flat_indices.dtype == torch.int32
    assert delta.values.tolist() == [4.0, 2.0, 3.0, 1.0]
    s = delta.structure
    assert s.row_offsets.tolist() == [0, 2, 3, 4] and s.cols.dtype == torch.int32
    assert delta.structure is s  # derived once
    dense = delta.to_dense()
    assert dense[2, 1] == 1.0 and dense[0, 3] == 2.0 and dense.count_nonzero() == 4
    again = SparseDelta.from_mask(dense != 0, dense)
    assert torch.equal(again.flat_indices, delta.flat_indices) and torch.equal(again.values, delta.values)
    with pytest.raises(ValueError, match="repeated"):
        SparseDelta.from_flat(torch.tensor([1, 1]), (2, 2))
    with pytest.raises(TypeError, match=r"shape must be \(out_features, in_features\)"):
        SparseDelta.from_flat((3, 4), torch.tensor([1, 5, 7]))  # arguments swapped
    with pytest.raises(ValueError, match="both ≥ 1"):
        SparseDelta.from_coo(rows, cols, (0, 4))
    with pytest.raises(ValueError, match="out of range"):
        SparseDelta.from_flat(torch.tensor([4]), (2, 2))
    with pytest.raises(ValueError, match="cols has entries outside"):
        SparseDelta.from_coo(torch.tensor([0]), torch.tensor([4]), (3, 4))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sddmm_row_blocks_matches_the_reference(device, dtype):
    # The many-token CUDA backward's way (dense gyᵀ·x a few rows at a time); here with blocks
    # of 3 rows so that rows are split, skipped (empty) and ragged at the end.
    delta = make_delta(17, 33, dtype, density=0.1, device=device)
    gy, x = randn(70, 17, dtype=dtype, seed=8, device=device), randn(70, 33, dtype=dtype, seed=9, device=device)
    s = delta.structure
    g = sd.sddmm_row_blocks(gy, x, s.rows, s.cols, s.row_offsets, block_bytes=3 * 4 * 33)
    rows, cols = s.rows.long(), s.cols.long()
    exact = (gy.double().T @ x.double())[rows, cols]
    assert g.dtype == torch.float32
    assert_within_error_bound(g, exact, (abs64(gy).T @ abs64(x))[rows, cols], 70,
                              "sddmm_row_blocks", torch_result=(gy.T @ x)[rows, cols])
