"""torch.compile, autocast and mixed batches as a demanding user runs them (what the other test
files do not cover):

- a layer's ``scale`` changed after compiling, and compiling with dynamic=True: torch.compile
  traces such a float as a symbol, which the scale check must take (it used math.isfinite:
  fullgraph=True failed, without it every call broke the graph);
- ShiraLinear under inductor with dynamic shapes, every strategy: forward and backward the
  same bits as eager, one graph for every token count above 1;
- binary_linear / binary_lora with strategy="dequantize" under autocast: their result keeps
  x's dtype and bits (torch's matmul inside the op was recast to bf16 in eager mode, while the
  compiled graph, following the fake kernel, stayed in fp32);
- multi_delta_linear and AdapterBank.mixed() under autocast: they run in the autocast dtype
  like sparse_delta_linear (they raised: a bf16 input met the fp32 weight, or the op's inner
  matmul came out in bf16 while its sparse part stayed in fp32).
"""
import copy

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from shira_kernels import AdapterBank, BinaryWeight, SparseDelta, SparseDeltaSet
from shira_kernels.nn import replace_linear
from shira_kernels.ops.binary import binary_linear, binary_lora
from shira_kernels.ops.multi_delta import multi_delta_linear
from shira_kernels.ops.sparse_delta import sparse_delta_linear

from unchanged import bits

STRATEGIES = ("auto", "fold", "spmm", "swap", "merge")


def same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(bits(a), bits(b)), f"{what}: max diff {(a.double() - b.double()).abs().max()}"


def shira_mlp(strategy: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    replace_linear(model, ["0", "2"], r=2, seed=seed)
    for layer in (model[0], model[2]):
        layer.strategy = strategy
        with torch.no_grad():
            layer.shira_values.normal_()
    return model


def random_delta(shape, nnz, seed, dtype=torch.float32) -> SparseDelta:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(shape[0] * shape[1], generator=g)[:nnz]
    return SparseDelta.from_flat(flat, shape, torch.randn(nnz, generator=g).to(dtype))


def counted(model, **kwargs):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(kwargs.pop("backend", "aot_eager"))
    return torch.compile(model, backend=counter, fullgraph=True, **kwargs), counter


# ---------------------------------------------------------------------------------------------
# The scale as torch.compile traces it
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["auto", "swap"])
def test_scale_changed_after_compiling_fullgraph(strategy):
    model = shira_mlp(strategy)
    compiled, counter = counted(model)
    x = torch.randn(5, 16)
    scales = (1.0, 2.0, 0.5, -3.0)
    with torch.no_grad():
        for scale in scales:
            model[0].scale = model[2].scale = scale
            same_bits(compiled(x), model(x), f"scale {scale}")
        frames = counter.frame_count
        # The op takes the scale as a constant: at most a graph per value, each reused.
        assert frames <= len(scales) + 1
        for scale in scales:
            model[0].scale = model[2].scale = scale
            same_bits(compiled(x), model(x), f"scale {scale} again")
    assert counter.frame_count == frames
    model[0].scale = float("nan")  # still refused in eager mode
    with pytest.raises(ValueError, match="scale must be finite"):
        model(x)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inductor_dynamic_shapes_forward_and_backward_equal_eager(strategy):
    model = shira_mlp(strategy, seed=1)
    twin = copy.deepcopy(model)
    compiled, counter = counted(twin, backend="inductor", dynamic=True)
    frames = None
    for tokens in (3, 7, 12, 5):
        g = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, 16, generator=g)
        gy = torch.randn(tokens, 8, generator=g)
        results = []
        for m, f in ((model, model), (twin, compiled)):
            xi = x.clone().requires_grad_()
            y = f(xi)
            y.backward(gy)
            results.append((y.detach(), xi.grad, m[0].shira_values.grad.clone(),
                            m[2].shira_values.grad.clone()))
            m.zero_grad()
        for what, a, b in zip(("y", "grad x", "grad values 0", "grad values 2"), *results):
            same_bits(b, a, f"{strategy}, {tokens} tokens, {what}")
        frames = frames or counter.frame_count
    assert counter.frame_count == frames  # the first call's graphs serve every token count


# ---------------------------------------------------------------------------------------------
# 1-bit ops under autocast
# ---------------------------------------------------------------------------------------------
def test_binary_dequantize_strategy_under_autocast_keeps_x_dtype():
    g = torch.Generator().manual_seed(0)
    bw = BinaryWeight.from_float(torch.randn(20, 70, generator=g))
    down = BinaryWeight.from_float(torch.randn(4, 70, generator=g))
    up = BinaryWeight.from_float(torch.randn(20, 4, generator=g))
    x = torch.randn(5, 70, generator=g)
    bias = torch.randn(20, generator=g)

    def run(x):
        return (binary_linear(x, bw, bias, strategy="dequantize"),
                binary_lora(x, down, up, 0.5, "relu", strategy="dequantize"),
                binary_lora(x, down, up, 2.0, strategy="dequantize"))

    plain = run(x)
    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_autocast = run(x)
        compiled_autocast = compiled(x)
    for i, (a, b, c) in enumerate(zip(plain, eager_autocast, compiled_autocast)):
        same_bits(b, a, f"output {i}, eager under autocast")
        same_bits(c, a, f"output {i}, compiled under autocast")


# ---------------------------------------------------------------------------------------------
# Mixed batches under autocast
# ---------------------------------------------------------------------------------------------
def test_multi_delta_linear_under_autocast_runs_in_bf16_like_sparse_delta_linear():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 16, generator=g)
    bias = torch.randn(24, generator=g)
    deltas = {"a": (random_delta((24, 16), 30, 3), 1.5), "b": (random_delta((24, 16), 25, 4), -0.5)}
    delta_set = SparseDeltaSet((24, 16))
    for name, (d, scale) in deltas.items():
        delta_set.add(name, d, scale)
    names = ["a", "b", None, "a", "b", None, "b", "a"]  # every group has more than one row
    x = torch.randn(len(names), 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = multi_delta_linear(x, w, bias, delta_set, names)
        alone = {n: sparse_delta_linear(x, w, bias, d, s, "spmm") for n, (d, s) in deltas.items()}
        alone[None] = torch.nn.functional.linear(x, w, bias)
    assert y.dtype == torch.bfloat16
    for row, n in enumerate(names):
        same_bits(y[row], alone[n][row], f"row {row} ({n})")
    # and a training step through it: x and the values get gradients of their own dtype
    xi = x.clone().requires_grad_()
    values = {n: d.values.clone().requires_grad_() for n, (d, _) in deltas.items()}
    trained = SparseDeltaSet((24, 16))
    for n, (d, s) in deltas.items():
        trained.add(n, d.with_values(values[n]), s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = multi_delta_linear(xi, w, bias, trained, names)
    out.float().square().sum().backward()
    assert xi.grad.dtype == torch.float32 and torch.isfinite(xi.grad).all()
    for n, v in values.items():
        assert v.grad.dtype == torch.float32 and v.grad.abs().sum() > 0, n


@pytest.mark.parametrize("adapted", [("2",), ("0", "2")], ids=["second-layer", "both-layers"])
def test_bank_mixed_under_autocast(adapted):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12))
    shapes = {"0": (24, 16), "2": (12, 24)}
    bank = AdapterBank(model)
    adapters = {name: {layer: (random_delta(shapes[layer], 20, 10 * k + i), 0.5 + k)
                       for i, layer in enumerate(adapted)} for k, name in enumerate(("a", "b"))}
    for name, adapter in adapters.items():
        bank.add(name, adapter)
    names = ["a", None, "b", "a", None, "b"]  # every group has more than one row
    x = torch.randn(len(names), 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with bank.mixed(names):
            y = model(x)

        def layer(i, h, name):  # what the mixed layer computes for rows of adapter `name`
            lin = model[int(i)]
            if name is None or i not in adapted:
                return torch.nn.functional.linear(h, lin.weight, lin.bias)
            d, s = adapters[name][i]
            return sparse_delta_linear(h, lin.weight, lin.bias, d, s, "spmm")

        expected = {}
        for name in ("a", "b", None):
            h = torch.relu(layer("0", x, name))
            expected[name] = layer("2", h, name)
    assert y.dtype == torch.bfloat16
    for row, n in enumerate(names):
        same_bits(y[row], expected[n][row], f"row {row} ({n})")
