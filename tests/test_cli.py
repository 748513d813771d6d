"""The command line: `info`, `demo` and `bench` (at a tiny size), run in this process."""
import functools
import importlib.util
import json
import re
import sys

import pytest
import torch

from shira_kernels import _machine, _native, cli
from shira_kernels.harness import bench_suite

HAVE_PEFT = importlib.util.find_spec("peft") is not None
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
TINY = ["--quick", "--size-override", "64,160,2", "--repeat", "2", "--drift-switches", "20"]

TOP_FIELDS = {"schema", "created", "command", "elapsed_s", "machine", "versions", "config",
              "skipped", "comparisons", "measurements", "plots"}
MACHINE_FIELDS = {"platform", "cpu", "cpu_count", "cpu_cores", "cpu_threads", "torch_threads",
                  "device", "gpu", "backend"}
VERSION_FIELDS = {"shira_kernels", "python", "torch", "cuda", "triton", "peft", "matplotlib"}
CONFIG_FIELDS = {"quick", "device", "hidden", "intermediate", "blocks", "r", "repeat",
                 "drift_switches", "switch_blocks", "forward_tokens", "train_tokens",
                 "binary_tokens", "drift_hidden", "drift_intermediate", "size_source",
                 "ci_target", "time_cap_s"}
MEASUREMENT_FIELDS = {"id", "group", "metric", "method", "role", "unit", "median", "min", "max",
                      "n", "ratio", "best_alternative", "skipped", "params", "extra", "ci95",
                      "ci_tight"}
EXPECTED = {  # group → methods that must appear (PEFT's measured or marked skipped)
    "switch": {bench_suite.BANK, bench_suite.PEFT_SHIRA, bench_suite.PEFT_LORA,
               bench_suite.LORA_MERGE},
    "drift": {bench_suite.BANK, bench_suite.PEFT_SHIRA, bench_suite.PEFT_LORA,
              bench_suite.LORA_MERGE},
    "forward": {bench_suite.BASE, bench_suite.UNFUSED, bench_suite.FUSED,
                bench_suite.PEFT_SHIRA, bench_suite.PEFT_LORA},
    "train": {bench_suite.SHIRA, bench_suite.PEFT_SHIRA, bench_suite.PEFT_LORA},
    "memory": {bench_suite.SHIRA, bench_suite.PEFT_SHIRA, bench_suite.PEFT_LORA},
    "binary": {bench_suite.BINARY_LINEAR, bench_suite.DENSE_LINEAR, bench_suite.BINARY_LORA,
               bench_suite.DENSE_LORA},
}


def test_info_without_timing(capsys):
    assert cli.main(["info", "--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "versions" in out and "backends for cpu tensors" in out
    lanes = _native.module("cpu").vector_lanes()
    assert lanes in (8, 16) and f"built for this CPU: {lanes}-lane fp32 vectors" in out


def test_reports_name_the_cpu_kind(capsys, monkeypatch):
    # "AMD EPYC" alone names a Zen 3, 4 or 5 (AVX2 only, AVX-512, AVX-512 with a full-width
    # datapath): a figure must say which one it was measured on.
    from shira_kernels import tuning
    from shira_kernels.harness import benchmark as sb
    monkeypatch.setattr(_machine, "cpu_info",
                        lambda: {"model name": "AMD EPYC", "cpu family": "25", "model": "17"})
    arch = tuning.arch_class("cpu")
    assert sb.cpu_model() == f"AMD EPYC (cpuinfo family 25 model 17; {arch})"
    assert cli.main(["info", "--no-timing"]) == 0
    assert "AMD EPYC (cpuinfo family 25 model 17), " in capsys.readouterr().out
    monkeypatch.setattr(_machine, "cpu_info", lambda: {"model name": "Neoverse"})  # no ids
    assert _machine.cpu_ids() == "" and sb.cpu_model() == f"Neoverse ({arch})"


def test_info_measures_the_machine_limits(capsys, monkeypatch):
    from shira_kernels.harness import benchmark as sb
    # Small sizes: the rates are real measurements, at a cost a test can pay.
    monkeypatch.setattr(sb, "read_bandwidth", functools.partial(sb.read_bandwidth, 2**20))
    monkeypatch.setattr(sb, "copy_bandwidth", functools.partial(sb.copy_bandwidth, 2**20))
    peak = sb.matmul_peak
    monkeypatch.setattr(sb, "matmul_peak", lambda dtype: peak(dtype, 64))
    lines = cli._machine_limits()
    rates = [float(re.search(r"([0-9.]+) (GB|GFLOP)/s", line).group(1)) for line in lines[1:]]
    assert len(rates) == 4 and all(rate > 0 for rate in rates), lines


def test_info_prints_a_slow_rate_with_its_digits(monkeypatch):
    # A rate under 0.05 (torch's bf16 matmul on an AVX2-only CPU, under load) printed as 0.0
    # read as "nothing measured" (the test above failed so).
    from shira_kernels.harness import benchmark as sb
    monkeypatch.setattr(sb, "read_bandwidth", lambda: 21.7e9)
    monkeypatch.setattr(sb, "copy_bandwidth", lambda: 3.2e9)
    monkeypatch.setattr(sb, "matmul_peak", lambda dtype: 1.5e11 if dtype == torch.float32 else 4.1e7)
    monkeypatch.setattr(sb, "peak_size", lambda dtype: 256)
    rates = [re.search(r"([0-9.]+) (GB|GFLOP)/s", line).group(1)
             for line in cli._machine_limits()[1:]]
    assert rates == ["21.7", "3.2", "150.0", "0.041"]


@pytest.mark.parametrize("call_s, n", [(0.0, 256), (1e9, 2048)])
def test_matmul_peak_size_keeps_one_call_short(monkeypatch, call_s, n):
    # From a 256³ call's rate: the largest size up to PEAK_SIZE whose call fits PEAK_CALL_S
    # (torch's bf16 matmul on an AVX2-only CPU: about 1 GFLOP/s, 14 s at 2048³).
    from shira_kernels.harness import benchmark as sb
    monkeypatch.setattr(sb, "PEAK_CALL_S", call_s)
    sb.peak_size.cache_clear()
    try:
        assert sb.peak_size(torch.bfloat16) == n
    finally:
        sb.peak_size.cache_clear()


def test_demo_each_adapter_is_best_on_its_own_task(capsys):
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    losses = {}
    for line in out.splitlines():
        match = re.match(r"\s*adapter (A|B) active\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s*$", line)
        if match:
            losses[match.group(1)] = {"A": float(match.group(2)), "B": float(match.group(3))}
    assert set(losses) == {"A", "B"}, out
    assert losses["A"]["A"] < losses["B"]["A"]
    assert losses["B"]["B"] < losses["A"]["B"]
    # The training printed falling losses.
    train = [float(v) for v in re.findall(r"training loss ([0-9.]+)", out)]
    assert len(train) >= 4 and train[-1] < train[0]
    assert "FAILED" not in out and "all claims held" in out


def test_bench_size_from_flag_or_environment(monkeypatch):
    monkeypatch.setenv(bench_suite.SIZE_ENV, "128,256,3")
    cfg = bench_suite.make_config(quick=True)
    assert (cfg.hidden, cfg.intermediate, cfg.blocks) == (128, 256, 3)
    assert cfg.switch_blocks == [1, 3] and cfg.size_source.startswith("$")
    cfg = bench_suite.make_config(quick=True, size="64x160x2")
    assert (cfg.hidden, cfg.intermediate, cfg.blocks) == (64, 160, 2)
    monkeypatch.delenv(bench_suite.SIZE_ENV)
    assert (bench_suite.make_config(quick=True).hidden,
            bench_suite.make_config().hidden) == (bench_suite.QUICK_SIZE[0],
                                                  bench_suite.FULL_SIZE[0])
    assert cli.main(["bench", "--size-override", "64,160"]) == 2


def test_llama_shaped_model_names_the_projections_like_llama():
    model = bench_suite.LlamaShapedModel.build(64, 160, 2)
    names = [name for name, _ in bench_suite.sb.llama_linear_shapes(64, 160, 2)]
    linears = dict(model.named_modules())
    assert all(name in linears for name in names)
    assert [tuple(linears[n].weight.shape) for n in names[:7]] == \
        [(64, 64)] * 4 + [(160, 64), (160, 64), (64, 160)]


def test_bench_quick_tiny(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_suite, "QUICK_TIME_CAP_S", 1.0)  # the test's time, not the CLI's
    out_dir = tmp_path / "results"
    assert cli.main(["bench", *TINY, "--out", str(out_dir)]) == 0
    printed = capsys.readouterr()
    assert "metric" in printed.out and "best alternative" in printed.out
    data = json.loads((out_dir / "results.json").read_text())
    assert (out_dir / "results.md").is_file()
    assert TOP_FIELDS <= set(data)
    assert data["schema"] == bench_suite.SCHEMA
    assert MACHINE_FIELDS <= set(data["machine"])
    assert VERSION_FIELDS <= set(data["versions"])
    assert CONFIG_FIELDS <= set(data["config"])
    assert data["config"]["hidden"] == 64 and data["config"]["blocks"] == 2
    assert data["config"]["time_cap_s"] == 1.0 and data["config"]["ci_target"] == 0.05

    by_group = {}
    for m in data["measurements"]:
        assert MEASUREMENT_FIELDS <= set(m), m
        by_group.setdefault(m["group"], {})[m["method"]] = by_group.get(m["group"], {}).get(
            m["method"], []) + [m]
        if m["skipped"]:
            assert m["median"] is None and m["ci95"] is None
            continue
        assert m["n"] >= 1 and m["min"] <= m["median"] <= m["max"]
        low, high = m["ci95"]
        assert m["min"] <= low <= m["median"] <= high <= m["max"], m
        if m["unit"] == "ms":  # timed in rounds: at least --repeat, more until tight or capped
            assert m["n"] >= 2 and isinstance(m["ci_tight"], bool), m
            if m["ci_tight"]:
                assert m["n"] >= bench_suite.sb.MIN_CI_VALUES
                assert m["median"] * 0.95 <= low and high <= m["median"] * 1.05, m
        else:
            assert m["ci_tight"] is None, m
    for group, methods in EXPECTED.items():
        assert methods <= set(by_group.get(group, {})), (group, set(by_group.get(group, {})))
    switch_layers = {m["params"]["layers"] for ms in by_group["switch"].values() for m in ms}
    assert switch_layers == {7, 14}

    for group in EXPECTED:
        for method in (bench_suite.PEFT_SHIRA, bench_suite.PEFT_LORA):
            for m in by_group[group].get(method, []):
                if HAVE_PEFT:
                    assert m["skipped"] is None and m["median"] is not None, m
                else:
                    assert "peft is not installed" in m["skipped"], m
    if not HAVE_PEFT:
        assert any("PEFT" in s["what"] for s in data["skipped"])
        assert "shira-kernels[bench]" in printed.out

    # The bank restores the base exactly; the others need not.
    (bank,) = by_group["drift"][bench_suite.BANK]
    assert bank["median"] == 0 and bank["extra"]["bit_exact"]
    assert bank["params"]["switches"] == 20

    # Every comparison names ours and the best alternative, with a ratio.
    assert data["comparisons"]
    for c in data["comparisons"]:
        assert {"metric", "unit", "ours", "best_alternative", "ratio"} <= set(c)
        assert {"median", "n", "ci95", "ci_tight"} <= set(c["ours"])
        if c["best_alternative"] is not None and c["best_alternative"]["median"] > 0:
            assert c["ratio"] == pytest.approx(c["ours"]["median"] /
                                               c["best_alternative"]["median"])

    # What the figures are of stands at the top of results.md and of the printed table: size,
    # dtype, r, the CPU with its threads, and for --quick that only the ratios compare with the
    # README's headline table.
    md = (out_dir / "results.md").read_text()
    head = md.split("Made by")[0]
    tail = printed.out.split("metric")[0]
    for text in (head, tail):
        assert "hidden 64, intermediate 160, 2 blocks" in text and "r = 1" in text
        assert "float32" in text and "bfloat16" in text
        assert _machine.cpu_model() in text and "threads" in text
        assert "--quick" in text and "smaller model than the README's headline table" in text
        assert "only as ratios" in text
    assert "## Intervals wider than ±5%" in md and "95% CI" in md
    for m in data["measurements"]:
        if m["ci_tight"] is False:
            assert f"- {m['metric']}, {m['method']}:" in md
    # A figure whose interval stayed wide is listed; a run at the README's size has no note.
    data["measurements"][0]["ci_tight"] = False
    first = data["measurements"][0]
    assert f"- {first['metric']}, {first['method']}:" in bench_suite.markdown(data)
    data["config"].update(quick=False, hidden=2048, intermediate=5504, blocks=4)
    assert len(bench_suite.run_header(data)) == 2

    if HAVE_MATPLOTLIB:
        assert set(data["plots"]) == {"switch_time_vs_layers.png",
                                      "forward_latency_vs_tokens.png",
                                      "training_time_memory.png"}
        for name in data["plots"]:
            assert (out_dir / name).stat().st_size > 1000
    else:
        assert data["plots"] == [] and any(s["what"] == "plots" for s in data["skipped"])


def test_bench_without_peft_says_what_it_skipped(tmp_path, capsys, monkeypatch):
    """With peft unimportable, the PEFT comparisons are marked skipped and the rest runs
    (only the cheap sections: switching and drift)."""
    monkeypatch.setitem(sys.modules, "peft", None)
    assert not bench_suite.sb.peft_available()
    cfg = bench_suite.make_config(quick=True, size="64,160,1", repeat=1, drift_switches=4)
    results = bench_suite.Results()
    progress = bench_suite.Progress(3, enabled=False)
    device = bench_suite.torch.device("cpu")
    bench_suite.measure_switch(cfg, results, progress, device, with_peft=False)
    bench_suite.measure_drift(cfg, results, progress, device, with_peft=False)
    results.finish()
    methods = {(m.group, m.method): m for m in results.items}
    for group in ("switch", "drift"):
        for method in (bench_suite.PEFT_SHIRA, bench_suite.PEFT_LORA):
            assert "pip install 'shira-kernels[bench]'" in methods[(group, method)].skipped
        assert methods[(group, bench_suite.BANK)].ratio is not None
    assert methods[("drift", bench_suite.BANK)].median == 0


def test_bench_only_some_groups(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_suite, "QUICK_TIME_CAP_S", 1.0)
    out_dir = tmp_path / "switch_only"
    assert cli.main(["bench", *TINY, "--only", "switch,drift", "--no-progress",
                     "--out", str(out_dir)]) == 0
    data = json.loads((out_dir / "results.json").read_text())
    assert {m["group"] for m in data["measurements"]} == {"switch", "drift"}
    assert data["config"]["groups"] == ["switch", "drift"]
    if HAVE_MATPLOTLIB:
        assert data["plots"] == ["switch_time_vs_layers.png"]
    assert cli.main(["bench", "--only", "switch,speed"]) == 2
    assert "--only takes a comma-separated subset" in capsys.readouterr().err
