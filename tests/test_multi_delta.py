"""multi_delta_linear: a batch whose rows use different sparse adapters, every backend against
the float64 reference (forward and gradients, within tests/tolerance.py's bound), row for row
the same bits as the single-adapter spmm strategy on the CPU kernels, and SparseDeltaSet."""
import pytest
import torch
from torch.library import opcheck

import shira_kernels
from shira_kernels import SparseDeltaSet
from shira_kernels.ops import multi_delta
from shira_kernels.ops.multi_delta import multi_delta_linear_reference

from conftest import DTYPES
from tolerance import abs64, assert_within_error_bound
from test_sparse_delta import delta_linear_bound, make_delta, randn

SCALES = (0.5, 2.0, 1.0)


def make_set(out_f, in_f, dtype, device="cpu", n=3):
    delta_set = SparseDeltaSet((out_f, in_f))
    for i in range(n):
        delta_set.add(f"a{i}", make_delta(out_f, in_f, dtype, density=0.1 + 0.1 * i, seed=i,
                                          device=device), SCALES[i % len(SCALES)])
    return delta_set


def exact_and_magnitude(x, weight, bias, delta_set, row_adapter, gy, values):
    """The float64 result and gradients (x, each adapter's values, bias), and the same on
    absolute values (the magnitudes of the error bound)."""
    out = []
    for f in (lambda t: t.detach().double(), abs64):
        x64, w64, b64 = (f(t).requires_grad_(t.requires_grad) for t in (x, weight, bias))
        v64 = [f(v).requires_grad_() for v in values]
        deltas = [e[1].with_values(v) for e, v in zip(delta_set.slots, v64)]
        scales = [e[2] for e in delta_set.slots]
        y = multi_delta_linear_reference(x64.reshape(-1, x.shape[-1]), w64, b64, deltas, scales,
                                         row_adapter.reshape(-1))
        y = y.view(*x.shape[:-1], -1)
        inputs = [x64, b64] + v64
        grads = torch.autograd.grad(y, inputs, f(gy).view(y.shape), allow_unused=True)
        out.append([y] + [torch.zeros_like(t) if g is None else g
                          for t, g in zip(inputs, grads)])
    return out


# (tokens, out, in), with the rows' adapters: groups of several rows, a group of one row,
# base rows, an adapter absent from the batch, every row base, one adapter for all rows.
CASES = {
    "mixed": ((9, 33, 65), [0, 1, -1, 0, 2, 1, 0, -1, 2]),
    "one-row-group": ((5, 17, 40), [0, 0, 1, -1, 0]),
    "absent-adapter": ((6, 8, 130), [2, 0, 2, 0, -1, 2]),
    "all-base": ((4, 6, 10), [-1, -1, -1, -1]),
    "one-adapter": ((7, 131, 50), [1] * 7),
    "runs": ((8, 33, 65), [1, 1, 1, 0, 0, -1, 2, 2]),  # each group one run: views, no gathers
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_against_the_reference_with_gradients(backend, device, dtype, case):
    (tokens, out_f, in_f), assignment = CASES[case]
    delta_set = make_set(out_f, in_f, dtype, device).requires_grad_()
    values = [e[1].values for e in delta_set.slots]
    x = randn(tokens, in_f, dtype=dtype, seed=1, device=device).requires_grad_()
    weight = randn(out_f, in_f, dtype=dtype, seed=2, device=device)
    bias = randn(out_f, dtype=dtype, seed=3, device=device).requires_grad_()
    row_adapter = torch.tensor(assignment, device=device)
    gy = randn(tokens, out_f, dtype=dtype, seed=4, device=device)
    y = shira_kernels.multi_delta_linear(x, weight, bias, delta_set, row_adapter)
    assert y.shape == (tokens, out_f) and y.dtype == dtype
    gx, gbias, gbuffer = torch.autograd.grad(y, [x, bias, delta_set.values], gy)
    segments = [delta_set.segment(e[0]) for e in delta_set.slots]
    ours = [y, gx, gbias] + [gbuffer[seg] for seg in segments]
    outside = torch.ones_like(gbuffer, dtype=torch.bool)  # the buffer's spare room
    for seg in segments:
        outside[seg] = False
    assert not gbuffer[outside].any()
    exact, magnitude = exact_and_magnitude(x, weight, bias, delta_set, row_adapter, gy, values)
    # y and grad x as sparse_delta_linear's; the values' gradient: the group's sddmm sum and the
    # scale; the bias's: a sum over the tokens.
    bounds = [delta_linear_bound(in_f), delta_linear_bound(out_f), (tokens, 0)] + \
        [(tokens + 1, 0)] * len(values)
    names = ["y", "grad x", "grad bias"] + [f"grad values {i}" for i in range(len(values))]
    for name, o, e, m, (k, n) in zip(names, ours, exact, magnitude, bounds):
        assert_within_error_bound(o, e, m, k, f"{case} {name}", roundings=n)
    for a, grad in enumerate(ours[3:]):  # an adapter no row uses gets a zero gradient
        if a not in assignment:
            assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["mixed", "one-row-group", "all-base", "runs"])
def test_base_on_the_fold_kernel_against_the_reference(dtype, case):
    # Where tuning measured it faster on this machine ("auto"), or when asked, the CPU runs the
    # base product (x·Wᵀ + b and gy·W) on the fold kernel with no entries instead of torch's
    # matmul: the same bound.
    (tokens, out_f, in_f), assignment = CASES[case]
    delta_set = make_set(out_f, in_f, dtype).requires_grad_()
    values = [e[1].values for e in delta_set.slots]
    x = randn(tokens, in_f, dtype=dtype, seed=1).requires_grad_()
    weight = randn(out_f, in_f, dtype=dtype, seed=2)
    bias = randn(out_f, dtype=dtype, seed=3).requires_grad_()
    row_adapter = torch.tensor(assignment)
    gy = randn(tokens, out_f, dtype=dtype, seed=4)
    with shira_kernels.use_backend("cpu"):
        y = shira_kernels.multi_delta_linear(x, weight, bias, delta_set, row_adapter,
                                             base="fold")
        gx, gbuffer = torch.autograd.grad(y, [x, delta_set.values], gy)
        with torch.no_grad():  # the base alone: the fold kernel's, not torch's
            base = multi_delta._base_linear(x, weight, bias, "fold")
    assert torch.equal(y[row_adapter == -1], base[row_adapter == -1])
    exact, magnitude = exact_and_magnitude(x, weight, bias, delta_set, row_adapter, gy, values)
    ours = [y, gx] + [gbuffer[delta_set.segment(e[0])] for e in delta_set.slots]
    bounds = [delta_linear_bound(in_f), delta_linear_bound(out_f)] + \
        [(tokens + 1, 0)] * len(values)
    for name, o, e, m, (k, n) in zip(["y", "grad x", "v0", "v1", "v2"], ours,
                                     exact[:2] + exact[3:], magnitude[:2] + magnitude[3:],
                                     bounds):
        assert_within_error_bound(o, e, m, k, f"{case} {name}", roundings=n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("base", ["torch", "fold"])
def test_base_linear_alone(dtype, base):
    # The base product alone (BinaryAdapterBank.mixed adds its 1-bit branches to it) on either
    # kernel: F.linear itself for "torch"; for "fold" within the bound of a dense product, its
    # gradients of x, W and the bias too, and the op passes opcheck.
    x = randn(2, 3, 65, dtype=dtype, seed=1).requires_grad_()
    weight = randn(33, 65, dtype=dtype, seed=2).requires_grad_()
    bias = randn(33, dtype=dtype, seed=3).requires_grad_()
    gy = randn(2, 3, 33, dtype=dtype, seed=4)
    with shira_kernels.use_backend("cpu"):
        y = multi_delta.base_linear(x, weight, bias, base=base)
        grads = torch.autograd.grad(y, [x, weight, bias], gy)
    theirs = torch.nn.functional.linear(x, weight, bias)
    if base == "torch":
        assert torch.equal(y, theirs)
    assert y.shape == (2, 3, 33) and y.dtype == dtype
    x64, w64, b64 = (t.detach().double() for t in (x, weight, bias))
    exact = torch.nn.functional.linear(x64, w64, b64)
    g64 = gy.double()
    assert_within_error_bound(y, exact, abs64(x) @ abs64(weight).T + abs64(bias), 65 + 1, "y")
    for name, ours, e, m, k in [
            ("grad x", grads[0], g64 @ w64, abs64(gy) @ abs64(weight), 33),
            ("grad W", grads[1], g64.reshape(-1, 33).T @ x64.reshape(-1, 65),
             abs64(gy).reshape(-1, 33).T @ abs64(x).reshape(-1, 65), 6),
            ("grad bias", grads[2], g64.reshape(-1, 33).sum(0), abs64(gy).reshape(-1, 33).sum(0), 6)]:
        assert_within_error_bound(ours, e, m, k, name)
    opcheck(torch.ops.shira.base_linear.default,
            (x.detach().view(6, 65).requires_grad_(), weight.detach(), bias.detach(), base))
    with pytest.raises(ValueError, match="base must be one of"):
        multi_delta.base_linear(x, weight, bias, base="mkl")
    with pytest.raises(ValueError, match="last dim must be in_features = 65"):
        multi_delta.base_linear(x[..., :64], weight, bias)


@pytest.mark.parametrize("assignment", [[0, 2, 1, -1, 0, 1, 2, -1, 0, 1],
                                        [2, 2, 2, 0, 0, 0, 0, -1, 1, 1]],
                         ids=["interleaved", "runs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_each_row_is_its_adapters_single_adapter_output(dtype, assignment):
    # The CPU kernels: the same dense matmul on the same batch, and spmm's sum for a token does
    # not depend on the other tokens, so each row is bit for bit what sparse_delta_linear's
    # spmm strategy gives with that row's adapter (groups of two or more rows: a single token
    # takes the one-token path, whose sum is ordered differently). Groups whose rows are one
    # run of the batch ("runs") are served by views, the others by gathered rows.
    tokens, out_f, in_f = 10, 70, 300
    delta_set = make_set(out_f, in_f, dtype)
    x = randn(2, tokens // 2, in_f, dtype=dtype, seed=1)  # leading dims are flattened
    weight, bias = randn(out_f, in_f, dtype=dtype, seed=2), randn(out_f, dtype=dtype, seed=3)
    with torch.no_grad(), shira_kernels.use_backend("cpu"):
        y = shira_kernels.multi_delta_linear(x, weight, bias, delta_set,
                                             torch.tensor(assignment).view(2, -1))
        for a in (-1, 0, 1, 2):
            if a == -1:
                single = torch.nn.functional.linear(x, weight, bias)
            else:
                _, delta, scale = delta_set.slots[a]
                single = shira_kernels.sparse_delta_linear(x, weight, bias, delta, scale,
                                                           strategy="spmm")
            rows = torch.tensor(assignment).view(2, -1) == a
            assert torch.equal(y[rows], single[rows]), a


def test_names_and_slots():
    delta_set = make_set(6, 10, torch.float32)
    x, weight = randn(4, 10, dtype=torch.float32, seed=1), randn(6, 10, dtype=torch.float32, seed=2)
    by_names = shira_kernels.multi_delta_linear(x, weight, None, delta_set,
                                                ["a1", None, "__base__", "a0"])
    by_slots = shira_kernels.multi_delta_linear(x, weight, None, delta_set, [1, -1, -1, 0])
    assert torch.equal(by_names, by_slots)
    # One adapter per batch row of a [batch, sequence, features] input, for all its positions.
    x3 = x.view(2, 2, 10)
    per_batch_row = shira_kernels.multi_delta_linear(x3, weight, None, delta_set, [1, 0])
    assert torch.equal(per_batch_row, shira_kernels.multi_delta_linear(
        x3, weight, None, delta_set, torch.tensor([[1, 1], [0, 0]])))
    # Removing an adapter frees its slot and keeps the others; add reuses the lowest free one.
    delta_set.remove("a1")
    assert delta_set.names == ["a0", "a2"] and delta_set.index("a2") == 2 and "a1" not in delta_set
    with pytest.raises(ValueError, match="not an adapter slot"):
        shira_kernels.multi_delta_linear(x, weight, None, delta_set, [1, -1, -1, 0])
    after = shira_kernels.multi_delta_linear(x, weight, None, delta_set, [2, -1, -1, 0])
    assert torch.equal(after[1:], by_slots[1:])
    assert delta_set.add("new", make_delta(6, 10, torch.float32, seed=9)) == 1
    assert len(delta_set) == 3


def test_the_set_packs_copies_of_its_adapters_in_one_set_of_buffers():
    out_f, in_f = 20, 30
    delta_set = make_set(out_f, in_f, torch.float32)
    x, weight = randn(4, in_f, dtype=torch.float32, seed=1), randn(out_f, in_f, dtype=torch.float32, seed=2)
    rows = torch.tensor([0, 1, 2, -1])

    def run():
        with torch.no_grad():
            return shira_kernels.multi_delta_linear(x, weight, None, delta_set, rows)

    def check(y, what):  # against the float64 definition with the set's current values
        exact, magnitude = (multi_delta_linear_reference(
            f(x), f(weight), None, [e[1].with_values(f(e[1].values)) for e in delta_set.slots],
            [e[2] for e in delta_set.slots], rows) for f in (lambda t: t.double(), abs64))
        k, n = delta_linear_bound(in_f)
        assert_within_error_bound(y, exact, magnitude, k, what, roundings=n)

    before = run()
    storage = delta_set.values.untyped_storage().data_ptr()
    for name, delta, _ in delta_set:  # each adapter's values: a view of the one buffer
        assert delta.values.untyped_storage().data_ptr() == storage
        assert torch.equal(delta_set.values[delta_set.segment(name)], delta.values)
    # add copied the values: writing the delta that was given changes nothing here
    given = make_delta(out_f, in_f, torch.float32, seed=9)
    delta_set.add("given", given)
    # and its structure, derived for the copy only: the set's delta views the buffers, and no
    # cache keeps a second copy for the given indices
    from shira_kernels.formats import _STRUCTURES
    assert given._structure is None and _STRUCTURES.get(given.flat_indices, given.shape) is None
    cols = delta_set.delta("given").structure.cols
    assert cols.untyped_storage().data_ptr() == delta_set.snapshot().cols.untyped_storage().data_ptr()
    assert torch.equal(cols, given.structure.cols)
    given.values.mul_(3)
    assert not torch.equal(delta_set.delta("given").values, given.values)
    # a write to the set's own view is seen by the next call
    delta_set.delta("a1").values.mul_(-2)
    after = run()
    assert torch.equal(after[[0, 2, 3]], before[[0, 2, 3]])
    check(after, "after a write")
    # Remove and add many times: the buffers are made anew with the live segments only (their
    # size stays bounded), each adapter left in place gives the same bits, and a values
    # buffer that takes a gradient still does.
    delta_set.requires_grad_()
    kept = run()
    for i in range(40):
        delta_set.add(f"t{i}", make_delta(out_f, in_f, torch.float32, density=0.5, seed=20 + i))
        if i >= 2:
            delta_set.remove(f"t{i - 2}")
    live = sum(e[1].nnz for e in delta_set)
    assert delta_set.values.numel() <= 4 * live + 64, (delta_set.values.numel(), live)
    assert delta_set.values.requires_grad and delta_set.values.is_leaf
    assert torch.equal(run(), kept)
    assert sorted(delta_set.names) == ["a0", "a1", "a2", "given", "t38", "t39"]
    # Once every adapter is out, the set takes another dtype.
    for name in delta_set.names:
        delta_set.remove(name)
    delta_set.add("half", make_delta(out_f, in_f, torch.bfloat16, seed=3))
    assert delta_set.values.dtype == torch.bfloat16 and delta_set.index("half") == 0


def test_values_given_in_place_of_the_sets_take_the_same_gradient():
    # Training values held elsewhere (a PEFT model's parameters): the set gives the structure,
    # the given tensors the values, and their gradients are the set's own would be.
    (tokens, out_f, in_f), assignment = CASES["mixed"]
    delta_set = make_set(out_f, in_f, torch.float32)
    delta_set.remove("a1")  # a free slot and its segment in between
    delta_set.add("a1", make_delta(out_f, in_f, torch.float32, seed=5), 0.25)
    x = randn(tokens, in_f, dtype=torch.float32, seed=1)
    weight = randn(out_f, in_f, dtype=torch.float32, seed=2)
    rows = torch.tensor(assignment)
    mine = {n: (delta_set.delta(n).values * 1.5).requires_grad_() for n in ("a0", "a1")}
    y = shira_kernels.multi_delta_linear(x, weight, None, delta_set, rows, values=mine)
    grads = torch.autograd.grad(y.square().sum(), list(mine.values()))
    with torch.no_grad():
        for n, v in mine.items():
            delta_set.delta(n).values.copy_(v)
    delta_set.requires_grad_()
    want = shira_kernels.multi_delta_linear(x, weight, None, delta_set, rows)
    assert torch.equal(y, want)
    (g,) = torch.autograd.grad(want.square().sum(), [delta_set.values])
    for n, grad in zip(mine, grads):
        assert torch.equal(grad, g[delta_set.segment(n)]), n
    # Values given for some adapters only: the others' gradients still go to the set's values.
    some = {"a0": delta_set.delta("a0").values.detach().clone().requires_grad_()}
    y = shira_kernels.multi_delta_linear(x, weight, None, delta_set, rows, values=some)
    assert torch.equal(y, want)
    g_set, g_some = torch.autograd.grad(y.square().sum(), [delta_set.values, some["a0"]])
    assert torch.equal(g_some, g[delta_set.segment("a0")])
    assert not g_set[delta_set.segment("a0")].any()
    others = [n for n in delta_set.names if n != "a0"]
    assert others and any(g[delta_set.segment(n)].any() for n in others)
    for n in others:
        assert torch.equal(g_set[delta_set.segment(n)], g[delta_set.segment(n)]), n
    with pytest.raises(ValueError, match=r"values\['a0'\] must be a tensor of shape"):
        shira_kernels.multi_delta_linear(x, weight, None, delta_set, rows,
                                         values={"a0": torch.zeros(3)})
    with pytest.raises(KeyError, match="'zz'"):
        shira_kernels.multi_delta_linear(x, weight, None, delta_set, rows,
                                         values={"zz": torch.zeros(3)})
    with pytest.raises(ValueError, match="values require grad"):
        delta_set.add("b", make_delta(out_f, in_f, torch.float32).with_values(
            torch.zeros(make_delta(out_f, in_f, torch.float32).nnz, requires_grad=True)))


def test_bad_inputs_name_the_argument():
    delta_set = make_set(6, 10, torch.float32)
    x, weight = randn(4, 10, dtype=torch.float32, seed=1), randn(6, 10, dtype=torch.float32, seed=2)
    with pytest.raises(KeyError, match="no adapter 'zzz'"):
        shira_kernels.multi_delta_linear(x, weight, None, delta_set, ["zzz", None, None, None])
    with pytest.raises(ValueError, match="row_adapter has shape"):
        shira_kernels.multi_delta_linear(x, weight, None, delta_set, [0, 1])
    with pytest.raises(ValueError, match="row_adapter holds 7"):
        shira_kernels.multi_delta_linear(x, weight, None, delta_set, [7, 0, 0, 0])
    with pytest.raises(TypeError, match="row_adapter must be a list of adapter names"):
        shira_kernels.multi_delta_linear(x, weight, None, delta_set, [b"a0"] * 4)
    with pytest.raises(TypeError, match="row_adapter must hold integer slots"):
        shira_kernels.multi_delta_linear(x, weight, None, delta_set, torch.zeros(4))
    with pytest.raises(ValueError, match="delta_set is for"):
        shira_kernels.multi_delta_linear(torch.randn(4, 11), torch.randn(6, 11), None, delta_set,
                                         [0] * 4)
    with pytest.raises(TypeError, match="delta_set must be a SparseDeltaSet"):
        shira_kernels.multi_delta_linear(x, weight, None, {}, [0] * 4)
    with pytest.raises(ValueError, match="base must be one of"):
        shira_kernels.multi_delta_linear(x, weight, None, delta_set, [0] * 4, base="mkl")
    with pytest.raises(TypeError, match="values of adapter 'a0'"):  # fp32 adapters, bf16 x
        shira_kernels.multi_delta_linear(x.bfloat16(), weight.bfloat16(), None, delta_set,
                                         [0] * 4)
    with pytest.raises(ValueError, match="already in this set"):
        delta_set.add("a0", make_delta(6, 10, torch.float32))
    with pytest.raises(ValueError, match="this set's weight is"):
        delta_set.add("b", make_delta(6, 11, torch.float32))
    with pytest.raises(ValueError, match="non-empty str other than '__base__'"):
        delta_set.add("__base__", make_delta(6, 10, torch.float32))
    with pytest.raises(ValueError, match="are torch.float32 on cpu"):
        delta_set.add("b", make_delta(6, 10, torch.bfloat16))


def test_weight_is_only_read_and_gets_its_gradient_when_asked():
    delta_set = make_set(6, 10, torch.float32)
    x = randn(5, 10, dtype=torch.float32, seed=1)
    weight = randn(6, 10, dtype=torch.float32, seed=2)
    base = weight.clone()
    weight.requires_grad_()
    y = shira_kernels.multi_delta_linear(x, weight, None, delta_set, [0, 1, 2, -1, 0])
    (gw,) = torch.autograd.grad(y.sum(), [weight])
    assert torch.allclose(gw, torch.ones(5, 6).T @ x)  # dy/dW = gyᵀ·x, whatever the adapters
    assert torch.equal(weight.detach(), base)


def test_opcheck(backend, device):
    delta_set = make_set(6, 10, torch.float32, device)
    x = randn(5, 10, dtype=torch.float32, seed=1, device=device).requires_grad_()
    weight = randn(6, 10, dtype=torch.float32, seed=2, device=device)
    bias = randn(6, dtype=torch.float32, seed=3, device=device)
    delta_set.remove("a1")  # a free slot and its segment, left in the buffers
    state = delta_set.snapshot()
    buffers = [t[:state.used] for t in (state.values, state.cols, state.rows, state.t_cols,
                                        state.t_perm)] + [state.offsets[:state.used_offsets]]
    opcheck(torch.ops.shira.multi_delta_linear.default,
            (x, weight, bias, torch.tensor([0, 2, 2, -1, 0], device=device), *buffers,
             state.segments, state.scales))


# ---------------------------------------------------------------------------------------------
# AdapterBank.mixed: every adapted layer runs multi_delta_linear for the rows' adapters.
# ---------------------------------------------------------------------------------------------
def make_bank(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    model.to(dtype)
    bank = shira_kernels.AdapterBank(model)
    bank.add("a", {"0": make_delta(24, 40, torch.float32, seed=1),
                   "2": make_delta(8, 24, torch.float32, seed=2)}, scale=0.5)
    bank.add("b", {"0": make_delta(24, 40, torch.float32, seed=3)}, scale=2.0)
    return model, bank


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bank_mixed_rows_match_their_adapter(dtype):
    model, bank = make_bank(dtype)
    names = ["a", None, "b", "__base__", "a", "b"]
    x = randn(6, 3, 40, dtype=dtype, seed=5)  # [batch, sequence, features]
    weights = [p.detach().clone() for p in model.parameters()]
    seen = []
    hook = model[0].register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad(), bank.mixed(names):
        model(x)
    hook.remove()
    # The first layer's output against its float64 definition: each row's adapter's delta (in
    # the weight's dtype) and scale, the sequence positions of a row sharing its adapter.
    first, deltas, scales = model[0], [], []
    for name in ("a", "b"):
        delta, scale = bank.deltas(name)["0"]
        deltas.append(delta.with_values(delta.values.to(dtype)))
        scales.append(scale)
    rows = torch.tensor([0, -1, 1, -1, 0, 1]).repeat_interleave(3)
    exact, magnitude = (multi_delta_linear_reference(
        f(x.reshape(-1, 40)), f(first.weight), f(first.bias),
        [d.with_values(f(d.values)) for d in deltas], scales, rows)
        for f in (lambda t: t.double(), abs64))
    k, n = delta_linear_bound(40)
    assert_within_error_bound(seen[0].reshape(-1, 24), exact, magnitude, k, "first layer",
                              roundings=n)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))  # only read
    assert all("forward" not in m.__dict__ for m in model)  # the layers' own forward is back


def test_bank_mixed_agrees_with_activate_and_trains():
    model, bank = make_bank(torch.float32)
    names = ["b", "a", None]
    x = randn(3, 40, dtype=torch.float32, seed=6).requires_grad_()
    with bank.mixed(names):
        y = model(x)
        y.square().sum().backward()  # the backward inside the block, as reading() asks
    for i, name in enumerate(names):
        with torch.no_grad():
            bank.activate(name)
            ref = model(x[i:i + 1])
            bank.deactivate()
        assert torch.allclose(y[i:i + 1], ref, rtol=1e-5, atol=1e-5), name
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bank_mixed_refuses_what_it_cannot_do():
    model, bank = make_bank(torch.float32)
    x = randn(2, 40, dtype=torch.float32, seed=7)
    with pytest.raises(KeyError, match="no adapter named 'zzz'"):
        with bank.mixed(["zzz", None]):
            pass
    with pytest.raises(ValueError, match="mixed batch of 3 rows"):
        with bank.mixed(["a", None, "b"]):
            model(x)
    assert all("forward" not in m.__dict__ for m in model)  # restored after the error too
    with pytest.raises(ValueError, match="non-empty list"):
        with bank.mixed([]):
            pass
    with pytest.raises(ValueError, match="non-empty list"):
        with bank.mixed(None):
            pass
    bank.activate("a")
    with pytest.raises(RuntimeError, match="'a' is active"):
        with bank.mixed(["a", "b"]):
            pass
    bank.deactivate()
    shira_model = torch.nn.Sequential(shira_kernels.nn.ShiraLinear.from_linear(
        torch.nn.Linear(40, 24), r=2))
    shira_bank = shira_kernels.AdapterBank(shira_model)
    shira_bank.add("a", {"0": make_delta(24, 40, torch.float32, seed=1)})
    with pytest.raises(TypeError, match="plain nn.Linear"):
        with shira_bank.mixed(["a", None]):
            pass


def test_threads_get_right_answers_and_change_nothing():
    # Two threads on one weight and set (the weight read under its lock), each its own batch.
    from concurrent.futures import ThreadPoolExecutor
    delta_set = make_set(33, 65, torch.float32)
    weight = randn(33, 65, dtype=torch.float32, seed=2)
    base = weight.clone()
    batches = [(randn(9, 65, dtype=torch.float32, seed=10 + i),
                torch.tensor([i % 3, -1, 2, 0, 1, 1, 0, 2, -1])) for i in range(8)]
    alone = [shira_kernels.multi_delta_linear(x, weight, None, delta_set, r) for x, r in batches]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(5):
            together = list(pool.map(
                lambda b: shira_kernels.multi_delta_linear(b[0], weight, None, delta_set, b[1]),
                batches))
            assert all(torch.equal(a, b) for a, b in zip(alone, together))
    assert torch.equal(weight, base)


def test_compiles_whole_and_new_row_assignments_do_not_recompile():
    # The slots are checked inside the op, so the public function has no host sync: fullgraph
    # traces it, and another assignment of rows to adapters (same shape) reuses the graph.
    delta_set = make_set(12, 20, torch.float32)
    x = randn(6, 20, dtype=torch.float32, seed=1).requires_grad_()
    weight, bias = randn(12, 20, dtype=torch.float32, seed=2), randn(12, dtype=torch.float32, seed=3)

    def step(x, row_adapter):
        return shira_kernels.multi_delta_linear(x, weight, bias, delta_set, row_adapter)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assignments = ([0, 1, -1, 2, 0, 1], [2, 2, 2, -1, -1, 0], [-1] * 6)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in assignments:
            row_adapter = torch.tensor(rows)
            y = compiled(x, row_adapter)
            expected = step(x, row_adapter)
            assert torch.equal(y, expected)
            gx, = torch.autograd.grad(y.sum(), x)
            assert torch.equal(gx, torch.autograd.grad(expected.sum(), x)[0])
        with pytest.raises(ValueError, match="row_adapter holds 5"):
            compiled(x, torch.tensor([5, 0, 0, 0, 0, 0]))
    torch._dynamo.reset()


def test_triton_forward_is_one_launch_with_the_per_group_bits():
    # All groups in one grouped_spmm launch (no per-adapter spmm), the backward in one for gx
    # and one for every adapter's values, and each row the same bits as Triton's own spmm
    # strategy with its adapter.
    pytest.importorskip("triton")
    import contextlib
    from unittest import mock
    from shira_kernels.triton import sparse_delta as triton_sd
    (tokens, out_f, in_f), assignment = CASES["mixed"]
    delta_set = make_set(out_f, in_f, torch.float32)
    x = randn(tokens, in_f, dtype=torch.float32, seed=1)
    weight = randn(out_f, in_f, dtype=torch.float32, seed=2)
    row_adapter = torch.tensor(assignment)
    launches = dict.fromkeys(["_grouped_spmm_kernel", "_spmm_kernel", "_grouped_sddmm_kernel",
                              "_sddmm_kernel"], 0)
    x.requires_grad_()
    delta_set.requires_grad_()  # values that take a gradient too

    class Counted:  # a jitted kernel whose launches (kernel[grid](...)) are counted
        def __init__(self, name):
            self.name, self.kernel = name, getattr(triton_sd, name)

        def __getitem__(self, grid):
            launches[self.name] += 1
            return self.kernel[grid]
    with shira_kernels.use_backend("triton"), contextlib.ExitStack() as stack:
        for name in launches:
            stack.enter_context(mock.patch.object(triton_sd, name, Counted(name)))
        y = shira_kernels.multi_delta_linear(x, weight, None, delta_set, row_adapter)
        assert launches == {"_grouped_spmm_kernel": 1, "_spmm_kernel": 0,
                            "_grouped_sddmm_kernel": 0, "_sddmm_kernel": 0}, launches
        y.sum().backward()  # gx: one grouped launch; every adapter's values: one more
    assert launches == {"_grouped_spmm_kernel": 2, "_spmm_kernel": 0,
                        "_grouped_sddmm_kernel": 1, "_sddmm_kernel": 0}, launches
    assert delta_set.values.grad is not None
    y = y.detach()
    with shira_kernels.use_backend("triton"):
        for a in set(assignment) - {-1}:
            rows = (row_adapter == a).nonzero().view(-1)
            _, delta, scale = delta_set.slots[a]
            # The whole batch with that adapter (the same dense matmul), then its rows.
            one = shira_kernels.sparse_delta_linear(x, weight, None, delta, scale,
                                                    strategy="spmm")
            assert torch.equal(y[rows], one[rows]), a


def test_triton_grouped_kernels_read_the_adapters_where_the_set_keeps_them():
    # The one-launch kernels take the set's own buffers and tables of the call's groups and
    # tiles only: no copy of the present adapters' entries per call (it had cost as many bytes
    # as the sparse product reads). Absent adapters' entries get a zero gradient.
    pytest.importorskip("triton")
    from unittest import mock
    from shira_kernels.triton import sparse_delta as triton_sd
    (tokens, out_f, in_f), assignment = CASES["absent-adapter"]
    delta_set = make_set(out_f, in_f, torch.float32)
    state = delta_set.snapshot()
    x = randn(tokens, in_f, dtype=torch.float32, seed=1).requires_grad_()
    weight = randn(out_f, in_f, dtype=torch.float32, seed=2)
    launched = {"_grouped_spmm_kernel": [], "_grouped_sddmm_kernel": []}

    class Recorded:  # a jitted kernel whose launches' arguments are kept
        def __init__(self, name):
            self.name, self.kernel = name, getattr(triton_sd, name)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched[self.name].append(args)
                return self.kernel[grid](*args, **kwargs)
            return launch
    delta_set.requires_grad_()
    with shira_kernels.use_backend("triton"), \
            mock.patch.object(triton_sd, "_grouped_spmm_kernel",
                              Recorded("_grouped_spmm_kernel")), \
            mock.patch.object(triton_sd, "_grouped_sddmm_kernel",
                              Recorded("_grouped_sddmm_kernel")):
        y = shira_kernels.multi_delta_linear(x, weight, None, delta_set, torch.tensor(assignment))
        y.sum().backward()
    (forward, gx), (sddmm,) = launched["_grouped_spmm_kernel"], launched["_grouped_sddmm_kernel"]
    groups = len(set(assignment) - {-1})
    # forward: (y, x, order, 5 tables, offsets, cols, values, scales, ...)
    assert forward[8].data_ptr() == state.offsets.data_ptr()
    assert forward[9].data_ptr() == state.cols.data_ptr()
    assert forward[10].data_ptr() == state.values.data_ptr()
    # gx: the transposed structures in place (values put in their order, per adapter present)
    assert gx[8].data_ptr() == state.offsets.data_ptr()
    assert gx[9].data_ptr() == state.t_cols.data_ptr()
    # sddmm: (gy, x, order, 4 tables, scales, rows, cols, g, ...)
    assert sddmm[8].data_ptr() == state.rows.data_ptr()
    assert sddmm[9].data_ptr() == state.cols.data_ptr()
    for args in (forward, gx):
        assert args[5].numel() == args[6].numel() == args[11].numel() == groups
    assert sddmm[5].numel() == groups and sddmm[7].numel() == groups
    grad = delta_set.values.grad
    absent = [n for n in delta_set.names if delta_set.index(n) not in assignment]
    assert absent and all(not grad[delta_set.segment(n)].any() for n in absent)
    assert all(grad[delta_set.segment(n)].any() for n in delta_set.names if n not in absent)
