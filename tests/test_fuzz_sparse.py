"""Adversarial uses of the sparse side of the API, each a defect once found: bad input is refused
by name before anything changes, and what the bank accepts it also serves."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import shira_kernels
from shira_kernels import AdapterBank, SparseDelta, SparseDeltaSet
from shira_kernels.nn import ShiraLinear
from shira_kernels.ops.multi_delta import multi_delta_linear_reference

from tolerance import abs64, assert_within_error_bound
from unchanged import bits, state_bits


# ---------------------------------------------------------------------------------------------
# ShiraLinear.load_state_dict: a state_dict whose weight or bias has the wrong size used to skip
# the adapter checks, and torch then copied the (unchecked) indices and values before raising.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wrong,indices", [("weight", [0, 2, 4, 6]), ("weight", [20, 9, 5, 1]),
                                           ("bias", [0, 2, 4, 6])],
                         ids=["weight", "weight-unsorted-indices", "bias"])
def test_load_with_a_wrong_sized_base_tensor_changes_nothing(wrong, indices):
    layer = ShiraLinear(8, 4, indices=torch.tensor([1, 5, 9, 20]))
    with torch.no_grad():
        layer.shira_values.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    x = torch.randn(3, 8)
    y_before = layer(x).detach()
    before = state_bits(layer, derived=True)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state[wrong] = torch.zeros(5, 8) if wrong == "weight" else torch.zeros(5)
    state["shira_flat_indices"] = torch.tensor(indices)
    state["shira_values"] = torch.ones(4)
    with pytest.raises(RuntimeError, match=f"size mismatch for {wrong}"):
        layer.load_state_dict(state)
    after = state_bits(layer, derived=True)
    for name, t in before.items():
        assert torch.equal(after[name], t), f"{name} changed by a rejected load"
    assert torch.equal(layer(x).detach(), y_before)


# ---------------------------------------------------------------------------------------------
# multi_delta_linear's row_adapter: a float list was truncated (0.7 → slot 0) and bools taken as
# slots 0 and 1; a bare string failed inside torch without naming the argument.
# ---------------------------------------------------------------------------------------------
def _set_and_inputs():
    delta = SparseDelta.from_flat(torch.tensor([3, 1, 30]), (4, 8), torch.tensor([1., 2., 3.]))
    delta_set = SparseDeltaSet((4, 8))
    delta_set.add("a", delta, 2.0)
    return delta_set, torch.randn(3, 8), torch.randn(4, 8)


@pytest.mark.parametrize("row_adapter", [[0.7, -1, 0], [True, False, True], [0, 1.0, -1]],
                         ids=["fraction", "bools", "whole-float"])
def test_row_adapter_of_non_integers_is_refused(row_adapter):
    delta_set, x, weight = _set_and_inputs()
    with pytest.raises(TypeError, match="row_adapter must hold integer slots"):
        shira_kernels.multi_delta_linear(x, weight, None, delta_set, row_adapter)


def test_row_adapter_as_one_string_is_refused_by_name():
    delta_set, x, weight = _set_and_inputs()
    with pytest.raises(TypeError, match="row_adapter must be a list"):
        shira_kernels.multi_delta_linear(x, weight, None, delta_set, "aaa")
    # An empty list still means no rows.
    y = shira_kernels.multi_delta_linear(x[:0], weight, None, delta_set, [])
    assert y.shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# SparseDelta.from_coo: float rows/cols were truncated by .long() (1.7 → row 1), bools taken.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool], ids=str)
def test_from_coo_refuses_non_integer_coordinates(which, dtype):
    good = torch.tensor([0, 1])
    bad = torch.tensor([0.5, 1.7]).to(dtype)
    rows, cols = (bad, good) if which == "rows" else (good, bad)
    with pytest.raises(TypeError, match=f"{which} must hold integers"):
        SparseDelta.from_coo(rows, cols, (4, 8))


# ---------------------------------------------------------------------------------------------
# AdapterBank.mixed: values cast to the weight's dtype before the scale could overflow (or flush
# to zero) where the adapted weight fits: activate() served them, mixed() gave inf.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values,scale", [([1e5, 2.0, -3e5], 1e-3), ([1e-8, 2e-8, -3e-8], 1e5)],
                         ids=["overflow", "underflow"])
def test_mixed_serves_values_that_only_fit_once_scaled(values, scale):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4)).half()
    with torch.no_grad():  # a zero base: the adapter is all of the output
        model[0].weight.zero_()
        model[0].bias.zero_()
    bank = AdapterBank(model)
    delta = SparseDelta.from_flat([0, 5, 31], (4, 8), torch.tensor(values))
    bank.add("a", {"0": (delta, scale)})
    x = torch.randn(2, 8).half()
    with torch.no_grad(), bank.mixed(["a", None]):
        y = model(x)
    assert torch.isfinite(y).all()
    # Against float64: row 0 through W + scale·S (S rounded to fp16 once scaled), row 1 the base.
    w, b = model[0].weight, model[0].bias
    folded = SparseDelta.from_flat([0, 5, 31], (4, 8),
                                   (torch.tensor(values) * scale).half())
    rows = torch.tensor([0, -1])
    exact, magnitude = (multi_delta_linear_reference(
        f(x), f(w), f(b), [folded.with_values(f(folded.values))], [1.0], rows)
        for f in (lambda t: t.double(), abs64))
    assert_within_error_bound(y, exact, magnitude, 8 + 2, "mixed, scaled values", roundings=1)
    assert exact[0].abs().max() > 1e-3  # the adapter is there to be lost


def test_mixed_refuses_values_that_do_not_fit_even_scaled():
    model = nn.Sequential(nn.Linear(8, 4)).half()
    with torch.no_grad():
        model[0].weight.view(-1)[0] = -60000.0  # base + 1e5 fits fp16, 1e5 alone does not
    bank = AdapterBank(model)
    bank.add("a", {"0": SparseDelta.from_flat([0], (4, 8), torch.tensor([1e5]))})
    with pytest.raises(ValueError, match="adapter 'a', layer '0'.*does not fit"):
        with bank.mixed(["a"]):
            pass
    assert all("forward" not in m.__dict__ for m in model)


# ---------------------------------------------------------------------------------------------
# AdapterBank: activate() inside a mixed() block (same thread: the lock is re-entrant) swapped
# the adapter into the weights the block's forwards read as the base: wrong outputs, silently.
# ---------------------------------------------------------------------------------------------
def test_switch_inside_a_mixed_block_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    bank = AdapterBank(model)
    bank.add("a", {"0": SparseDelta.from_flat([0, 5, 31], (4, 8), torch.tensor([1., 2., 3.]))})
    base = [bits(p).clone() for p in model.parameters()]
    x = torch.randn(2, 8)
    with torch.no_grad(), bank.mixed(["a", None]):
        y1 = model(x)
        with pytest.raises(RuntimeError, match="mixed\\(\\) block is open"):
            bank.activate("a")
        with pytest.raises(RuntimeError, match="mixed\\(\\) block is open"):
            bank.activate(["a"], weights=[0.5])
        assert bank.active is None
        assert torch.equal(model(x), y1)
    assert all(torch.equal(bits(p), b) for p, b in zip(model.parameters(), base))
    bank.activate("a")  # after the block, as usual
    bank.deactivate()
    assert all(torch.equal(bits(p), b) for p, b in zip(model.parameters(), base))


# AdapterBank: remove() then add() inside a mixed() block gave the new adapter the removed one's
# slot, and the rows naming the removed adapter ran the new one, silently.
def test_add_and_remove_inside_a_mixed_block_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    bank = AdapterBank(model)
    a = SparseDelta.from_flat([0, 5, 31], (4, 8), torch.tensor([1., 2., 3.]))
    bank.add("a", {"0": a})
    bank.add("b", {"0": a.with_values(torch.tensor([-1., 4., 0.5]))})
    x = torch.randn(2, 8)
    with torch.no_grad(), bank.mixed(["a", "b"]):
        y = model(x)
        with pytest.raises(RuntimeError, match="mixed\\(\\) block is open; remove"):
            bank.remove("a")
        with pytest.raises(RuntimeError, match="mixed\\(\\) block is open; add"):
            bank.add("c", {"0": a})
        assert bank.names == ("a", "b")
        assert torch.equal(model(x), y)
    bank.remove("a")  # after the block, as usual
    bank.add("c", {"0": a})


# AdapterBank.mixed served the layer that owns a tied weight but ran the layers sharing it on
# the base weight, where activate() (which writes the shared weight) adapts them all.
def test_mixed_serves_the_layers_that_share_a_tied_weight():
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 8)
            self.second.weight = self.first.weight

        def forward(self, x):
            return self.second(torch.relu(self.first(x)))
    model = Tied()
    bank = AdapterBank(model)
    bank.add("a", {"first": SparseDelta.from_flat(torch.arange(0, 64, 3), (8, 8),
                                                  torch.randn(22))})
    x = torch.randn(3, 8)
    with torch.no_grad():
        base = model(x)
        with bank.mixed(["a", None, "a"]):
            mixed = model(x)
        bank.activate("a")
        w = model.first.weight.double()  # W + S, in both layers
        bank.deactivate()
        b1, b2 = model.first.bias.double(), model.second.bias.double()
    x64 = x.double()
    exact = torch.relu(x64 @ w.T + b1) @ w.T + b2
    magnitude = (x64.abs() @ w.abs().T + b1.abs()) @ w.abs().T + b2.abs()
    # Each layer: 8 products and sums, S's separate sum joined, the bias.
    assert_within_error_bound(mixed[0::2], exact[0::2], magnitude[0::2], 2 * (8 + 3), "mixed")
    assert torch.equal(mixed[1], base[1])
    assert all("forward" not in m.__dict__ for m in model.modules())


# ---------------------------------------------------------------------------------------------
# AdapterBank.hotswap: values rescaled to a layer of tiny scale overflowed its dtype and were
# written as inf.
# ---------------------------------------------------------------------------------------------
def test_hotswap_refuses_values_that_overflow_the_layer_and_changes_nothing():
    model = nn.Sequential(ShiraLinear(8, 4, indices=torch.tensor([0, 1, 2, 3]),
                                      scale=1e-6).half())
    bank = AdapterBank(model)
    bank.add("h", {"0": SparseDelta.from_flat([0, 5], (4, 8), torch.tensor([1., 2.]))})
    before = state_bits(model[0], derived=True)
    with pytest.raises(ValueError, match="adapter 'h', layer '0'.*do not fit"):
        bank.hotswap("h")
    after = state_bits(model[0], derived=True)
    assert all(torch.equal(after[k], t) for k, t in before.items())
    assert bank.hotswapped is None


# ---------------------------------------------------------------------------------------------
# AdapterBank.activate(names, weights=<a number>): a TypeError from inside that named nothing.
# ---------------------------------------------------------------------------------------------
def test_fusion_weights_as_a_bare_number_is_refused_by_name():
    model = nn.Sequential(nn.Linear(8, 4))
    bank = AdapterBank(model)
    bank.add("a", {"0": SparseDelta.from_flat([0, 5], (4, 8), torch.tensor([1., 2.]))})
    with pytest.raises(TypeError, match="weights must be a list of numbers"):
        bank.activate(["a"], weights=0.5)
    assert bank.active is None


# ---------------------------------------------------------------------------------------------
# SparseDeltaSet.add from several threads: each name its own slot (the free slot is found and
# taken under the set's lock). A stress test: thread switches forced as often as Python allows.
# ---------------------------------------------------------------------------------------------
def test_sparse_delta_set_adds_from_threads_take_distinct_slots():
    import sys
    import threading

    delta = SparseDelta.from_flat([0, 5], (4, 8), torch.tensor([1., 2.]))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(20):
            delta_set = SparseDeltaSet((4, 8))
            names = [[f"t{k}-{j}" for j in range(25)] for k in range(4)]
            threads = [threading.Thread(target=lambda ns=ns: [delta_set.add(n, delta) for n in ns])
                       for ns in names]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            flat = [n for ns in names for n in ns]
            assert sorted(delta_set.index(n) for n in flat) == list(range(len(flat)))
            assert sorted(delta_set.names) == sorted(flat)
    finally:
        sys.setswitchinterval(interval)
