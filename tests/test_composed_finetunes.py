"""Composed sparse fine-tunes: shira_kernels/methods/composed.py (LT-SFT's mask selection and the
layers that train it) and the example examples/composed_finetunes.py run in its quick mode."""
import contextlib
import copy
import importlib.util
import io
import pathlib
import sys

import pytest
import torch
from torch import nn

from shira_kernels.adapters import AdapterBank
from shira_kernels.masks import mask_to_indices
from shira_kernels.methods.composed import change_masks, sparsify
from shira_kernels.nn.shira_linear import ShiraLinear
from tolerance import assert_within_error_bound

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "composed_finetunes.py"
DTYPES = (torch.float32, torch.bfloat16)


def small_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6)).to(dtype)


def tuned_copy(base, changes):
    """A copy of ``base`` with ``changes`` {layer: {flat index: added value}} written in."""
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, entries in changes.items():
            flat = tuned.get_submodule(name).weight.view(-1)
            for index, value in entries.items():
                flat[index] += value
    return tuned


# ---------------------------------------------------------------------------------------------
# change_masks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_change_masks_keeps_the_entries_that_changed_most(dtype):
    base = small_model(dtype)
    # Layer "0" has 120 entries: density 0.025 keeps 3; layer "2" has 60: r=... not used here.
    changes = {"0": {5: 2.0, 17: -3.0, 40: 1.0, 99: 0.25}, "2": {7: -1.0, 30: 0.5}}
    tuned = tuned_copy(base, changes)
    masks = change_masks(base, tuned, density=0.025, layers=["0"])
    assert list(masks) == ["0"]
    assert masks["0"].dtype == torch.bool and masks["0"].shape == (10, 12)
    assert sorted(torch.nonzero(masks["0"].view(-1)).view(-1).tolist()) == [5, 17, 40]


@pytest.mark.parametrize("dtype", DTYPES)
def test_change_masks_default_takes_the_changed_layers(dtype):
    base = small_model(dtype)
    tuned = tuned_copy(base, {"2": {7: -1.0, 30: 0.5, 31: 0.125}})
    masks = change_masks(base, tuned, r=1, layers=None)  # r=1: 10+6 = 16 entries of 60
    assert list(masks) == ["2"]
    chosen = torch.nonzero(masks["2"].view(-1)).view(-1)
    assert chosen.numel() == 16 and {7, 30, 31} <= set(chosen.tolist())


def test_change_masks_bad_arguments():
    base = small_model()
    tuned = tuned_copy(base, {"0": {3: 1.0}})
    with pytest.raises(ValueError, match="nothing was fine-tuned"):
        change_masks(base, copy.deepcopy(base), density=0.1)
    with pytest.raises(ValueError, match="'missing'.*no nn.Linear of base"):
        change_masks(base, tuned, density=0.1, layers=["missing"])
    with pytest.raises(ValueError, match="layers is empty"):
        change_masks(base, tuned, density=0.1, layers=[])
    with pytest.raises(ValueError, match="exactly one of r= or density="):
        change_masks(base, tuned, layers=["0"])
    with pytest.raises(ValueError, match="'0'.*density"):
        change_masks(base, tuned, density=1.5, layers=["0"])
    with pytest.raises(TypeError, match="tuned must be an nn.Module"):
        change_masks(base, {"0.weight": torch.zeros(10, 12)}, density=0.1)


# ---------------------------------------------------------------------------------------------
# sparsify
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparsify_trains_exactly_the_masks_entries(dtype):
    model = small_model(dtype)
    weights = {name: model.get_submodule(name).weight for name in ("0", "2")}
    masks = {"2": torch.rand(6, 10, generator=torch.Generator().manual_seed(1)) < 0.3,
             "0": torch.rand(10, 12, generator=torch.Generator().manual_seed(2)) < 0.2}
    assert sparsify(model, masks, scale=0.5) == ["0", "2"]  # model order
    for name in ("0", "2"):
        layer = model.get_submodule(name)
        assert isinstance(layer, ShiraLinear) and layer.scale == 0.5
        assert layer.weight is weights[name] and not layer.weight.requires_grad
        assert torch.equal(layer.shira_flat_indices, mask_to_indices(masks[name]))
        assert layer.shira_values.dtype == dtype and not bool(layer.shira_values.any())


def test_sparsify_refuses_bad_masks_and_changes_nothing():
    model = small_model()
    good = torch.zeros(10, 12, dtype=torch.bool)
    good[0, 0] = True
    cases = [
        ({"0": good, "2": torch.zeros(6, 10)}, "masks\\['2'\\] must be a bool tensor"),
        ({"0": good, "2": torch.ones(10, 6, dtype=torch.bool)}, "masks\\['2'\\] has shape"),
        ({"0": good, "2": torch.zeros(6, 10, dtype=torch.bool)}, "selects no entry"),
        ({"0": good, "1": good}, "'1', which is no nn.Linear"),
        ({}, "non-empty mapping"),
    ]
    for masks, message in cases:
        with pytest.raises(ValueError, match=message):
            sparsify(model, masks)
        assert all(type(m) is nn.Linear for m in (model[0], model[2]))  # nothing replaced
        assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="scale"):
        sparsify(model, {"0": good}, scale=float("nan"))
    assert type(model[0]) is nn.Linear
    sparsify(model, {"0": good})
    with pytest.raises(ValueError, match="already a ShiraLinear"):
        sparsify(model, {"0": good})


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_finetunes_compose_in_the_bank_and_restore_the_base(dtype):
    """Two SFTs trained apart (overlapping entries) added to a bank over the plain base: the
    composition is base + both deltas (one rounding), deactivate() gives back the base's bits."""
    base = small_model(dtype)
    sfts = []
    for seed in (3, 4):
        sft = copy.deepcopy(base)
        g = torch.Generator().manual_seed(seed)
        sparsify(sft, {name: torch.rand(sft.get_submodule(name).weight.shape, generator=g) < 0.4
                       for name in ("0", "2")})
        with torch.no_grad():
            for name in ("0", "2"):
                values = sft.get_submodule(name).shira_values
                values.copy_(torch.randn(values.shape, generator=g).to(dtype))
        sfts.append(sft)
    saved = {k: v.clone() for k, v in base.state_dict().items()}
    bank = AdapterBank(base)
    bank.add_from_model("lang", sfts[0])
    bank.add_from_model("task", sfts[1])
    bank.activate(["lang", "task"])
    for name in ("0", "2"):
        exact = saved[f"{name}.weight"].double().clone().view(-1)
        magnitude = exact.abs()
        for sft in sfts:
            layer = sft.get_submodule(name)
            index = layer.shira_flat_indices.long()
            exact.index_add_(0, index, layer.shira_values.detach().double())
            magnitude.index_add_(0, index, layer.shira_values.detach().double().abs())
        assert_within_error_bound(base.get_submodule(name).weight.view(-1), exact, magnitude,
                                  k=2, what=f"layer {name} composed")
    bank.deactivate()
    for key, value in base.state_dict().items():
        assert torch.equal(value.view(torch.uint8), saved[key].view(torch.uint8)), key


# ---------------------------------------------------------------------------------------------
# The example, quick mode, in-process
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run():
    spec = importlib.util.spec_from_file_location("composed_finetunes_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(example)
    finally:
        del sys.modules[spec.name]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = example.main(["--quick", "--seed", "0"])
    return result, printed.getvalue()


def test_example_restores_the_base_and_learns_both_finetunes(quick_run):
    run = quick_run[0]["runs"][0]
    assert run["base_restored"] is True
    mrr, mlm = run["mrr"], run["mlm_accuracy"]
    # The language SFT learns to read and write A (masked-LM accuracy), the base barely can
    # (it never saw A's rare words) ...
    assert mlm["lang_A"]["A"] >= mlm["base"]["A"] + 0.2
    # ... and changes nothing of B: it adapts only A's words' columns of the embedding table,
    # so B's masked-LM and the task's ranking of B are the same, bit for bit.
    assert mlm["lang_A"]["B"] == mlm["base"]["B"]
    assert mrr["lang_A + task (composed)"]["B"] == mrr["task alone"]["B"]
    # The task SFT, with the source language's SFT, reranks B well; the base's new head is
    # untrained (random ≈ 0.34 for 8 candidates).
    assert mrr["lang_B + task (source SFT)"]["B"] >= 0.6
    assert mrr["base"]["B"] <= 0.5


def test_example_composition_beats_each_finetune_alone(quick_run):
    # The method's claim, on the test's seed: more than 2 standard errors of the paired
    # per-query difference over the better of lang_A alone and task alone.
    result = quick_run[0]
    margin = result["runs"][0]["composition_margin"]
    assert result["composition_wins"], result["verdict"]
    assert margin["margin"] > 2 * margin["standard_error"]
    assert "does NOT" not in result["verdict"]


def test_example_prints_the_table_and_the_verdict_last(quick_run):
    result, printed = quick_run
    lines = printed.strip().splitlines()
    assert lines[-1] == f"verdict: {result['verdict']}"
    run = result["runs"][0]
    mrr, margin = run["mrr"], run["composition_margin"]
    composed = mrr["lang_A + task (composed)"]["A"]
    rival = max(mrr["lang_A alone"]["A"], mrr["task alone"]["A"])
    assert abs(margin["margin"] - (composed - rival)) < 1e-9
    assert result["composition_wins"] == (margin["margin"] > 2 * margin["standard_error"])
    assert ("does NOT" in result["verdict"]) == (not result["composition_wins"])
    row = next(line for line in lines if line.startswith("lang_A + task (composed)"))
    assert f"{composed:6.3f}" in row
