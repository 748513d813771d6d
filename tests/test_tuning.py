"""The tuning table: one row per measured decision, each naming a report that exists, and
lookups that pick the most specific row."""
from pathlib import Path

import pytest
import torch

from shira_kernels import tuning
from shira_kernels.ops import sparse_delta as sd

REPORTS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def test_every_row_names_a_committed_report_and_hardware():
    for row in tuning.ROWS:
        assert (REPORTS / row.report.split(" (")[0]).is_file(), row
        assert row.hardware and row.device_type in ("cpu", "cuda", "triton"), row


def test_no_two_rows_decide_the_same_thing():
    keys = [(r.decision, r.device_type, r.dtype, r.arch) for r in tuning.ROWS]
    assert len(keys) == len(set(keys))


def test_most_specific_row_wins(monkeypatch):
    # A table of its own and a machine of a known class: the result does not depend on the
    # CPU the test runs on.
    rows = (
        tuning.Row("d", "cpu", None, 1, "x.md", "test"),
        tuning.Row("d", "cpu", torch.bfloat16, 7, "x.md", "test"),
        tuning.Row("d", "cpu", None, 9, "x.md", "test", arch="HERE"),
        tuning.Row("d", "cpu", torch.float16, 11, "x.md", "test", arch="ELSEWHERE"),
        tuning.Row("d", "cuda", None, 512, "x.md", "test"),
    )
    monkeypatch.setattr(tuning, "arch_class", lambda device_type: "HERE")
    monkeypatch.setattr(tuning, "ROWS", rows[:2] + rows[3:])
    tuning._resolved.cache_clear()
    try:
        assert tuning.lookup("d", "cpu", torch.bfloat16) == 7   # the dtype row
        assert tuning.lookup("d", "cpu", torch.float16) == 1    # not that arch
        monkeypatch.setattr(tuning, "ROWS", rows)
        tuning._resolved.cache_clear()
        # This machine's architecture first, then the dtype.
        assert tuning.lookup("d", "cpu", torch.bfloat16) == 9
        assert tuning.lookup("d", "cpu", torch.float32) == 9
        assert tuning.lookup("d", "cpu", torch.float16) == 9    # not that arch
        assert tuning.lookup("d", "cuda", torch.float16) == 512
        assert tuning.lookup("no_such_decision", "cpu", None, "fallback") == "fallback"
    finally:
        monkeypatch.undo()
        tuning._resolved.cache_clear()


def test_cpu_architecture_class_names_bf16_and_amx_units(monkeypatch):
    monkeypatch.delenv(tuning.ARCH_ENV, raising=False)  # the machine's own class
    arch = tuning.arch_class.__wrapped__("cpu")
    assert arch.startswith(torch.backends.cpu.get_cpu_capability())
    assert ("+BF16" in arch) == torch.cpu._is_avx512_bf16_supported()
    assert ("+AMX" in arch) == torch.cpu._is_amx_tile_supported()


@pytest.mark.parametrize("arch", ["AVX512+BF16", "AVX512+BF16+AMX", "AVX2"])
def test_auto_strategy_reads_the_table_of_each_cpu_class(monkeypatch, arch):
    monkeypatch.setattr(tuning, "arch_class", lambda device_type: arch)
    tuning._resolved.cache_clear()
    try:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            first, last = tuning.lookup("fold_tokens", "cpu", dtype)
            swap_from = tuning.lookup("swap_from_tokens", "cpu", dtype)
            for tokens in (1, 2, 16, swap_from - 1, swap_from, 4096):
                folds = first is not None and first <= tokens and (last is None or tokens <= last)
                expected = "fold" if folds else "swap" if tokens >= swap_from else "spmm"
                assert sd.auto_strategy("cpu", dtype, tokens) == expected, (dtype, tokens)
        assert sd.FOLD_TOKENS == tuning.view("fold_tokens")
    finally:
        monkeypatch.undo()
        tuning._resolved.cache_clear()
    assert sd.auto_strategy("cuda", torch.bfloat16, tuning.lookup("swap_from_tokens", "cuda")) \
        == "swap"


def test_the_amx_class_never_folds_and_swaps_bf16_from_128(monkeypatch):
    monkeypatch.setattr(tuning, "arch_class", lambda device_type: "AVX512+BF16+AMX")
    tuning._resolved.cache_clear()
    try:
        assert [sd.auto_strategy("cpu", torch.bfloat16, t) for t in (1, 127, 128)] == \
            ["spmm", "spmm", "swap"]
        assert [sd.auto_strategy("cpu", torch.float32, t, True) for t in (1, 1023, 1024)] == \
            ["spmm", "spmm", "swap"]
    finally:
        monkeypatch.undo()
        tuning._resolved.cache_clear()
