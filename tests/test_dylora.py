"""DyLoRALinear: drop-in wrapping, seeded rank sampling, which components get gradients,
set_rank, torch.compile without recompilation across ranks, merge/unmerge, bad arguments."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shira_kernels.nn import DyLoRALinear, ShiraLinear

from tolerance import abs64, assert_within_error_bound


def make_layer(in_f=12, out_f=7, r=4, seed=0, dtype=torch.float32, **kwargs):
    torch.manual_seed(seed)
    layer = DyLoRALinear.from_linear(nn.Linear(in_f, out_f).to(dtype), r, seed=seed, **kwargs)
    with torch.no_grad():  # B starts at zero; make the branch visible (and A's gradient nonzero)
        layer.lora_B.copy_(torch.randn(out_f, r))
    return layer


def reference(layer, x, b, absolute=False):
    """The rank-b output, computed by slicing, in fp64; absolute: the same on the absolute
    values of every input, the magnitude of the error bound."""
    f = abs64 if absolute else (lambda t: t.double())
    w, bias = f(layer.weight), f(layer.bias)
    a, bb = f(layer.lora_A[:b]), f(layer.lora_B[:, :b])
    return F.linear(f(x), w, bias) + (layer.alpha / b) * F.linear(F.linear(f(x), a), bb)


def forward_k(layer):
    """fp32 roundings along the forward's longest chain: x·Aᵀ (in), the rank weights (the
    scale alpha/b rounded to fp32, the product), ·Bᵀ (r), the add to the base output."""
    return layer.in_features + layer.r + 3


def assert_close_to_exact(ours, exact, magnitude, k):
    """ours (fp32) against an fp64 result, within the error bound of tests/tolerance.py."""
    assert_within_error_bound(ours, exact, magnitude, k)


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them with aot_eager."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs += 1
        return lookup_backend("aot_eager")(gm, example_inputs)


def test_from_linear_is_a_drop_in_replacement():
    base = nn.Linear(10, 6)
    layer = DyLoRALinear.from_linear(base, 3, seed=0)
    assert isinstance(layer, nn.Linear)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.shape == (3, 10) and layer.lora_B.shape == (6, 3)
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(10)  # LoRA's Kaiming-uniform with a=√5: U(−1/√in, 1/√in)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > bound / 2
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert layer.rank == 3 and layer.alpha == 3.0 and layer.last_rank is None
    x = torch.randn(4, 10)
    assert torch.equal(layer.eval()(x), base(x))  # B = 0: the layer starts equal to the base
    layer.train()(x)
    assert 1 <= layer.last_rank <= 3


def test_seed_makes_initialisation_and_rank_draws_reproducible():
    def ranks(layer, n):
        x = torch.randn(2, 12)
        out = []
        for _ in range(n):
            layer(x)
            out.append(layer.last_rank)
        return out

    one, two = make_layer(seed=3).train(), make_layer(seed=3).train()
    assert torch.equal(one.lora_A, two.lora_A)
    drawn = ranks(one, 200)
    assert drawn == ranks(two, 200)
    assert set(drawn) == {1, 2, 3, 4}  # uniform over 1..r: 200 draws cover all four
    counts = torch.bincount(torch.tensor(drawn), minlength=5)[1:]
    assert counts.min() > 20
    assert ranks(make_layer(seed=4).train(), 200) != drawn
    # seed=None draws its seed from the global RNG, so torch.manual_seed still reproduces it.
    torch.manual_seed(1)
    a = DyLoRALinear.from_linear(nn.Linear(4, 4), 2)
    torch.manual_seed(1)
    b = DyLoRALinear.from_linear(nn.Linear(4, 4), 2)
    assert a.seed == b.seed and torch.equal(a.lora_A, b.lora_A)


@pytest.mark.parametrize("train_lower", [False, True])
def test_training_forward_and_which_components_get_gradients(train_lower):
    layer = make_layer(r=5, seed=1, train_lower=train_lower).train()
    seen = set()
    for _ in range(30):
        layer.zero_grad(set_to_none=True)
        x = torch.randn(3, 12, requires_grad=True)
        gy = torch.randn(3, 7)
        y = layer(x)
        b = layer.last_rank
        seen.add(b)
        assert_close_to_exact(y, reference(layer, x.detach(), b), reference(layer, x, b, True),
                              forward_k(layer))
        y.backward(gy)
        trained = [b - 1] if not train_lower else list(range(b))
        for j in range(5):
            a_row, b_col = layer.lora_A.grad[j], layer.lora_B.grad[:, j]
            if j in trained:
                assert a_row.abs().sum() > 0 and b_col.abs().sum() > 0, (b, j)
            else:
                assert torch.count_nonzero(a_row) == 0 and torch.count_nonzero(b_col) == 0, (b, j)
        # The trained components' gradients, and x's (through all b components), are the
        # gradients of the plain rank-b formula.
        x64 = x.detach().double().requires_grad_(True)
        a64 = layer.lora_A.detach().double().requires_grad_(True)
        b64 = layer.lora_B.detach().double().requires_grad_(True)
        ref = F.linear(x64, layer.weight.double(), layer.bias.double()) + (layer.alpha / b) * \
            F.linear(F.linear(x64, a64[:b]), b64[:, :b])
        ref.backward(gy.double())
        # The magnitudes: the same gradients on the absolute values.
        x_abs, a_abs, b_abs = (abs64(t).requires_grad_(True) for t in (x, layer.lora_A, layer.lora_B))
        ref_abs = F.linear(x_abs, abs64(layer.weight), abs64(layer.bias)) + (layer.alpha / b) * \
            F.linear(F.linear(x_abs, a_abs[:b]), b_abs[:, :b])
        ref_abs.backward(abs64(gy))
        # x: gy·W (out) joined with gy·B (out), the rank weights (2), ·A (r); A: gy·B (out),
        # the rank weights, ·x over the 3 tokens, the join; B: x·Aᵀ (in), the weights, the tokens.
        out_f, in_f, r = 7, 12, 5
        assert_close_to_exact(x.grad, x64.grad, x_abs.grad, out_f + r + 3)
        assert_close_to_exact(layer.lora_A.grad[trained], a64.grad[trained],
                              a_abs.grad[trained], out_f + 3 + 3)
        assert_close_to_exact(layer.lora_B.grad[:, trained], b64.grad[:, trained],
                              b_abs.grad[:, trained], in_f + 3 + 3)
    assert len(seen) >= 4


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_drawn_rank(use_reentrant):
    # The recomputation inside the backward must run the forward's rank (checkpoint restores
    # torch's RNG, not the layer's generator): the same gradients as without checkpointing, and
    # one draw per step.
    from torch.utils.checkpoint import checkpoint
    x = torch.randn(5, 8)
    grads = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        layer = DyLoRALinear.from_linear(nn.Linear(8, 6), r=4, seed=3).train()
        with torch.no_grad():
            layer.lora_B.normal_()
        ranks = []
        for _ in range(3):
            xi = x.clone().requires_grad_()
            y = checkpoint(layer, xi, use_reentrant=use_reentrant) if checkpointed else layer(xi)
            ranks.append(layer.last_rank)
            y.square().sum().backward()
            assert layer.last_rank == ranks[-1]
        grads[checkpointed] = (ranks, xi.grad, layer.lora_A.grad, layer.lora_B.grad)
    assert grads[True][0] == grads[False][0] and len(set(grads[False][0])) > 1
    for got, want in zip(grads[True][1:], grads[False][1:]):
        assert torch.equal(got, want)


def test_training_does_not_change_the_inference_rank():
    layer = make_layer(seed=2)
    layer.set_rank(2)
    x = torch.randn(3, 12)
    before = layer.eval()(x)
    layer.train()
    for _ in range(10):
        layer(x)
    assert torch.equal(layer.eval()(x), before) and layer.rank == 2


def test_set_rank_selects_the_first_b_components_without_copies():
    layer = make_layer(r=6, seed=5).eval()
    x = torch.randn(4, 12)
    a_ptr, b_ptr = layer.lora_A.data_ptr(), layer.lora_B.data_ptr()
    mask, scale = layer.rank_mask, layer.rank_scale
    for b in range(1, 7):
        assert layer.set_rank(b) is layer and layer.rank == b
        assert_close_to_exact(layer(x), reference(layer, x, b), reference(layer, x, b, True),
                              forward_k(layer))
        assert layer.rank_mask is mask and layer.rank_scale is scale  # written in place
        assert torch.equal(mask, (torch.arange(6) < b).float())
        assert scale.item() == torch.tensor(6 / b).item()
    assert (layer.lora_A.data_ptr(), layer.lora_B.data_ptr()) == (a_ptr, b_ptr)


def test_torch_compile_switches_rank_without_recompiling():
    torch._dynamo.reset()
    layer = make_layer(r=5, seed=6).eval()
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(7, 3))
    counter = CountingBackend()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(4, 12)
    for b in [5, 1, 3, 2, 4, 1]:
        layer.set_rank(b)
        with torch.no_grad():
            assert torch.equal(compiled(x), model(x)), b
            assert_close_to_exact(layer(x), reference(layer, x, b), reference(layer, x, b, True),
                              forward_k(layer))
    assert counter.graphs == 1
    # The same with the stock backend named in the brief: no recompilation either.
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for b in [2, 5, 1]:
            layer.set_rank(b)
            assert torch.equal(compiled(x), model(x))
    torch._dynamo.reset()


def test_torch_compile_training_matches_eager_and_does_not_recompile_per_rank():
    torch._dynamo.reset()
    eager, layer = make_layer(r=4, seed=7).train(), make_layer(r=4, seed=7).train()
    counter = CountingBackend()
    compiled = torch.compile(layer, backend=counter)  # the draw is a graph break
    x = torch.randn(3, 12)
    graphs_after_first = None
    for step in range(12):
        y_ref, y = eager(x), compiled(x)
        assert layer.last_rank == eager.last_rank
        torch.testing.assert_close(y, y_ref)
        y.sum().backward()
        y_ref.sum().backward()
        if step == 0:
            graphs_after_first = counter.graphs
    torch.testing.assert_close(layer.lora_A.grad, eager.lora_A.grad)
    torch.testing.assert_close(layer.lora_B.grad, eager.lora_B.grad)
    assert counter.graphs == graphs_after_first
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_equals_the_unmerged_output_and_unmerge_is_exact(dtype):
    layer = make_layer(in_f=32, out_f=16, r=4, seed=8, dtype=dtype).eval()
    base_weight = layer.weight.detach().clone()
    x = torch.randn(5, 32).to(dtype)
    for b in [3, 1]:
        layer.set_rank(b)
        unmerged = layer(x)
        layer.merge()
        assert layer.merged and layer.merged_rank == b
        merged = layer(x)
        exact = reference(layer.unmerge(), x, b)
        magnitude = reference(layer, x, b, absolute=True)
        # Both within the bound of the unmerged chain, whose intermediates are rounded to the
        # dtype: x·Aᵀ, the rank weights (cast to the dtype) and their product, ·Bᵀ (4); the
        # merged weight W + (alpha/b)·B·A (fp32: b + 2 steps, rounded once) needs fewer.
        k = forward_k(layer) + 1
        assert_within_error_bound(merged, exact, magnitude, k, "merged", roundings=4)
        assert_within_error_bound(unmerged, exact, magnitude, k, "unmerged", roundings=4)
        assert torch.equal(layer.weight, base_weight)  # bit for bit
        assert layer._merge_backup is None
    # merge(rank=b) sets the rank; the merged weight is W + delta_weight(b) rounded once.
    layer.merge(rank=2)
    assert layer.rank == 2
    expected = (base_weight.float() + layer.delta_weight(2)).to(dtype)
    assert torch.equal(layer.weight, expected)
    layer.merge(rank=2)  # merging again at the same rank does nothing
    assert torch.equal(layer.weight, expected)
    with pytest.raises(RuntimeError, match="merged at rank 2"):
        layer.merge(rank=3)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.set_rank(4)
    with pytest.raises(RuntimeError, match="before training"):
        layer.train()(x)
    layer.eval().unmerge().unmerge()  # unmerge twice is harmless
    assert torch.equal(layer.weight, base_weight)


def test_constructor_and_state_dict_round_trip():
    src = make_layer(r=3, seed=9)
    dst = DyLoRALinear(12, 7, r=3, seed=0)
    assert not dst.weight.requires_grad
    dst.load_state_dict(src.state_dict())
    x = torch.randn(2, 12)
    for b in (1, 3):
        src.set_rank(b)
        dst.set_rank(b)
        assert torch.equal(src.eval()(x), dst.eval()(x))


def test_bad_arguments():
    lin = nn.Linear(6, 4)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        DyLoRALinear.from_linear(nn.Conv1d(2, 2, 1), 2)
    with pytest.raises(TypeError, match="overrides forward"):
        DyLoRALinear.from_linear(DyLoRALinear.from_linear(lin, 2), 2)
    with pytest.raises(TypeError, match="overrides forward"):
        DyLoRALinear.from_linear(ShiraLinear.from_linear(nn.Linear(6, 4), r=1), 2)
    for r in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match=r"^r must be a positive int"):
            DyLoRALinear.from_linear(lin, r)
        with pytest.raises(ValueError, match=r"^r must be a positive int"):
            DyLoRALinear(6, 4, r=r)
    for alpha in (0, -1.0, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="alpha"):
            DyLoRALinear.from_linear(lin, 2, alpha=alpha)
    with pytest.raises(ValueError, match="seed"):
        DyLoRALinear.from_linear(lin, 2, seed=1.5)
    with pytest.raises(ValueError, match="train_lower"):
        DyLoRALinear.from_linear(lin, 2, train_lower=1)
    layer = DyLoRALinear.from_linear(lin, 3, alpha=6.0)
    for rank in (0, 4, -1, 2.0, True, "2"):
        with pytest.raises(ValueError, match="rank"):
            layer.set_rank(rank)
        with pytest.raises(ValueError, match="rank"):
            layer.merge(rank)
    assert layer.rank == 3 and not layer.merged
    layer.set_rank(2)
    assert layer.rank_scale.item() == 3.0  # alpha / b
    assert "r=3, rank=2, alpha=6.0" in repr(layer)


# -- r_max, r's old name: accepted with a DeprecationWarning --------------------------------------
def _same_layer(a, b):
    assert a.r == b.r and a.alpha == b.alpha and a.seed == b.seed
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_r_is_the_maximum_rank(recwarn):
    layer = DyLoRALinear.from_linear(nn.Linear(6, 4), r=3, seed=0)
    assert layer.r == 3 and layer.rank == 3 and layer.lora_A.shape == (3, 6)
    layer.set_rank(2)
    assert layer.r == 3 and layer.rank == 2  # r stays the maximum; rank is the inference rank
    assert DyLoRALinear(6, 4, r=3, seed=0).r == 3
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def test_r_max_keyword_is_deprecated_and_builds_the_same_layer():
    torch.manual_seed(0)  # the same base layer, and the same seed: the same layer
    new = DyLoRALinear.from_linear(nn.Linear(6, 4), r=3, seed=5)
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    with pytest.warns(DeprecationWarning, match=r"r_max= is deprecated, pass r=") as record:
        old = DyLoRALinear.from_linear(lin, r_max=3, seed=5)
    assert record[0].filename == __file__  # attributed to the caller
    _same_layer(old, new)
    torch.manual_seed(1)
    new = DyLoRALinear(6, 4, r=3)
    torch.manual_seed(1)
    with pytest.warns(DeprecationWarning, match=r"r_max= is deprecated"):
        old = DyLoRALinear(6, 4, r_max=3)
    _same_layer(old, new)
    # The attribute r_max: a read-only alias of r, deprecated too.
    with pytest.raises(AttributeError):
        old.r_max = 2
    with pytest.warns(DeprecationWarning, match=r"DyLoRALinear\.r_max is deprecated, use \.r"):
        assert old.r_max == old.r == 3


def test_r_and_r_max_together_or_neither_are_refused():
    with pytest.raises(TypeError, match=r"got both 'r' and 'r_max'"):
        DyLoRALinear.from_linear(nn.Linear(6, 4), 3, r_max=3)
    with pytest.raises(TypeError, match=r"got both 'r' and 'r_max'"):
        DyLoRALinear(6, 4, r=3, r_max=3)
    with pytest.raises(TypeError, match=r"missing required argument: 'r'"):
        DyLoRALinear.from_linear(nn.Linear(6, 4))
    with pytest.raises(TypeError, match=r"missing required argument: 'r'"):
        DyLoRALinear(6, 4)


def test_a_refused_r_max_is_named_r_max():
    lin = nn.Linear(6, 4)
    for bad in (0, 2.0, None):
        with pytest.warns(DeprecationWarning), \
                pytest.raises(ValueError, match=r"^r_max must be a positive int"):
            DyLoRALinear.from_linear(lin, r_max=bad)
        with pytest.warns(DeprecationWarning), \
                pytest.raises(ValueError, match=r"^r_max must be a positive int"):
            DyLoRALinear(6, 4, r_max=bad)
    assert lin.weight.requires_grad
