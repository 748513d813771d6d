"""AdapterBank: exact switching (single, direct A → B, fusions), one scatter_swap_ per switch,
prepared values, outputs, validation that changes nothing, ShiraLinear models, threads."""
import copy
import random
import threading
import time

import pytest
import torch
from torch import nn

import shira_kernels
import shira_kernels.ops.scatter_swap as scatter_swap_module
from shira_kernels import AdapterBank, SparseDelta
from shira_kernels.nn import ShiraLinear, replace_linear

from conftest import DTYPES
from test_sparse_delta import delta_linear_bound
from tolerance import abs64, absolute_copy, assert_within_error_bound, exact_copy

SHAPES = {"0": (24, 16), "2": (12, 24), "4": (8, 12)}


def small_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12, bias=False), nn.ReLU(),
                         nn.Linear(12, 8)).to(dtype)


def random_delta(shape, nnz, gen, magnitude=1.0):
    flat = torch.randperm(shape[0] * shape[1], generator=gen)[:nnz]
    return SparseDelta.from_flat(flat, shape, magnitude * torch.randn(nnz, generator=gen))


def random_adapter(gen, layers=tuple(SHAPES), density=0.2, magnitude=1.0):
    return {layer: random_delta(SHAPES[layer], max(1, int(density * SHAPES[layer][0] * SHAPES[layer][1])),
                                gen, magnitude) for layer in layers}


def bits(t):
    t = t.detach()
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def snapshot(model):
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}


def assert_bits_equal(model, saved):
    for name, p in model.named_parameters():
        assert torch.equal(bits(p.cpu()), bits(saved[name])), f"{name} differs from the saved weights"


def expected_prepared(base_weight, parts):
    """round(base + Σ coefficient·delta) in fp32 over the union of the parts' indices, built
    densely (independently of the bank): returns (sorted flat indices, values)."""
    total = torch.zeros(base_weight.numel(), dtype=torch.float32)
    touched = torch.zeros(base_weight.numel(), dtype=torch.bool)
    for delta, coefficient in parts:
        idx = delta.flat_indices.long()
        total[idx] = total[idx] + coefficient * delta.values.float()
        touched[idx] = True
    idx = torch.nonzero(touched).view(-1)
    return idx, (base_weight.reshape(-1)[idx].float() + total[idx]).to(base_weight.dtype)


def expected_state(base, adapters, active, weights=None):
    """{layer: (indices, values)} that must stand in W for ``active`` (a name or a fusion)."""
    names = (active,) if isinstance(active, str) else tuple(active)
    weights = (1.0,) * len(names) if weights is None else weights
    out = {}
    for layer in SHAPES:
        parts = []
        for name, w in zip(names, weights):
            adapter, scale = adapters[name]
            if layer in adapter:
                item = adapter[layer]
                delta, s = item if isinstance(item, tuple) else (item, scale)
                parts.append((delta, w * s))
        if parts:
            out[layer] = expected_prepared(base[f"{layer}.weight"], parts)
    return out


def check_weights(model, base, state):
    """W equals the expected values at the active entries and the base everywhere else."""
    for layer in SHAPES:
        w = model.get_submodule(layer).weight.detach().cpu().reshape(-1)
        want = base[f"{layer}.weight"].reshape(-1).clone()
        if layer in state:
            idx, values = state[layer]
            want[idx] = values
        assert torch.equal(bits(w), bits(want)), f"layer {layer} holds wrong values"


class CountingSwap:
    """Stands in for scatter_swap_ where the bank's switches call it (the swap transaction of
    shira_kernels.ops.scatter_swap), counting calls."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = scatter_swap_module.scatter_swap_

        def counted(weights, indices, values):
            self.calls.append(([i.data_ptr() for i in indices], [v.data_ptr() for v in values]))
            return real(weights, indices, values)
        monkeypatch.setattr(scatter_swap_module, "scatter_swap_", counted)


# -- basics -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_activate_writes_prepared_values_and_deactivate_restores_the_base(dtype):
    model = small_model(dtype)
    base = snapshot(model)
    gen = torch.Generator().manual_seed(1)
    adapter = random_adapter(gen, layers=("0", "4"))
    adapter["4"] = (adapter["4"], 0.25)  # a per-layer scale wins over the adapter's
    bank = AdapterBank(model)
    assert bank.layers == ("0", "2", "4")
    bank.add("a", adapter, scale=3.0)
    assert bank.names == ("a",) and "a" in bank and len(bank) == 1 and bank.active is None
    assert_bits_equal(model, base)  # adding changes no weight

    bank.activate("a")
    assert bank.active == "a"
    state = expected_state(base, {"a": (adapter, 3.0)}, "a")
    check_weights(model, base, state)
    for layer, (idx, values) in bank.prepared("a").items():
        assert torch.equal(idx.long(), state[layer][0]) and torch.equal(bits(values), bits(state[layer][1]))
    deltas = bank.deltas("a")
    assert deltas["0"][1] == 3.0 and deltas["4"][1] == 0.25
    assert torch.equal(deltas["0"][0].values, adapter["0"].values)

    bank.activate("a")  # already active: nothing happens
    check_weights(model, base, state)
    bank.deactivate()
    assert bank.active is None
    assert_bits_equal(model, base)
    bank.deactivate()  # already the base
    assert_bits_equal(model, base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_with_an_adapter_active_is_the_output_of_base_plus_scaled_delta(dtype):
    model = small_model(dtype)
    gen = torch.Generator().manual_seed(2)
    adapter = random_adapter(gen, density=0.3)
    reference = copy.deepcopy(model)
    with torch.no_grad():  # base + scale·dense delta, fp32 arithmetic, one rounding
        for layer, delta in adapter.items():
            w = reference.get_submodule(layer).weight
            w.copy_((w.float() + 0.7 * delta.to_dense(torch.float32)).to(dtype))
    bank = AdapterBank(model)
    bank.add("a", adapter, scale=0.7)
    x = torch.randn(5, 16).to(dtype)
    base_out = model(x)
    bank.activate("a")
    out = model(x)
    assert torch.equal(out, reference(x))  # the same rounded weights give the same output
    # ... and it matches the exact formula for those weights within the error bound: three
    # layers (16 + 1, 24, 12 + 1 steps), two stored activations and up to one rounding per
    # layer of torch's product before its bias, in the dtype.
    assert_within_error_bound(out, exact_copy(reference)(x.double()),
                              absolute_copy(reference)(abs64(x)), 17 + 24 + 13, "output",
                              roundings=2 + 2)
    assert not torch.allclose(out.float(), base_out.float(), atol=1e-3)
    bank.deactivate()
    assert torch.equal(model(x), base_out)


def test_direct_switch_is_one_swap_and_reuses_its_buffers(monkeypatch):
    model = small_model(torch.bfloat16)
    base = snapshot(model)
    gen = torch.Generator().manual_seed(3)
    a = random_adapter(gen, layers=("0", "2"), density=0.4)
    b = random_adapter(gen, layers=("2", "4"), density=0.4)  # overlaps a on layer 2 only
    bank = AdapterBank(model)
    bank.add("a", a)
    bank.add("b", b, scale=-2.0)
    adapters = {"a": (a, 1.0), "b": (b, -2.0)}
    swaps = CountingSwap(monkeypatch)

    bank.activate("a")
    bank.activate("b")
    assert len(swaps.calls) == 2
    check_weights(model, base, expected_state(base, adapters, "b"))
    bank.activate("a")
    check_weights(model, base, expected_state(base, adapters, "a"))
    bank.activate("b")
    bank.activate(["a", "b"], weights=[0.5, 1.0])
    check_weights(model, base, expected_state(base, adapters, ("a", "b"), (0.5, 1.0)))
    bank.deactivate()
    assert len(swaps.calls) == 6  # one scatter_swap_ per switch, whatever the switch
    assert_bits_equal(model, base)
    # The a → b switches ran on the same index and value buffers (cached pair plan).
    assert swaps.calls[1] == swaps.calls[3]
    assert swaps.calls[2] != swaps.calls[1]


def test_identical_masks_and_empty_layers_switch_exactly():
    model = small_model(torch.float16)
    base = snapshot(model)
    gen = torch.Generator().manual_seed(4)
    a = random_adapter(gen)
    same_mask = {layer: d.with_values(torch.randn(d.nnz, generator=gen)) for layer, d in a.items()}
    empty = {"2": SparseDelta((12, 24), torch.empty(0, dtype=torch.int32), torch.empty(0))}
    bank = AdapterBank(model)
    bank.add("a", a)
    bank.add("same", same_mask, scale=0.5)
    bank.add("empty", empty)
    adapters = {"a": (a, 1.0), "same": (same_mask, 0.5)}
    for name in ["a", "same", "a", "empty", "same", "empty", "a", "same"]:
        bank.activate(name)
        if name != "empty":
            check_weights(model, base, expected_state(base, adapters, name))
        else:
            assert_bits_equal(model, base)
    bank.deactivate()
    assert_bits_equal(model, base)


# -- exactness over long random sequences ---------------------------------------------------------
def _random_switches(dtype, steps, check_every, seed, device="cpu", **bank_options):
    model = small_model(dtype, seed=seed).to(device)
    base = snapshot(model)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    bank = AdapterBank(model, **bank_options)
    adapters = {}
    for k in range(5):
        layers = tuple(layer for layer in SHAPES if rng.random() < 0.8) or ("2",)
        adapter = random_adapter(gen, layers=layers, density=rng.choice([0.05, 0.2, 0.5]),
                                 magnitude=rng.choice([1e-3, 1.0, 50.0]))
        scale = rng.choice([1.0, 0.5, -3.0])
        bank.add(f"a{k}", adapter, scale=scale)
        adapters[f"a{k}"] = (adapter, scale)
    fusions = [(("a0", "a1"), (1.0, 0.5)), (("a2", "a3", "a4"), (0.3, -1.0, 2.0)),
               (("a4", "a1"), (1.0, 1.0))]
    counts = {"adapter": 0, "fusion": 0, "off": 0}
    for step in range(steps):
        roll = rng.random()
        if roll < 0.08:
            bank.deactivate()
            target, weights = None, None
            counts["off"] += 1
        elif roll < 0.2:
            target, weights = rng.choice(fusions)
            bank.activate(list(target), weights=list(weights))
            counts["fusion"] += 1
        else:
            target, weights = f"a{rng.randrange(5)}", None
            bank.activate(target)
            counts["adapter"] += 1
        if step % check_every == 0:
            assert bank.active == target
            state = {} if target is None else expected_state(base, adapters, target, weights)
            check_weights(model, base, state)
    bank.deactivate()
    assert_bits_equal(model, base)
    return counts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_ten_thousand_random_switches_restore_the_base_bit_for_bit(dtype):
    # The bank's bookkeeping is what is under test, so the cheapest swap backend runs it; the
    # next test runs a shorter sequence on every backend.
    start = time.perf_counter()
    with shira_kernels.use_backend("reference"):
        counts = _random_switches(dtype, steps=10_000, check_every=97, seed=5)
    print(f"\n10,000 switches ({counts}) in {dtype}: {time.perf_counter() - start:.2f} s")
    assert counts["fusion"] > 500 and counts["off"] > 300


def test_random_switches_on_every_backend(backend, device):
    steps = 40 if backend == "triton" else 300  # Triton runs interpreted on CPU
    # Small caches: pair plans and fusions are dropped and rebuilt (fusions from the base
    # while something else is active) along the way.
    _random_switches(torch.bfloat16, steps=steps, check_every=7, seed=6, device=device,
                     max_pairs=3, max_fusions=1)


# -- adding while active, fusions -----------------------------------------------------------------
def test_adding_and_fusing_while_active_start_from_the_base():
    model = small_model(torch.bfloat16)
    base = snapshot(model)
    gen = torch.Generator().manual_seed(7)
    a = random_adapter(gen, density=0.5, magnitude=10.0)
    c = {layer: d.with_values(torch.randn(d.nnz, generator=gen)) for layer, d in a.items()}
    bank = AdapterBank(model)
    bank.add("a", a)
    bank.activate("a")
    bank.add("c", c, scale=2.0)  # on a's very entries, while W holds a's values there
    bank.activate(["a", "c"])  # fusion computed while a is active
    adapters = {"a": (a, 1.0), "c": (c, 2.0)}
    check_weights(model, base, expected_state(base, adapters, ("a", "c")))
    assert bank.active == ("a", "c") and bank.active_weights == (1.0, 1.0)
    bank.activate("c")
    check_weights(model, base, expected_state(base, adapters, "c"))
    for layer, (idx, values) in bank.prepared("c").items():
        assert torch.equal(bits(values), bits(expected_state(base, adapters, "c")[layer][1]))
    bank.deactivate()
    assert_bits_equal(model, base)


def test_fusions_are_computed_once_per_names_and_weights(monkeypatch):
    model = small_model()
    gen = torch.Generator().manual_seed(8)
    bank = AdapterBank(model, max_fusions=2)
    for name in "abc":
        bank.add(name, random_adapter(gen))
    built = []
    real = AdapterBank._fused_entries
    monkeypatch.setattr(AdapterBank, "_fused_entries",
                        lambda self, n, w: built.append((n, w)) or real(self, n, w))
    bank.activate(["a", "b"], weights=[1.0, 0.5])
    bank.activate("c")
    bank.activate(("a", "b"), weights=(1.0, 0.5))
    assert len(built) == 1
    bank.activate(["a", "b"], weights=[1.0, 0.25])  # other weights: another fusion
    bank.activate(["b", "c"])
    bank.activate(["a", "b"], weights=[1.0, 0.25])
    assert len(built) == 3
    assert len(bank._fusions) <= 2  # least recently used fusions are dropped past max_fusions
    bank.deactivate()


# -- validation: errors change nothing ------------------------------------------------------------
def _corrupted(kind, gen):
    delta = random_delta((24, 16), 20, gen)
    if kind == "out of range":
        delta.flat_indices[3] = 24 * 16
    elif kind == "repeated":
        delta.flat_indices[3] = delta.flat_indices[4]
    elif kind == "negative":
        delta.flat_indices[0] = -1
    return delta


@pytest.mark.parametrize("case", [
    "unknown layer", "shape", "out of range", "repeated", "negative", "non-finite", "bad scale",
    "duplicate name", "empty", "not a delta"])
def test_bad_adapters_raise_and_change_nothing(case):
    model = small_model(torch.float16)
    gen = torch.Generator().manual_seed(9)
    good = random_adapter(gen)
    bank = AdapterBank(model)
    bank.add("good", good)
    bank.activate("good")
    before = snapshot(model)
    prepared = bank.prepared("good")
    ok = random_delta((24, 16), 20, gen)
    adapter, name, scale, error = {"0": ok}, "bad", 1.0, ValueError
    if case == "unknown layer":
        adapter = {"0": ok, "fc9": ok}
    elif case == "shape":
        adapter = {"0": ok, "2": random_delta((24, 12), 5, gen)}
    elif case in ("out of range", "repeated", "negative"):
        adapter = {"2": random_delta((12, 24), 5, gen), "0": _corrupted(case, gen)}
    elif case == "non-finite":
        bad = random_delta((24, 16), 20, gen)
        bad.values[2] = float("nan")
        adapter = {"0": bad}
    elif case == "bad scale":
        adapter = {"0": (ok, float("inf"))}
    elif case == "duplicate name":
        name = "good"
    elif case == "empty":
        adapter = {}
    elif case == "not a delta":
        adapter, error = {"0": torch.zeros(24, 16)}, TypeError
    with pytest.raises(error) as info:
        bank.add(name, adapter, scale=scale)
    message = str(info.value)
    assert repr(name) in message
    if case in ("unknown layer", "shape", "out of range", "repeated", "negative"):
        assert repr("fc9" if case == "unknown layer" else "2" if case == "shape" else "0") in message
    assert bank.names == ("good",) and bank.active == "good"
    assert_bits_equal(model, before)
    for layer, (idx, values) in bank.prepared("good").items():
        assert torch.equal(bits(values), bits(prepared[layer][1]))
    bank.deactivate()  # and the bank still works
    bank.add("later", {"0": ok})


def test_bad_switches_raise_and_change_nothing():
    model = small_model()
    gen = torch.Generator().manual_seed(10)
    bank = AdapterBank(model)
    bank.add("a", random_adapter(gen))
    bank.add("b", random_adapter(gen))
    bank.activate("a")
    before = snapshot(model)
    for name, weights, error in [("nope", None, KeyError), (["a", "nope"], None, KeyError),
                                 (["a", "a"], None, ValueError), ([], None, ValueError),
                                 (["a", "b"], [1.0], ValueError),
                                 (["a", "b"], [1.0, float("nan")], ValueError),
                                 ("b", [1.0], ValueError)]:
        with pytest.raises(error):
            bank.activate(name, weights=weights)
        assert bank.active == "a"
        assert_bits_equal(model, before)
    with pytest.raises(RuntimeError, match="active"):
        bank.remove("a")
    bank.activate(["a", "b"])
    with pytest.raises(RuntimeError, match="active"):
        bank.remove("b")
    with pytest.raises(KeyError):
        bank.remove("nope")
    bank.deactivate()
    bank.remove("b")
    assert bank.names == ("a",) and "b" not in bank and len(bank) == 1
    assert not bank._fusions and not any("b" in plan.names for pair in bank._pairs for plan in pair)


def test_layers_with_tied_weights_are_addressed_by_their_first_name():
    model = small_model()
    model.append(nn.Linear(16, 24))
    model[5].weight = model[0].weight
    bank = AdapterBank(model)
    assert bank.layers == ("0", "2", "4")
    with pytest.raises(ValueError, match="'0'"):
        bank.add("a", {"5": random_delta((24, 16), 4, torch.Generator().manual_seed(0))})


def test_a_model_without_linear_layers_is_refused():
    with pytest.raises(ValueError, match="nn.Linear"):
        AdapterBank(nn.Sequential(nn.ReLU()))


# -- ShiraLinear models ---------------------------------------------------------------------------
def trained_shira_model(dtype, seed=11):
    model = small_model(dtype)
    shira = copy.deepcopy(model)
    replace_linear(shira, ["0", "2", "4"], r=2, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in shira.modules():
            if isinstance(module, ShiraLinear):
                module.shira_values.copy_(torch.randn(module.shira_values.shape, generator=gen))
                module.scale = 0.5
    return model, shira


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_from_model_takes_every_shira_layer_with_its_scale(dtype):
    model, shira = trained_shira_model(dtype)
    base = snapshot(model)
    bank = AdapterBank(model)
    bank.add_from_model("task", shira)
    assert set(bank.deltas("task")) == {"0", "2", "4"}
    assert all(scale == 0.5 for _, scale in bank.deltas("task").values())
    x = torch.randn(3, 16).to(dtype)
    want = shira(x)  # unmerged: x·(W + 0.5·S)ᵀ + b through the sparse kernels
    bank.activate("task")
    # Both against x·(W + 0.5·S)ᵀ + b layer by layer in float64: each layer within
    # delta_linear_bound, plus the two activations stored in the dtype.
    exact, magnitude = x.double(), abs64(x)
    k = roundings = 0
    for module in shira:
        if isinstance(module, ShiraLinear):
            dense = module.delta.to_dense(torch.float64)
            w = module.weight.double() + module.scale * dense
            w_abs = abs64(module.weight) + abs(module.scale) * dense.abs()
            b, b_abs = (None, None) if module.bias is None else (module.bias.double(),
                                                                 abs64(module.bias))
            exact = nn.functional.linear(exact, w, b)
            magnitude = nn.functional.linear(magnitude, w_abs, b_abs)
            k_l, n_l = delta_linear_bound(module.in_features)
            k, roundings = k + k_l, roundings + n_l + 1
        else:  # ReLU: 1-Lipschitz, the identity on the magnitudes
            exact = module(exact)
    roundings -= 1  # the last layer's output is the result's own rounding
    assert_within_error_bound(model(x), exact, magnitude, k, "merged", roundings=roundings)
    assert_within_error_bound(want, exact, magnitude, k, "unmerged", roundings=roundings)
    # merge() uses the same fp32 formula and rounding, so the weights agree bit for bit.
    for module in shira.modules():
        if isinstance(module, ShiraLinear):
            module.merge()
    for name, p in model.named_parameters():
        assert torch.equal(bits(p), bits(shira.get_parameter(name)))
    bank.deactivate()
    assert_bits_equal(model, base)


def test_a_merged_shira_layer_is_refused():
    _, shira = trained_shira_model(torch.float32)
    base = snapshot(shira)
    bank = AdapterBank(shira)  # a bank over a ShiraLinear model itself
    bank.add_from_model("own", shira)
    bank.add("other", random_adapter(torch.Generator().manual_seed(12)))
    shira[2].merge()
    with pytest.raises(RuntimeError, match="'2'.*merged ShiraLinear"):
        bank.activate("other")
    with pytest.raises(RuntimeError, match="merged"):
        bank.add("more", random_adapter(torch.Generator().manual_seed(13)))
    with pytest.raises(RuntimeError, match="merged"):
        AdapterBank(shira)
    shira[2].unmerge()
    assert bank.active is None
    assert_bits_equal(shira, base)
    bank.activate("own")
    bank.activate("other")
    bank.deactivate()
    assert_bits_equal(shira, base)


def test_add_from_model_without_shira_layers_is_refused():
    bank = AdapterBank(small_model())
    with pytest.raises(ValueError, match="no ShiraLinear"):
        bank.add_from_model("x", small_model())
    assert len(bank) == 0


# -- threads ---------------------------------------------------------------------------------------
def _two_far_apart_adapters():
    model = small_model()
    gen = torch.Generator().manual_seed(14)
    # Every layer changes a lot, so a forward that mixed the two states would give a third output.
    a = random_adapter(gen, density=0.6, magnitude=5.0)
    b = random_adapter(gen, density=0.6, magnitude=5.0)
    bank = AdapterBank(model)
    bank.add("a", a)
    bank.add("b", b)
    return model, bank


def _forward_while_switching(model, bank, run_forward, enough=20, timeout=60.0):
    x = torch.randn(4, 16)
    with torch.no_grad():
        bank.activate("a")
        out_a = run_forward(x)
        bank.activate("b")
        out_b = run_forward(x)
    assert not torch.allclose(out_a, out_b)
    stop = threading.Event()
    switches = [0]
    errors = []

    def switcher():
        try:
            while not stop.is_set():
                bank.activate("a" if switches[0] % 2 else "b")
                switches[0] += 1
                time.sleep(0)  # locks are not fair: let the forward thread in now and then
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    thread = threading.Thread(target=switcher)
    seen = {"a": 0, "b": 0}
    thread.start()
    try:
        # Count-based, not time-based, so a loaded machine only makes it slower, not failing.
        deadline = time.perf_counter() + timeout
        while (seen["a"] + seen["b"] < enough or switches[0] < enough) and time.perf_counter() < deadline:
            with torch.no_grad():
                out = run_forward(x)
            if torch.equal(out, out_a):
                seen["a"] += 1
            elif torch.equal(out, out_b):
                seen["b"] += 1
            else:
                raise AssertionError("a forward saw half-switched weights")
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert switches[0] >= enough and seen["a"] + seen["b"] >= enough
    bank.deactivate()
    return seen


def test_guard_forward_keeps_forwards_and_switches_apart():
    model, bank = _two_far_apart_adapters()
    base = snapshot(model)
    guard = bank.guard_forward()
    assert bank.guard_forward() is guard
    _forward_while_switching(model, bank, model)
    guard.remove()
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert_bits_equal(model, base)


def test_reading_context_keeps_forwards_and_switches_apart():
    model, bank = _two_far_apart_adapters()

    def guarded(x):
        with bank.reading():
            return model(x)
    _forward_while_switching(model, bank, guarded)


def test_guard_releases_the_lock_when_forward_raises():
    model, bank = _two_far_apart_adapters()
    with bank.guard_forward():
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 5))  # wrong width
        done = threading.Event()
        thread = threading.Thread(target=lambda: (bank.activate("a"), done.set()))
        thread.start()
        thread.join(timeout=10)
        assert done.is_set(), "the lock stayed held after a failed forward"
    bank.deactivate()
