"""Adversarial uses of AdapterBank and ShiraLinear, each a defect once found: nothing stays held
after a guarded forward raises, and a merged layer's state_dict loads back to the same layer."""
from __future__ import annotations

import re
import threading
import warnings

import pytest
import torch
from torch import nn

from shira_kernels import AdapterBank, SparseDelta, SparseDeltaSet
from shira_kernels.nn import ShiraLinear, replace_linear

from tolerance import abs64, assert_within_error_bound
from unchanged import assert_same_bits, bits, state_bits


def other_thread_can_lock(bank: AdapterBank) -> bool:
    got = []

    def take():
        got.append(bank.lock.acquire(timeout=2))
        if got[-1]:
            bank.lock.release()
    thread = threading.Thread(target=take)
    thread.start()
    thread.join()
    return got[0]


# ---------------------------------------------------------------------------------------------
# guard_forward: the post-hook warned (once, for a forward recording a backward) before it
# released the lock; under warnings-as-errors the warning raised there, torch does not call an
# always_call hook twice, and the bank's lock stayed held by that thread for good.
# ---------------------------------------------------------------------------------------------
def test_guarded_forward_whose_warning_raises_releases_the_lock():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    bank = AdapterBank(model)
    bank.add("a", {"0": SparseDelta((6, 8), torch.tensor([1, 9, 30]), torch.randn(3))})
    with bank.guard_forward():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                model(torch.randn(2, 8, requires_grad=True))
            except UserWarning:
                pass
        assert not bank.lock._is_owned()
        assert other_thread_can_lock(bank)
        bank.activate("a")  # and the bank still switches, from any thread
        bank.deactivate()


# ---------------------------------------------------------------------------------------------
# guard_forward took the lock in a forward pre-hook and gave it back in an always_call forward
# hook; torch runs those only for an Exception, so a KeyboardInterrupt in the forward (Ctrl-C
# in a notebook) left the lock held by that thread, and every other thread's switch or guarded
# forward waited for good.
# ---------------------------------------------------------------------------------------------
class _Interrupting(nn.Module):
    def __init__(self):
        super().__init__()
        self.interrupt = False

    def forward(self, x):
        if self.interrupt:
            raise KeyboardInterrupt
        return x


def test_guarded_forward_ended_by_a_keyboard_interrupt_releases_the_lock():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), _Interrupting(), nn.Linear(6, 4))
    bank = AdapterBank(model)
    bank.add("a", {"0": SparseDelta((6, 8), torch.tensor([1, 9, 30]), torch.randn(3))})
    x = torch.randn(2, 8)
    with torch.no_grad():
        want = model(x)
    with bank.guard_forward():
        model[1].interrupt = True
        with pytest.raises(KeyboardInterrupt), torch.no_grad():
            model(x)
        assert not bank.lock._is_owned()
        assert other_thread_can_lock(bank)
        model[1].interrupt = False
        with torch.no_grad():
            assert torch.equal(model(x), want)  # still guarded, still the same function
        bank.activate("a")
        bank.deactivate()


def test_guard_forward_keeps_the_forward_signature_and_comes_off_cleanly():
    import inspect
    model = nn.Sequential(nn.Linear(8, 4))
    bank = AdapterBank(model)
    signature = inspect.signature(model.forward)
    with bank.guard_forward():
        assert "forward" in model.__dict__
        assert inspect.signature(model.forward) == signature  # what generate() inspects
    assert "forward" not in model.__dict__


# ---------------------------------------------------------------------------------------------
# ShiraLinear.state_dict() while merged saved W + scale·S as "weight" next to shira_values: a
# layer loading it (unmerged, as load_state_dict requires) then added S a second time.
# ---------------------------------------------------------------------------------------------
def test_state_dict_of_a_merged_layer_loads_back_to_the_same_outputs():
    torch.manual_seed(0)
    layer = ShiraLinear.from_linear(nn.Linear(8, 6), r=1)
    with torch.no_grad():
        layer.shira_values.normal_()
    base = bits(layer.weight).clone()
    x = torch.randn(3, 8)
    layer.merge()
    state = layer.state_dict()
    assert torch.equal(bits(state["weight"]), base)
    assert layer.merged and not torch.equal(bits(layer.weight), base)  # the layer is untouched
    fresh = ShiraLinear.from_linear(nn.Linear(8, 6), r=1)
    fresh.load_state_dict(state)
    w64 = base.view(torch.float32).double().clone()
    w64.view(-1)[layer.shira_flat_indices.long()] += layer.scale * layer.shira_values.double()
    exact = x.double() @ w64.T + layer.bias.double()
    magnitude = abs64(x) @ w64.abs().T + abs64(layer.bias)
    assert_within_error_bound(fresh(x), exact, magnitude, k=8 + 2)


# ---------------------------------------------------------------------------------------------
# A model converted after its bank was built (model.half()): activate() was refused by the swap
# with a message about values[0] and weights[0], not the layer.
# ---------------------------------------------------------------------------------------------
def test_activate_after_the_model_was_converted_names_the_layer():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    bank = AdapterBank(model)
    bank.add("a", {"2": SparseDelta.from_flat([1, 7, 20], (4, 6), torch.tensor([1., 2., 3.]))})
    model.half()
    before = [bits(p).clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="layer '2': the weight is torch.float16"):
        bank.activate("a")
    assert bank.active is None
    assert all(torch.equal(bits(p), b) for p, b in zip(model.parameters(), before))


# ---------------------------------------------------------------------------------------------
# add("__base__", ...): the name that means the base in mixed() rows was taken as an adapter's.
# After a mixed() block the layers' sets refused it only once the bank had registered it (add
# raised, the adapter stayed); before one, add succeeded and every later block raised.
# ---------------------------------------------------------------------------------------------
def _two_layer_bank():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    bank = AdapterBank(model)
    bank.add("a", {"0": SparseDelta.from_flat([1, 7, 20], (6, 8), torch.tensor([1., 2., 3.])),
                   "2": SparseDelta.from_flat([0, 9], (4, 6), torch.tensor([4., 5.]))})
    return model, bank


@pytest.mark.parametrize("after_a_block", [False, True], ids=["fresh", "after-a-block"])
def test_an_adapter_named_base_is_refused_and_changes_nothing(after_a_block):
    model, bank = _two_layer_bank()
    x = torch.randn(2, 8)
    if after_a_block:
        with bank.mixed(["a", None]):
            model(x)
    before = state_bits(model)
    with pytest.raises(ValueError, match="other than '__base__'"):
        bank.add("__base__", {"0": SparseDelta.from_flat([2], (6, 8), torch.tensor([1.]))})
    assert bank.names == ("a",)
    assert_same_bits(state_bits(model), before)
    with bank.mixed(["a", "__base__"]):  # still served, the second row by the base
        mixed = model(x)
    assert torch.equal(mixed[1], model(x)[1])


def test_an_add_that_fails_in_the_mixed_layers_registers_nothing(monkeypatch):
    model, bank = _two_layer_bank()
    with bank.mixed(["a", None]):
        model(torch.randn(2, 8))
    real = SparseDeltaSet.add

    def failing(self, name, delta, scale=1.0):
        if self.shape == (4, 6):  # the second layer: the first one's set already holds it
            raise MemoryError("no room")
        return real(self, name, delta, scale)
    monkeypatch.setattr(SparseDeltaSet, "add", failing)
    before = state_bits(model)
    adapter = {"0": SparseDelta.from_flat([2], (6, 8), torch.tensor([1.])),
               "2": SparseDelta.from_flat([3], (4, 6), torch.tensor([1.]))}
    with pytest.raises(MemoryError):
        bank.add("b", adapter)
    assert bank.names == ("a",)
    assert all("b" not in served.adapters for served in bank._mixed.values())
    assert_same_bits(state_bits(model), before)
    monkeypatch.undo()
    bank.add("b", adapter)  # and the name is free
    with bank.mixed(["a", "b"]):
        model(torch.randn(2, 8))


# ---------------------------------------------------------------------------------------------
# hotswap() wrote the bank's layers only: a ShiraLinear whose weight is tied to an earlier one
# kept its own adapter, so hotswap(None) did not serve the base through it and hotswap(name)
# gave it neither the adapter (which activate() puts in the shared weight) nor zeros.
# ---------------------------------------------------------------------------------------------
def _tied_shira_model(tied_shira=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    model[1].weight = model[0].weight
    replace_linear(model, ["0"], r=2)  # 24 entries
    if tied_shira:
        replace_linear(model, ["1"], r=1, scale=0.5)  # 12 entries, its own scale
    assert model[0].weight is model[1].weight
    with torch.no_grad():
        for layer in model[:2 if tied_shira else 1]:
            layer.shira_values.fill_(1.0)  # "trained"
    return model


def test_hotswap_gives_a_tied_shira_layer_its_owners_adapter():
    model = _tied_shira_model()
    bank = AdapterBank(model)
    bank.hotswap(None)
    assert all(not layer.shira_values.any() for layer in model)
    delta = SparseDelta.from_flat([1, 8, 20, 33], (6, 6), torch.tensor([1., -2., 3., 4.]))
    bank.add("a", {"0": delta}, scale=2.0)
    bank.hotswap("a")
    for layer in model:  # each through its own scale: 2·delta either way
        assert torch.equal(layer.scale * layer.delta.to_dense(), 2.0 * delta.to_dense())
    x = torch.randn(3, 6)
    y_hotswapped = model[1](x)
    bank.hotswap(None)
    bank.activate("a")  # the shared weight: the tied layer sees the adapter too
    torch.testing.assert_close(y_hotswapped, model[1](x))
    bank.deactivate()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_from_model_takes_what_hotswap_left_in_tied_layers_of_any_scales(dtype):
    """hotswap rounds each tied layer's values through its own scale (0.3 and 0.7 here, whose
    ratios to the adapter's are not exact): add_from_model still reads them as one adapter."""
    for seed in range(10):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
        model[1].weight = model[0].weight
        replace_linear(model, ["0"], r=2, scale=0.3)
        replace_linear(model, ["1"], r=2, scale=0.7)
        model.to(dtype)
        bank = AdapterBank(model)
        taken = model[0].shira_flat_indices[:40]
        bank.add("a", {"0": SparseDelta((16, 16), taken, torch.randn(40, dtype=dtype))})
        bank.hotswap("a")
        bank.add_from_model("b", model)
        assert bank.names == ("a", "b")


def test_a_merged_tied_shira_layer_blocks_switches_as_a_merged_owner_does():
    """A ShiraLinear tied to an earlier layer's weight and merged holds base entries of that
    weight: switching the bank meanwhile let an unmerge put them back over the adapter's and
    the base came back changed. Every switch now refuses while it is merged, changing nothing."""
    model = _tied_shira_model()
    bank = AdapterBank(model)
    taken = model[1].shira_flat_indices[:3]
    bank.add("a", {"0": SparseDelta(model[0].weight.shape, taken, torch.tensor([5., 6., 7.]))})
    before = bits(model[0].weight)
    model[1].merge()
    merged = bits(model[0].weight)
    for switch in (lambda: bank.activate("a"), lambda: bank.activate(["a"], [0.5])):
        with pytest.raises(RuntimeError, match="layer '1' is a merged ShiraLinear"):
            switch()
        assert torch.equal(bits(model[0].weight), merged) and bank.active is None
    model[1].unmerge()
    assert torch.equal(bits(model[0].weight), before)
    bank.activate("a")
    bank.deactivate()
    assert torch.equal(bits(model[0].weight), before)


def test_add_from_model_takes_tied_shira_layers_as_their_owners_adapter():
    """add_from_model on a model whose ShiraLinear layers share a weight: the tied layer holds
    the owner's adapter through its own scale (as hotswap leaves it), so the bank gets that one
    adapter under the owner's name; tied layers with different adapters are refused, nothing
    added."""
    model = _tied_shira_model()
    bank = AdapterBank(model)
    delta = SparseDelta.from_flat([1, 8, 20, 33], (6, 6), torch.tensor([1., -2., 3., 0.7]))
    bank.add("a", {"0": delta}, scale=2.0)
    bank.hotswap("a")  # layer 1 (scale 0.5) gets 4·values, layer 0 (scale 1) 2·values
    bank.add_from_model("copy", model)
    bank.hotswap(None)
    x = torch.randn(3, 6)
    for name in ("a", "copy"):
        bank.activate(name)
        y = model(x)
        bank.deactivate()
        if name == "a":
            want = y
    assert torch.equal(bits(y), bits(want))
    model = _tied_shira_model()  # each layer trained on its own: two adapters for one weight
    bank = AdapterBank(model)
    with pytest.raises(ValueError, match=r"layers '0' and '1' share one weight but carry "
                                         r"different adapters"):
        bank.add_from_model("both", model)
    assert bank.names == ()


@pytest.mark.parametrize("case", ["capacity", "scale 0", "merged", "not a ShiraLinear"])
def test_hotswap_checks_a_tied_layer_before_writing_any(case):
    model = _tied_shira_model(tied_shira=case != "not a ShiraLinear")
    bank = AdapterBank(model)
    bank.hotswap(None)
    nnz = 13 if case == "capacity" else 4  # fits the owner's 24 entries, not the tied 12
    bank.add("a", {"0": SparseDelta.from_flat(torch.arange(nnz) * 2, (6, 6), torch.ones(nnz))})
    error, match = ValueError, "layer '1' .*tied to layer '0'.*more than its 12"
    if case == "scale 0":
        model[1].scale = 0.0
        match = "layer '1' .*tied to layer '0'.* scale 0"
    elif case == "merged":
        model[1].merge()  # its (zero) adapter: W unchanged
        error, match = RuntimeError, "layer '1' is merged"
    elif case == "not a ShiraLinear":  # it could not carry what the shared weight would
        error, match = TypeError, "layer '1' .*tied to layer '0'.* is a Linear, not a ShiraLinear"
    before = state_bits(model, derived=True)
    with pytest.raises(error, match=match):
        bank.hotswap("a")
    assert_same_bits(state_bits(model, derived=True), before)
    assert bank.hotswapped is None


# ---------------------------------------------------------------------------------------------
# bank.load of a missing file or a directory raised FileNotFoundError / IsADirectoryError, where
# its docstring promises a ValueError for any problem (add_peft already named a missing file).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["missing", "directory"])
def test_load_of_a_path_that_is_not_a_file_is_a_value_error_naming_it(tmp_path, where):
    model, bank = _two_layer_bank()
    bank.activate("a")
    path = tmp_path / "nope.safetensors" if where == "missing" else tmp_path
    before = state_bits(model)
    with pytest.raises(ValueError, match=re.escape(f"{path}: cannot read an adapter file there")):
        bank.load("b", path)
    assert bank.names == ("a",) and bank.active == "a"
    assert_same_bits(state_bits(model), before)
    bank.deactivate()


# ---------------------------------------------------------------------------------------------
# activate(names, weights) of a fusion: a list among the names raised "unhashable type: 'list'"
# (a set of the names was made before their types were checked), and a 2-D tensor of weights
# became a list of lists, refused as "a fusion weight ... got list [1.0]".
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("names,weights,error,match", [
    ([["a"], "b"], None, TypeError, r"name\[0\] must be an adapter name \(str\), got list"),
    (["a", 3], None, TypeError, r"name\[1\] must be an adapter name \(str\), got int 3"),
    (["a", "b"], torch.ones(2, 1), ValueError, r"weights must be one number per adapter.*"
                                               r"shape \(2, 1\)"),
    (["a", "b"], torch.tensor(1.0), ValueError, r"weights must be one number per adapter.*"
                                                r"shape \(\)"),
    (["a", "b"], [1.0, [2.0]], TypeError, r"weights\[1\] must be a real number"),
], ids=["list-name", "int-name", "2d-weights", "0d-weights", "nested-weight"])
def test_bad_fusions_name_the_argument_and_change_nothing(names, weights, error, match):
    model, bank = _two_layer_bank()
    bank.add("b", {"2": SparseDelta.from_flat([0, 3], (4, 6), torch.tensor([1., 1.]))})
    bank.activate("b")
    before = state_bits(model)
    with pytest.raises(error, match=match):
        bank.activate(names, weights=weights)
    assert bank.active == "b" and bank.names == ("a", "b") and not bank._fusions
    assert_same_bits(state_bits(model), before)
    bank.activate(["a", "b"], weights=torch.tensor([1.0, 0.5]))  # a 1-D tensor is fine
    assert bank.active_weights == (1.0, 0.5)
    bank.deactivate()


# ---------------------------------------------------------------------------------------------
# Two layers whose distinct weight Parameters share one storage (nn.Parameter(w.data), or a
# load_state_dict(assign=True) of a tied model) were taken for two weights: an adapter added on
# one while another was active on the other took that one's values as its base. Such a model
# is refused when the bank is built; weights tied as one Parameter, views of one storage that
# do not overlap, and meta weights (all at address 0) are not.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["same-view", "overlapping-views", "assign-load"])
def test_distinct_weights_over_the_same_memory_are_refused(how):
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False))
    if how == "same-view":
        model[1].weight = nn.Parameter(model[0].weight.data)
    elif how == "overlapping-views":
        storage = torch.randn(5, 4)
        model[0].weight, model[1].weight = nn.Parameter(storage[:3]), nn.Parameter(storage[2:])
    else:
        tied = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False))
        tied[1].weight = tied[0].weight
        model.load_state_dict(tied.state_dict(), assign=True)
    assert model[0].weight is not model[1].weight
    with pytest.raises(ValueError, match="layers '0' and '1' have distinct weight tensors over "
                                         "the same memory"):
        AdapterBank(model)


def test_weights_in_one_storage_that_do_not_overlap_are_two_layers():
    storage = torch.randn(6, 4)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False))
    model[0].weight, model[1].weight = nn.Parameter(storage[:3]), nn.Parameter(storage[3:])
    base = storage.clone()
    bank = AdapterBank(model)
    assert bank.layers == ("0", "1")
    def delta(value):
        return SparseDelta.from_flat([2], (3, 4), torch.tensor([value]))
    bank.add("a", {"0": delta(1.0)})
    bank.activate("a")
    bank.add("c", {"1": delta(100.0)})  # its base: storage row 3, untouched by "a"
    bank.activate("c")
    assert storage[3, 2] == (base[3, 2] + 100.0) and torch.equal(storage[:3], base[:3])
    bank.deactivate()
    assert torch.equal(bits(storage), bits(base))
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 3), nn.Linear(4, 3))
    assert AdapterBank(meta).layers == ("0", "1")
