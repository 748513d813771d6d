"""Checks that only mean something on a CUDA GPU: the automatic backend, Llama-sized layers
(grids of thousands of blocks, hundreds of thousands of entries) on the compiled cuda and
triton kernels against the reference, and torch.compile with inductor. The per-op tests of the
other files also run on CUDA tensors there (their `backend` fixture adds the cuda-* cases).
Run on a GPU machine with TRITON_INTERPRET=0: scripts/gpu-check.sh."""
import pytest
import torch
import torch.nn.functional as F

import shira_kernels
from shira_kernels import backends
from shira_kernels.formats import SparseDelta
from shira_kernels.masks import sample_distinct
from shira_kernels.nn import ShiraLinear
from shira_kernels.ops import sparse_delta as sd

from conftest import INTERPRETED
from test_sparse_delta import delta_linear_bound
from tolerance import abs64, assert_within_error_bound

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_BACKENDS = ["cuda"] + ([] if INTERPRETED else ["triton"])


def test_cuda_kernels_are_the_automatic_choice_for_cuda_tensors(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.select("cuda") == "cuda", backends.unavailable_reason("cuda", "cuda")


def _llama_layer(out_f, in_f, r, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    flat = sample_distinct(out_f * in_f, r * (out_f + in_f), gen).sort().values
    delta = SparseDelta.from_flat(flat, (out_f, in_f), torch.randn(flat.numel(), generator=gen))
    weight = torch.randn(out_f, in_f, generator=gen) * in_f ** -0.5
    return weight.to("cuda", dtype), delta.to(dtype).to("cuda")


@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
@pytest.mark.parametrize("strategy", ["fold", "spmm", "swap", "merge"])
@pytest.mark.parametrize("tokens", [1, 2047])
def test_cuda_llama_sized_layer_matches_the_reference(backend_name, strategy, tokens):
    dtype = torch.bfloat16
    weight, delta = _llama_layer(11008, 4096, 32, dtype)
    values = delta.values.clone().requires_grad_(True)
    delta = delta.with_values(values)
    base = weight.clone()
    x = torch.randn(tokens, 4096, device="cuda", dtype=dtype).requires_grad_(True)
    gy = torch.randn(tokens, 11008, device="cuda", dtype=dtype)
    with shira_kernels.use_backend(backend_name):
        y = shira_kernels.sparse_delta_linear(x, weight, None, delta, 0.5, strategy=strategy)
        ours = [y, *torch.autograd.grad(y, [x, values], gy)]
    ref = sd.sparse_delta_linear_reference(x, weight, None, delta, 0.5)
    theirs = [ref, *torch.autograd.grad(ref, [x, values], gy)]
    x64, v64 = (t.detach().double().requires_grad_(True) for t in (x, values))
    ref64 = sd.sparse_delta_linear_reference(x64, weight.double(), None, delta.with_values(v64), 0.5)
    exact = [ref64, *torch.autograd.grad(ref64, [x64, v64], gy.double())]
    # The magnitudes: the same formula and gradients on the absolute values.
    x_abs, v_abs = (abs64(t).requires_grad_(True) for t in (x, values))
    ref_abs = sd.sparse_delta_linear_reference(x_abs, abs64(weight), None,
                                               delta.with_values(v_abs), 0.5)
    magnitude = [ref_abs, *torch.autograd.grad(ref_abs, [x_abs, v_abs], abs64(gy))]
    # y, grad x: delta_linear_bound; the values' gradient: a sum over the tokens, the scale.
    bounds = [delta_linear_bound(4096), delta_linear_bound(11008), (tokens + 1, 0)]
    for name, o, t, e, m, (k, n) in zip(["y", "grad x", "grad values"], ours, theirs, exact,
                                        magnitude, bounds):
        assert_within_error_bound(o, e, m, k, name, torch_result=t, roundings=n)
    assert torch.equal(weight, base)


@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
def test_cuda_scatter_swap_of_a_llama_block_is_exact(backend_name):
    weights, indices, values = [], [], []
    for seed, (m, n) in enumerate([(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]):
        w, d = _llama_layer(m, n, 32, torch.bfloat16, seed)
        weights.append(w)
        indices.append(d.flat_indices)
        values.append(d.values.clone())
    base_w, base_v = [w.clone() for w in weights], [v.clone() for v in values]
    with shira_kernels.use_backend(backend_name):
        shira_kernels.scatter_swap_(weights, indices, values)
        for w, i, v, bw, bv in zip(weights, indices, values, base_w, base_v):
            assert torch.equal(w.view(-1)[i.long()], bv) and torch.equal(v, bw.view(-1)[i.long()])
        shira_kernels.scatter_swap_(weights, indices, values)
    for w, v, bw, bv in zip(weights, values, base_w, base_v):
        assert torch.equal(w.view(torch.int16), bw.view(torch.int16))
        assert torch.equal(v.view(torch.int16), bv.view(torch.int16))


def test_cuda_torch_compile_with_inductor_matches_eager():
    torch.manual_seed(0)
    layer = ShiraLinear.from_linear(torch.nn.Linear(256, 192), r=4, seed=0).cuda()
    with torch.no_grad():
        layer.shira_values.normal_()
    model = torch.nn.Sequential(layer, torch.nn.GELU())
    x = torch.randn(3, 37, 256, device="cuda")
    expected = model(x)
    (g_expected,) = torch.autograd.grad(expected.square().sum(), layer.shira_values)
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    (g,) = torch.autograd.grad(y.square().sum(), layer.shira_values)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(g, g_expected)
    # What the compiled graph computes is the adapted layer, not the base one.
    assert not torch.allclose(y, F.gelu(F.linear(x, layer.weight, layer.bias)))


@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
def test_cuda_backward_runs_on_the_backend_the_forward_chose(backend_name, monkeypatch):
    # Autograd runs CUDA backwards on its own thread; use_backend must still hold there.
    seen = []
    real = backends.select
    monkeypatch.setattr(backends, "select", lambda device: seen.append(real(device)) or seen[-1])
    weight, delta = _llama_layer(64, 96, 2, torch.float32)
    values = delta.values.clone().requires_grad_(True)
    x = torch.randn(5, 96, device="cuda", requires_grad=True)
    with shira_kernels.use_backend(backend_name):
        y = shira_kernels.sparse_delta_linear(x, weight, None, delta.with_values(values),
                                              strategy="spmm")
        seen.clear()
        y.sum().backward()
    assert seen and set(seen) == {backend_name}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_multi_delta_is_one_launch_with_each_rows_single_adapter_bits(dtype, monkeypatch):
    # The CUDA grouped kernels: one launch per direction for all adapters, and with adapters
    # of one size (the same lanes per row as spmm's) each row the same bits as the cuda spmm
    # strategy on the whole batch with that row's adapter. Gradients against the reference:
    # test_multi_delta.py (its cuda-cuda cases).
    from shira_kernels import SparseDeltaSet, _native
    mod = _native.module("cuda")
    delta_set = SparseDeltaSet((512, 384))
    for a in range(4):
        weight, delta = _llama_layer(512, 384, 4, dtype, seed=a)
        delta_set.add(f"a{a}", delta, 0.5 + a)
    x = torch.randn(67, 384, device="cuda").to(dtype)
    rows_of = torch.arange(67, device="cuda") % 5 - 1  # every adapter, and base rows
    calls = []
    for name in ("grouped_spmm", "grouped_sddmm"):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, real=real, name=name, **k: calls.append(name)
                            or real(*a, **k))
    delta_set.requires_grad_()
    with shira_kernels.use_backend("cuda"):
        y = shira_kernels.multi_delta_linear(x, weight, None, delta_set, rows_of)
        y.float().square().sum().backward()
    # One launch for the forward, one for gx, one for every adapter's values.
    assert sorted(calls) == ["grouped_sddmm", "grouped_spmm", "grouped_spmm"], calls
    assert all(delta_set.values.grad[delta_set.segment(n)].any() for n in delta_set.names)
    with torch.no_grad(), shira_kernels.use_backend("cuda"):
        for a, (_, delta, scale) in enumerate(delta_set.slots):
            rows = (rows_of == a).nonzero().view(-1)
            one = shira_kernels.sparse_delta_linear(x, weight, None, delta, scale,
                                                    strategy="spmm")
            assert torch.equal(y.detach()[rows], one[rows]), a
