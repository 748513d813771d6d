"""Adversarial checks of methods/, transfer, the CLI and QuantizedShiraLinear: a refused call
changes nothing, and a bad flag is a usage error (exit 2) with a message, not a traceback."""
from __future__ import annotations

import os

import pytest
import torch

from shira_kernels import cli

from shira_kernels.nn import ShiraLinear

from test_quantized import IN_F, SCALE, adapted, kind_params, make_base
from unchanged import assert_same_bits, state_bits


# ---------------------------------------------------------------------------------------------
# QuantizedShiraLinear.load_state_dict: what the base layer refuses is refused before the
# adapter's entries are copied.
# ---------------------------------------------------------------------------------------------
def _changed(state):
    out = dict(state)
    out["shira_values"] = state["shira_values"] + 1
    out["shira_flat_indices"] = state["shira_flat_indices"].clone()
    return out


@pytest.mark.parametrize("kind", kind_params("bnb-int8", "bnb-nf4", "torchao-int8",
                                             "torchao-int4"))
def test_quantized_load_refused_by_the_base_leaves_the_adapter(kind):
    layer = adapted(kind)
    x = torch.randn(3, IN_F)
    before, snap = layer(x), state_bits(layer, skip=("base_layer.weight",))
    bad = _changed(layer.state_dict())
    bad["base_layer.bias"] = torch.zeros(7)  # the wrong size: the base refuses it
    for key in ("base_layer.SCB", "base_layer.weight_format"):  # (bnb int8: tested below)
        bad.pop(key, None)
    with pytest.raises(RuntimeError, match="base_layer.bias"):
        layer.load_state_dict(bad)
    assert torch.equal(layer(x), before)
    after = state_bits(layer, skip=("base_layer.weight",))
    assert all(torch.equal(after[k], v) for k, v in snap.items())


@pytest.mark.parametrize("kind", kind_params("torchao-int8", "torchao-int4"))
def test_quantized_load_of_a_float_weight_into_torchao_is_refused_first(kind):
    layer = adapted(kind)
    x = torch.randn(3, IN_F)
    before = layer(x)
    bad = _changed(layer.state_dict())
    bad["base_layer.weight"] = torch.randn(layer.out_features, layer.in_features)
    with pytest.raises(RuntimeError, match="base_layer.weight"):
        layer.load_state_dict(bad, strict=False)
    assert torch.equal(layer(x), before)


@pytest.mark.parametrize("kind", kind_params("bnb-int8"))
def test_quantized_bnb_int8_refusals_come_first(kind):
    layer = adapted(kind)  # its forward moved the scales into the layer's state
    x = torch.randn(3, IN_F)
    before, state = layer(x), layer.state_dict()
    with pytest.raises(RuntimeError, match="SCB"):  # bitsandbytes refuses them after a forward
        layer.load_state_dict(_changed(state))
    assert torch.equal(layer(x), before)
    unrun = ShiraLinear.from_linear(make_base(kind, seed=1), r=4, seed=9, scale=SCALE)
    values = unrun.shira_values.detach().clone()
    for key, t, error in (("base_layer.weight_format", torch.tensor(1, dtype=torch.uint8),
                           ValueError), ("base_layer.SCB", torch.ones(3), RuntimeError)):
        with pytest.raises(error, match=key.split(".")[1]):
            unrun.load_state_dict(dict(state, **{key: t}))
        assert torch.equal(unrun.shira_values, values)
    unrun.load_state_dict(state)  # the legitimate load still goes through
    assert torch.equal(unrun(x), before)


# ---------------------------------------------------------------------------------------------
# The CLI: a bad flag is a usage error (exit 2) naming the flag, before anything runs.
# ---------------------------------------------------------------------------------------------
BAD_FLAGS = [
    ["tune", "--size", "4096"],  # was: a traceback from unpacking one value into two
    ["tune", "--size", "64,160,2"],
    ["tune", "--r", "0"],  # was: accepted (nnz = 0 or negative, measured and cached)
    ["tune", "--r", "-3"],
    ["info", "--no-timing", "--hidden", "0"],
    ["info", "--no-timing", "--intermediate", "-1"],
    ["demo", "--steps", "0"],  # was: ran, untrained, and reported failed claims
    ["bench", "--repeat", "-2"],  # was: a traceback from the harness
    ["bench", "--repeat", "0"],  # was: silently the default
    ["bench", "--r", "0"],
    # was: a traceback (torch's "Overflow when unpacking long long"), after bench made --out
    ["demo", "--seed", str(2 ** 64)],
    ["bench", "--seed", str(2 ** 64)],
    ["demo", "--seed", str(-2 ** 63 - 1)],
    # in torch's range, but the commands add offsets to it (demo: seed + 1000): was a traceback
    ["demo", "--seed", str(2 ** 64 - 1)],
    ["bench", "--seed", "1.5"],
]


@pytest.mark.parametrize("argv", BAD_FLAGS, ids=" ".join)
def test_cli_bad_flags_are_usage_errors(argv, capsys, monkeypatch):
    from shira_kernels.harness import bench_suite, demo

    ran = []
    monkeypatch.setattr(bench_suite, "run_bench", lambda *a, **k: ran.append("bench"))
    monkeypatch.setattr(demo, "run", lambda **k: ran.append("demo") or 0)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert argv[1] in err and "usage:" in err and "Traceback" not in err
    assert not ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["tune", "bench"])
def test_cli_device_cuda_without_cuda_is_a_usage_error(command, capsys, monkeypatch):
    from shira_kernels.harness import bench_suite

    monkeypatch.setenv("SHIRA_KERNELS_TUNE", "auto")  # (off would stop tune before the device)
    monkeypatch.setattr(bench_suite, "run_bench", lambda *a, **k: None)
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--device", "cuda", "--size" if command == "tune" else
                  "--size-override", "64,160" if command == "tune" else "64,160,1"])
    assert exc.value.code == 2
    assert "--device cuda" in capsys.readouterr().err


@pytest.mark.parametrize("where", [
    "a file", "under a file",
    pytest.param("a read-only folder", marks=pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere"))])
def test_cli_bench_out_that_cannot_hold_the_files_is_a_usage_error(where, tmp_path, capsys,
                                                                     monkeypatch):
    from shira_kernels.harness import bench_suite

    ran = []
    monkeypatch.setattr(bench_suite, "run_bench", lambda *a, **k: ran.append("bench"))
    afile = tmp_path / "afile"
    afile.write_text("kept")
    out = {"a file": afile, "under a file": afile / "sub", "a read-only folder": tmp_path}[where]
    if where == "a read-only folder":
        tmp_path.chmod(0o500)
    try:
        with pytest.raises(SystemExit) as exc:  # was: FileExistsError, NotADirectoryError or
            cli.main(["bench", "--out", str(out)])  # PermissionError once run_bench was called
    finally:
        tmp_path.chmod(0o700)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {out}" in err and "usage:" in err and "Traceback" not in err
    assert not ran and afile.read_text() == "kept"
    assert cli.main(["bench", "--out", str(tmp_path / "new" / "dir")]) == 0  # made, then run
    assert ran == ["bench"]


def test_cli_seed_outside_the_range_makes_no_folder_and_its_bounds_run(tmp_path, capsys,
                                                                         monkeypatch):
    from shira_kernels.harness import bench_suite, demo

    ran = []
    monkeypatch.setattr(bench_suite, "run_bench", lambda *a, **k: ran.append("bench"))
    monkeypatch.setattr(demo, "run", lambda **k: ran.append(k["seed"]) or 0)
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--seed", str(2 ** 63), "--out", str(out)])
    assert exc.value.code == 2 and "--seed" in capsys.readouterr().err
    assert not out.exists() and not ran
    for seed in (-2 ** 63, 2 ** 63 - 1):
        assert cli.main(["demo", "--seed", str(seed)]) == 0
    assert ran == [-2 ** 63, 2 ** 63 - 1]


# ---------------------------------------------------------------------------------------------
# MoSA: merge() refuses a second merge and a non-bool into_weight, merge_mosa a layer that does
# not fit, and the layers a seed outside torch's range, changing nothing.
# ---------------------------------------------------------------------------------------------
def _mosa_linear():
    from shira_kernels.methods.mosa import MoSAShiraLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 12)
    layer = MoSAShiraLinear.from_linear(linear, k=2, active=1, r=2)
    with torch.no_grad():
        for values in layer.shira_modules.module_values:
            values.normal_()
    return linear, layer


def test_mosa_second_merge_is_refused_and_the_weight_kept():
    linear, layer = _mosa_linear()
    layer.merge()
    weight = linear.weight.detach().clone()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()  # was: W + 2·scale·S in the shared weight
    assert torch.equal(linear.weight, weight)


def test_mosa_merge_into_weight_must_be_a_bool():
    from shira_kernels.methods.mosa import merge_mosa

    linear, layer = _mosa_linear()
    weight = linear.weight.detach().clone()
    with pytest.raises(TypeError, match="into_weight"):
        layer.merge(into_weight="no")  # was: truthy, merged into the weight
    assert torch.equal(linear.weight, weight) and not layer.merged
    model = torch.nn.Sequential(layer)
    with pytest.raises(TypeError, match="into_weight"):
        merge_mosa(model, into_weight=0)
    assert model[0] is layer and torch.equal(linear.weight, weight)
    with pytest.raises(TypeError, match="model"):
        merge_mosa("model")  # was: AttributeError


def test_merge_mosa_refused_part_way_leaves_every_layer():
    from shira_kernels.methods.mosa import MoSAShiraLinear, merge_mosa

    torch.manual_seed(0)

    def layer(value):
        m = MoSAShiraLinear.from_linear(torch.nn.Linear(8, 8).half(), k=2, active=1, r=1)
        with torch.no_grad():
            for values in m.shira_modules.module_values:
                values.fill_(value)
        m.scale = 2.0
        return m

    model = torch.nn.Sequential(layer(0.5), layer(6e4))  # layer 1: W + 2·6e4 overflows fp16
    model[0].weight.requires_grad_(True)  # merge() freezes the weight: a refusal gives it back
    layers, before = list(model), state_bits(model)
    with pytest.raises(ValueError, match=r"layer '1'.*does not fit torch\.float16"):
        merge_mosa(model)  # was: layer 0 replaced by a ShiraLinear merged into its weight
    assert all(now is was for now, was in zip(model, layers))
    assert_same_bits(state_bits(model), before)
    assert model[0].weight.requires_grad and not any(m.merged for m in layers)
    with torch.no_grad():
        for values in model[1].shira_modules.module_values:
            values.fill_(0.5)
    assert merge_mosa(model) == ["0", "1"]  # both merge now: neither was left marked merged
    assert all(type(m) is ShiraLinear and m.merged for m in model)


def test_mosa_seeds_beyond_torchs_range_are_refused_naming_seed():
    from shira_kernels.methods.mosa import MoSABottleneck, MoSAShiraLinear

    with pytest.raises(ValueError, match=r"^seed must lie"):
        MoSABottleneck(8, 2, seed=2 ** 64)  # was: an overflow naming nothing
    # Hierarchical: group g is split again with seed + 1 + g, up to seed + k.
    with pytest.raises(ValueError, match=r"^seed \+ k .*must lie"):
        MoSABottleneck(8, 2, k=4, hierarchical=True, k_fine=2, seed=2 ** 64 - 4)
    MoSABottleneck(8, 2, k=4, hierarchical=True, k_fine=2, seed=2 ** 64 - 5)
    MoSABottleneck(8, 2, seed=-2 ** 63)  # torch's range, as ShiraLinear takes it
    layer = ShiraLinear.from_linear(torch.nn.Linear(8, 8), r=1)
    layer.bias.requires_grad_(True)
    before, flags = state_bits(layer), [p.requires_grad for p in layer.parameters()]
    with pytest.raises(ValueError, match=r"^seed must lie"):
        MoSAShiraLinear.from_shira(layer, k=2, active=1, seed=2 ** 64)
    assert_same_bits(state_bits(layer), before)
    assert [p.requires_grad for p in layer.parameters()] == flags
