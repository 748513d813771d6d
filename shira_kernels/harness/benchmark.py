"""Helpers for timing scatter_swap_ against the ways adapters are usually switched.

Shared by bench/ (pytest-benchmark) and the report script; imports only torch and the standard
library so the package's command line can use it without pytest.

A *swap case* is a set of Llama-style linear weights together with a SHiRA-style sparse adapter
for each (sorted, unique int32 flat indices and their values) and a LoRA adapter of the same rank
(A [r, in], B [out, r]), so the swap and the LoRA merges can be timed on the same layers.
"""
from __future__ import annotations

import functools
import math
import random
import statistics
import time
from dataclasses import dataclass, field

import torch

from .. import _machine, tuning
from ..masks import sample_distinct

__all__ = [
    "SwapCase", "llama_linear_shapes", "make_swap_case", "device_sync", "synced",
    "median_time", "median_ci",
    "interval_within", "round_robin_until_tight", "MIN_CI_VALUES", "copy_bandwidth",
    "read_bandwidth", "matmul_peak", "peak_size",
    "swap_traffic_bytes", "torch_loop_swap", "lora_addmm_fuse", "peft_lora_merge",
    "DEFAULT_LORA_SCALE", "CACHE_LINE",
]

CACHE_LINE = 64
# lora_alpha / r for a typical alpha = 2r; only the arithmetic matters here, not the value.
DEFAULT_LORA_SCALE = 2.0

_PROJECTIONS = (
    ("self_attn.q_proj", "hh"), ("self_attn.k_proj", "hh"), ("self_attn.v_proj", "hh"),
    ("self_attn.o_proj", "hh"), ("mlp.gate_proj", "ih"), ("mlp.up_proj", "ih"),
    ("mlp.down_proj", "hi"),
)


def llama_linear_shapes(hidden: int = 4096, intermediate: int = 11008,
                        blocks: int = 2) -> list[tuple[str, tuple[int, int]]]:
    """(name, (out_features, in_features)) of the seven projections in each of ``blocks`` blocks."""
    size = {"h": hidden, "i": intermediate}
    return [(f"layers.{b}.{proj}", (size[kind[0]], size[kind[1]]))
            for b in range(blocks) for proj, kind in _PROJECTIONS]


@dataclass
class SwapCase:
    """Weights, a sparse adapter (indices, values) and a LoRA adapter (A, B) per layer."""
    names: list[str]
    shapes: list[tuple[int, int]]
    dtype: torch.dtype
    r: int
    weights: list[torch.Tensor]
    indices: list[torch.Tensor]
    values: list[torch.Tensor]
    lora_A: list[torch.Tensor] = field(default_factory=list)
    lora_B: list[torch.Tensor] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights)

    @property
    def swapped_entries(self) -> int:
        return sum(i.numel() for i in self.indices)

    def describe(self) -> str:
        dims = sorted(set(self.shapes))
        return (f"{len(self.weights)} weights {', '.join(f'{m}x{n}' for m, n in dims)}, "
                f"{str(self.dtype).removeprefix('torch.')}, r={self.r}: "
                f"{self.weight_bytes / 2**30:.2f} GiB of weights, "
                f"{self.swapped_entries:,} swapped entries")


def make_swap_case(shapes, r: int = 32, dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> SwapCase:
    """Build the tensors for ``shapes`` (a list of (name, (out, in)) or of (out, in)).

    Each out×in weight gets r·(out+in) distinct random flat indices (sorted, int32; the number
    of parameters a rank-r LoRA would have) with randn values, and LoRA factors A [r, in] and
    B [out, r] of small random values; everything in ``dtype``, contiguous, on the CPU.
    """
    gen = torch.Generator().manual_seed(seed)
    names, dims = [], []
    for k, item in enumerate(shapes):
        if isinstance(item[0], str):
            name, (m, n) = item
        else:
            name, (m, n) = f"weight{k}", item
        names.append(name)
        dims.append((int(m), int(n)))
    weights, indices, values, lora_a, lora_b = [], [], [], [], []
    for m, n in dims:
        if m * n >= 2**31:
            raise ValueError(f"a {m}x{n} weight has too many entries for int32 indices")
        weights.append(torch.randn(m, n, generator=gen, dtype=torch.float32).to(dtype))
        k = r * (m + n)
        indices.append(sample_distinct(m * n, k, gen).sort().values.to(torch.int32))
        values.append(torch.randn(k, generator=gen, dtype=torch.float32).to(dtype))
        lora_a.append((torch.randn(r, n, generator=gen) * 0.01).to(dtype))
        lora_b.append((torch.randn(m, r, generator=gen) * 0.01).to(dtype))
    return SwapCase(names=names, shapes=dims, dtype=dtype, r=r, weights=weights,
                    indices=indices, values=values, lora_A=lora_a, lora_B=lora_b)


def device_sync(device: torch.device):
    """A call that waits for ``device``'s queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def synced(fn, device: torch.device):
    """``fn`` followed by a device synchronisation: the timed call includes the device work."""
    sync = device_sync(device)

    def run():
        out = fn()
        sync()
        return out
    return run


def median_time(fn, *, warmup: int = 1, repeat: int = 5) -> tuple[float, list[float]]:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeat`` times; (median s, all times s)."""
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


# Below 6 values the interval of median_ci is (min, max), which holds the median with
# probability 1 − 2·2⁻ⁿ: under 95% for n ≤ 5 (93.8% at 5, 96.9% at 6).
MIN_CI_VALUES = 6


def median_ci(values) -> tuple[float, float]:
    """A distribution-free ~95% confidence interval for the median of ``values``: the order
    statistics n/2 ∓ 0.98·√n (the count of values below the true median is binomial(n, ½)),
    widened by one place; (min, max) for fewer than MIN_CI_VALUES values."""
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        raise ValueError("no values")
    spread = 0.98 * math.sqrt(n)
    low = max(0, math.floor(n / 2 - spread) - 1)
    return ordered[low], ordered[min(n - 1, math.ceil(n / 2 + spread))]


def interval_within(values, rel: float) -> bool:
    """Whether there are at least MIN_CI_VALUES values and median_ci(values) lies within
    ±``rel`` (a fraction) of their median."""
    if len(values) < MIN_CI_VALUES:
        return False
    mid = statistics.median(values)
    low, high = median_ci(values)
    return mid - low <= rel * abs(mid) and high - mid <= rel * abs(mid)


def round_robin_until_tight(fns: dict, *, least: int, cap_s: float, rel: float = 0.05,
                            most: int = 100_000, clock=time.perf_counter,
                            seed: int = 0) -> dict[str, list[float]]:
    """Seconds per call of each callable in ``fns`` (name → callable), timed in rounds.

    One untimed warm-up round, then rounds calling each callable once, in a new random order
    each round (from ``seed``): a change of load on a shared machine hits all alike, and no
    callable always follows the same one, whose traffic may have warmed or evicted what it
    reads (a fixed or rotating order gives each callable one predecessor in most rounds).
    Rounds go on until every callable's median has its ~95% interval (median_ci) within
    ±``rel`` of it, or ``cap_s`` seconds of timed rounds have passed, or ``most`` rounds; and
    at least ``least`` rounds whatever the interval or the time (``rel`` = 0: rounds until
    the cap). ``clock`` is the timer (seconds)."""
    if least < 1:
        raise ValueError("least must be at least 1")
    names, shuffle = list(fns), random.Random(seed).shuffle
    for name in names:
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    started, rounds = clock(), 0
    while rounds < most:
        if rounds >= least and (clock() - started >= cap_s
                                or all(interval_within(times[n], rel) for n in names)):
            break
        shuffle(names)
        for name in names:
            t0 = clock()
            fns[name]()
            times[name].append(clock() - t0)
        rounds += 1
    return times


def copy_bandwidth(nbytes: int = 256 * 2**20, *, repeat: int = 5) -> float:
    """Bytes per second of ``dst.copy_(src)`` over ``nbytes`` of uint8, read + write counted."""
    src = torch.empty(nbytes, dtype=torch.uint8)
    src.fill_(1)  # touch every page so the first timed copy does not pay for page faults
    dst = torch.zeros_like(src)
    seconds, _ = median_time(lambda: dst.copy_(src), warmup=1, repeat=repeat)
    return 2 * nbytes / seconds


def read_bandwidth(nbytes: int = 256 * 2**20, *, repeat: int = 5) -> float:
    """Bytes per second of reading ``nbytes`` of fp32 once (a sum), as a GEMV reads its weight;
    the default size is far above any cache here, so this is memory's rate."""
    src = torch.ones(max(1, nbytes // 4), dtype=torch.float32)  # every page touched
    seconds, _ = median_time(lambda: src.sum(), warmup=1, repeat=repeat)
    return src.numel() * 4 / seconds


PEAK_SIZE = 2048  # n of the n x n x n matmul a peak is timed on
PEAK_CALL_S = 2.0  # ...unless one call of it would take longer than this here


@functools.cache
def peak_size(dtype: torch.dtype = torch.float32) -> int:
    """The n matmul_peak times in ``dtype``: PEAK_SIZE, or the largest power of two from 256 of
    which one call takes at most PEAK_CALL_S here, as far as a 256³ call tells. torch's fp16 and
    bf16 matmuls run at about 1 GFLOP/s on an AVX2-only CPU (a 2048³ call: 14 s)."""
    n = 256
    a = torch.randn(n, n).to(dtype)
    a @ a  # warm-up
    started = time.perf_counter()
    a @ a
    rate = 2 * n**3 / max(time.perf_counter() - started, 1e-9)
    while n < PEAK_SIZE and 2 * (2 * n) ** 3 / rate <= PEAK_CALL_S:
        n *= 2
    return n


def matmul_peak(dtype: torch.dtype = torch.float32, n: int | None = None, *,
                repeat: int = 3) -> float:
    """Flop/s of torch's n x n x n matmul in ``dtype`` here (n: peak_size's): the rate a
    compute-bound bound is measured against (the best of ``repeat`` after a warm-up, as a peak
    is)."""
    n = peak_size(dtype) if n is None else n
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    _, times = median_time(lambda: a @ b, warmup=1, repeat=repeat)
    return 2 * n**3 / min(times)


def swap_traffic_bytes(case: SwapCase, line: int = CACHE_LINE) -> int:
    """The least memory traffic a swap of ``case`` needs, in bytes.

    Every distinct cache line (``line`` bytes: 64 on a CPU, a 32-byte sector on a GPU) of a
    weight that holds a swapped entry is read and written back once; the indices are read once;
    the values are read and written once.
    """
    total = 0
    for w, idx, v in zip(case.weights, case.indices, case.values):
        if idx.numel():
            offset = w.data_ptr() % line  # allocations are usually line-aligned; be exact
            lines = torch.unique((idx.to(torch.int64) * w.element_size() + offset) // line)
            total += 2 * line * lines.numel()
        total += idx.numel() * idx.element_size()
        total += 2 * v.numel() * v.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# The alternatives timed against scatter_swap_.
# ---------------------------------------------------------------------------------------------
def torch_loop_swap(case: SwapCase) -> None:
    """The swap written with torch indexing, one layer after another (self-inverse too)."""
    with torch.no_grad():
        for w, idx, v in zip(case.weights, case.indices, case.values):
            flat = w.view(-1)
            old = flat[idx]
            flat[idx] = v
            v.copy_(old)


def lora_addmm_fuse(case: SwapCase, scale: float = DEFAULT_LORA_SCALE) -> None:
    """Fuse the LoRA adapter into each weight in place: W += scale · B @ A."""
    with torch.no_grad():
        for w, a, b in zip(case.weights, case.lora_A, case.lora_B):
            w.addmm_(b, a, alpha=scale)


def peft_lora_merge(case: SwapCase, scale: float = DEFAULT_LORA_SCALE) -> None:
    """Merge as PEFT does: the delta in float32, cast to the weight's dtype, then added."""
    with torch.no_grad():
        for w, a, b in zip(case.weights, case.lora_A, case.lora_B):
            delta = (b.float() @ a.float()) * scale
            w += delta.to(w.dtype)


# ---------------------------------------------------------------------------------------------
# One adapted linear layer, several ways: ShiraLinear, PEFT's ShiRA and PEFT's LoRA.
# Used by bench/bench_shira_linear.py and bench/report_shira_linear.py. peft is imported only
# inside the functions that need it.
# ---------------------------------------------------------------------------------------------
ADAPTER_VALUE_STD = 0.01  # the random adapter values set before timing; only non-zero matters


def _import_peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError("comparing against PEFT needs the peft package: pip install peft") \
            from exc
    return peft


def peft_available() -> bool:
    """Whether ``import peft`` works (the PEFT comparisons are skipped where it does not)."""
    try:
        _import_peft()
    except ImportError:
        return False
    return True


def make_linear(out_features: int, in_features: int, *, dtype: torch.dtype = torch.float32,
                bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    """An nn.Linear with seeded random weight (and bias) in ``dtype``, on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        bound = in_features ** -0.5
        layer.weight.copy_(torch.empty(out_features, in_features).uniform_(-bound, bound,
                                                                           generator=gen))
        if bias:
            layer.bias.copy_(torch.empty(out_features).uniform_(-bound, bound, generator=gen))
    return layer


def clone_linear(linear: torch.nn.Linear) -> torch.nn.Linear:
    """A copy of ``linear`` with its own (contiguous) weight and bias."""
    copy = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        copy.weight.copy_(linear.weight)
        if linear.bias is not None:
            copy.bias.copy_(linear.bias)
    return copy


def _fill_random_(param: torch.Tensor, seed: int, std: float = ADAPTER_VALUE_STD) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        param.copy_(torch.randn(param.shape, generator=gen) * std)


def shira_linear_layer(linear: torch.nn.Linear, r: int = 32, seed: int = 0,
                       strategy: str = "auto"):
    """ShiraLinear.from_linear(linear, r=r, mask="rand", seed=seed) with random (non-zero)
    ``shira_values``. The layer reuses ``linear``'s weight and bias and freezes them."""
    from ..nn import ShiraLinear

    layer = ShiraLinear.from_linear(linear, r=r, mask="rand", seed=seed)
    _fill_random_(layer.shira_values, seed + 1)
    layer.strategy = strategy
    return layer


class _OneLayer(torch.nn.Module):
    """The smallest model PEFT can adapt: one linear called ``proj``."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def _peft_adapted(linear: torch.nn.Linear, config):
    peft = _import_peft()
    model = peft.get_peft_model(_OneLayer(linear), config)
    layer = model.get_submodule("base_model.model.proj")
    if layer.get_base_layer() is not linear:
        raise RuntimeError("PEFT did not wrap the given linear as expected")
    return layer


def peft_shira_layer(linear: torch.nn.Linear, r: int = 32, seed: int = 0):
    """PEFT's ShiRA layer (peft.tuners.shira.Linear) around ``linear``, random mask of
    r·(out+in) entries (random_seed=seed), ``shira_weight`` set to random values.

    Built with get_peft_model on a one-layer container; the returned layer is the adapted module
    itself: call it as ``layer(x)``; ``layer.merge()`` / ``layer.unmerge()`` are PEFT's. It holds
    ``linear`` as its base layer (not copied; PEFT freezes it). Its forward clones the base
    weight, adds the adapter as a dense sum of a sparse COO tensor, then runs F.linear.
    """
    peft = _import_peft()
    config = peft.ShiraConfig(r=r, target_modules=["proj"], random_seed=seed)
    layer = _peft_adapted(linear, config)
    for param in layer.shira_weight.values():
        _fill_random_(param, seed + 1)
    return layer


def peft_lora_layer(linear: torch.nn.Linear, r: int = 32, seed: int = 0):
    """PEFT's LoRA layer (peft.tuners.lora.Linear) around ``linear``: rank r, lora_alpha 2r,
    no dropout; A keeps PEFT's initialisation, B (zeros in PEFT) is set to small random values
    so the adapter is non-trivial. Call as ``layer(x)``; merge()/unmerge() are PEFT's. Holds
    ``linear`` as its base layer (not copied; PEFT freezes it)."""
    peft = _import_peft()
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"])
    layer = _peft_adapted(linear, config)
    for module in layer.lora_B.values():
        _fill_random_(module.weight, seed + 1)
    return layer


def trainable_parameters(module: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters of ``module`` that require grad (the adapter's, for the layers above)."""
    return [p for p in module.parameters() if p.requires_grad]


def training_step(layer: torch.nn.Module, x: torch.Tensor, params=None):
    """A function running one training step of ``layer`` on ``x``: the gradients of ``params``
    (default: the trainable ones) and of x, if it requires grad, are set to None, then forward,
    loss = mean of the squared output, backward. Nothing is updated."""
    params = trainable_parameters(layer) if params is None else list(params)

    def step():
        for p in params:
            p.grad = None
        if x.requires_grad:
            x.grad = None
        loss = layer(x).square().mean()
        loss.backward()
        return loss

    return step


__all__ += [
    "ADAPTER_VALUE_STD", "peft_available", "make_linear", "clone_linear", "shira_linear_layer",
    "peft_shira_layer", "peft_lora_layer", "trainable_parameters", "training_step",
]


# ---------------------------------------------------------------------------------------------
# Describing a run: the machine and the command that made a report.
# ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU as a report names it: model name, cpuinfo family and model, and the ISA class
    that picks the static tuning rows, e.g. "AMD EPYC (cpuinfo family 25 model 17; AVX512+BF16)"."""
    return _machine.cpu_name(tuning.arch_class("cpu"))


def write_report(text: str, out: str) -> None:
    """Print nothing more; write ``text`` to ``out`` (a path; "-" writes nothing) and say so."""
    from pathlib import Path

    if out != "-":
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.rstrip("\n") + "\n")
        print(f"\nwritten to {path}")


def publish_report(lines: list[str], out: str) -> None:
    """The report's lines as one text: printed, then written to ``out`` as write_report does."""
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(text, out)


def command_line() -> str:
    """The command that is running, as `python <script relative to cwd> <args>`."""
    import shlex
    import sys
    from pathlib import Path

    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(Path.cwd().resolve())
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


# ---------------------------------------------------------------------------------------------
# Peak memory of a CPU step. torch's CPU allocator does not cache, so tensor memory shows in
# the resident set size; the kernel's high-water mark (VmHWM) can be reset just before a step.
# ---------------------------------------------------------------------------------------------
def _proc_status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _release_freed_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_peak_during(fn) -> dict:
    """Resident set size before ``fn()`` and its peak while ``fn()`` ran, MiB (Linux: VmHWM
    reset through /proc/self/clear_refs; elsewhere the growth of ru_maxrss, a lower bound)."""
    _release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = _proc_status_mib("VmHWM") is not None
    except OSError:
        reset = False
    if reset:
        before = _proc_status_mib("VmRSS")
        fn()
        return {"before": before, "peak": _proc_status_mib("VmHWM"),
                "how": "VmHWM after clear_refs"}
    import resource
    import sys

    factor = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * factor
    fn()
    return {"before": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * factor,
            "how": "ru_maxrss growth (a lower bound)"}
