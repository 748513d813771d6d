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
  (whichever it is, compiled or not) like sparse_delta_linear (they raised: a bf16 input met the fp32 weight, or the op's inner
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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_multi_delta_linear_under_autocast_runs_in_its_dtype_like_sparse_delta_linear(dtype):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 16, generator=g)
    bias = torch.randn(24, generator=g)
    deltas = {"a": (random_delta((24, 16), 30, 3), 1.5), "b": (random_delta((24, 16), 25, 4), -0.5)}
    delta_set = SparseDeltaSet((24, 16))
    for name, (d, scale) in deltas.items():
        delta_set.add(name, d, scale)
    names = ["a", "b", None, "a", "b", None, "b", "a"]  # every group has more than one row
    x = torch.randn(len(names), 16, generator=g)
    with torch.autocast("cpu", dtype=dtype):
        y = multi_delta_linear(x, w, bias, delta_set, names)
        alone = {n: sparse_delta_linear(x, w, bias, d, s, "spmm") for n, (d, s) in deltas.items()}
        alone[None] = torch.nn.functional.linear(x, w, bias)
    assert y.dtype == dtype
    for row, n in enumerate(names):
        same_bits(y[row], alone[n][row], f"row {row} ({n})")
    # and a training step through it: x and the values get gradients of their own dtype
    xi = x.clone().requires_grad_()
    delta_set.requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out = multi_delta_linear(xi, w, bias, delta_set, names)
    out.float().square().sum().backward()
    assert xi.grad.dtype == torch.float32 and torch.isfinite(xi.grad).all()
    grad = delta_set.values.grad
    assert grad.dtype == torch.float32
    for n in deltas:
        assert grad[delta_set.segment(n)].abs().sum() > 0, n


def test_a_delta_without_its_structure_under_fullgraph_says_to_derive_it():
    # The structure is derived eagerly (its checks read the indices); inside a graph the error
    # was torch's "tensor.is_inference() during tracing", naming nothing of the package.
    torch.manual_seed(0)
    w, b = torch.randn(12, 16), torch.randn(12)
    delta = SparseDelta.from_flat(torch.randperm(192)[:30], (12, 16), torch.randn(30))

    def f(x):
        return sparse_delta_linear(x, w, b, delta, 0.5, "spmm")
    x = torch.randn(5, 16)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="touch delta.structure once"):
        torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    torch._dynamo.reset()
    same_bits(torch.compile(f, backend="aot_eager")(x), f(x), "with a graph break")
    delta.structure
    torch._dynamo.reset()
    same_bits(torch.compile(f, backend="aot_eager", fullgraph=True)(x), f(x), "derived first")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_compiled_layer_under_autocast_runs_in_its_dtype_as_eager(dtype):
    # The ops' autocast rule reads the dtype in force when it runs (traced with the graph).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16))
    replace_linear(model, ["0"], r=2)
    with torch.no_grad():
        model[0].shira_values.normal_()
    x = torch.randn(4, 32, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=dtype):
        eager, traced = model(x), compiled(x)
    assert eager.dtype == traced.dtype == dtype
    same_bits(traced, eager, "output")
    for got, want in zip(torch.autograd.grad(traced.float().sum(), (x, model[0].shira_values)),
                         torch.autograd.grad(eager.float().sum(), (x, model[0].shira_values))):
        same_bits(got, want, "gradient")


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


# ---------------------------------------------------------------------------------------------
# mixed() blocks under torch.compile: every block used to install new forwards over a new set of
# the block's adapters, so a compiled model recompiled for each batch (and ran eager once past
# dynamo's cache limit). The forwards and their adapters are now kept per bank and layer.
# ---------------------------------------------------------------------------------------------
def _blocks_reuse_the_graph(model, bank, x, blocks, add, remove):
    """Compiled and eager forwards agree in every block; after the first block (and one call
    outside any block) no block recompiles, whatever its rows name; add() and remove() each
    recompile at most once."""
    compiled, counter = counted(model)
    with torch.no_grad():
        same_bits(compiled(x), model(x), "outside a block")
        for names in blocks[:1]:
            with bank.mixed(names):
                same_bits(compiled(x), model(x), f"block {names}")
        graphs = counter.frame_count
        with torch._dynamo.config.patch(error_on_recompile=True):
            for names in blocks[1:]:
                with bank.mixed(names):
                    same_bits(compiled(x), model(x), f"block {names}")
        for change, names in ((add, ["new", "b", None, "a"]), (remove, ["new", "b", None, "b"])):
            change()
            with bank.mixed(names):
                same_bits(compiled(x), model(x), f"block {names} after a change")
            assert counter.frame_count <= graphs + 1
            graphs = counter.frame_count
    assert all("forward" not in m.__dict__ for m in model.modules())
    torch._dynamo.reset()


def test_adapter_bank_mixed_blocks_reuse_the_compiled_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12))
    shapes = {"0": (24, 16), "2": (12, 24)}
    bank = AdapterBank(model)
    for k, name in enumerate("abc"):
        layers = ("0", "2") if name != "c" else ("2",)  # c on the second layer only
        bank.add(name, {layer: (random_delta(shapes[layer], 20, 10 * k + i), 0.5 + k)
                        for i, layer in enumerate(layers)})
    blocks = [["a", None, "b", "a"], ["b", "b", None, "c"], ["c", "c", "c", "c"],
              [None, "__base__", None, None], ["a", "a", "a", "a"]]
    _blocks_reuse_the_graph(
        model, bank, torch.randn(4, 16), blocks,
        add=lambda: bank.add("new", {"0": random_delta(shapes["0"], 9, 99)}),
        remove=lambda: bank.remove("a"))


def test_binary_adapter_bank_mixed_blocks_reuse_the_compiled_graph():
    from shira_kernels import BinaryAdapterBank
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12))
    g = torch.Generator().manual_seed(1)

    def branch(in_f, out_f, r):
        return (BinaryWeight.from_float(torch.randn(r, in_f, generator=g)),
                BinaryWeight.from_float(torch.randn(out_f, r, generator=g) * 0.1, "row"))

    bank = BinaryAdapterBank(model)
    for k, name in enumerate("abc"):
        layers = {"0": branch(16, 24, 3 + k)}
        if name != "c":
            layers["2"] = branch(24, 12, 2)
        bank.add(name, layers)
    blocks = [["a", None, "b", "a"], ["b", "b", None, "c"], ["c", "c", "c", "c"],
              [None, "__base__", None, None]]
    _blocks_reuse_the_graph(model, bank, torch.randn(4, 16), blocks,
                            add=lambda: bank.add("new", {"2": branch(24, 12, 5)}),
                            remove=lambda: bank.remove("a"))


def test_adapter_bank_mixed_follows_the_model_to_another_dtype():
    # The adapters a mixed batch uses are prepared in the weight's dtype; casting the model
    # after a block prepares them again (a kept fp32 set would meet a bf16 weight).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24))
    delta = random_delta((24, 16), 30, 5)
    bank = AdapterBank(model)
    bank.add("a", {"0": (delta, 0.5)})
    x = torch.randn(3, 16)
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        with torch.no_grad(), bank.mixed(["a", None, "a"]):
            y = model(x.to(dtype))
            w, b = model[0].weight, model[0].bias
            adapted = sparse_delta_linear(x.to(dtype), w, b,
                                          delta.with_values(delta.values.to(dtype)), 0.5, "spmm")
            base = torch.nn.functional.linear(x.to(dtype), w, b)
        assert y.dtype == dtype
        for row, expected in enumerate((adapted, base, adapted)):
            same_bits(y[row], expected[row], f"row {row}, {dtype}")


def test_adapter_bank_mixed_after_adding_an_adapter_on_a_layer_new_to_mixed():
    # The first block made forwards for layer "0" only; an adapter added later on layer "2"
    # gets that layer its forward (made with the adapter in it, so not added twice).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12))
    bank = AdapterBank(model)
    bank.add("a", {"0": random_delta((24, 16), 20, 1)})
    x = torch.randn(2, 16)
    with torch.no_grad(), bank.mixed(["a", None]):
        model(x)
    delta = random_delta((12, 24), 15, 2)
    bank.add("b", {"2": (delta, 0.5)})
    with torch.no_grad():
        with bank.mixed(["b", None]):
            y = model(x)
        h = torch.relu(model[0](x))
        expected = sparse_delta_linear(h, model[2].weight, model[2].bias, delta, 0.5, "spmm")
    same_bits(y[0], expected[0], "row of b")
    assert "forward" not in model[2].__dict__


def test_an_eager_block_hands_the_op_the_packed_set_and_an_all_base_block_runs_the_base():
    # The set is packed (the op's inputs are the same whatever its count), so an eager block
    # gives the op the layer's whole set, as a compiled graph does; a block that uses no
    # adapter on the layer runs plain F.linear.
    from unittest import mock
    import shira_kernels.adapters as adapters_module
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24))
    bank = AdapterBank(model)
    for k in range(6):
        bank.add(f"a{k}", {"0": random_delta((24, 16), 10, k)})
    seen = []
    real = adapters_module.multi_delta_linear

    def spy(x, weight, bias, delta_set, rows):
        seen.append(sorted(delta_set.names))
        return real(x, weight, bias, delta_set, rows)

    x = torch.randn(3, 16)
    with mock.patch.object(adapters_module, "multi_delta_linear", spy), torch.no_grad():
        with bank.mixed(["a4", None, "a1"]):
            y = model(x)
        with bank.mixed([None, None, None]):
            base = model(x)
    assert seen == [[f"a{k}" for k in range(6)]]  # the all-base block ran plain F.linear
    same_bits(base, torch.nn.functional.linear(x, model[0].weight, model[0].bias), "all base")
    assert y.shape == (3, 24)
