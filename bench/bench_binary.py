"""pytest-benchmark: the 1-bit ops against dense matmuls on identical inputs.

Sizes: SHIRA_BENCH_BINARY_SHAPES (e.g. "768x768,4096x4096"), SHIRA_BENCH_TOKENS ("1,128")."""
import os

import pytest
import torch
import torch.nn.functional as F

import shira_kernels
from shira_kernels.formats import BinaryWeight

SHAPES = [tuple(int(v) for v in s.split("x")) for s in
          os.environ.get("SHIRA_BENCH_BINARY_SHAPES", "768x768,4096x4096").split(",")]
TOKENS = [int(t) for t in os.environ.get("SHIRA_BENCH_TOKENS", "1,128").split(",")]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def weight(request):
    out_f, in_f = request.param
    return BinaryWeight.from_float(torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("variant", ["binary_linear", "dense_fp32", "dense_bf16"])
def test_binary_linear(benchmark, weight, tokens, variant):
    x = torch.randn(tokens, weight.shape[1])
    w = weight.dequantize()
    fns = {"binary_linear": lambda: shira_kernels.binary_linear(x, weight),
           "dense_fp32": lambda: x @ w.T,
           "dense_bf16": (lambda xb, wb: lambda: xb @ wb.T)(x.bfloat16(), w.bfloat16())}
    benchmark.group = f"binary_linear[{weight.shape[0]}x{weight.shape[1]}-T{tokens}]"
    with torch.no_grad():
        benchmark.pedantic(fns[variant], rounds=7, warmup_rounds=1)


@pytest.mark.parametrize("tokens", [1, 197])
@pytest.mark.parametrize("variant", ["binary_lora", "dense_fp32"])
def test_binary_lora(benchmark, tokens, variant):
    g = torch.Generator().manual_seed(1)
    down = BinaryWeight.from_float(torch.randn(32, 768, generator=g))
    up = BinaryWeight.from_float(torch.randn(768, 32, generator=g))
    d, u = down.dequantize(), up.dequantize()
    x = torch.randn(tokens, 768, generator=g)
    fns = {"binary_lora": lambda: shira_kernels.binary_lora(x, down, up, 0.1, "relu"),
           "dense_fp32": lambda: 0.1 * F.linear(torch.relu(F.linear(x, d)), u)}
    benchmark.group = f"binary_lora[768-r32-T{tokens}]"
    with torch.no_grad():
        benchmark.pedantic(fns[variant], rounds=7, warmup_rounds=1)
