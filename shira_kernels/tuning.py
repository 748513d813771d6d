"""The tuning table: every measured decision of the package, as data.

Each row says what is decided, for which device type, architecture class and dtype, the value,
and the report that measured it on which hardware (the figures are in that report, not here).
The ops ask ``lookup(decision, device_type, dtype)``; the most specific row wins: one for this
machine's architecture class over one for any ("*"), then one for the dtype over one for any. Values that nothing measured for a device
type fall back to the default the op passes.

Architecture classes: for CPUs the vector ISA torch was built to use here
(``torch.backends.cpu.get_cpu_capability()``: "AVX512", "AVX2", ...), for CUDA devices the
device name. Every row below is "*" today: each decision was measured on one machine per device
type (a 2-core AMD EPYC, Zen 5; one H200), which the row names. Rows measured on other
machines are added with their class.

Decisions:
  fold_tokens           (first, last or None) token counts at which sparse_delta_linear's
                        "auto" runs "fold" in calls without a backward
  fold_training_tokens  the same for calls that record a backward (the backward runs the
                        forward's strategy)
  swap_from_tokens      token count from which "auto" runs "swap" rather than "spmm" (where it
                        does not fold)
  dense_sddmm_from_tokens  token count from which the gradient of S's values is formed from
                        row blocks of the dense gyᵀ·x (tensor cores) instead of per entry
  sddmm_block_bytes     the most fp32 gradient one such row block may hold
  gemv_max_tokens       up to this many tokens binary_linear tries the CUDA kernel's
                        warp-per-row path first; above, Triton's tensor-core tiles
  triton_first          ops whose Triton kernel measured faster than the CUDA one try backends
                        in this order (backends.select's ``order``)
  swap_block            entries per block of work in scatter_swap_'s launch table, per backend
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["Row", "ROWS", "arch_class", "lookup", "view"]

_CPU_AMD = "AMD EPYC (Zen 5), 2 cores, torch 2.13 CPU (MKL fp32 matmul)"
_H200 = "NVIDIA H200"
_ANY = None  # any dtype


@dataclass(frozen=True)
class Row:
    decision: str
    device_type: str
    dtype: torch.dtype | None
    value: object
    report: str          # the file under docs/benchmarks/ (or the script) that measured it
    hardware: str        # where it was measured
    arch: str = "*"      # architecture class (see the module docstring); "*" any


ROWS: tuple[Row, ...] = (
    # fp32: fold's own matmul beat torch's (MKL on that AMD CPU) at every count, forward and
    # training step. fp16: likewise, and torch's fp16 gy·W is a slow path there. bf16: torch's
    # AVX512-BF16 matmul beats fold's fp32 sums from 2 tokens; at 1 token fold reads W faster.
    Row("fold_tokens", "cpu", torch.float32, (1, None), "shira_linear_cpu.md", _CPU_AMD),
    Row("fold_tokens", "cpu", torch.float16, (1, None), "shira_linear_cpu_fp16.md", _CPU_AMD),
    Row("fold_tokens", "cpu", torch.bfloat16, (1, 1), "shira_linear_cpu_bf16.md", _CPU_AMD),
    Row("fold_training_tokens", "cpu", torch.float32, (1, None), "shira_linear_cpu.md",
        _CPU_AMD),
    Row("fold_training_tokens", "cpu", torch.float16, (1, None), "shira_linear_cpu_fp16.md",
        _CPU_AMD),
    Row("fold_training_tokens", "cpu", torch.bfloat16, (1, 1), "shira_linear_cpu_bf16.md",
        _CPU_AMD),
    # CPU: measured for bf16 (the only dtype that does not fold at 1024+ tokens), forward and
    # training step. CUDA: bf16, swap won from 512 tokens in both runs (256 not measured).
    Row("swap_from_tokens", "cpu", _ANY, 1024, "shira_linear_cpu_bf16.md", _CPU_AMD),
    Row("swap_from_tokens", "cuda", _ANY, 512, "gpu_h200.md", _H200),
    Row("dense_sddmm_from_tokens", "cuda", _ANY, 512, "gpu_h200.md (sddmm table)", _H200),
    Row("sddmm_block_bytes", "cuda", _ANY, 16 * 2**20, "gpu_h200.md (sddmm table)", _H200),
    Row("gemv_max_tokens", "cuda", _ANY, 8, "gpu_h200.md", _H200),
    Row("triton_first", "cuda", _ANY, ("triton", "cuda", "reference"), "gpu_h200.md", _H200),
    Row("swap_block", "cpu", _ANY, 4096, "scatter_swap_cpu.md", _CPU_AMD),
    Row("swap_block", "triton", _ANY, 1024, "gpu_h200.md", _H200),
    Row("swap_block", "cuda", _ANY, 2048, "gpu_h200.md", _H200),
)


@functools.cache
def arch_class(device_type: str) -> str:
    """The architecture class of this machine's ``device_type`` (module docstring)."""
    if device_type == "cpu":
        return torch.backends.cpu.get_cpu_capability()
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "*"


@functools.cache
def _resolved(decision: str, device_type: str, dtype: torch.dtype | None):
    """The most specific row's value for this machine, or a sentinel when none applies."""
    arch = arch_class(device_type)
    best, best_rank = _MISSING, -1
    for row in ROWS:
        if row.decision != decision or row.device_type != device_type:
            continue
        if row.arch not in ("*", arch) or row.dtype not in (None, dtype):
            continue
        rank = 2 * (row.arch != "*") + (row.dtype is not None)
        if rank > best_rank:
            best, best_rank = row.value, rank
    return best


_MISSING = object()


@torch.compiler.assume_constant_result  # fixed at trace time: no graph break, no recompile
def lookup(decision: str, device_type: str, dtype: torch.dtype | None = None, default=None):
    """The value of ``decision`` for ``device_type`` (and ``dtype``) on this machine, or
    ``default`` where the table has no row for it. Cached: a dict lookup per call."""
    value = _resolved(decision, device_type, dtype)
    return default if value is _MISSING else value


def view(decision: str) -> dict:
    """{device_type: value} or {device_type: {dtype: value}} of a decision's rows (all
    architectures), for code and reports that print the table."""
    out: dict = {}
    for row in ROWS:
        if row.decision != decision:
            continue
        if row.dtype is None:
            out[row.device_type] = row.value
        else:
            out.setdefault(row.device_type, {})[row.dtype] = row.value
    return out
