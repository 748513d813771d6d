"""The tuning table: every measured decision of the package, as data.

Each row says what is decided, for which device type, architecture class and dtype, the value,
and the report that measured it on which hardware (the figures are in that report, not here).
The ops ask ``lookup(decision, device_type, dtype)``; the most specific row wins: one for this
machine's architecture class over one for any ("*"), then one for the dtype over one for any. Values that nothing measured for a device
type fall back to the default the op passes.

Architecture classes: for CPUs the vector ISA torch uses here
(``torch.backends.cpu.get_cpu_capability()``: "AVX512", "AVX2", ...) with "+BF16" and "+AMX"
where the CPU has AVX512-BF16 and AMX tiles (the AMD EPYC measured: "AVX512+BF16"; Intel Xeons
with AMX: "AVX512+BF16+AMX"; SHIRA_KERNELS_ARCH_CLASS names another, to run with its rows),
for CUDA devices the device name. The "*" rows were measured on
one machine per device type (a 2-core AMD EPYC, Zen 5; one H200), which the row names.

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

Autotuning. A decision whose best value depends on the machine more than a table can say (the
strategy of sparse_delta_linear, and binary_linear's table lookup against dequantizing for
torch's matmul: both turn on the speed of torch's matmul here against the package's own
kernels) is measured where the code runs: ``decide`` times the candidates the
first time a key is needed, keeps the winner in memory and in a file per machine fingerprint
(CPU model and ISA flags, cores, torch and BLAS build), and reads it from there in later
processes. ``SHIRA_KERNELS_TUNE`` says how: "auto" (default) measure what the file lacks, "off"
never measure and use the table above (the static defaults per architecture class), "force"
measure again once per process, replacing what the file has. The file's folder is the
package's cache ($SHIRA_KERNELS_CACHE, default ~/.cache/shira_kernels, beside the compiled
kernels) or ``SHIRA_KERNELS_TUNE_CACHE`` where set (a fresh tuning cache without rebuilding
the kernels); each write merges under a file lock and replaces the file
atomically, so concurrent processes lose nothing. Each measurement is given
``SHIRA_KERNELS_TUNE_BUDGET`` seconds (default 0.5), measuring the
largest slice of the problem that fits in it (``measure_sliced``; ``measure_extrapolated``: the
slices and rounds that fit); first-time costs (building the native extension) are not charged.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import json
import math
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _machine
from ._files import locked, package_code_digest, write_atomically

__all__ = ["Row", "ROWS", "arch_class", "lookup", "view", "mode", "decide", "measure",
           "measure_sliced", "measure_extrapolated", "token_class", "token_label", "place", "fingerprint", "cache_file", "entry",
           "measured_decisions", "forget_decisions"]

_CPU_AMD = "AMD EPYC (Zen 5), 2 cores, torch 2.13 CPU (MKL fp32 matmul)"
_CPU_INTEL = "Intel Xeon (AVX-512, AVX512-BF16, AMX), 2 cores, torch 2.13 CPU (issue 17)"
_AMX = "AVX512+BF16+AMX"
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
    # AVX512-BF16 matmul beat fold's fp32 sums from 2 tokens; at 1 token fold reads W faster.
    # (Since fold's bf16 pair panels, it ties spmm and swap from 128 tokens on a Zen 4:
    # autotune_cpu_zen4.md. These static rows, for tuning off, are kept.)
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
    # Intel with AMX: torch's matmul (oneDNN on AMX, MKL) beat fold at 128 and 2048 tokens.
    Row("fold_tokens", "cpu", torch.float32, (None, None), "intel_xeon_amx.md", _CPU_INTEL,
        _AMX),
    Row("fold_tokens", "cpu", torch.bfloat16, (None, None), "intel_xeon_amx.md", _CPU_INTEL,
        _AMX),
    Row("fold_training_tokens", "cpu", torch.float32, (None, None), "intel_xeon_amx.md",
        _CPU_INTEL, _AMX),
    Row("fold_training_tokens", "cpu", torch.bfloat16, (None, None), "intel_xeon_amx.md",
        _CPU_INTEL, _AMX),
    Row("swap_from_tokens", "cpu", torch.float32, 1024, "intel_xeon_amx.md", _CPU_INTEL, _AMX),
    Row("swap_from_tokens", "cpu", torch.bfloat16, 128, "intel_xeon_amx.md", _CPU_INTEL, _AMX),
    Row("swap_block", "cpu", _ANY, 4096, "scatter_swap_cpu.md", _CPU_AMD),
    Row("swap_block", "triton", _ANY, 1024, "gpu_h200.md", _H200),
    Row("swap_block", "cuda", _ANY, 2048, "gpu_h200.md", _H200),
)


ARCH_ENV = "SHIRA_KERNELS_ARCH_CLASS"


@functools.cache
def arch_class(device_type: str) -> str:
    """The architecture class of this machine's ``device_type`` (module docstring)."""
    if device_type == "cpu":
        if os.environ.get(ARCH_ENV):  # another class's static rows, e.g. to test them here
            return os.environ[ARCH_ENV]
        # The vector ISA torch uses, and the matrix units its bf16/fp16 GEMMs use where present
        # (oneDNN on AMX is several times faster than on AVX512-BF16 alone).
        arch = torch.backends.cpu.get_cpu_capability()
        if torch.cpu._is_avx512_bf16_supported():
            arch += "+BF16"
        if torch.cpu._is_amx_tile_supported():
            arch += "+AMX"
        return arch
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


class _View(Mapping):
    """{device_type: value}, or {device_type: {dtype: value}} where rows differ by dtype: the
    values lookup() resolves on this machine, read when an item is read (a device's class is
    not probed before its decision is asked for)."""

    def __init__(self, decision: str):
        self._decision = decision

    def _rows(self, device_type=None):
        return [row for row in ROWS if row.decision == self._decision
                and device_type in (None, row.device_type)]

    def __getitem__(self, device_type: str):
        rows = self._rows(device_type)
        if not rows:
            raise KeyError(device_type)
        if all(row.dtype is None for row in rows):
            return _resolved(self._decision, device_type, None)
        dtypes = (torch.float32, torch.float16, torch.bfloat16)
        values = {dtype: _resolved(self._decision, device_type, dtype) for dtype in dtypes}
        return {dtype: value for dtype, value in values.items() if value is not _MISSING}

    def __iter__(self):
        return iter(dict.fromkeys(row.device_type for row in self._rows()))

    def __len__(self) -> int:
        return len(set(row.device_type for row in self._rows()))

    def __repr__(self) -> str:
        return f"tuning.view({self._decision!r})"


def view(decision: str) -> Mapping:
    """A decision's values on this machine per device type (and dtype, where rows differ by
    it), for code and reports that read the table."""
    return _View(decision)


# ---------------------------------------------------------------------------------------------
# Autotuning: decisions measured where the code runs, cached per machine.
# ---------------------------------------------------------------------------------------------
MODE_ENV = "SHIRA_KERNELS_TUNE"
CACHE_DIR_ENV = "SHIRA_KERNELS_TUNE_CACHE"
BUDGET_ENV = "SHIRA_KERNELS_TUNE_BUDGET"
MODES = ("auto", "off", "force")
_FORMAT = 1


@torch.compiler.assume_constant_result  # under torch.compile: as it was at trace time
def mode() -> str:
    """The tuning mode from SHIRA_KERNELS_TUNE: "auto" (unset or empty), "off" or "force"."""
    raw = _machine.environment(MODE_ENV)
    value = raw.strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={raw!r}: expected one of {', '.join(MODES)}")
    return value


def budget_s() -> float:
    """Seconds one decision may spend measuring (SHIRA_KERNELS_TUNE_BUDGET, default 0.5)."""
    raw = os.environ.get(BUDGET_ENV, "")
    if not raw.strip():
        return 0.5
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"{BUDGET_ENV}={raw!r}: expected a positive number of seconds")
    return value


@functools.cache
def fingerprint() -> dict[str, str]:
    """What makes a measurement valid for another process: the CPU (model, ISA flags), the cores
    this process may use, the torch and BLAS build, and this package's code (its Python and
    native sources: other kernels, or another way of measuring them, measure again). GPUs are
    named in their decisions' keys instead, so a CPU decision survives a GPU change."""
    flags = _machine.cpu_flags()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _machine.cpu_model(),
        "isa": arch_class("cpu") + " " + hashlib.sha256(flags.encode()).hexdigest()[:12],
        "cores": str(cores),
        "torch": torch.__version__,
        "build": hashlib.sha256(torch.__config__.show().encode()).hexdigest()[:12],
        "code": package_code_digest(),
    }


def cache_file() -> Path:
    """This machine's decision file (it need not exist yet)."""
    folder = os.environ.get(CACHE_DIR_ENV) or _machine.cache_dir()
    digest = hashlib.sha256(json.dumps(fingerprint(), sort_keys=True).encode()).hexdigest()
    return Path(folder) / f"tuning-{digest[:16]}.json"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    # Every way a parse fails: JSON nested past the parser's recursion raises RecursionError.
    except (OSError, ValueError, RecursionError) as exc:
        warnings.warn(f"shira_kernels: ignoring unreadable tuning cache {path}: {exc}",
                      RuntimeWarning, stacklevel=3)
        return {}
    if not isinstance(data, dict) or data.get("format") != _FORMAT \
            or not isinstance(data.get("decisions"), dict):
        return {}
    return data["decisions"]


def _write(path: Path, key: str, entry: dict) -> None:
    """Merge one decision into the file: under the lock, read what other processes wrote, add
    this one, write a temporary file beside it and rename it over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.with_suffix(".lock")):
        decisions = _read(path)
        decisions[key] = entry
        body = {"format": _FORMAT, "fingerprint": fingerprint(), "decisions": decisions}
        write_atomically(path, json.dumps(body, indent=1, sort_keys=True).encode())


_memo: dict[str, dict] = {}      # key → entry, everything decided or read in this process
_forced: set[str] = set()        # keys measured in this process under "force"
_measured_here: set[str] = set()  # keys measured (not read) in this process
_disk: dict[Path, dict] = {}     # the decision file as read once per process
_tuning = threading.RLock()      # one measurement at a time (a decision may nest another)
_unwritable: set[Path] = set()


# Token classes of the measured decisions (upper end, the count measured): 1, 2-4, 5-16, ...,
# 257-1024, 1025 and more. A class is measured once, at half its upper end: within a factor of
# 2 of every count in it.
_TOKEN_CLASSES = ((1, 1), (4, 2), (16, 8), (64, 32), (256, 128), (1024, 512))
_MANY_TOKENS = 2048


def place(device: torch.device) -> str:
    """Where a decision's calls run, as its key says it: the GPU's name and SM, or the CPU
    threads torch uses (the machine itself is the cache file's fingerprint)."""
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)} "
                f"sm{''.join(map(str, torch.cuda.get_device_capability(device)))}")
    return f"cpu {torch.get_num_threads()} threads"


def token_class(tokens: int) -> int:
    """The token count measured for ``tokens``' class."""
    for upper, measured in _TOKEN_CLASSES:  # a loop, not next(generator): asked every call
        if tokens <= upper:
            return measured
    return _MANY_TOKENS


def token_label(measured: int) -> str:
    """The class of a measured token count (token_class) in words, for a decision's key."""
    if measured == 1:
        return "tokens 1"
    if measured == _MANY_TOKENS:
        return f"tokens {_TOKEN_CLASSES[-1][0] + 1}+"
    return f"tokens {measured // 2 + 1}-{2 * measured}"


def _key(decision: str, key: tuple) -> str:
    return decision + "|" + "|".join(str(part) for part in key)


def in_transform() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev) is running: decide then measures
    nothing, and what it returns for an undecided key is not to be kept by the caller."""
    return torch._C._are_functorch_transforms_active()


def decide(decision: str, key: tuple, default: str,
           timings: Callable[[], tuple[Mapping[str, float], str]],
           candidates: tuple[str, ...] | None = None) -> str:
    """The fastest candidate for ``decision`` at ``key`` (a tuple of plain values): in "off"
    mode ``default`` without measuring; otherwise the value decided before (this process, then
    the machine's file), or the winner of ``timings()`` ({candidate: seconds}, how they were
    taken: see measure, measure_sliced) measured now and kept. ``default`` also where no
    candidate could run, and where the value is not one of ``candidates`` (the values the
    caller can run, if given: a cache file written by another version may hold others)."""
    value = _decide(decision, key, default, timings)
    return value if candidates is None or value in candidates else default


def remembered(shortcut: dict, args: tuple, decide_now: Callable[[], str]) -> str:
    """decide_now()'s value for a caller that asks on every call (a layer's forward): kept in
    ``shortcut`` (a memo()) under the raw ``args`` with the tuning mode and torch's thread
    count (which every key depends on), so that the key is built and decide asked only the
    first time. Not kept inside torch.func's transforms, where decide does not measure."""
    fast = (*args, mode(), torch.get_num_threads())
    value = shortcut.get(fast)
    if value is None:
        value = decide_now()
        if not in_transform():
            shortcut[fast] = value
    return value


def _decide(decision: str, key: tuple, default: str,
            timings: Callable[[], tuple[Mapping[str, float], str]]) -> str:
    tune = mode()
    if tune == "off":
        return default
    name = _key(decision, key)
    entry = _memo.get(name)
    if entry is not None and (tune == "auto" or name in _forced):
        return entry["value"]
    with _tuning:
        entry = _memo.get(name)
        if entry is not None and (tune == "auto" or name in _forced):
            return entry["value"]
        path = cache_file()
        entry = None
        if tune == "auto":
            if path not in _disk:
                _disk[path] = _read(path)
            entry = _disk[path].get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("value"), str):
            if in_transform():
                # Inside torch.func's grad or vmap the timed calls would run under the
                # transform (vmap refuses their random inputs): the static choice for this
                # call, nothing kept, and the first call outside measures.
                return default
            budget_s()  # a bad setting is the caller's error, not a measurement that failed
            started = time.perf_counter()
            try:
                times, how = timings()
            except Exception as exc:  # noqa: BLE001 - measuring must not fail the caller's call
                warnings.warn(f"shira_kernels: measuring {name} failed ({type(exc).__name__}: "
                              f"{exc}); using the static choice {default!r} in this process",
                              RuntimeWarning, stacklevel=3)
                times, how = None, f"measuring failed: {type(exc).__name__}"
            entry = {"value": min(times, key=times.get) if times else default,
                     "ms": {k: round(v * 1e3, 4) for k, v in (times or {}).items()},
                     "how": how, "tuning_s": round(time.perf_counter() - started, 3),
                     "when": datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec="seconds")}
            if times is not None:  # a failure is not kept: another process may measure
                _keep(path, name, entry)
            _measured_here.add(name)
            if tune == "force":
                _forced.add(name)
        _memo[name] = entry
        return entry["value"]


def _keep(path: Path, name: str, entry: dict) -> None:
    _disk.setdefault(path, {})[name] = entry
    if path in _unwritable:
        return
    try:
        _write(path, name, entry)
    except OSError as exc:
        _unwritable.add(path)
        warnings.warn(f"shira_kernels: cannot write the tuning cache {path} ({exc}); decisions "
                      f"are kept for this process only", RuntimeWarning, stacklevel=4)


def _time_once(call: Callable, sync) -> float:
    if sync is not None:
        sync()
    start = time.perf_counter()
    call()
    if sync is not None:
        sync()
    return time.perf_counter() - start


def measure(calls: Mapping[str, Callable], *, rounds: int = 3, sync=None
            ) -> tuple[dict[str, float], str]:
    """Median seconds of each call over ``rounds`` rounds taken in turn (after one warm-up
    call each), so that a slow spell of the machine hits every candidate alike. A call that
    raises is left out."""
    times: dict[str, list[float]] = {}
    for name, call in calls.items():
        try:
            _time_once(call, sync)
        except Exception:  # noqa: BLE001 - a candidate that cannot run here does not compete
            continue
        times[name] = []
    for _ in range(rounds):
        for name in times:
            times[name].append(_time_once(calls[name], sync))
    return {name: statistics.median(ts) for name, ts in times.items()}, f"median of {rounds}"


PROBE_WARM_ROWS = 16  # measure_sliced's warm-up slice: first-call costs, and a first ranking


def measure_sliced(make: Callable[[int], Mapping[str, Callable]], full: int, *,
                   least: int = 64, rounds: int = 5, sync=None) -> tuple[dict[str, float], str]:
    """Median seconds of each candidate on a slice of the problem, as large as the budget
    allows: ``make(n)`` gives the calls on n of the problem's ``full`` independent rows (a
    layer's output rows), whose cost grows alike for every candidate as n grows, so that the
    ranking on the slice is the whole problem's. The whole is measured where it fits; a small
    problem (few tokens: overheads and memory traffic decide) always fits. ``least`` rows at
    the fewest (a slice small enough to sit in a core's cache would favour scattered writes).

    Where the probe is larger, each candidate first runs twice on PROBE_WARM_ROWS rows (the
    first call pays first-call costs; the second is timed). One already 3x the best there,
    whose time grown to ``least`` rows would take over a quarter of the budget, is not run
    further (on a CPU where torch's bf16 matmul crawls, a call on ``least`` rows takes a
    second). A probe at ``least`` rows (the faster of two runs, taken in turn, or one where
    the first already took 3x the best first and over a quarter of the budget) then sizes the
    slice; a candidate 1.5x slower than the best there is not measured further. Neither kind
    is returned (it will not win; the description says which were left out), which leaves the
    budget to a larger slice for the ones that might. The first ``make`` and each candidate's
    first call are not charged to the budget: they may build the native extension or compile
    a kernel (30 s on a fresh install, which left a fresh machine's first decision to the
    smallest probe)."""
    started = time.perf_counter()
    n = min(full, least)
    probe = make(n)
    first_calls = time.perf_counter() - started  # seconds of first-time costs: not the budget's
    hopeless = budget_s() / 4
    screened: list[str] = []
    if n > PROBE_WARM_ROWS:
        first, at_warm = _timed_after_a_first_call(make(PROBE_WARM_ROWS), sync)
        first_calls += first
        best_warm = min(at_warm.values(), default=0.0)
        screened = sorted(name for name, t in at_warm.items()
                          if t > 3 * best_warm and t * n / PROBE_WARM_ROWS > hopeless)
        candidates = [name for name in probe if name in at_warm and name not in screened]
    else:
        candidates = list(probe)
    # Two passes over the candidates in turn (a slow spell of the machine then hits one run of
    # several candidates, not both runs of one), each keeping the faster of its runs.
    once: dict[str, float] = {}
    for name in candidates:
        try:
            if n <= PROBE_WARM_ROWS:
                first_calls += _time_once(probe[name], sync)
            once[name] = _time_once(probe[name], sync)
        except Exception:  # noqa: BLE001 - a candidate that cannot run here does not compete
            pass
    first_best = min(once.values(), default=math.inf)
    for name, first in list(once.items()):
        if not (first > 3 * first_best and first > hopeless):
            try:
                once[name] = min(first, _time_once(probe[name], sync))
            except Exception:  # noqa: BLE001 - as in the first pass
                del once[name]
    if not once:
        return {}, f"no candidate ran on {n} of {full} rows"
    best = min(once.values())
    kept = {name: t for name, t in once.items() if t <= 1.5 * best}
    dropped = sorted(set(once) - set(kept))
    note = "".join(f" ({', '.join(names)} left out: {why})" for names, why in (
        (screened, f"≥3x slower on {PROBE_WARM_ROWS} rows"),
        (dropped, "≥1.5x slower on the probe")) if names)
    left = budget_s() - (time.perf_counter() - started - first_calls)
    per_round = sum(kept.values())
    if per_round * rounds > left:  # even the smallest slice is over budget
        return kept, f"the faster of two runs on {n} of {full} rows{note}"
    rows = n
    while rows < full and per_round * min(2 * rows, full) / n * (rounds + 1) <= left:
        rows = min(2 * rows, full)
    calls = make(rows) if rows != n else probe
    times, how = measure({name: calls[name] for name in kept}, rounds=rounds, sync=sync)
    return times, f"{how} on {rows} of {full} rows{note}"


def measure_extrapolated(make: Callable[[int], Mapping[str, Callable]], full: int, *,
                         least: int = 256, rounds: int = 3, sync=None
                         ) -> tuple[dict[str, float], str]:
    """Seconds of each candidate on the whole problem of ``full`` rows, for candidates whose
    cost is a fixed part plus a part per row (a 1-bit kernel builds its tables per token
    whatever the rows; a slice alone would favour whatever has no fixed part): measured (median
    of ``rounds``, in turn) on ``least`` and 4·least rows and extrapolated along the line
    through the two, or measured whole where 4·least rows is the whole.

    Within the budget (budget_s), charged as measure_sliced charges it: the first ``make`` and
    each candidate's first call are not the budget's (they may build the native extension). One
    timed run of each on the first slice sizes the rest: where ``rounds`` rounds would not fit,
    the larger slice shrinks (to twice the smaller at the least), then the rounds (to one); where
    even one run on twice the rows would not fit, the times are that first run's on ``least``
    rows, not extrapolated (as measure_sliced's where its smallest slice is over the budget)."""
    budget = budget_s()
    started = time.perf_counter()
    small = full if full <= 4 * least else least
    calls = make(small)
    first_calls = time.perf_counter() - started  # seconds of first-time costs: not the budget's
    first, once = _timed_after_a_first_call(calls, sync)
    first_calls += first
    if not once:
        return {}, f"no candidate ran on {small} of {full} rows"
    left = budget - (time.perf_counter() - started - first_calls)
    per_run = max(sum(once.values()), 1e-9)  # one run of every candidate on the first slice
    if small == full:
        n = max(1, min(rounds, 1 + int(left // per_run)))
        return _more_rounds(calls, once, n, sync), f"median of {n} on {full} of {full} rows"
    # A plan of n rounds: n - 1 more on the first slice, a warm-up and n on `large` rows, each
    # at most large/small times the first slice's (a candidate's cost grows no faster than
    # its rows).
    for n in range(rounds, 0, -1):
        large = min(4 * small, int(small * (left - (n - 1) * per_run) / ((n + 1) * per_run)))
        if large >= 2 * small:
            break
    else:
        return once, f"one run on {small} of {full} rows, not extrapolated (over the budget)"
    at_small = _more_rounds(calls, once, n, sync)
    at_large, _ = measure(make(large), rounds=n, sync=sync)
    per_row = {name: (at_large[name] - at_small[name]) / (large - small)
               for name in at_small if name in at_large}
    times = {name: max(at_large[name] + per_row[name] * (full - large), at_large[name])
             for name in per_row}
    return times, (f"median of {n} on {small} and {large} of {full} rows, extrapolated to "
                   f"{full} along the line through them")


def _timed_after_a_first_call(calls: Mapping[str, Callable], sync
                              ) -> tuple[float, dict[str, float]]:
    """(seconds of every candidate's first call, {candidate: its second call's seconds}): the
    first calls' costs (a native build, a kernel compiled) are not the budget's. A candidate
    that raises does not compete."""
    first, times = 0.0, {}
    for name, call in calls.items():
        try:
            first += _time_once(call, sync)
            times[name] = _time_once(call, sync)
        except Exception:  # noqa: BLE001 - a candidate that cannot run here does not compete
            pass
    return first, times


def _more_rounds(calls: Mapping[str, Callable], once: dict[str, float], rounds: int,
                 sync) -> dict[str, float]:
    """The median of ``once`` (each candidate's timed run) and rounds - 1 more, in turn; a
    candidate that raises is left out."""
    times = {name: [t] for name, t in once.items()}
    for _ in range(rounds - 1):
        for name in list(times):
            try:
                times[name].append(_time_once(calls[name], sync))
            except Exception:  # noqa: BLE001 - as in the first run
                del times[name]
    return {name: statistics.median(ts) for name, ts in times.items()}


def entry(decision: str, key: tuple) -> dict | None:
    """What this process decided (or read) for ``decision`` at ``key``: the value, the
    candidates' milliseconds, how they were measured, the seconds the measuring took, and
    "source": "measured" (in this process) or "cache" (read from the file)."""
    name = _key(decision, key)
    found = _memo.get(name)
    if found is None:
        return None
    return {**found, "source": "measured" if name in _measured_here else "cache"}


def measured_decisions() -> dict[str, dict]:
    """The decisions this process measured (not those it read from the file)."""
    return {name: _memo[name] for name in _measured_here if name in _memo}


_memos: list[dict] = []


def memo() -> dict:
    """A dict for a caller's own shortcut to its decisions (raw arguments → value), emptied
    with everything else by forget_decisions."""
    _memos.append({})
    return _memos[-1]


def forget_decisions() -> None:
    """Drop what this process has decided or read (the file stays): for tests and `tune`."""
    with _tuning:
        for shortcut in _memos:
            shortcut.clear()
        _memo.clear()
        _forced.clear()
        _measured_here.clear()
        _disk.clear()
        _unwritable.clear()
