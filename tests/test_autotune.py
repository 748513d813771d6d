"""Autotuning (tuning.decide and the strategy of sparse_delta_linear): measured once per key and
machine, kept in a file that survives processes and concurrent writers, never measured with
tuning off, and decided outside the graph under torch.compile."""
import functools
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import shira_kernels
from shira_kernels import backends, tuning
from shira_kernels.ops import binary as binary_ops
from shira_kernels.ops import multi_delta
from shira_kernels.nn import ShiraLinear
from shira_kernels.ops import sparse_delta as sd


@pytest.fixture
def tune(monkeypatch, tmp_path):
    """Tuning on ("auto"), into a cache folder of the test's own; the process forgets what it
    decided before and after."""
    monkeypatch.setenv(tuning.MODE_ENV, "auto")
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path))
    tuning.forget_decisions()
    yield tmp_path
    tuning.forget_decisions()


class Timings:
    """A timings() for decide that counts its calls and returns fixed seconds."""

    def __init__(self, **seconds):
        self.seconds, self.calls = seconds, 0

    def __call__(self):
        self.calls += 1
        return dict(self.seconds), "fixed"


def test_off_never_measures(tune, monkeypatch):
    monkeypatch.setenv(tuning.MODE_ENV, "off")
    timings = Timings(a=1.0, b=0.5)
    assert tuning.decide("d", (1,), "a", timings) == "a"
    assert timings.calls == 0 and not any(tune.iterdir())


def test_auto_measures_once_and_later_processes_read_the_file(tune):
    timings = Timings(a=2.0, b=0.5, c=1.0)
    assert tuning.decide("d", (1, "x"), "a", timings) == "b"
    assert tuning.decide("d", (1, "x"), "a", timings) == "b"
    assert timings.calls == 1
    (path,) = tune.glob("tuning-*.json")
    body = json.loads(path.read_text())
    assert body["fingerprint"] == tuning.fingerprint()
    assert body["decisions"]["d|1|x"]["ms"] == {"a": 2000.0, "b": 500.0, "c": 1000.0}
    tuning.forget_decisions()  # as a new process
    again = Timings(a=0.1, b=1.0)
    assert tuning.decide("d", (1, "x"), "a", again) == "b" and again.calls == 0
    assert tuning.decide("d", (2, "x"), "a", again) == "a" and again.calls == 1


def test_force_measures_again_once_per_process(tune, monkeypatch):
    assert tuning.decide("d", (1,), "a", Timings(a=2.0, b=1.0)) == "b"
    monkeypatch.setenv(tuning.MODE_ENV, "force")
    timings = Timings(a=1.0, b=2.0)
    assert tuning.decide("d", (1,), "b", timings) == "a"
    assert tuning.decide("d", (1,), "b", timings) == "a" and timings.calls == 1
    tuning.forget_decisions()
    monkeypatch.setenv(tuning.MODE_ENV, "auto")
    assert tuning.decide("d", (1,), "b", Timings()) == "a"  # the file holds the new winner


def test_no_candidate_ran_gives_the_default(tune):
    assert tuning.decide("d", (1,), "fallback", Timings()) == "fallback"


def test_a_value_the_caller_cannot_run_gives_the_default(tune):
    # A cache file written by another version may name a candidate this one does not have.
    assert tuning.decide("d", (1,), "a", Timings(a=2.0, gone=1.0)) == "gone"
    tuning.forget_decisions()  # as a new process that reads the file
    assert tuning.decide("d", (1,), "a", Timings(), candidates=("a", "b")) == "a"
    assert tuning.decide("d", (1,), "a", Timings(), candidates=("a", "gone")) == "gone"


def test_remembered_asks_once_per_arguments_mode_and_threads(tune, monkeypatch):
    shortcut, asked = tuning.memo(), []

    def decide_now():
        asked.append(1)
        return "v"
    assert tuning.remembered(shortcut, (1, "x"), decide_now) == "v"
    assert tuning.remembered(shortcut, (1, "x"), decide_now) == "v" and len(asked) == 1
    assert tuning.remembered(shortcut, (2, "x"), decide_now) == "v" and len(asked) == 2
    monkeypatch.setenv(tuning.MODE_ENV, "force")
    assert tuning.remembered(shortcut, (1, "x"), decide_now) == "v" and len(asked) == 3
    tuning.forget_decisions()
    assert not shortcut


@pytest.mark.parametrize("var, value", [(tuning.MODE_ENV, "sometimes"),
                                        (tuning.BUDGET_ENV, "-1"), (tuning.BUDGET_ENV, "x"),
                                        (tuning.BUDGET_ENV, "nan")])
def test_bad_settings_name_the_variable(tune, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var):
        tuning.decide("d", (1,), "a", Timings(a=1.0)) if var == tuning.MODE_ENV \
            else tuning.budget_s()


# Not JSON; JSON nested deeper than the parser recurses (RecursionError, not ValueError);
# bytes that are not UTF-8.
@pytest.mark.parametrize("body", [b"{not json", b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe{"],
                         ids=["not json", "deeply nested", "not utf-8"])
def test_unreadable_file_is_ignored_and_replaced(tune, body):
    path = tuning.cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    with pytest.warns(RuntimeWarning, match="unreadable tuning cache"):
        assert tuning.decide("d", (1,), "a", Timings(a=1.0, b=0.5)) == "b"
    assert json.loads(path.read_text())["decisions"]["d|1"]["value"] == "b"


def test_unwritable_folder_keeps_decisions_in_memory(tune, monkeypatch):
    blocker = tune / "a file"
    blocker.write_text("")
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(blocker / "sub"))
    timings = Timings(a=1.0, b=0.5)
    with pytest.warns(RuntimeWarning, match="cannot write the tuning cache"):
        assert tuning.decide("d", (1,), "a", timings) == "b"
    assert tuning.decide("d", (1,), "a", timings) == "b" and timings.calls == 1


def test_another_machine_uses_another_file(tune, monkeypatch):
    here, print_ = tuning.cache_file(), tuning.fingerprint()
    monkeypatch.setattr(tuning, "fingerprint", lambda: {**print_, "cpu": "other"})
    assert tuning.cache_file() != here and tuning.cache_file().parent == here.parent


def test_other_code_uses_another_file(tune, tmp_path):
    # The fingerprint holds a digest of the package's code, so an upgrade (other kernels, or
    # another way of timing them) measures again instead of reading the old decisions. The
    # digest reads code files only: a change to a doc does not count.
    from shira_kernels import _files
    assert tuning.fingerprint()["code"] == _files.package_code_digest()
    pkg, csrc = tmp_path / "pkg", tmp_path / "csrc"
    (pkg / "ops").mkdir(parents=True)
    (csrc / "cpu").mkdir(parents=True)
    (pkg / "ops" / "op.py").write_text("x = 1\n")
    (csrc / "cpu" / "k.cpp").write_text("int k;\n")
    (pkg / "README.md").write_text("a\n")
    first = _files.code_digest(pkg, csrc)
    (pkg / "README.md").write_text("b\n")
    assert _files.code_digest(pkg, csrc) == first
    (csrc / "cpu" / "k.cpp").write_text("int k = 1;\n")
    second = _files.code_digest(pkg, csrc)
    (pkg / "ops" / "op.py").write_text("x = 2\n")
    assert len({first, second, _files.code_digest(pkg, csrc)}) == 3
    here, print_ = tuning.cache_file(), tuning.fingerprint()
    try:
        tuning.fingerprint.cache_clear()
        with pytest.MonkeyPatch.context() as m:
            m.setattr(tuning, "package_code_digest", lambda: "another")
            assert tuning.fingerprint() == {**print_, "code": "another"}
            assert tuning.cache_file() != here
    finally:
        tuning.fingerprint.cache_clear()
    assert tuning.cache_file() == here


_WRITER = """
import sys
import shira_kernels
from shira_kernels import backends, tuning
from shira_kernels.ops import binary as binary_ops
from shira_kernels.ops import multi_delta
for i in range(int(sys.argv[2])):
    assert tuning.decide("d", (sys.argv[1], i), "a",
                         lambda: ({"a": 1.0, "b": 0.5}, "fixed")) == "b"
"""


def test_concurrent_processes_lose_no_decision(tune):
    env = {**os.environ, tuning.MODE_ENV: "auto", tuning.CACHE_DIR_ENV: str(tune)}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, f"p{n}", "15"], env=env)
             for n in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 4
    (path,) = tune.glob("tuning-*.json")
    decisions = json.loads(path.read_text())["decisions"]
    assert {k for k in decisions} == {f"d|p{n}|{i}" for n in range(4) for i in range(15)}
    assert not list(tune.glob("*.tmp"))


def test_measure_sliced_ranks_on_the_largest_slice_the_budget_allows(tune, monkeypatch):
    monkeypatch.setenv(tuning.BUDGET_ENV, "0.2")
    seen = []

    def make(rows):
        seen.append(rows)
        return {"slow": lambda: time.sleep(1.3e-5 * rows), "fast": lambda: time.sleep(1e-5 * rows),
                "hopeless": lambda: time.sleep(4e-5 * rows), "broken": lambda: 1 / 0}
    times, how = tuning.measure_sliced(make, 100_000, least=64)
    assert set(times) == {"slow", "fast"} and times["fast"] < times["slow"]
    assert "(hopeless left out" in how  # slower by half on the probe: not measured further
    # The warm-up slice, one probe slice and one larger one; its 6 calls of the two kept fit in
    # the budget.
    assert seen[:2] == [64, tuning.PROBE_WARM_ROWS] and len(seen) == 3
    assert 64 < seen[2] < 100_000
    assert seen[2] * 2.3e-5 * 6 <= 0.2 and f"on {seen[2]} of 100000 rows" in how
    seen.clear()
    times, how = tuning.measure_sliced(make, 100, least=64)  # the whole fits
    assert seen == [64, tuning.PROBE_WARM_ROWS, 100] and "on 100 of 100 rows" in how


@pytest.mark.parametrize("full", [100_000, 10])
@pytest.mark.parametrize("where", ["make", "call"])
def test_measure_sliced_does_not_charge_first_time_costs_to_the_budget(tune, monkeypatch, full,
                                                                        where):
    # Building the inputs or a candidate's first call may build the native extension (about
    # 30 s on a fresh install): the slice is sized as it would be without it, not shrunk to the
    # smallest probe (a fresh machine's first decision was taken and kept on 256 of 11008
    # rows). Large problems (a warm-up slice first) and small ones (measured whole) alike.
    monkeypatch.setenv(tuning.BUDGET_ENV, "0.2")
    seen, built = [], []

    def build_once():
        if not built:
            built.append(True)
            time.sleep(0.4)  # twice the budget

    def make(rows):
        seen.append(rows)
        if where == "make":
            build_once()
        return {"fast": lambda: (where == "call" and build_once(), time.sleep(1e-5 * rows)),
                "slow": lambda: time.sleep(1.3e-5 * rows)}
    times, how = tuning.measure_sliced(make, full, least=64)
    assert set(times) == {"fast", "slow"} and how.startswith("median of 5"), how
    assert f"on {seen[-1]} of {full} rows" in how and (seen[-1] > 64 or seen[-1] == full), seen


def test_measure_sliced_screens_out_a_crawling_candidate_on_the_warm_up_slice(tune, monkeypatch):
    # A candidate already 3x the best on the warm-up slice, whose time grown to the probe's
    # rows is over a quarter of the budget, never runs on the probe (torch's bf16 matmul on an
    # AVX2-only CPU: a second a call there).
    monkeypatch.setenv(tuning.BUDGET_ENV, "0.2")
    calls = {"fast": [], "crawl": []}

    def make(rows):
        return {"fast": lambda: calls["fast"].append(rows),
                "crawl": lambda: (calls["crawl"].append(rows), time.sleep(0.002 * rows))}
    times, how = tuning.measure_sliced(make, 100_000, least=64)
    # 32 ms on 16 rows (twice: a warm-up and the timed one); 128 ms on 64, over 0.05 s
    assert calls["crawl"] == [tuning.PROBE_WARM_ROWS] * 2
    assert set(times) == {"fast"} and f"(crawl left out: ≥3x slower on {tuning.PROBE_WARM_ROWS}" \
        in how
    assert calls["fast"][:4] == [tuning.PROBE_WARM_ROWS] * 2 + [64] * 2  # kept: probed twice


def test_measure_sliced_runs_a_crawling_candidate_once_on_the_probe(tune, monkeypatch):
    # A candidate as fast as the best on the warm-up slice whose first call on the probe is 3x
    # the best first call there and over a quarter of the budget is not run there again.
    monkeypatch.setenv(tuning.BUDGET_ENV, "0.2")
    calls = {"fast": [], "crawl": []}

    def make(rows):
        return {"fast": lambda: calls["fast"].append(rows),
                "crawl": lambda: (calls["crawl"].append(rows),
                                  time.sleep(0.002 * (rows - tuning.PROBE_WARM_ROWS)))}
    times, how = tuning.measure_sliced(make, 100_000, least=64)
    # nothing on the warm-up slice; 96 ms on the probe, over 0.05 s
    assert calls["crawl"] == [tuning.PROBE_WARM_ROWS] * 2 + [64]
    assert set(times) == {"fast"} and "(crawl left out: ≥1.5x slower on the probe)" in how


def test_measure_extrapolated_accounts_for_a_fixed_cost():
    # "table" pays 20 ms whatever the rows, then 10 µs a row; "gemm" 40 µs a row. On 64 rows
    # gemm looks faster; on the whole 2,000 rows table is (40 ms against 80 ms).
    seen = []

    def make(rows):
        seen.append(rows)
        return {"table": lambda: time.sleep(0.02 + 1e-5 * rows),
                "gemm": lambda: time.sleep(4e-5 * rows), "broken": lambda: 1 / 0}
    times, how = tuning.measure_extrapolated(make, 2000, least=64)
    assert seen == [64, 256] and set(times) == {"table", "gemm"}
    assert times["table"] < times["gemm"]
    assert abs(times["table"] - 0.04) < 0.01 and abs(times["gemm"] - 0.08) < 0.02
    assert "extrapolated to 2000" in how
    seen.clear()
    times, how = tuning.measure_extrapolated(make, 200, least=64)  # 4·64 covers it: measured
    assert seen == [200] and "on 200 of 200 rows" in how


def test_measure_extrapolated_keeps_to_the_budget(tune, monkeypatch):
    # Each candidate's first call aside (first-time costs: not the budget's), the calls' own
    # seconds fit in the budget: "table" pays 5 ms and 0.1 ms a row, "gemm" 0.2 ms a row, so 3
    # rounds on 64 and 256 rows (0.4 s) would not; the larger slice shrinks, then the rounds.
    cost = {"table": lambda rows: 0.005 + 1e-4 * rows, "gemm": lambda rows: 2e-4 * rows}
    for budget in (0.2, 0.06):
        monkeypatch.setenv(tuning.BUDGET_ENV, str(budget))
        seen, charged, first = [], [], set()

        def run(name, rows):
            if name in first:
                charged.append(cost[name](rows))
            first.add(name)
            time.sleep(cost[name](rows))

        def make(rows):
            seen.append(rows)
            return {name: functools.partial(run, name, rows) for name in cost}
        times, how = tuning.measure_extrapolated(make, 100_000, least=64)
        assert set(times) == {"table", "gemm"} and sum(charged) <= budget, (budget, how)
        if budget == 0.2:  # a second slice of 128 to 255 rows
            assert len(seen) == 2 and 128 <= seen[1] < 256 and "extrapolated" in how, how
        else:  # one run on 64 rows is all it allows
            assert seen == [64] and len(charged) == 2 and "not extrapolated" in how, how
    # A bad budget is the caller's error, raised before anything is measured, not a failed
    # measurement the static choice papers over.
    monkeypatch.setenv(tuning.BUDGET_ENV, "abc")
    with pytest.raises(ValueError, match=tuning.BUDGET_ENV):
        tuning.measure_extrapolated(make, 100_000, least=64)
    with pytest.raises(ValueError, match=tuning.BUDGET_ENV):
        binary_ops.auto_strategy("cpu", torch.bfloat16, 9, (48, 64))
    assert tuning.entry(binary_ops.STRATEGY_DECISION,
                        binary_ops.strategy_key(torch.bfloat16, 48, 64, tuning.token_class(9))) \
        is None


def test_measure_takes_rounds_in_turn_and_drops_failures():
    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b"),
             "c": lambda: (_ for _ in ()).throw(RuntimeError("cannot run here"))}
    times, how = tuning.measure(calls, rounds=3)
    assert set(times) == {"a", "b"} and order == ["a", "b"] + ["a", "b"] * 3
    assert how == "median of 3"


def _layer(out_f=48, in_f=64, dtype=torch.float32):
    torch.manual_seed(0)
    layer = ShiraLinear.from_linear(torch.nn.Linear(in_f, out_f).to(dtype), r=2)
    return layer, layer.shira_values.numel()


def test_auto_strategy_runs_the_measured_winner(tune):
    layer, nnz = _layer()
    key = sd._strategy_key(torch.device("cpu"), torch.float32, 48, 64, nnz,
                           tuning.token_class(9), "inference")
    forced = "merge"  # never the static choice: proves the decision is read
    assert sd.static_strategy("cpu", torch.float32, 16) != forced
    tuning.decide(sd.STRATEGY_DECISION, key, "spmm", lambda: ({forced: 0.1}, "fixed"))
    assert sd.auto_strategy("cpu", torch.float32, 9, False, (48, 64), nnz) == forced
    x = torch.randn(9, 64)
    with torch.no_grad():
        auto, merged = layer(x), sd.sparse_delta_linear(
            x, layer.weight, layer.bias, layer.delta, strategy=forced)
    assert torch.equal(auto, merged)


def test_auto_strategy_measures_every_candidate_of_the_backend(tune):
    _, nnz = _layer()
    choice = sd.auto_strategy("cpu", torch.float32, 3, True, (48, 64), nnz)
    entry = sd.strategy_entry("cpu", torch.float32, 3, True, (48, 64), nnz)
    expected = {"spmm", "swap"} | ({"fold"} if backends.select("cpu") == "cpu" else set())
    # Each candidate measured, or named as left out after the probe.
    assert entry["value"] == choice and set(entry["ms"]) <= expected
    assert all(name in entry["ms"] or name in entry["how"] for name in expected)
    assert entry["ms"][choice] == min(entry["ms"].values())
    assert "on 48 of 48 rows" in entry["how"]


def test_tuning_off_or_unknown_shape_is_the_static_choice(tune, monkeypatch):
    assert sd.auto_strategy("cpu", torch.bfloat16, 2048, False) == \
        sd.static_strategy("cpu", torch.bfloat16, 2048, False)
    monkeypatch.setenv(tuning.MODE_ENV, "off")
    assert sd.auto_strategy("cpu", torch.float32, 5, True, (48, 64), 100) == \
        sd.static_strategy("cpu", torch.float32, 5, True)
    assert not any(tune.iterdir())


def test_compiled_layer_is_tuned_at_trace_time_without_breaks_or_recompiles(tune):
    layer, nnz = _layer()
    x = torch.randn(5, 64, requires_grad=True)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            y = compiled(x)
            y.sum().backward()
    entry = sd.strategy_entry("cpu", torch.float32, 5, True, (48, 64), nnz)
    assert entry is not None and entry["value"] in entry["ms"]
    eager = layer(x)
    assert torch.allclose(y, eager, rtol=0, atol=1e-5)


def _mixed_case(tokens=5):
    torch.manual_seed(0)
    delta_set = shira_kernels.SparseDeltaSet((48, 64))
    for name in ("a", "b"):
        flat = torch.randperm(48 * 64)[:200]
        delta_set.add(name, shira_kernels.SparseDelta.from_flat(flat, (48, 64), torch.randn(200)))
    rows = [i % 3 - 1 for i in range(tokens)]  # base, a, b, base, ...
    return torch.randn(tokens, 64), torch.randn(48, 64), torch.randn(48), delta_set, rows


def test_multi_delta_base_is_measured_once_then_run(tune):
    # multi_delta_linear's base product: torch's matmul or the CPU's fold kernel with no
    # entries, whichever measured faster here, per shape, dtype, token class and backward.
    x, weight, bias, delta_set, rows = _mixed_case()
    with torch.no_grad():
        y = shira_kernels.multi_delta_linear(x, weight, bias, delta_set, rows)
    entry = multi_delta.base_entry("cpu", torch.float32, 5, False, False, (48, 64))
    if backends.select("cpu") != "cpu":  # the fold kernel needs the CPU extension
        assert entry is None
        return
    assert entry["value"] in multi_delta.BASES
    assert all(name in entry["ms"] or name in entry["how"] for name in multi_delta.BASES)
    assert entry["ms"][entry["value"]] == min(entry["ms"].values())
    with torch.no_grad():
        base = multi_delta._base_linear(x, weight, bias, entry["value"])
    base_rows = torch.tensor(rows) == -1
    assert torch.equal(y[base_rows], base[base_rows])
    # Another token class (17-64) decided the other way: the call runs that decision.
    forced = "torch" if entry["value"] == "fold" else "fold"
    key = multi_delta._base_key(torch.device("cpu"), torch.float32, 48, 64,
                                tuning.token_class(20), "inference")
    tuning.decide(multi_delta.BASE_DECISION, key, "torch", lambda: ({forced: 0.1}, "fixed"))
    x20 = torch.randn(20, 64)
    with torch.no_grad():
        y20 = shira_kernels.multi_delta_linear(x20, weight, bias, delta_set, [-1] * 20)
        assert torch.equal(y20, multi_delta._base_linear(x20, weight, bias, forced))


def test_base_linear_runs_the_mixed_base_decision_and_compiles_whole(tune):
    # BinaryAdapterBank.mixed's base product (multi_delta.base_linear) takes multi_delta_linear's
    # decision for the same shape, dtype, token class and backward; under torch.compile it is
    # decided at trace time.
    if backends.select("cpu") != "cpu":  # the fold kernel needs the CPU extension
        pytest.skip("the CPU extension is not available: base_linear runs torch's matmul")
    weight, bias = torch.randn(48, 64), torch.randn(48)
    for forced in multi_delta.BASES:
        tuning.forget_decisions()
        key = multi_delta._base_key(torch.device("cpu"), torch.float32, 48, 64,
                                    tuning.token_class(20), "inference")
        tuning.decide(multi_delta.BASE_DECISION, key, "torch", lambda: ({forced: 0.1}, "fixed"))
        x20 = torch.randn(20, 64)
        with torch.no_grad():
            assert torch.equal(multi_delta.base_linear(x20, weight, bias),
                               multi_delta._base_linear(x20, weight, bias, forced))
    x = torch.randn(5, 64, requires_grad=True)
    key = multi_delta._base_key(torch.device("cpu"), torch.float32, 48, 64,
                                tuning.token_class(5), "training")
    tuning.decide(multi_delta.BASE_DECISION, key, "torch", lambda: ({"fold": 0.1}, "fixed"))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: multi_delta.base_linear(x, weight, bias), fullgraph=True,
                             backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            y = compiled(x)
            y.sum().backward()
            assert torch.equal(y, multi_delta._base_linear(x, weight, bias, "fold"))
    torch._dynamo.reset()


def test_compiled_multi_delta_is_tuned_at_trace_time_without_breaks_or_recompiles(tune):
    x, weight, bias, delta_set, rows = _mixed_case()
    x.requires_grad_()

    def step(x, row_adapter):
        return shira_kernels.multi_delta_linear(x, weight, bias, delta_set, row_adapter)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for assignment in (rows, rows[::-1], [-1] * 5):
            y = compiled(x, torch.tensor(assignment))
            y.sum().backward()
            assert torch.equal(y, step(x, torch.tensor(assignment)))
    torch._dynamo.reset()
    if backends.select("cpu") == "cpu":
        assert multi_delta.base_entry("cpu", torch.float32, 5, True, True, (48, 64)) is not None


def test_binary_linear_auto_measures_lut_and_dequantize(tune):
    choice = binary_ops.auto_strategy("cpu", torch.bfloat16, 9, (48, 64))
    key = binary_ops.strategy_key(torch.bfloat16, 48, 64, tuning.token_class(9))
    entry = tuning.entry(binary_ops.STRATEGY_DECISION, key)
    candidates = {"lut", "dequantize"}
    assert entry["value"] == choice and set(entry["ms"]) <= candidates
    assert all(name in entry["ms"] or name in entry["how"] for name in candidates)
    assert entry["ms"][choice] == min(entry["ms"].values())
    # One token, another device, or tuning off: the 1-bit kernel, nothing measured.
    assert binary_ops.auto_strategy("cpu", torch.bfloat16, 1, (48, 64)) == "lut"
    assert binary_ops.auto_strategy("meta", torch.bfloat16, 9, (48, 64)) == "lut"
    assert tuning.entry(binary_ops.STRATEGY_DECISION,
                        binary_ops.strategy_key(torch.bfloat16, 48, 64, 1)) is None


@pytest.mark.parametrize("which", ["binary_linear", "binary_lora"])
def test_binary_decisions_are_kept_per_backend(tune, which):
    # One measured under use_backend("reference") timed the reference's kernels: the backend
    # chosen automatically (the cpu one where it builds) measures its own, in this process and
    # in a later one that reads the file, as sparse_delta_linear's decisions do.
    if which == "binary_linear":
        decision = binary_ops.STRATEGY_DECISION
        choose = functools.partial(binary_ops.auto_strategy, "cpu", torch.bfloat16, 9, (48, 64))
        key_of = functools.partial(binary_ops.strategy_key, torch.bfloat16, 48, 64,
                                   tuning.token_class(9))
    else:
        decision = binary_ops.LORA_STRATEGY_DECISION
        choose = functools.partial(binary_ops.lora_auto_strategy, "cpu", torch.bfloat16, 9, 8,
                                   64, 48)
        key_of = functools.partial(binary_ops.lora_strategy_key, torch.bfloat16, 8, 64, 48,
                                   tuning.token_class(9))
    with backends.use_backend("reference"):
        choose()
        reference_key = key_of()
    assert "reference" in reference_key
    assert tuning.entry(decision, reference_key)["source"] == "measured"
    choose()
    assert key_of() != reference_key and tuning.entry(decision, key_of())["source"] == "measured"
    tuning.forget_decisions()  # a later process: each backend reads its own from the file
    with backends.use_backend("reference"):
        choose()
    choose()
    assert tuning.entry(decision, reference_key)["source"] == "cache"
    assert tuning.entry(decision, key_of())["source"] == "cache"


def test_compiled_binary_linear_is_tuned_at_trace_time_without_breaks_or_recompiles(tune):
    torch.manual_seed(0)
    bw = shira_kernels.BinaryWeight.from_float(torch.randn(48, 64), "row")
    x = torch.randn(9, 64).to(torch.bfloat16).requires_grad_(True)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: binary_ops.binary_linear(t, bw), fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            y = compiled(x)
            y.float().sum().backward()
    entry = tuning.entry(binary_ops.STRATEGY_DECISION,
                         binary_ops.strategy_key(torch.bfloat16, 48, 64, tuning.token_class(9)))
    assert entry is not None and entry["value"] in entry["ms"]
    assert torch.equal(y, binary_ops.binary_linear(x, bw, strategy=entry["value"]))


def test_binary_lora_auto_measures_both_and_runs_the_winner(tune):
    torch.manual_seed(0)
    down = shira_kernels.BinaryWeight.from_float(torch.randn(8, 64), "petl")
    up = shira_kernels.BinaryWeight.from_float(torch.randn(48, 8), "row")
    choice = binary_ops.lora_auto_strategy("cpu", torch.bfloat16, 9, 8, 64, 48)
    key = binary_ops.lora_strategy_key(torch.bfloat16, 8, 64, 48, tuning.token_class(9))
    entry = tuning.entry(binary_ops.LORA_STRATEGY_DECISION, key)
    assert entry["value"] == choice and set(entry["ms"]) == {"lut", "dequantize"}
    assert entry["ms"][choice] == min(entry["ms"].values())
    x = torch.randn(9, 64).to(torch.bfloat16)
    assert torch.equal(binary_ops.binary_lora(x, down, up, 0.5),
                       binary_ops.binary_lora(x, down, up, 0.5, strategy=choice))
    assert binary_ops.lora_auto_strategy("cpu", torch.bfloat16, 1, 8, 64, 48) == "lut"


def test_binary_linear_auto_runs_the_measured_winner(tune):
    torch.manual_seed(0)
    bw = shira_kernels.BinaryWeight.from_float(torch.randn(48, 64), "row")
    for forced, tokens in (("dequantize", 9), ("lut", 40)):  # two token classes, two keys
        key = binary_ops.strategy_key(torch.bfloat16, 48, 64, tuning.token_class(tokens))
        tuning.decide(binary_ops.STRATEGY_DECISION, key, "lut", lambda: ({forced: 0.1}, "fixed"))
        assert binary_ops.auto_strategy("cpu", torch.bfloat16, tokens, (48, 64)) == forced
        x = torch.randn(tokens, 64).to(torch.bfloat16)
        assert torch.equal(binary_ops.binary_linear(x, bw),
                           binary_ops.binary_linear(x, bw, strategy=forced))


def test_tune_command_measures_then_reads_the_cache(tune, capsys):
    from shira_kernels import cli

    argv = ["tune", "--size", "64,160", "--dtype", "fp32,bf16", "--tokens", "1,20",
            "--mode", "inference"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    rows = [line for line in first.splitlines() if "inference" in line]
    assert len(rows) == 3 * 2 * 2  # shapes x dtypes x token counts
    assert all(re.search(r"inference (fold|spmm|swap) ", row) for row in rows), rows
    # multi_delta_linear's base matmul beside it: measured where the CPU kernels are built
    base = r" (torch|fold) \((torch|fold) " if backends.select("cpu") == "cpu" else " torch "
    assert all(re.search(base, row) for row in rows), rows
    assert "median of 5 on" in first and str(tuning.cache_file()) in first
    tuning.forget_decisions()  # a new process reads them
    assert cli.main(argv) == 0
    assert "tuning took 0.0 s" in capsys.readouterr().out


def test_tune_command_refuses_when_tuning_is_off(tune, monkeypatch, capsys):
    from shira_kernels import cli

    monkeypatch.setenv(tuning.MODE_ENV, "off")
    assert cli.main(["tune", "--size", "64,160", "--tokens", "1"]) == 2
    assert "nothing is measured" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["tune", "--tokens", "0"])
    assert "positive integers" in capsys.readouterr().err


@pytest.mark.parametrize("var, value", [(tuning.BUDGET_ENV, "abc"), (tuning.MODE_ENV, "sometimes")])
def test_tune_command_refuses_a_bad_setting_up_front(tune, monkeypatch, capsys, var, value):
    # Exit status 2 and the variable named, before anything is measured (the budget's error
    # was a "measuring failed" per row and status 0; the mode's a traceback).
    from shira_kernels import cli

    monkeypatch.setenv(var, value)
    assert cli.main(["tune", "--size", "64,160", "--dtype", "fp32", "--tokens", "2",
                     "--mode", "inference"]) == 2
    captured = capsys.readouterr()
    assert var in captured.err and "inference" not in captured.out
    assert not list(tune.glob("tuning-*.json"))


def test_a_cached_value_that_is_no_strategy_gives_the_static_choice(tune):
    _, nnz = _layer()
    key = sd._strategy_key(torch.device("cpu"), torch.float32, 48, 64, nnz,
                           tuning.token_class(9), "inference")
    tuning.decide(sd.STRATEGY_DECISION, key, "spmm", lambda: ({"warp": 0.1}, "fixed"))
    assert sd.auto_strategy("cpu", torch.float32, 9, False, (48, 64), nnz) == \
        sd.static_strategy("cpu", torch.float32, 9, False)


def test_a_failure_while_measuring_gives_the_default_and_is_not_kept(tune):
    def timings():
        raise MemoryError("no room for the candidates' tensors")
    with pytest.warns(RuntimeWarning, match="measuring d.* failed .*MemoryError"):
        assert tuning.decide("d", (1,), "spmm", timings) == "spmm"
    assert tuning.decide("d", (1,), "spmm", timings) == "spmm"  # once per process
    assert not tuning.cache_file().exists()


def test_threads_asking_at_once_measure_once_and_agree(tune):
    import threading

    calls, results = [], []

    def timings():
        calls.append(1)
        time.sleep(0.05)  # long enough for the other threads to arrive meanwhile
        return {"a": 1.0, "b": 0.5}, "fixed"

    threads = [threading.Thread(target=lambda: results.append(
        tuning.decide("d", (1,), "a", timings))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["b"] * 4 and len(calls) == 1
