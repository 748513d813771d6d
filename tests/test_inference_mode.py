"""torch.inference_mode: every format, op, layer, the AdapterBank and the PEFT bridge work inside
it, including the first call of a process (nothing cached yet), and what a call inside it leaves
behind (cached index data, scratch buffers, held-aside entries, plans) serves later calls
outside it (autograd refuses to save inference tensors, and they cannot be written outside
inference mode). Each result is compared bit for bit with the same call outside inference_mode.

Inference tensors have no version counter, so the index caches check them by content: an index
tensor written in place inside inference_mode is never served stale derived data."""
import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import shira_kernels
from shira_kernels import AdapterBank, BinaryWeight, SparseDelta, _checks, formats
from shira_kernels.nn.shira_linear import ShiraLinear
from shira_kernels.ops import binary as binary_ops
from shira_kernels.ops import scatter_swap as swap_ops
from shira_kernels.ops import sparse_delta as sd_ops
from shira_kernels.ops.binary import binary_linear, binary_lora
from shira_kernels.ops.scatter_swap import scatter_swap_
from shira_kernels.ops.sparse_delta import add_delta, sddmm, sparse_delta_linear, spmm, spmm_t

STRATEGIES = ("fold", "spmm", "swap", "merge", "auto")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _clear_caches():
    """Empty every process-wide cache of derived data, as in a fresh process."""
    for module in (_checks, formats, sd_ops, binary_ops, swap_ops):
        for value in vars(module).values():
            if isinstance(value, _checks.TensorCache):
                value._entries.clear()
    sd_ops._scratch.__dict__.clear()
    table = getattr(swap_ops, "_TABLE_CACHE", None)
    if table is not None:
        table.clear()


@pytest.fixture(autouse=True)
def fresh():
    _clear_caches()
    yield


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.dtype.is_floating_point:
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()
    return t.clone()


def assert_same_bits(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(bits(a), bits(b))
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_bits(x, y)


def no_inference_tensors(value) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_inference()
    if isinstance(value, (tuple, list)):
        return all(no_inference_tensors(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return all(no_inference_tensors(getattr(value, f)) for f in value.__dataclass_fields__)
    return True


def random_delta(shape, nnz, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(shape[0] * shape[1], generator=g)[:nnz]
    return SparseDelta.from_flat(flat, shape, torch.randn(nnz, generator=g).to(dtype))


def clone_delta(delta: SparseDelta) -> SparseDelta:
    """The same delta on fresh tensors (so no cache entry of the original serves it)."""
    return SparseDelta(delta.shape, delta.flat_indices.clone(), delta.values.clone())


# ---------------------------------------------------------------------------------------------
# The caches
# ---------------------------------------------------------------------------------------------
def test_tensor_cache_keys_by_content_for_inference_tensors():
    cache = _checks.TensorCache()
    with torch.inference_mode():
        key = torch.tensor([1, 2, 3])
        assert cache.get(key) is None
        assert cache.put(key, "derived") == "derived"
        assert cache.get(key) == "derived"
        assert cache.get(key, extra=1) is None
        key[0] = 7  # an inference tensor can be written inside inference_mode
        assert cache.get(key) is None
        cache.put(key, "again")
    assert cache.get(key) == "again"  # readable outside inference_mode too
    other = torch.tensor([7, 2, 3])  # equal contents, another tensor: not the same key
    assert cache.get(other) is None


def test_tensor_cache_normal_keys_inside_inference_mode():
    cache = _checks.TensorCache()
    key = torch.tensor([1, 2, 3])
    with torch.inference_mode():
        derived = key * 2
        assert derived.is_inference()
        stored = cache.put(key, (derived, [derived + 1]))
        assert cache.get(key) is stored
        key.add_(1)  # normal tensors keep their version counter inside inference_mode
        assert cache.get(key) is None
        stored = cache.put(key, (derived, [derived + 1]))
    assert no_inference_tensors(stored)
    assert torch.equal(stored[0], torch.tensor([2, 4, 6]))
    assert torch.equal(stored[1][0], torch.tensor([3, 5, 7]))
    assert cache.get(key) is stored


def test_validate_indices_sees_inference_tensors_written_in_place():
    with torch.inference_mode():
        idx = torch.tensor([0, 4, 9], dtype=torch.int32)
        shira_kernels.validate_indices(idx, 10)
        idx[1] = 9  # now repeated: a stale cache would still pass it
        with pytest.raises(ValueError, match="repeated"):
            shira_kernels.validate_indices(idx, 10)
        idx[1] = 12
        with pytest.raises(ValueError, match="out of range"):
            shira_kernels.validate_indices(idx, 10)
        idx[1] = 5
        shira_kernels.validate_indices(idx, 10)
    with pytest.raises(ValueError, match="out of range"):  # outside: same contents, same answer
        shira_kernels.validate_indices(idx, 9)


# ---------------------------------------------------------------------------------------------
# SparseDelta
# ---------------------------------------------------------------------------------------------
def test_sparse_delta_constructors():
    shape = (6, 10)
    g = torch.Generator().manual_seed(0)
    flat = torch.randperm(60, generator=g)[:17]
    values = torch.randn(17, generator=g)
    mask = torch.zeros(60, dtype=torch.bool)
    mask[flat] = True
    dense = torch.randn(shape, generator=g)

    def build():
        rows, cols = flat // 10, flat % 10
        made = [SparseDelta.from_flat(flat, shape, values),
                SparseDelta.from_coo(rows, cols, shape, values),
                SparseDelta.from_mask(mask.view(shape), dense),
                SparseDelta.from_flat(flat.int(), shape)]
        made.append(SparseDelta(shape, made[0].flat_indices, made[0].values))
        return [(d.flat_indices, d.values, d.to_dense(), tuple(vars(d.structure).values()))
                for d in made]

    with torch.inference_mode():
        inside = build()
        idx = torch.sort(flat).values.int()  # an inference tensor: checked by content
        structure = SparseDelta(shape, idx, torch.ones(17)).structure
        assert no_inference_tensors(structure)
    _clear_caches()
    assert_same_bits(build(), inside)
    twin = SparseDelta(shape, idx.clone(), torch.ones(17)).structure
    assert_same_bits(tuple(vars(structure).values()), tuple(vars(twin).values()))
    with torch.inference_mode():
        with pytest.raises(ValueError, match="repeated"):
            SparseDelta.from_flat(torch.tensor([3, 1, 3]), shape)
        with pytest.raises(ValueError, match="out of range"):
            SparseDelta(shape, torch.tensor([1, 60], dtype=torch.int32), torch.ones(2))


def test_structure_computed_inside_serves_training_outside():
    delta = random_delta((24, 40), 70, seed=1)
    twin = clone_delta(delta)
    with torch.inference_mode():
        structure = delta.structure  # the first derivation, inside inference_mode
    assert no_inference_tensors(structure)
    x = torch.randn(5, 40)
    w = torch.randn(24, 40)
    grads = []
    for d in (delta, twin):
        values = d.values.clone().requires_grad_()
        xi = x.clone().requires_grad_()
        y = sparse_delta_linear(xi, w, None, d.with_values(values), 0.5, "spmm")
        y.square().sum().backward()
        grads.append((y, xi.grad, values.grad))
    assert_same_bits(grads[0], grads[1])


# ---------------------------------------------------------------------------------------------
# Ops, on every backend
# ---------------------------------------------------------------------------------------------
def _op_results(delta, w, x, y0, gy, bias, strategies):
    out = [spmm(y0, x, delta, 0.75), spmm_t(x.clone(), gy, delta, -1.5), sddmm(gy, x, delta),
           add_delta(w, delta, 2.0)]
    buf = torch.empty_like(w)
    add_delta(w, delta, 0.5, out=buf)
    out.append(buf)
    for strategy in strategies:
        out.append(sparse_delta_linear(x, w, bias, delta, 1.25, strategy))
        out.append(sparse_delta_linear(x.view(1, *x.shape), w, None, delta, 1.0, strategy))
    out.append(w)  # "swap" must have restored W
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_delta_ops_first_call_inside(backend, device, dtype):
    shape = (24, 40)
    g = torch.Generator().manual_seed(3)
    delta = random_delta(shape, 80, seed=2, dtype=dtype).to(device)
    w = torch.randn(shape, generator=g).to(dtype).to(device)
    x = torch.randn(6, 40, generator=g).to(dtype).to(device)
    y0 = torch.randn(6, 24, generator=g).to(dtype).to(device)
    gy = torch.randn(6, 24, generator=g).to(dtype).to(device)
    bias = torch.randn(24, generator=g).to(dtype).to(device)
    w_bits = bits(w)
    with torch.inference_mode():
        inside = _op_results(delta, w, x, y0, gy, bias, STRATEGIES)
    assert torch.equal(bits(w), w_bits)
    outside = _op_results(delta, w, x, y0, gy, bias, STRATEGIES)
    assert_same_bits(inside, outside)
    # Everything made inside inference_mode: the same results.
    with torch.inference_mode():
        made = [t.clone() for t in (delta.flat_indices, delta.values, w, x, y0, gy, bias)]
        d_in = SparseDelta(shape, made[0], made[1])
        all_inside = _op_results(d_in, *made[2:], STRATEGIES)
    assert_same_bits(all_inside, outside)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sparse_delta_linear_training_after_first_call_inside(backend, device, strategy):
    shape = (24, 40)
    delta = random_delta(shape, 80, seed=4).to(device)
    twin = clone_delta(delta)  # never seen inside inference_mode
    g = torch.Generator().manual_seed(5)
    w = torch.randn(shape, generator=g).to(device)
    x = torch.randn(7, 40, generator=g).to(device)
    with torch.inference_mode():
        first = sparse_delta_linear(x, w, None, delta, 0.5, strategy)
    results = []
    for d in (delta, twin):
        values = d.values.clone().requires_grad_()
        xi = x.clone().requires_grad_()
        y = sparse_delta_linear(xi, w, None, d.with_values(values), 0.5, strategy)
        y.square().sum().backward()
        results.append((y, xi.grad, values.grad))
    assert_same_bits(results[0], results[1])
    assert_same_bits(first, results[0][0])


def test_scatter_swap_inside(backend, device):
    g = torch.Generator().manual_seed(6)
    weights = [torch.randn(8, 12, generator=g).to(device), torch.randn(30, generator=g).to(device)]
    before = [bits(w) for w in weights]
    flat = [torch.tensor([3, 0, 50, 95], dtype=torch.int32), torch.tensor([29, 1, 7])]
    new = [torch.randn(4, generator=g), torch.randn(3, generator=g)]
    with torch.inference_mode():
        indices = [i.clone().to(device) for i in flat]  # inference tensors
        values = [v.clone().to(device) for v in new]
        scatter_swap_(weights, indices, values)
        for w, i, v, b in zip(weights, indices, new, before):
            assert torch.equal(w.view(-1)[i.long()].cpu(), v)
        for v, b, i in zip(values, before, indices):  # the values now hold the old entries
            assert torch.equal(bits(v), b.view(-1)[i.long()])
        scatter_swap_(weights, indices, values)
        assert_same_bits([bits(w) for w in weights], before)
        # An index tensor written in place inside inference_mode is checked again.
        indices[0][1] = 3
        with pytest.raises(ValueError, match="repeated"):
            scatter_swap_(weights, indices, values)
        indices[0][1] = 96
        with pytest.raises(ValueError, match="out of range"):
            scatter_swap_(weights, indices, values)
        assert_same_bits([bits(w) for w in weights], before)
    # Normal tensors swapped inside, then swapped back outside.
    indices = [i.to(device) for i in flat]
    values = [v.clone().to(device) for v in new]
    with torch.inference_mode():
        scatter_swap_(weights, indices, values)
    assert not any(v.is_inference() for v in values)
    scatter_swap_(weights, indices, values)
    assert_same_bits([bits(w) for w in weights], before)


def test_binary_ops_inside(backend, device):
    g = torch.Generator().manual_seed(7)
    bw = BinaryWeight.from_float(torch.randn(20, 70, generator=g)).to(device)
    down = BinaryWeight.from_float(torch.randn(4, 70, generator=g)).to(device)
    up = BinaryWeight.from_float(torch.randn(20, 4, generator=g)).to(device)
    x = torch.randn(5, 70, generator=g).to(device)
    bias = torch.randn(20, generator=g).to(device)

    def run(bw, down, up, x, bias):
        return [binary_linear(x, bw, bias), binary_linear(x.view(1, 5, 70), bw),
                binary_lora(x, down, up, 0.5, "relu"), binary_lora(x, down, up, 2.0)]

    with torch.inference_mode():
        inside = run(bw, down, up, x, bias)
        made = [BinaryWeight(b.packed.clone(), b.alpha.clone(), b.mu.clone(), b.shape[1])
                for b in (bw, down, up)]
        all_inside = run(*made, x.clone(), bias.clone())
    outside = run(bw, down, up, x, bias)
    assert_same_bits(inside, outside)
    assert_same_bits(all_inside, outside)
    # Training after the first call inside (cached sign bytes are normal tensors).
    xi = x.clone().requires_grad_()
    (binary_linear(xi, bw, bias).sum() + binary_lora(xi, down, up, 0.5, "relu").sum()).backward()
    xr = x.clone().requires_grad_()
    _clear_caches()
    (binary_linear(xr, bw, bias).sum() + binary_lora(xr, down, up, 0.5, "relu").sum()).backward()
    assert_same_bits(xi.grad, xr.grad)


# ---------------------------------------------------------------------------------------------
# ShiraLinear
# ---------------------------------------------------------------------------------------------
def shira_layer(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = ShiraLinear.from_linear(nn.Linear(40, 24).to(dtype), r=2, seed=seed)
    with torch.no_grad():
        layer.shira_values.normal_()
    return layer


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shira_linear_forward_inside_then_training_outside(strategy):
    layer = shira_layer()
    layer.strategy = strategy
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 5, 40)
    w_bits = bits(layer.weight)
    with torch.inference_mode():
        inside = layer(x)
        assert inside.is_inference()
    assert torch.equal(bits(layer.weight), w_bits)
    results = []
    for m in (layer, twin):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.square().sum().backward()
        results.append((y, xi.grad, m.shira_values.grad))
    assert_same_bits(results[0], results[1])
    assert_same_bits(inside, results[0][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("merge_inside, unmerge_inside",
                         [(True, False), (False, True), (True, True)])
def test_shira_linear_merge_unmerge(dtype, merge_inside, unmerge_inside):
    layer = shira_layer(1, dtype)
    reference = copy.deepcopy(layer)
    x = torch.randn(4, 40).to(dtype)
    base = bits(layer.weight)
    reference.merge()
    merged_ref = bits(reference.weight)
    with torch.inference_mode(merge_inside):
        layer.merge()
    assert torch.equal(bits(layer.weight), merged_ref)
    assert not layer._shira_swapped.is_inference()
    with torch.inference_mode():
        assert_same_bits(layer(x), reference(x))
    with torch.inference_mode(unmerge_inside):
        layer.unmerge()
    assert torch.equal(bits(layer.weight), base)
    layer.merge()  # and again, outside
    layer.unmerge()
    assert torch.equal(bits(layer.weight), base)


def test_shira_linear_load_state_dict_inside():
    source, layer = shira_layer(2), shira_layer(3)
    twin = shira_layer(3)
    twin.load_state_dict(source.state_dict())
    with torch.inference_mode():
        layer.load_state_dict(source.state_dict())  # the load hook derives the structure
    assert no_inference_tensors(list(layer.buffers()))
    x = torch.randn(3, 40)
    results = []
    for m in (layer, twin):
        y = m(x)
        y.sum().backward()
        results.append((y, m.shira_values.grad))
    assert_same_bits(results[0], results[1])


# ---------------------------------------------------------------------------------------------
# AdapterBank
# ---------------------------------------------------------------------------------------------
def bank_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12))


def bank_adapters():
    return {"a": {"0": random_delta((24, 16), 30, 10), "2": (random_delta((12, 24), 20, 11), 0.5)},
            "b": {"0": random_delta((24, 16), 25, 12)}}


def weight_bits(model):
    return [bits(m.weight) for m in model if isinstance(m, nn.Linear)]


def reference_states(adapters):
    """Weights bits per state, from a bank used only outside inference_mode."""
    bank = AdapterBank(bank_model())
    for name, adapter in adapters.items():
        bank.add(name, adapter, scale=2.0)
    states = {None: weight_bits(bank.model)}
    for state in ("a", "b", ("a", "b")):
        bank.activate(list(state) if isinstance(state, tuple) else state,
                      weights=[1.0, -0.5] if isinstance(state, tuple) else None)
        states[state] = weight_bits(bank.model)
    bank.deactivate()
    assert_same_bits(weight_bits(bank.model), states[None])
    return states


def _activate(bank, state):
    if isinstance(state, tuple):
        bank.activate(list(state), weights=[1.0, -0.5])
    else:
        bank.activate(state)


@pytest.mark.parametrize("build_inside", [False, True], ids=["deltas-outside", "deltas-inside"])
def test_bank_added_inside_switches_anywhere(build_inside):
    expected = reference_states(bank_adapters())
    with torch.inference_mode(build_inside):
        adapters = bank_adapters()
    bank = AdapterBank(bank_model())
    with torch.inference_mode():
        for name, adapter in adapters.items():
            bank.add(name, adapter, scale=2.0)
    # Every switch (including A -> B plans and fusions) first inside, then outside, then
    # inside again: the same weights each time, and the base bit for bit at the end.
    order = ["a", "b", ("a", "b"), "a", None, ("a", "b"), "b", None]
    for inside in (True, False, True):
        for state in order:
            with torch.inference_mode(inside):
                _activate(bank, state)
                assert_same_bits(weight_bits(bank.model), expected[state])
    with torch.inference_mode():
        prepared = bank.prepared("a")
    bank.activate("a")
    assert_same_bits(list(bank.prepared("a").values()), list(prepared.values()))
    bank.deactivate()
    for slot in [*bank._adapters.values(), *bank._fusions.values()]:
        assert all(not e.buf.is_inference() and not e.indices.is_inference()
                   for e in slot.entries.values())


def test_bank_mixed_first_inside_then_training_outside():
    # The first mixed() block prepares every adapter's values in the weight's dtype (a new
    # tensor: the deltas are fp32, the weights bf16) and keeps them for later blocks; made as
    # inference tensors, a later block with autograd could not save them for the backward.
    model = bank_model().to(torch.bfloat16)
    bank = AdapterBank(model)
    for name, adapter in bank_adapters().items():
        bank.add(name, adapter, scale=2.0)
    names = ["a", None, "b"]
    x = torch.randn(3, 16).to(torch.bfloat16)
    with torch.inference_mode(), bank.mixed(names):
        inside = model(x)
    xr = x.clone().requires_grad_()
    with bank.mixed(names):
        outside = model(xr)
        outside.float().sum().backward()
    assert_same_bits(outside.detach(), inside)
    assert xr.grad is not None and torch.isfinite(xr.grad).all()
    assert all(not delta.values.is_inference()
               for served in bank._mixed.values() for _, delta, _ in served.adapters)


def test_bank_added_outside_activated_inside():
    expected = reference_states(bank_adapters())
    bank = AdapterBank(bank_model())
    for name, adapter in bank_adapters().items():
        bank.add(name, adapter, scale=2.0)
    with torch.inference_mode():
        bank.activate("a")
        assert_same_bits(weight_bits(bank.model), expected["a"])
        y = bank.model(torch.randn(3, 16))
    assert y.is_inference()
    bank.activate("b")
    assert_same_bits(weight_bits(bank.model), expected["b"])
    with torch.inference_mode():
        bank.deactivate()
    assert_same_bits(weight_bits(bank.model), expected[None])


# ---------------------------------------------------------------------------------------------
# A fresh process: the very first call of everything inside inference_mode
# ---------------------------------------------------------------------------------------------
FRESH_SCRIPT = textwrap.dedent('''
    import copy, warnings
    import torch
    from torch import nn
    warnings.simplefilter("ignore")
    from shira_kernels import AdapterBank, SparseDelta
    from shira_kernels.nn.shira_linear import ShiraLinear
    from shira_kernels.ops.sparse_delta import sparse_delta_linear

    def same(a, b):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))

    torch.manual_seed(0)
    w = torch.randn(24, 40)
    x = torch.randn(5, 40)
    flat = torch.randperm(960)[:70]
    values = torch.randn(70)
    with torch.inference_mode():
        delta = SparseDelta.from_flat(flat, (24, 40), values)
        inside = {s: sparse_delta_linear(x, w, None, delta, 0.5, s)
                  for s in ("fold", "spmm", "swap", "merge")}
    twin = SparseDelta.from_flat(flat.clone(), (24, 40), values.clone())
    for s, y in inside.items():
        v = twin.values.clone().requires_grad_()
        out = sparse_delta_linear(x, w, None, twin.with_values(v), 0.5, s)
        out.sum().backward()
        same(out.detach(), y)

    layer = ShiraLinear.from_linear(nn.Linear(40, 24), r=2)
    with torch.no_grad():
        layer.shira_values.normal_()
    base = layer.weight.detach().clone()
    with torch.inference_mode():
        y_in = layer(x)
        layer.merge()
    layer.unmerge()
    same(layer.weight.detach(), base)
    y = layer(x)
    y.sum().backward()
    same(y.detach(), y_in)

    model = nn.Sequential(nn.Linear(40, 24))
    bank = AdapterBank(model)
    before = model[0].weight.detach().clone()
    with torch.inference_mode():
        bank.add("a", {"0": delta})
    bank.activate("a")
    with torch.inference_mode():
        bank.deactivate()
        bank.activate("a")
    bank.deactivate()
    same(model[0].weight.detach(), before)

    from peft import ShiraConfig, get_peft_model
    from shira_kernels.integrations.peft import accelerate
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 12))
    pm = get_peft_model(copy.deepcopy(mlp), ShiraConfig(r=2, target_modules=["0", "2"],
                                                       init_weights=False))
    pa = accelerate(copy.deepcopy(pm))
    with torch.inference_mode():
        first = pa(x)
    torch.testing.assert_close(first, pm(x).detach(), rtol=1e-5, atol=1e-5)
    out = pa(x)
    out.square().sum().backward()
    same(out.detach(), first)
    print("fresh process: ok")
''')


def test_first_calls_of_a_fresh_process_inside(tmp_path):
    pytest.importorskip("peft")
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True,
                         text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "fresh process: ok" in run.stdout
