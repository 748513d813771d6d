"""MoSA (shira_kernels/methods/mosa.py): a step's modules are the only entries in the forward
and the only ones an optimizer moves; the merged adapter is the sum of the modules; the
subset's structure is the one SparseStructure.build derives; bad arguments; the example."""
import copy
import importlib.util
import itertools
import pathlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from shira_kernels.formats import SparseStructure
from shira_kernels.ops import registry
from shira_kernels.methods.mosa import (Bottleneck, MoSABottleneck, MoSAShiraLinear,
                                        ParallelAdapter, SparseModules, merge_mosa)
from shira_kernels.nn import ShiraLinear

from test_sparse_delta import delta_linear_bound
from tolerance import assert_within_error_bound
from unchanged import assert_same_bits, state_bits

DTYPES = (torch.float32, torch.bfloat16)
# CUDA tensors too where a GPU is visible (the ops pick the cuda or triton backend there).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FIELDS = ("rows", "cols", "row_offsets", "t_offsets", "t_cols", "t_perm")


def _randomize(modules: SparseModules, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for values in modules.module_values:
            values.copy_(torch.randn(values.shape, generator=g))


def _dense64(modules: SparseModules, chosen, absolute=False) -> torch.Tensor:
    """The chosen modules' entries, summed module by module into a float64 matrix."""
    dense = torch.zeros(modules.shape, dtype=torch.float64)
    for j in chosen:
        values = modules.module_values[j].detach().double()
        values = values.abs() if absolute else values
        dense.view(-1)[modules.module_flat_indices[j].long()] += values
    return dense


def _bottleneck64(layer, x, chosen, factor, absolute=False):
    """scale·(f·relu(f·x·Dᵀ + b_d)·Uᵀ + b_u) in float64 over the chosen modules (absolute: the
    same on absolute values, the error bound's magnitude)."""
    t = (lambda v: v.detach().double().abs()) if absolute else (lambda v: v.detach().double())
    down, up = (_dense64(m, chosen, absolute) for m in (layer.down_modules, layer.up_modules))
    h = factor * t(x) @ down.T + t(layer.down_bias)
    y = factor * torch.relu(h) @ up.T + t(layer.up_bias)
    return abs(layer.scale) * y if absolute else layer.scale * y


def _mosa_bottleneck(d, r, dtype, k=3, active=2, seed=0, **kwargs):
    layer = MoSABottleneck(d, r, k=k, active=active, seed=seed, dtype=dtype, **kwargs)
    for i, modules in enumerate((layer.down_modules, layer.up_modules)):
        _randomize(modules, seed + i)
    with torch.no_grad():
        layer.down_bias.normal_()
        layer.up_bias.normal_()
    return layer


# ---------------------------------------------------------------------------------------------
# The structure of a subset: O(nnz) filtering gives exactly what a fresh derivation gives.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hierarchical", [False, True])
def test_subset_structure_is_the_derived_one(hierarchical):
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(7, 13, generator=g) < 0.55
    nnz = int(mask.sum())
    mask.view(-1)[mask.view(-1).nonzero().view(-1)[:nnz % 4]] = False  # 4 | nnz
    k, k_fine = (2, 2) if hierarchical else (4, 1)
    modules = SparseModules(mask, k, k_fine=k_fine, seed=5, init=torch.randn(7, 13, generator=g))
    assert modules.n_modules == 4 and modules.nnz == int(mask.sum())
    union = torch.cat([i.long() for i in modules.module_flat_indices]).sort().values
    assert torch.equal(union, mask.view(-1).nonzero().view(-1))  # disjoint, union = mask
    for size in range(1, 5):
        for chosen in itertools.combinations(range(4), size):
            values, flat, structure = modules.operands(chosen)
            want = SparseStructure.build(flat, modules.shape)
            for name in FIELDS:
                got, expected = getattr(structure, name), getattr(want, name)
                assert got.dtype == expected.dtype and torch.equal(got, expected), (chosen, name)
            entries = torch.cat([modules.module_flat_indices[j].long() for j in chosen])
            assert torch.equal(flat.long(), entries.sort().values)
            assert torch.equal(values, _dense64(modules, chosen).float().view(-1)[flat.long()])


# ---------------------------------------------------------------------------------------------
# Inactive modules: no gradient, so AdamW (weight decay, momentum) leaves them as they were.
# ---------------------------------------------------------------------------------------------
def _two_steps(layer, x, second):
    """AdamW steps: every module, then ``second``; per module of each SparseModules of the
    layer, (values before step 2, grad in step 2)."""
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    layer.train()
    layer.set_active(tuple(range(layer.n_modules)))  # step 1: every module gets Adam state
    layer(x).square().sum().backward()
    opt.step()
    opt.zero_grad()
    split = [m for m in layer.modules() if isinstance(m, SparseModules)]
    before = [[v.detach().clone() for v in m.module_values] for m in split]
    layer.set_active(second)
    layer(x).square().sum().backward()
    grads = [[v.grad for v in m.module_values] for m in split]
    opt.step()
    return split, before, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer_kind", ["bottleneck", "shira"])
def test_inactive_modules_are_untouched_by_adamw(dtype, layer_kind):
    if layer_kind == "bottleneck":
        layer = _mosa_bottleneck(13, 3, dtype, k=3)  # 39 entries per matrix, 13 per module
        x, second = torch.randn(5, 13, dtype=dtype), (1,)
    else:
        base = nn.Linear(11, 7, dtype=dtype)
        layer = MoSAShiraLinear.from_linear(base, k=3, active=2, r=3, seed=1)  # 54 entries
        _randomize(layer.shira_modules, 1)
        x, second = torch.randn(2, 3, 11, dtype=dtype), (0, 2)
    frozen = [p.detach().clone() for p in layer.parameters() if not p.requires_grad]
    split, before, grads = _two_steps(layer, x, second)
    assert len(split) == (2 if layer_kind == "bottleneck" else 1)
    for modules, was, grad in zip(split, before, grads):
        for j, values in enumerate(modules.module_values):
            active = j in second
            assert (grad[j] is None) != active, (j, grad[j])
            assert torch.equal(values, was[j]) != active, f"module {j}"
    after = [p for p in layer.parameters() if not p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(after, frozen))  # the base weight, bias


# ---------------------------------------------------------------------------------------------
# Only the step's modules are in the forward; the merged adapter is the sum of all of them.
# ---------------------------------------------------------------------------------------------
# Bottleneck bound, along the longest chain: fp32 steps d (x·Dᵀ) + 1 (the factor) + r (h·Uᵀ)
# + 1 (the factor); roundings in the working dtype: down's output, its bias add, up's output,
# its bias add, the scale (torch's dense layers: the addmm products and bias adds, the scale).
def _bottleneck_bound(d, r):
    return d + r + 2, 5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rescale", [True, False])
def test_bottleneck_forward_uses_only_the_active_modules(dtype, rescale, device):
    d, r = 13, 3
    layer = _mosa_bottleneck(d, r, dtype, rescale=rescale)  # the reference reads it on the CPU
    x = torch.randn(2, 4, d, dtype=dtype)
    on_device = copy.deepcopy(layer).to(device)
    k, n = _bottleneck_bound(d, r)
    for chosen in [(0,), (2,), (0, 2), (0, 1, 2)]:
        on_device.set_active(chosen)
        factor = 3 / len(chosen) if rescale else 1.0
        exact = _bottleneck64(layer, x, chosen, factor)
        magnitude = _bottleneck64(layer, x, chosen, factor, absolute=True)
        assert_within_error_bound(on_device(x.to(device)).cpu(), exact, magnitude, k,
                                  f"modules {chosen}", roundings=n)
    layer = on_device
    assert layer.last_active == (0, 1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hierarchical", [False, True])
def test_merged_bottleneck_is_the_sum_of_its_modules(dtype, hierarchical):
    d, r = 13, 6  # 78 entries: 3 modules of 26, or 3 groups x 2 modules of 13
    split = dict(hierarchical=True, k_fine=2, active_fine=1) if hierarchical else {}
    layer = _mosa_bottleneck(d, r, dtype, k=3, active=1, **split)
    model = nn.Sequential(ParallelAdapter(nn.Identity(), layer))
    x = torch.randn(9, d, dtype=dtype)
    every = tuple(range(layer.n_modules))
    exact = x.double() + _bottleneck64(layer, x, every, 1.0)
    magnitude = x.double().abs() + _bottleneck64(layer, x, every, 1.0, absolute=True)
    k, n = _bottleneck_bound(d, r)
    model.eval()  # eval: every module, no rescaling
    assert_within_error_bound(model(x), exact, magnitude, k + 1, "eval", roundings=n + 1)
    assert merge_mosa(model) == ["0.adapter"]
    merged = model[0].adapter
    assert type(merged) is Bottleneck and merged.down.weight.dtype == dtype
    assert sum(p.numel() for p in merged.parameters()) == sum(
        p.numel() for p in layer.parameters())
    assert_within_error_bound(model(x), exact, magnitude, k + 1, "merged", roundings=n + 1)
    with pytest.raises(RuntimeError, match="merged"):
        layer(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merged_shira_linear_is_the_sum_of_its_modules(dtype):
    base = nn.Linear(11, 7, dtype=dtype)
    weight = base.weight.detach().clone()
    layer = MoSAShiraLinear.from_linear(base, k=4, active=1, r=2, seed=2, scale=0.5)
    _randomize(layer.shira_modules, 4)
    x = torch.randn(6, 11, dtype=dtype)
    k, n = delta_linear_bound(11)

    def reference(chosen, factor, absolute=False):
        t = (lambda v: v.detach().double().abs()) if absolute else (lambda v: v.detach().double())
        delta = _dense64(layer.shira_modules, chosen, absolute)
        return F.linear(t(x), t(weight) + 0.5 * factor * delta, t(layer.bias))

    layer.train()
    layer.set_active((2,))  # one module of 4, rescaled by 4
    assert_within_error_bound(layer(x), reference((2,), 4.0), reference((2,), 4.0, True), k,
                              "module 2", roundings=n)
    layer.eval()
    every = (0, 1, 2, 3)
    exact, magnitude = reference(every, 1.0), reference(every, 1.0, True)
    assert_within_error_bound(layer(x), exact, magnitude, k, "eval", roundings=n)
    model = nn.Sequential(layer)
    assert merge_mosa(model) == ["0"]
    merged = model[0]
    assert type(merged) is ShiraLinear and merged.merged and merged.weight is layer.weight
    assert merged.shira_values.numel() == layer.shira_modules.nnz
    assert_within_error_bound(merged(x), exact, magnitude, k, "merged into W", roundings=n)
    merged.unmerge()
    assert torch.equal(merged.weight, weight)  # the base comes back bit for bit
    assert_within_error_bound(merged(x), exact, magnitude, k, "unmerged", roundings=n)


def _shared_layer(kind, dtype=torch.float32, value=None):
    if kind == "bottleneck":
        return _mosa_bottleneck(8, 4, dtype, k=4)
    layer = MoSAShiraLinear.from_linear(nn.Linear(8, 8, dtype=dtype), k=4, active=2, r=2)
    _randomize(layer.shira_modules, 1)
    if value is not None:
        with torch.no_grad():
            for values in layer.shira_modules.module_values:
                values.fill_(value)
    return layer


@pytest.mark.parametrize("kind", ["bottleneck", "shira"])
def test_merge_mosa_replaces_a_shared_layer_in_every_place(kind):
    # named_modules() names a shared module once: the other places kept the merged-away layer.
    layer = _shared_layer(kind)
    model = nn.Sequential(layer, nn.ReLU(), nn.Sequential(layer)).eval()
    x = torch.randn(3, 8)
    expected = model(x)
    assert merge_mosa(model) == ["0", "2.0"]  # was: ["0"]
    merged = model[0]
    assert model[2][0] is merged and not isinstance(merged, (MoSABottleneck, MoSAShiraLinear))
    torch.testing.assert_close(model(x), expected)  # was: RuntimeError, the layer was merged
    # Refused part way (a later layer overflows fp16): every place keeps the shared layer.
    shared = _shared_layer("shira", torch.float16, 0.5)
    overflow = _shared_layer("shira", torch.float16, 6e4)
    overflow.scale = 2.0
    model = nn.Sequential(shared, overflow, nn.Sequential(shared))
    before = state_bits(model)
    with pytest.raises(ValueError, match=r"layer '1'"):
        merge_mosa(model)
    assert model[0] is shared and model[2][0] is shared and not shared.merged
    assert_same_bits(state_bits(model), before)


def test_merged_layers_take_the_training_flag_of_the_original():
    for training in (False, True):
        model = nn.Sequential(_shared_layer("bottleneck"), _shared_layer("shira")).train(training)
        merge_mosa(model)
        assert [m.training for m in model.modules()] == [training] * len(list(model.modules()))
        layer = _shared_layer("bottleneck").train(training)
        assert layer.merge().training == training  # was: True, a new module's default


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_bottleneck_runs_on_the_sparse_kernels_only():
    layer = _mosa_bottleneck(16, 4, torch.float32, k=4, active=2)
    x = torch.randn(8, 16, requires_grad=True)
    kernels = []
    real_kernel = registry.kernel

    def recording(op, *args, **kwargs):  # the sparse kernels the step asks the registry for
        kernels.append(op)
        return real_kernel(op, *args, **kwargs)

    with _OpLog() as log, mock.patch.object(registry, "kernel", recording):
        layer(x).sum().backward()
    assert "spmm" in kernels and ({"spmm_t_sddmm", "sddmm"} & set(kernels)), kernels
    dense = {"aten.mm", "aten.addmm", "aten.bmm", "aten.matmul", "aten.linear"} & log.ops
    assert not dense, f"dense matmuls in a MoSA step: {dense}"


# ---------------------------------------------------------------------------------------------
# Drawing the modules.
# ---------------------------------------------------------------------------------------------
def test_draws_pick_at_both_levels():
    layer = MoSABottleneck(8, 6, k=3, active=2, hierarchical=True, k_fine=4, active_fine=3)
    seen = set()
    for _ in range(200):
        chosen = layer.draw()
        groups = [m // 4 for m in chosen]
        assert len(chosen) == 6 and len(set(groups)) == 2
        assert all(groups.count(g) == 3 for g in set(groups))
        seen.update(chosen)
    assert seen == set(range(12))
    flat = MoSABottleneck(8, 6, k=4, active=3, seed=1)
    draws = {flat.draw() for _ in range(100)}
    assert all(len(c) == 3 for c in draws) and len(draws) == 4  # every 3-subset of 4


def test_training_draws_per_forward_and_eval_uses_all():
    layer = MoSABottleneck(8, 4, k=4, active=1, seed=3)
    x = torch.randn(2, 8)
    layer.train()
    chosen = set()
    for _ in range(30):
        layer(x)
        chosen.add(layer.last_active)
    assert len(chosen) == 4 and all(len(c) == 1 for c in chosen)
    layer.set_active([2])
    layer(x)
    assert layer.last_active == (2,)
    layer.eval()
    layer(x)
    assert layer.last_active == (0, 1, 2, 3)


def test_same_seed_same_draws_and_start():
    dense = Bottleneck(8, 4)
    a, b = (MoSABottleneck.from_bottleneck(dense, k=4, active=2, seed=7) for _ in range(2))
    assert [a.draw() for _ in range(5)] == [b.draw() for _ in range(5)]
    assert torch.equal(a.down_modules.to_dense(), dense.down.weight.detach())
    assert torch.equal(a.up_modules.to_dense(), dense.up.weight.detach())


def test_state_dict_round_trip_and_refused_load():
    layer = _mosa_bottleneck(10, 4, torch.float32, k=4)
    other = MoSABottleneck(10, 4, k=4, seed=9)  # another split
    other.load_state_dict(layer.state_dict())
    layer.eval(), other.eval()
    x = torch.randn(3, 10)
    assert torch.equal(other(x), layer(x))
    state = layer.state_dict()
    bad = state["down_modules.module_flat_indices"].clone()
    bad[1, 0] = bad[0, 0]  # two modules share an entry
    state["down_modules.module_flat_indices"] = bad
    kept = other.state_dict()
    with pytest.raises(ValueError, match="overlap|sorted"):
        other.load_state_dict(state)
    for key, t in other.state_dict().items():
        assert torch.equal(t, kept[key]), key


def _mosa_shira(k, seed):
    torch.manual_seed(seed)
    layer = MoSAShiraLinear.from_linear(nn.Linear(16, 8), k=k, active=1, r=2, seed=seed)
    _randomize(layer.shira_modules, seed)
    return layer


def _refused_load_cases():
    """(layer, state_dict it refuses, the key the refusal names), each refusal found by torch
    only after copying some of the layer's tensors."""
    def other_k_shira():
        state = _mosa_shira(2, 1).state_dict()
        return _mosa_shira(4, 0), state, "shira_modules.module_flat_indices"

    def other_k_bottleneck():
        state = _mosa_bottleneck(8, 4, torch.float32, k=2, seed=1).state_dict()
        return _mosa_bottleneck(8, 4, torch.float32, k=4), state, "down_modules.module_flat_indices"

    def permuted_and_missized(make, prefix):
        def case():
            layer = make()
            state = layer.state_dict()
            state[prefix + "module_flat_indices"] = state[prefix + "module_flat_indices"].flip(0)
            key = prefix + "module_values.1"
            state[key] = torch.zeros(state[key].numel() + 1)
            return layer, state, key
        return case

    return {"other_k_shira": other_k_shira, "other_k_bottleneck": other_k_bottleneck,
            "permuted_missized_bottleneck": permuted_and_missized(
                lambda: _mosa_bottleneck(8, 4, torch.float32, k=4), "up_modules."),
            "permuted_missized_shira": permuted_and_missized(lambda: _mosa_shira(4, 0),
                                                             "shira_modules."),
            "permuted_missized_modules": permuted_and_missized(
                lambda: _mosa_bottleneck(8, 4, torch.float32, k=4).down_modules, "")}


@pytest.mark.parametrize("case", list(_refused_load_cases()))
def test_refused_load_changes_nothing(case):
    layer, state, key = _refused_load_cases()[case]()
    before = state_bits(layer, derived=True)
    with pytest.raises((ValueError, RuntimeError), match=key.replace(".", r"\.")):
        layer.load_state_dict(state)  # was: the base weight, biases or indices copied first
    assert_same_bits(state_bits(layer, derived=True), before)


@pytest.mark.parametrize("fault", ["wraps_in_int32", "fractional", "negative"])
def test_load_refuses_indices_a_cast_would_change(fault):
    # The indices are checked as the state_dict holds them, not after the cast to the buffer's
    # int32: an int64 index 2**32 + i is not entry i, and a float index 3.5 is not entry 3.
    layer = _mosa_bottleneck(8, 4, torch.float32, k=4)
    state, key = layer.state_dict(), "down_modules.module_flat_indices"
    last = torch.zeros(state[key].shape, dtype=torch.bool)
    last[-1, -1] = True
    bad, error = {"wraps_in_int32": (state[key].long() + 2 ** 32 * last, ValueError),
                  "fractional": (state[key].float() + 0.5, TypeError),
                  "negative": (state[key].long() - 2 ** 32 * last, ValueError)}[fault]
    before = state_bits(layer, derived=True)
    with pytest.raises(error, match=rf"{key}\[\d\] .*(out of range|int32 or int64)"):
        layer.load_state_dict({**state, key: bad})  # was: accepted
    assert_same_bits(state_bits(layer, derived=True), before)
    layer.load_state_dict({**state, key: state[key].long()})  # in range: int64 loads


# ---------------------------------------------------------------------------------------------
# Bad arguments.
# ---------------------------------------------------------------------------------------------
def test_bad_arguments():
    with pytest.raises(ValueError, match="not divisible by 5"):
        MoSABottleneck(13, 3, k=5, active=1)  # 39 entries
    with pytest.raises(ValueError, match=r"k·k_fine=3·2"):
        MoSABottleneck(13, 3, k=3, active=1, hierarchical=True, k_fine=2)
    with pytest.raises(ValueError, match="active must be between 1 and k=4"):
        MoSABottleneck(8, 4, k=4, active=5)
    with pytest.raises(ValueError, match="active must be ≥ 1"):
        MoSABottleneck(8, 4, k=4, active=0)
    with pytest.raises(ValueError, match="active_fine must be between 1 and k_fine=2"):
        MoSABottleneck(8, 4, k=2, active=1, hierarchical=True, k_fine=2, active_fine=3)
    with pytest.raises(ValueError, match="hierarchical=True"):
        MoSABottleneck(8, 4, k=2, active=1, k_fine=2)
    with pytest.raises(TypeError, match="k must be an int"):
        MoSABottleneck(8, 4, k=2.0, active=1)
    with pytest.raises(TypeError, match="hierarchical must be a bool"):
        MoSABottleneck(8, 4, k=2, active=1, hierarchical=1)
    with pytest.raises(TypeError, match="rescale must be a bool"):
        MoSABottleneck(8, 4, k=2, active=1, rescale="yes")
    with pytest.raises(TypeError, match="Bottleneck"):
        MoSABottleneck.from_bottleneck(nn.Linear(4, 4))
    layer = MoSABottleneck(8, 4, k=4, active=2)
    for bad, error in (([4], ValueError), ([], ValueError), ([1, 1], ValueError),
                       ([-1], ValueError), (["a"], TypeError)):
        with pytest.raises(error, match="modules"):
            layer.set_active(bad)
    with pytest.raises(TypeError, match="x has dtype"):
        layer(torch.randn(2, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="last dim must be d = 8"):
        layer(torch.randn(2, 7))
    # A refused split leaves the layer it wraps as it was.
    base = nn.Linear(11, 7)
    shira = ShiraLinear.from_linear(base, r=2)  # 36 entries
    with pytest.raises(ValueError, match="not divisible by 5"):
        MoSAShiraLinear.from_shira(shira, k=5, active=1)
    with pytest.raises(TypeError, match="ShiraLinear"):
        MoSAShiraLinear.from_shira(base)
    with pytest.raises(TypeError, match="from_shira"):
        MoSAShiraLinear(11, 7)
    shira.merge()
    with pytest.raises(ValueError, match="unmerge"):
        MoSAShiraLinear.from_shira(shira)


# ---------------------------------------------------------------------------------------------
# The example (quick mode, in-process).
# ---------------------------------------------------------------------------------------------
def test_example_quick_trains_every_adapter():
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "mosa.py"
    spec = importlib.util.spec_from_file_location("mosa_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    result = example.main(["--quick", "--seed", "0"])
    assert torch.get_num_threads() == threads
    assert result["task_a"] > 0.6  # the pre-training learned task A
    # Adapting helps every method well beyond the frozen model and far above chance (checked
    # over seeds 0-2: at least +5.7 points over the frozen model, which is near 0.5).
    for name, accuracy in result["accuracy"].items():
        assert accuracy > result["base_on_b"] + 0.03, name
        assert accuracy > 4 * result["chance"], name
    assert all(result["merged_equal"].values())
    trainable = result["trainable"]
    assert trainable["dense bottleneck"] == trainable["MoSA bottleneck"] \
        == trainable["MoSA hierarchical"]
    assert trainable["ShiraLinear"] == trainable["MoSA ShiraLinear"]
    assert result["mosa_minus_dense"] == pytest.approx(
        result["accuracy"]["MoSA bottleneck"] - result["accuracy"]["dense bottleneck"])
