"""Property-based tests (Hypothesis) of scatter_swap_ and SparseDelta: for random shapes,
dtypes and index sets (sorted, unsorted, repeated, out of range), every call gives the correct
result or a ValueError/TypeError naming the bad argument, and a call that raises leaves every
input tensor bit-identical (bit patterns compared, so NaN payloads count)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shira_kernels
from shira_kernels import SparseDelta
from shira_kernels.ops.sparse_delta import sparse_delta_linear

from conftest import cpu_backends

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def bits(t):
    return t.detach().view({1: torch.int8, 2: torch.int16, 4: torch.int32,
                            8: torch.int64}[t.element_size()]).clone()


@st.composite
def index_sets(draw, numel):
    """Indices for a weight of ``numel`` entries: mostly valid, sometimes unsorted, repeated or
    out of range, as int32 or int64."""
    n = draw(st.integers(0, min(numel, 24)))
    chosen = draw(st.lists(st.integers(0, numel - 1), min_size=n, max_size=n, unique=True))
    kind = draw(st.sampled_from(["sorted", "unsorted", "repeated", "too_big", "negative"]))
    if kind == "sorted":
        chosen.sort()
    elif kind == "repeated" and chosen:
        chosen.append(chosen[0])
    elif kind == "too_big":
        chosen.append(draw(st.sampled_from([numel, numel + 7, 2**31 - 1])))
    elif kind == "negative":
        chosen.append(-draw(st.integers(1, 5)))
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    if dtype == torch.int32:
        chosen = [i for i in chosen if -2**31 <= i < 2**31]
    return torch.tensor(chosen, dtype=dtype)


@st.composite
def swap_calls(draw):
    count = draw(st.integers(1, 3))
    weights, indices, values = [], [], []
    for _ in range(count):
        shape = (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
        dtype = draw(st.sampled_from(FLOATS))
        seed = draw(st.integers(0, 2**16))
        w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
        if draw(st.booleans()):  # NaN payloads must survive a rejected call bit for bit
            w.view(-1)[0] = float("nan")
        idx = draw(index_sets(w.numel()))
        n = idx.numel() + draw(st.sampled_from([0, 0, 0, 1, -1]))
        v_dtype = dtype if draw(st.integers(0, 5)) else draw(st.sampled_from(FLOATS))
        v = torch.randn(max(n, 0)).to(v_dtype)
        weights.append(w)
        indices.append(idx)
        values.append(v)
    return weights, indices, values


def expected_valid(weights, indices, values) -> bool:
    for w, i, v in zip(weights, indices, values):
        flat = i.tolist()
        if v.dtype != w.dtype or v.numel() != len(flat):
            return False
        if any(k < 0 or k >= w.numel() for k in flat) or len(set(flat)) != len(flat):
            return False
    return True


@pytest.mark.parametrize("backend_name", cpu_backends())
@SETTINGS
@given(call=swap_calls())
def test_scatter_swap_is_right_or_rejects_and_changes_nothing(backend_name, call):
    weights, indices, values = call
    before = [bits(t) for t in weights + indices + values]
    valid = expected_valid(weights, indices, values)
    with shira_kernels.use_backend(backend_name):
        if not valid:
            with pytest.raises((ValueError, TypeError)) as info:
                shira_kernels.scatter_swap_(weights, indices, values)
            assert any(name in str(info.value) for name in ("weights", "indices", "values"))
            after = [bits(t) for t in weights + indices + values]
            assert all(torch.equal(a, b) for a, b in zip(after, before))
            return
        expected_w = [bits(w).view(-1).clone() for w in weights]
        expected_v = []
        for w_bits, i, v in zip(expected_w, indices, values):
            old = w_bits[i.long()].clone()
            w_bits[i.long()] = bits(v)
            expected_v.append(old)
        shira_kernels.scatter_swap_(weights, indices, values)
        for w, want in zip(weights, expected_w):
            assert torch.equal(bits(w).view(-1), want)
        for v, want in zip(values, expected_v):
            assert torch.equal(bits(v), want)
        shira_kernels.scatter_swap_(weights, indices, values)  # twice: back, bit for bit
        after = [bits(t) for t in weights + indices + values]
        assert all(torch.equal(a, b) for a, b in zip(after, before))


@SETTINGS
@given(data=st.data())
def test_sparse_delta_accepts_exactly_the_canonical_form(data):
    shape = (data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8)))
    numel = shape[0] * shape[1]
    idx = data.draw(index_sets(numel))
    dtype = data.draw(st.sampled_from(FLOATS))
    values = torch.randn(idx.numel()).to(dtype)
    before = (bits(idx), bits(values))
    flat = idx.tolist()
    in_range = all(0 <= k < numel for k in flat)
    unique = len(set(flat)) == len(flat)
    canonical = in_range and unique and flat == sorted(flat)
    if canonical:
        delta = SparseDelta(shape, idx, values)
        assert delta.nnz == len(flat)
    else:
        with pytest.raises((ValueError, TypeError)) as info:
            SparseDelta(shape, idx, values)
        assert "flat_indices" in str(info.value)
    # from_flat sorts (values follow their indices) whenever the set is valid.
    if in_range and unique and idx.dtype in (torch.int32, torch.int64):
        delta = SparseDelta.from_flat(idx, shape, values)
        order = sorted(range(len(flat)), key=flat.__getitem__)
        assert delta.flat_indices.tolist() == sorted(flat)
        assert torch.equal(bits(delta.values), bits(values)[order] if order else bits(values))
        dense = torch.zeros(numel, dtype=torch.float64)
        dense[idx.long()] = values.double()
        assert torch.equal(delta.to_dense(torch.float64).view(-1), dense)
    else:
        with pytest.raises((ValueError, TypeError)) as info:
            SparseDelta.from_flat(idx, shape, values)
        assert "flat_indices" in str(info.value)
    assert torch.equal(bits(idx), before[0]) and torch.equal(bits(values), before[1])


@SETTINGS
@given(data=st.data())
def test_every_strategy_agrees_on_random_deltas(data):
    """Whatever the index set (sorted or not before from_flat), the four strategies compute
    the same product within fp32 rounding, and W is unchanged afterwards."""
    out_f, in_f = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    flat = data.draw(st.lists(st.integers(0, out_f * in_f - 1), max_size=20, unique=True))
    tokens = data.draw(st.integers(0, 6))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    values = torch.randn(len(flat), generator=g)
    delta = SparseDelta.from_flat(torch.tensor(flat, dtype=torch.int64), (out_f, in_f), values)
    weight = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(tokens, in_f, generator=g)
    w_before = bits(weight)
    dense = torch.zeros(out_f * in_f, dtype=torch.float64)
    dense[torch.tensor(flat, dtype=torch.long)] = values.double()
    exact = x.double() @ (weight.double() + dense.view(out_f, in_f)).T
    magnitude = x.double().abs() @ (weight.double().abs() + dense.view(out_f, in_f).abs()).T
    k = in_f + 1  # the adds of W and S count as one more rounding step
    gamma = k * 2**-24 / (1 - k * 2**-24)
    for strategy in ("fold", "spmm", "swap", "merge"):
        y = sparse_delta_linear(x, weight, None, delta, 1.0, strategy)
        err = (y.double() - exact).abs()
        assert bool((err <= gamma * magnitude + 2**-24 * exact.abs()).all()), strategy
        assert torch.equal(bits(weight), w_before), strategy


@SETTINGS
@given(data=st.data())
def test_shira_linear_load_state_dict_is_right_or_changes_nothing(data):
    """A state_dict with random indices (canonical or not) and values of any length and dtype:
    loaded exactly, or refused naming the key with every tensor of the layer unchanged."""
    from shira_kernels.nn import ShiraLinear

    out_f, in_f = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    mask = torch.rand(out_f, in_f) < 0.5
    mask.view(-1)[0] = True
    layer = ShiraLinear.from_linear(torch.nn.Linear(in_f, out_f), mask=mask)
    nnz = layer.shira_flat_indices.numel()
    if data.draw(st.booleans()):  # a canonical set of the layer's size: loadable (about half)
        chosen = data.draw(st.lists(st.integers(0, out_f * in_f - 1), min_size=nnz,
                                    max_size=nnz, unique=True))
        idx = torch.tensor(sorted(chosen), dtype=data.draw(st.sampled_from(
            [torch.int32, torch.int64])))
    else:
        idx = data.draw(index_sets(out_f * in_f))
    values = torch.randn(idx.numel() + data.draw(st.sampled_from([0, 0, 0, 1]))).to(
        data.draw(st.sampled_from(FLOATS + FLOATS + (torch.int32,))))
    state = dict(layer.state_dict())
    state["shira_flat_indices"], state["shira_values"] = idx, values
    before = {k: bits(v) for k, v in layer.state_dict().items()}
    flat = idx.tolist()
    loadable = (len(flat) == nnz and values.numel() == nnz and values.is_floating_point()
                and flat == sorted(set(flat)) and all(0 <= k < out_f * in_f for k in flat))
    if loadable:
        layer.load_state_dict(state)
        assert layer.shira_flat_indices.tolist() == flat
        assert torch.equal(bits(layer.shira_values.detach()), bits(values.to(
            layer.shira_values.dtype)))
        x = torch.randn(3, in_f)
        dense = torch.zeros(out_f * in_f, dtype=torch.float64)
        dense[idx.long()] = values.double()
        exact = x.double() @ (layer.weight.double() + dense.view(out_f, in_f)).T \
            + layer.bias.double()
        assert (layer(x).double() - exact).abs().max() < 1e-4
        return
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        layer.load_state_dict(state)
    assert "shira_" in str(info.value)
    after = {k: bits(v) for k, v in layer.state_dict().items()}
    assert all(torch.equal(after[k], before[k]) for k in before)

