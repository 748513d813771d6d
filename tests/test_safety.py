"""Promises that must hold under threads, faults and bad input (each test here reproduces a
defect found by fuzzing): concurrent forwards that write W, rejected loads, unsorted indices,
stale index checks, interrupted switches and merges, training while another thread switches."""
import os
import signal
import threading

import numpy as np
import pytest
import torch
from torch import nn

import shira_kernels
import shira_kernels.ops.scatter_swap as scatter_swap_module
from shira_kernels import AdapterBank, SparseDelta
from shira_kernels.formats import SparseStructure
from shira_kernels.nn import ShiraLinear
from shira_kernels.ops.sparse_delta import sparse_delta_linear

from conftest import DTYPES, cpu_backends


def bits(t):
    t = t.detach()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()


def shira_layer(out_f=48, in_f=40, dtype=torch.float32, seed=0, nnz=200):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f).to(dtype)
    layer = ShiraLinear.from_linear(base, r=None, density=nnz / (out_f * in_f), mask="rand",
                                    seed=seed)
    with torch.no_grad():
        layer.shira_values.copy_(torch.randn(layer.shira_values.shape).to(dtype))
    return layer


# ---------------------------------------------------------------------------------------------
# 1. Forwards that write W ("swap") from several threads.
# ---------------------------------------------------------------------------------------------
def run_threads(target, count):
    errors = []

    def wrapped(i):
        try:
            target(i)
        except BaseException as e:  # reported below, with the thread's index
            errors.append((i, e))
    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_concurrent_swap_forwards_are_exact_and_restore_w(dtype):
    layer = shira_layer(dtype=dtype)
    layer.strategy = "swap"
    w_before = bits(layer.weight)
    xs = [torch.randn(64, 40).to(dtype) for _ in range(4)]
    with torch.no_grad():
        expected = [layer(x) for x in xs]
    results = {}

    def forward(i):
        with torch.no_grad():
            for step in range(40):
                k = (i + step) % len(xs)
                results.setdefault(i, []).append((k, layer(xs[k])))
    run_threads(forward, 3)
    assert torch.equal(bits(layer.weight), w_before), "W was not restored"
    for outputs in results.values():
        for k, y in outputs:
            assert torch.equal(bits(y), bits(expected[k]))


def test_auto_bf16_swap_path_from_two_threads():
    """The fuzzed case: bf16 at 1024 tokens, where auto runs "swap" on the CPU."""
    from shira_kernels.ops.sparse_delta import auto_strategy
    assert auto_strategy("cpu", torch.bfloat16, 1024) == "swap"
    layer = shira_layer(out_f=64, in_f=64, dtype=torch.bfloat16, nnz=256)
    w_before = bits(layer.weight)
    x = torch.randn(1024, 64).to(torch.bfloat16)
    with torch.no_grad():
        expected = layer(x)
    outputs = []

    def forward(_):
        with torch.no_grad():
            for _ in range(10):
                outputs.append(layer(x))
    run_threads(forward, 2)
    assert torch.equal(bits(layer.weight), w_before)
    assert all(torch.equal(bits(y), bits(expected)) for y in outputs)


def test_swap_writer_and_readers_of_one_weight_exclude_each_other():
    """One thread runs "swap" on W while others read the same W through "spmm" and "fold":
    the readers must never see the adapted entries."""
    torch.manual_seed(1)
    weight = torch.randn(32, 48)
    delta = SparseDelta.from_mask(torch.rand(32, 48) < 0.3, torch.randn(32, 48))
    x = torch.randn(16, 48)
    expected = {s: sparse_delta_linear(x, weight, None, delta, 1.0, s)
                for s in ("swap", "spmm", "fold", "merge")}
    w_before = bits(weight)
    bad = []

    def worker(i):
        strategy = ("swap", "spmm", "fold", "merge")[i % 4]
        for _ in range(60):
            y = sparse_delta_linear(x, weight, None, delta, 1.0, strategy)
            if not torch.equal(bits(y), bits(expected[strategy])):
                bad.append(strategy)
    run_threads(worker, 4)
    assert not bad, f"wrong outputs from {sorted(set(bad))}"
    assert torch.equal(bits(weight), w_before)


# ---------------------------------------------------------------------------------------------
# 2. A rejected load_state_dict changes nothing.
# ---------------------------------------------------------------------------------------------
def layer_bits(layer):
    return {name: bits(t) for name, t in list(layer.state_dict(keep_vars=True).items())
            + [(n, b) for n, b in layer.named_buffers() if b is not None]}


@pytest.mark.parametrize("corrupt", ["duplicate", "int32_max", "negative", "unsorted",
                                     "short_values", "float_indices", "values_not_tensor"])
def test_rejected_load_state_dict_changes_nothing(corrupt):
    layer = shira_layer()
    x = torch.randn(5, 40)
    y_before = layer(x).detach()
    before = layer_bits(layer)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    idx = state["shira_flat_indices"]
    if corrupt == "duplicate":
        idx[1] = idx[0]
    elif corrupt == "int32_max":
        idx[-1] = 2**31 - 1
    elif corrupt == "negative":
        idx[0] = -1
    elif corrupt == "unsorted":
        idx[:2] = idx[:2].flip(0).clone()
    elif corrupt == "short_values":
        state["shira_values"] = state["shira_values"][:-1]
    elif corrupt == "float_indices":
        state["shira_flat_indices"] = idx.float()
    else:
        state["shira_values"] = [0.0] * idx.numel()
    state["weight"] = torch.zeros_like(state["weight"])  # would be copied if loading went on
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        layer.load_state_dict(state)
    if corrupt not in ("short_values",):  # torch's own size check may speak for that one
        assert "shira_" in str(info.value)
    after = layer_bits(layer)
    for name, t in before.items():
        assert torch.equal(after[name], t), f"{name} changed by a rejected load"
    assert torch.equal(layer(x).detach(), y_before)


def test_good_load_state_dict_rebuilds_the_structure():
    a, b = shira_layer(seed=0), shira_layer(seed=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(7, 40)
    for strategy in ("fold", "spmm", "swap", "merge"):
        a.strategy = b.strategy = strategy
        assert torch.equal(a(x), b(x))


def test_load_into_a_merged_layer_is_refused():
    layer = shira_layer()
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.load_state_dict(shira_layer(seed=3).state_dict())
    layer.unmerge()


@pytest.mark.parametrize("how", ["in place", "replaced"])
def test_unmerge_restores_where_merge_took_the_entries_after_the_indices_changed(how):
    layer = shira_layer()
    base = bits(layer.weight)
    other = shira_layer(seed=7).shira_flat_indices
    assert not torch.equal(other, layer.shira_flat_indices)
    layer.merge()
    merged_state = {k: bits(v) for k, v in layer.state_dict().items()}
    with torch.no_grad():
        if how == "in place":
            layer.shira_flat_indices.copy_(other)
        else:
            layer.shira_flat_indices = other.clone()
    # The state_dict of a merged layer holds the base weight, as it did before the change.
    assert torch.equal(bits(layer.state_dict()["weight"]), merged_state["weight"])
    assert torch.equal(bits(layer.state_dict()["weight"]), base)
    layer.unmerge()
    assert torch.equal(bits(layer.weight), base)


# ---------------------------------------------------------------------------------------------
# 3. Unsorted indices: rejected by the constructors that take canonical indices, sorted by the
# from_* factories, the same everywhere.
# ---------------------------------------------------------------------------------------------
def test_unsorted_indices_are_rejected_or_sorted():
    flat = torch.tensor([7, 2, 30, 11], dtype=torch.int32)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="sorted"):
        SparseDelta((6, 8), flat, values)
    with pytest.raises(ValueError, match="sorted"):
        ShiraLinear(8, 6, indices=flat)
    delta = SparseDelta.from_flat(flat, (6, 8), values)
    assert delta.flat_indices.tolist() == [2, 7, 11, 30]
    assert delta.values.tolist() == [2.0, 1.0, 4.0, 3.0]
    dense = torch.zeros(48)
    dense[flat.long()] = values
    x, w = torch.randn(3, 8), torch.randn(6, 8)
    exact = x.double() @ (w.double() + dense.view(6, 8).double()).T
    for strategy in ("fold", "spmm", "swap", "merge"):
        y = sparse_delta_linear(x, w, None, delta, 1.0, strategy)
        assert (y.double() - exact).abs().max() < 1e-5, strategy


# ---------------------------------------------------------------------------------------------
# 4. Stale index checks never lead to a write (or read) out of bounds.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name", cpu_backends())
@pytest.mark.parametrize("how", ["data", "numpy"])
def test_scatter_swap_with_a_stale_check_raises_and_changes_nothing(backend_name, how):
    weight = torch.randn(10, 10)
    index = torch.tensor([1, 5, 9, 40], dtype=torch.int64)
    value = torch.randn(4)
    with shira_kernels.use_backend(backend_name):
        shira_kernels.scatter_swap_([weight], [index], [value])  # checked and cached
        shira_kernels.scatter_swap_([weight], [index], [value])
        if how == "data":
            index.data[2] = 10**9
        else:
            index.numpy()[2] = 10**9
        w0, v0, i0 = bits(weight), bits(value), index.clone()
        with pytest.raises(ValueError, match="outside"):
            shira_kernels.scatter_swap_([weight], [index], [value])
        assert torch.equal(bits(weight), w0) and torch.equal(bits(value), v0)
        assert torch.equal(index, i0)
        # The stale check is dropped: the next call names the bad entry.
        with pytest.raises(ValueError, match="out of range"):
            shira_kernels.scatter_swap_([weight], [index], [value])


@pytest.mark.parametrize("backend_name", cpu_backends())
@pytest.mark.parametrize("strategy", ["swap", "merge"])
def test_stale_delta_indices_never_write_out_of_bounds(backend_name, strategy):
    weight = torch.randn(8, 8)
    delta = SparseDelta.from_flat(torch.tensor([3, 9, 60]), (8, 8), torch.randn(3))
    x = torch.randn(2, 8)
    with shira_kernels.use_backend(backend_name):
        sparse_delta_linear(x, weight, None, delta, 1.0, strategy)
        delta.flat_indices.numpy()[-1] = 2**31 - 1  # int32 indices: the fuzzed value
        w0 = bits(weight)
        with pytest.raises(ValueError, match="outside"):
            sparse_delta_linear(x, weight, None, delta, 1.0, strategy)
        assert torch.equal(bits(weight), w0)
        with pytest.raises(ValueError, match="outside"):
            shira_kernels.add_delta(weight, delta)
        assert torch.equal(bits(weight), w0)


def test_replacing_delta_tensors_is_checked():
    delta = SparseDelta.from_flat(torch.tensor([1, 4, 9]), (4, 4), torch.ones(3))
    with pytest.raises(ValueError):
        delta.flat_indices = torch.tensor([1, 4, 99], dtype=torch.int32)
    with pytest.raises(ValueError):
        delta.flat_indices = torch.tensor([4, 1, 9], dtype=torch.int32)
    with pytest.raises(ValueError):
        delta.values = torch.ones(5)
    assert delta.flat_indices.tolist() == [1, 4, 9]
    old_structure = delta.structure
    delta.flat_indices = torch.tensor([0, 5, 15], dtype=torch.int32)
    assert delta.structure is not old_structure
    x, w = torch.randn(2, 4), torch.randn(4, 4)
    dense = torch.zeros(16)
    dense[[0, 5, 15]] = 1.0
    exact = x.double() @ (w.double() + dense.view(4, 4).double()).T
    for strategy in ("fold", "spmm", "swap", "merge"):
        y = sparse_delta_linear(x, w, None, delta, 1.0, strategy)
        assert (y.double() - exact).abs().max() < 1e-5, strategy


def test_structure_of_another_delta_is_rejected():
    small = SparseDelta.from_flat(torch.tensor([0, 1]), (2, 2), torch.ones(2))
    big = SparseDelta.from_flat(torch.tensor([0, 500, 999]), (10, 100), torch.ones(3))
    with pytest.raises(ValueError, match="structure"):
        SparseDelta((10, 100), big.flat_indices, big.values, structure=small.structure)
    with pytest.raises(ValueError, match="structure"):
        SparseDelta((2, 2), small.flat_indices, small.values, structure=SparseStructure(
            *(t.clone() for t in (small.structure.rows, small.structure.cols + 7,
                                  small.structure.row_offsets, small.structure.t_offsets,
                                  small.structure.t_cols, small.structure.t_perm))))
    # Its own structure, or an equal copy, is fine.
    SparseDelta((10, 100), big.flat_indices, big.values, structure=big.structure)


# ---------------------------------------------------------------------------------------------
# 5. Switching, fusion and merge are transactions.
# ---------------------------------------------------------------------------------------------
def two_layer_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))


def random_adapter(model, seed, density=0.25):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in ("0", "2"):
        shape = tuple(model.get_submodule(name).weight.shape)
        mask = torch.rand(shape, generator=g) < density
        out[name] = SparseDelta.from_mask(mask, torch.randn(shape, generator=g))
    return out


def weights_bits(model):
    return [bits(p) for p in model.parameters()]


def expected_weights(model_base_bits, model, adapter):
    out = []
    for (name, module), base in zip([(n, model.get_submodule(n)) for n in ("0", "2")],
                                    model_base_bits[::2]):
        w = base.view(module.weight.dtype).clone().view(-1)
        delta = adapter[name]
        w[delta.flat_indices.long()] = (w[delta.flat_indices.long()].float()
                                        + delta.values.float()).to(w.dtype)
        out.append(bits(w.view(module.weight.shape)))
    return out


def bank_with_two_adapters():
    """(model, its weights' bits, a bank on it with adapters "a" and "b", a, b)."""
    model = two_layer_model()
    base = weights_bits(model)
    bank = AdapterBank(model)
    a, b = random_adapter(model, 1), random_adapter(model, 2)
    bank.add("a", a)
    bank.add("b", b)
    return model, base, bank, a, b


@pytest.fixture
def sigint_raises():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test: a process started in the
    background by a shell without job control inherits SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def interrupt_after(monkeypatch, target, attr):
    """Make target.attr send this process SIGINT right after it returns: without deferral the
    KeyboardInterrupt lands before the caller's bookkeeping."""
    real = getattr(target, attr)

    def with_interrupt(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return result
    monkeypatch.setattr(target, attr, with_interrupt)


@pytest.mark.parametrize("direct", [False, True], ids=["from_base", "a_to_b"])
def test_switch_interrupted_by_keyboard_interrupt_stays_consistent(monkeypatch, sigint_raises,
                                                                   direct):
    model, base, bank, a, b = bank_with_two_adapters()
    if direct:
        bank.activate("a")
    interrupt_after(monkeypatch, scatter_swap_module, "scatter_swap_")
    with pytest.raises(KeyboardInterrupt):
        bank.activate("b")
    monkeypatch.undo()
    # The interrupt arrived after the switch completed: books and weights agree.
    assert bank.active == "b"
    got = [bits(model[0].weight), bits(model[2].weight)]
    assert all(torch.equal(g, e) for g, e in zip(got, expected_weights(base, model, b)))
    bank.deactivate()
    assert all(torch.equal(g, e) for g, e in zip(weights_bits(model), base))
    bank.activate("a")
    bank.activate("b")
    bank.deactivate()
    assert all(torch.equal(g, e) for g, e in zip(weights_bits(model), base))


@pytest.mark.parametrize("error", [MemoryError, KeyboardInterrupt])
def test_switch_whose_bookkeeping_fails_is_rolled_back(monkeypatch, error):
    model, base, bank, a, b = bank_with_two_adapters()
    bank.activate("a")
    state_a = weights_bits(model)
    real_copy = torch.Tensor.copy_
    calls = {"n": 0}

    def failing_copy(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # after the swap, halfway through the buffers
            raise error("injected")
        return real_copy(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    with pytest.raises(error):
        bank.activate("b")
    monkeypatch.undo()
    assert bank.active == "a"
    assert all(torch.equal(g, e) for g, e in zip(weights_bits(model), state_a))
    bank.activate("b")
    got = [bits(model[0].weight), bits(model[2].weight)]
    assert all(torch.equal(g, e) for g, e in zip(got, expected_weights(base, model, b)))
    bank.deactivate()
    assert all(torch.equal(g, e) for g, e in zip(weights_bits(model), base))


@pytest.mark.parametrize("step", ["merge", "unmerge"])
def test_merge_interrupted_stays_restorable(monkeypatch, sigint_raises, step):
    layer = shira_layer()
    base = bits(layer.weight)
    if step == "unmerge":
        layer.merge()
    merged_bits = None
    interrupt_after(monkeypatch, scatter_swap_module, "scatter_swap_")
    with pytest.raises(KeyboardInterrupt):
        getattr(layer, step)()
    monkeypatch.undo()
    assert layer.merged == (step == "merge")
    if layer.merged:
        merged_bits = bits(layer.weight)
        assert not torch.equal(merged_bits, base)
        layer.unmerge()
    assert torch.equal(bits(layer.weight), base)


# ---------------------------------------------------------------------------------------------
# 9. Training while another thread switches: the boundary is bank.reading() around the step.
# ---------------------------------------------------------------------------------------------
def test_training_steps_under_reading_while_another_thread_switches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    for p in model.parameters():
        p.requires_grad_(False)
    head = nn.Linear(8, 4)  # trainable, on top of the switched layers
    bank = AdapterBank(model)
    bank.add("a", random_adapter(model, 1))
    bank.add("b", random_adapter(model, 2))
    x = torch.randn(32, 16)
    legal = {}
    for name in (None, "a", "b"):
        bank.activate(name)
        head.zero_grad()
        head(model(x)).square().sum().backward()
        legal[name] = head.weight.grad.clone()
    bank.deactivate()
    stop = threading.Event()
    seen = []

    def switcher():
        names = [None, "a", "b", "a"]
        i = 0
        while not stop.is_set():
            bank.activate(names[i % 4])
            i += 1

    t = threading.Thread(target=switcher)
    t.start()
    try:
        for _ in range(60):
            head.zero_grad()
            with bank.reading():
                head(model(x)).square().sum().backward()
            seen.append(head.weight.grad.clone())
    finally:
        stop.set()
        t.join()
    for g in seen:
        assert any(torch.equal(g, want) for want in legal.values())


# ---------------------------------------------------------------------------------------------
# Stress: several threads forwarding (guarded), one switching; every output is one of the
# legal outputs exactly, and the base is intact at the end.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_thread_stress_forwarding_while_switching(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)).to(dtype)
    base = weights_bits(model)
    bank = AdapterBank(model)
    names = [None, "a", "b"]
    bank.add("a", random_adapter(model, 1))
    bank.add("b", random_adapter(model, 2))
    bank.add("c", random_adapter(model, 3))
    x = torch.randn(8, 16).to(dtype)
    legal = {}
    with torch.no_grad():
        for name in names + ["c", ("a", "c")]:
            if isinstance(name, tuple):
                bank.activate(list(name), weights=[1.0, -0.5])
            else:
                bank.activate(name)
            legal[name] = bits(model(x))
    bank.deactivate()
    guard = bank.guard_forward()
    stop = threading.Event()
    wrong = []

    def forwarder(_):
        with torch.no_grad():
            while not stop.is_set():
                y = bits(model(x))
                if not any(torch.equal(y, want) for want in legal.values()):
                    wrong.append(y)

    def switcher():
        targets = names + ["c", ("a", "c")]
        for i in range(150):
            name = targets[i % len(targets)]
            if isinstance(name, tuple):
                bank.activate(list(name), weights=[1.0, -0.5])
            else:
                bank.activate(name)
        stop.set()

    threads = [threading.Thread(target=forwarder, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=switcher))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    guard.remove()
    assert not wrong, f"{len(wrong)} outputs matched no legal adapter state"
    bank.deactivate()
    assert all(torch.equal(g, e) for g, e in zip(weights_bits(model), base))


def test_guard_forward_warns_once_when_a_backward_will_follow():
    model = two_layer_model()
    bank = AdapterBank(model)
    bank.add("a", random_adapter(model, 1))
    x = torch.randn(4, 16)
    with bank.guard_forward():
        with torch.no_grad():
            model(x)  # inference: no warning
        with pytest.warns(UserWarning, match="reading"):
            model(x).sum().backward()
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(x).sum().backward()  # once only
            with bank.reading():
                model(x).sum().backward()


def test_a_sparse_deltas_indices_written_in_place_are_checked_and_rederived():
    """A SparseDelta kept the structure derived from its indices after they were written in
    place (its setter was not involved), so products used the old mask; unsorted or repeated
    indices written so were used as they were. Now the structure follows the indices, which
    are checked again first, for every consumer (the ops and SparseDeltaSet.add)."""
    from shira_kernels import SparseDeltaSet, sparse_product_add
    x, y = torch.eye(4), torch.zeros(4, 4)
    delta = SparseDelta.from_flat(torch.tensor([0, 5, 9]), (4, 4), torch.tensor([1., 2., 3.]))
    sparse_product_add(y, x, delta)  # the structure derived and kept
    delta.flat_indices.copy_(torch.tensor([1, 6, 15]))
    assert torch.equal(sparse_product_add(y, x, delta), x @ delta.to_dense().T)
    weight = torch.zeros(4, 4)
    assert torch.equal(shira_kernels.sparse_delta_linear(x, weight, None, delta),
                       x @ delta.to_dense().T)
    for bad, message in (([9, 5, 0], "sorted ascending"), ([5, 5, 5], "repeated")):
        for derived_before in (False, True):
            delta = SparseDelta.from_flat(torch.tensor([0, 5, 9]), (4, 4),
                                          torch.tensor([1., 2., 3.]))
            if derived_before:
                delta.structure
            delta.flat_indices.copy_(torch.tensor(bad))
            with pytest.raises(ValueError, match=message):
                sparse_product_add(y, x, delta)
            with pytest.raises(ValueError, match=message):
                SparseDeltaSet((4, 4)).add("a", delta)


def test_indices_written_in_place_are_checked_and_rederived():
    layer = shira_layer()
    other = shira_layer(seed=5)
    x = torch.randn(6, 40)
    with torch.no_grad():
        layer.shira_flat_indices.copy_(other.shira_flat_indices)
        layer.shira_values.copy_(other.shira_values)
        layer.weight.copy_(other.weight)
        layer.bias.copy_(other.bias)
    for strategy in ("fold", "spmm", "swap", "merge"):
        layer.strategy = other.strategy = strategy
        assert torch.equal(layer(x), other(x)), strategy
    w0 = bits(layer.weight)
    with torch.no_grad():
        layer.shira_flat_indices[3] = layer.shira_flat_indices[2]  # a repeated entry
    with pytest.raises(ValueError, match="shira_flat_indices"):
        layer(x)
    assert torch.equal(bits(layer.weight), w0)
