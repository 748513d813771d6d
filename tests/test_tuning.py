"""The tuning table: one row per measured decision, each naming a report that exists, and
lookups that pick the most specific row."""
from pathlib import Path

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


def test_cpu_architecture_class_names_bf16_and_amx_units():
    arch = tuning.arch_class("cpu")
    assert arch.startswith(torch.backends.cpu.get_cpu_capability())
    assert ("+BF16" in arch) == torch.cpu._is_avx512_bf16_supported()
    assert ("+AMX" in arch) == torch.cpu._is_amx_tile_supported()


def test_auto_strategy_reads_the_table():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        first, last = tuning.lookup("fold_tokens", "cpu", dtype)
        assert sd.auto_strategy("cpu", dtype, first) == "fold"
        if last is not None:
            assert sd.auto_strategy("cpu", dtype, last + 1) in ("spmm", "swap")
    assert sd.FOLD_TOKENS == tuning.view("fold_tokens")
    assert sd.auto_strategy("cuda", torch.bfloat16, tuning.lookup("swap_from_tokens", "cuda")) \
        == "swap"
