"""Benchmark scripts run end to end where a CPU can: the GPU report on CPU tensors at toy
sizes (--dry-run), so that it still works when a GPU session comes (its timing code is the only
part left unexercised), the CPU kernel A/B script and the 1-bit report at toy sizes."""
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> str:
    """Run bench/<name> with args from the repository root; its stdout (it must succeed)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / name), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_gpu_report_dry_run(tmp_path):
    out = tmp_path / "gpu.md"
    run_script("report_gpu.py", "--dry-run", "--blocks", "1", "--out", str(out))
    text = out.read_text()
    for section in ("## Ceilings", "## Adapter switch", "## sparse_delta_linear", "## 1-bit"):
        assert section in text
    data = json.loads(out.with_suffix(".json").read_text())
    switch = data["Adapter switch, 1 Llama-7B blocks"]
    assert switch["exact"] == {"scatter_swap_ (cpu)": True, "scatter_swap_ (reference)": True}
    linear = data["sparse_delta_linear"]
    for key, row in linear.items():
        if key == "swap_beats_spmm_from_tokens":
            continue
        for method, err in row["rel_error"].items():
            if method.startswith(("cpu ", "reference ", "clone")):
                assert err < 1e-2, (key, method, err)  # bf16 against the fp32 reference


def test_cpu_kernel_ab_script_runs():
    # Against this checkout itself: the script builds it a second time, checks the values agree
    # and prints a ratio per kernel.
    stdout = run_script("ab_cpu_kernels.py", "--against", str(ROOT), "--shapes", "40x24", "--r",
                        "2", "--tokens", "19", "--rounds", "2", "--step")
    for kernel in ("spmm ", "spmm_t_sddmm", "sddmm (offsets given)", "binary_linear_grad_x"):
        assert kernel in stdout and "this/other" in stdout
    # --step: the layer's step and forward with each build's kernels, against the frozen layer.
    steps = re.findall(r"^    (.+): step \d+\.\d+ ms, (\d+\.\d+)x the frozen layer's.*"
                       r"forward (\d+\.\d+)x nn\.Linear's$", stdout, re.M)
    assert [build for build, *_ in steps] == ["this checkout", str(ROOT)], stdout
    assert all(float(a) > 0 and float(b) > 0 for _, a, b in steps)
    # The sparse kernels' and the dense matmuls' lines end with their bound and the multiple.
    for line in stdout.splitlines():
        if line.strip().startswith(("spmm", "sddmm", "dense")):
            bound = re.search(r"; bound (\d+\.\d+) ms \((flops|bytes)\), ×(\d+\.\d+)$", line)
            assert bound and float(bound[3]) > 0, line  # toy sizes: the bound rounds to 0.000


def test_cpu_kernel_bounds_count_each_operand_once():
    # 3 tokens, a 5x7 layer with 4 entries, bf16 (2 bytes), 32-bit indices.
    least_work = load_report("ab_cpu_kernels").least_work
    x, y, s = 3 * 7 * 2, 3 * 5 * 2, 4 * (2 + 4) + 6 * 8
    assert least_work("spmm", 3, 5, 7, 4, 2, 4) == (2 * 3 * 4, x + 2 * y + s)
    assert least_work("sddmm (offsets given)", 3, 5, 7, 4, 2, 4) == \
        (2 * 3 * 4, x + y + 4 * (4 + 4) + 6 * 8 + 4 * 4)
    assert least_work("spmm_t_sddmm", 3, 5, 7, 4, 2, 4) == \
        (4 * 3 * 4, 3 * x + y + 4 * (2 + 4) + 8 * 8 + 4 * (8 + 4))
    assert least_work("dense x·Wᵀ (frozen forward)", 3, 5, 7, 4, 2, 4) == \
        (2 * 3 * 5 * 7, 5 * 7 * 2 + x + y)
    assert least_work("folded_linear", 3, 5, 7, 4, 2, 4) is None


def test_binary_report_quick(tmp_path):
    out = tmp_path / "binary.md"
    run_script("report_binary.py", "--quick", "--repeat", "2", "--out", str(out))
    text = out.read_text()
    for section in ("## binary_linear", "## Gradient of x through binary_linear",
                    "## binary_lora (ViT-B", "## binary_lora (small shapes"):
        assert section in text, section


def test_shira_linear_report_quick(tmp_path):
    # Toy shape and one round each: the report's every section but memory runs, and the
    # layer checks it makes before timing (each strategy against float64) pass.
    out = tmp_path / "shira.md"
    run_script("report_shira_linear.py", "--shapes", "96x80",
               "--sections", "forward,crossover,train,overhead", "--repeat", "1", "--min-time", "0",
               "--max-rounds", "1", "--pairs", "3",
               "--crossover-tokens", "1,4", "--crossover-limit", "8", "--out", str(out))
    text = out.read_text()
    assert "too large" not in text and "**NO**" not in text
    for section in ("## Forward, 96x80",
                    "## Fused (merged) ShiraLinear against nn.Linear, in pairs",
                    "## spmm / fold crossover", "## Training step, 96x80",
                    "## Per-call overhead (64x64, 1 token)", "## Targets"):
        assert section in text, section
    assert "| fused forward within 1.02× of nn.Linear (every token count) | **" in text


def test_autotune_report_at_a_toy_size(tmp_path):
    # Every decision is measured in the run (tuning on, in a fresh cache of the script's own,
    # whatever the suite's setting), and the table says which strategy auto ran.
    out = tmp_path / "autotune.md"
    run_script("report_autotune.py", "--shapes", "96x80", "--dtypes", "fp32,bf16",
               "--tokens", "1,20", "--repeat", "1", "--min-time", "0",
               "--first-step", "64,160,8,float32", "--out", str(out))
    text = out.read_text()
    assert "| first (empty cache) | 3 |" in text and "| second (reads the cache) | 0 |" in text
    rows = [line for line in text.splitlines() if line.startswith("| 96x80 |")]
    assert len(rows) == 2 * 2 * 2
    assert all(row.split(" | ")[4] in ("fold", "spmm", "swap") for row in rows), rows
    assert "configurations" in text and "decisions of the table above" in text


def load_report(name: str):
    """bench/<name>.py imported as a module (its functions, without running it)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_median_interval_brackets_the_median():
    report = load_report("report_shira_linear")
    widths = []
    for n in (9, 100, 1000):
        values = [((k * 7919) % n) / n for k in range(n)]  # 0 .. (n-1)/n, shuffled
        med, lo, hi = report.median_interval(values)
        assert lo < med < hi
        # The order statistics n/2 ∓ 0.98·√n: about ∓1/√n around the median of a uniform.
        assert abs((hi - lo) - 2 / n ** 0.5) < 4 / n
        widths.append(hi - lo)
    assert widths == sorted(widths, reverse=True)
    work = lambda: sum(range(99))  # noqa: E731
    ratios = report.paired(work, work, least=5, min_time=0, most=5)
    assert len(ratios) == 5 and all(r > 0 for r in ratios)


def test_median_ci_is_the_reports_interval_and_covers_the_median():
    import random

    from shira_kernels.harness import benchmark as sb
    report = load_report("report_shira_linear")
    rng = random.Random(0)
    for n in (1, 2, 5, 6, 9, 100, 1000):
        values = [rng.random() for _ in range(n)]
        assert sb.median_ci(values) == report.median_interval(values)[1:]
    # Coverage: the interval holds the true median (0.5 of a uniform) about 95% of the time.
    for n in (6, 30, 200):
        hits = sum(low <= 0.5 <= high for low, high in
                   (sb.median_ci([rng.random() for _ in range(n)]) for _ in range(1000)))
        assert hits >= 930, (n, hits)
    assert not sb.interval_within([1.0] * (sb.MIN_CI_VALUES - 1), 0.05)
    assert sb.interval_within([1.0] * sb.MIN_CI_VALUES, 0.05)


def test_round_robin_until_tight_stops_at_the_interval_or_the_cap():
    import itertools

    from shira_kernels.harness import benchmark as sb
    now = [0.0]
    order = []

    def takes(name, seconds):
        durations = itertools.cycle(seconds)

        def call():
            order.append(name)
            now[0] += next(durations)
        return call

    def run(least, cap_s, most=100_000, **durations):
        order.clear()
        fns = {name: takes(name, d) for name, d in durations.items()}
        return sb.round_robin_until_tight(fns, least=least, cap_s=cap_s, most=most,
                                          clock=lambda: now[0])

    # Steady calls: tight once there are enough values for the interval; never below `least`.
    times = run(2, 1e9, a=[1.0], b=[2.0])
    assert {k: len(v) for k, v in times.items()} == {"a": sb.MIN_CI_VALUES, "b": sb.MIN_CI_VALUES}
    assert order[:2] == ["a", "b"]  # the warm-up round, in the given order
    rounds = [order[i:i + 2] for i in range(2, len(order), 2)]
    assert all(sorted(r) == ["a", "b"] for r in rounds)  # then each once per round
    # The order is drawn anew each round: with three callables, each follows each other one
    # within a round (a rotating order has a before b, b before c and c before a in all).
    run(40, 0.0, most=40, a=[1.0], b=[1.0], c=[1.0])
    follows = {(order[i + j], order[i + j + 1]) for i in range(3, len(order), 3)
               for j in (0, 1)}
    assert {("a", "b"), ("b", "a"), ("a", "c"), ("c", "a"), ("b", "c"), ("c", "b")} <= follows
    assert len(run(10, 0.0, a=[1.0])["a"]) == 10
    # One noisy call (1 s, 3 s, ...) keeps every method going until the cap has passed.
    start = now[0]
    times = run(2, 100.0, a=[1.0, 3.0], b=[1.0])
    elapsed = sum(times["a"]) + sum(times["b"])
    last_round = times["a"][-1] + times["b"][-1]
    assert elapsed >= 100.0 > elapsed - last_round
    assert now[0] - start == elapsed + 2.0  # and the untimed warm-up round (1 s + 1 s)
    assert len(run(2, 1e9, most=40, a=[1.0, 3.0])["a"]) == 40


def test_multi_adapter_report_at_toy_size(tmp_path):
    out = tmp_path / "multi.md"
    run_script("report_multi_adapter.py", "--hidden", "64", "--intermediate", "96",
               "--sequences", "4", "--tokens", "8", "--adapters", "1,3", "--repeat", "1",
               "--out", str(out))
    text = out.read_text()
    for row in ("| 3 | mixed (this package) |", "| 3 | group and switch",
                "| 3 | 1-bit LoRA mixed (multi_binary_lora) |", "## bf16"):
        assert row in text, row
    assert text.startswith("# Many SHiRA adapters in one batch (CPU)")


def test_multi_adapter_report_names_a_device_it_cannot_use():
    # --device cuda is for a GPU session; without a GPU it stops before any work, saying so.
    import torch
    if torch.cuda.is_available():
        import pytest
        pytest.skip("a CUDA GPU is visible: --device cuda would run")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "report_multi_adapter.py"),
                           "--device", "cuda", "--out", "-"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and "--device 'cuda'" in proc.stderr, proc.stderr[-2000:]


def test_mixed_overhead_bench_at_toy_size():
    # It checks eager against compiled itself; here: it runs and prints a row per bank size.
    text = run_script("bench_mixed_overhead.py", "--banks", "2,5", "--layers", "2",
                      "--features", "24", "--calls", "2", "--rounds", "1")
    assert "| 2 | " in text and "| 5 | " in text and "plain model" in text


def test_quantized_report_quick(tmp_path):
    out = tmp_path / "quantized.md"
    run_script("report_quantized.py", "--quick", "--out", str(out))
    text = out.read_text()
    assert "## fp32, 96x64" in text and "this package" in text
