"""Time ShiraLinear on the CPU against nn.Linear and PEFT's ShiRA and LoRA layers.

    python bench/report_shira_linear.py [--quick] [--repeat N] [--dtype float32]
                                        [--out docs/benchmarks/shira_linear_cpu.md]

One run measures, for each layer shape (default 4096x4096 and 11008x4096, r = 32, fp32 unless
--dtype says otherwise):
  * forward latency (inference, torch.no_grad) at 1, 16, 128 and 2048 tokens: nn.Linear,
    ShiraLinear unfused ("auto"), ShiraLinear fused (merged), ShiraLinear with each explicit
    strategy (fold, spmm, swap, merge), PEFT ShiRA and PEFT LoRA;
  * the spmm/fold crossover: spmm, fold and swap against nn.Linear at 1 to 256 tokens, and the
    counts at which fold is no slower than spmm (what FOLD_TOKENS should list); a training
    step with each strategy at the same counts (FOLD_TRAINING_TOKENS);
  * one training step (forward, loss, backward) at 128 and 2048 tokens: ShiraLinear (auto, and
    spmm: torch's matmul plus the sparse kernels), PEFT ShiRA, PEFT LoRA, and a frozen
    nn.Linear;
  * the peak memory of one training step per method, each in a fresh subprocess;
and checks the issue's targets against the measured ratios. The variants of one configuration
are timed interleaved (round robin), so a change in the machine's load hits them alike. A
markdown report is written to --out (use --out - to only print it).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("shira_kernels") is None:  # run from a source checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import shira_kernels  # noqa: E402
from shira_kernels.harness import benchmark as sb  # noqa: E402
from shira_kernels.ops import sparse_delta  # noqa: E402

FULL_SHAPES = [(4096, 4096), (11008, 4096)]
QUICK_SHAPES = [(512, 512), (1376, 512)]
FORWARD_TOKENS = [1, 16, 128, 2048]
CROSSOVER_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
TRAIN_TOKENS = [128, 2048]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE = torch.float32  # --dtype sets it

LINEAR, UNFUSED, FUSED = "nn.Linear", "ShiraLinear unfused (auto)", "ShiraLinear fused (merged)"
SPMM, SWAP, MERGE = "ShiraLinear spmm", "ShiraLinear swap", "ShiraLinear merge"
FOLD = "ShiraLinear fold"
PEFT_SHIRA, PEFT_LORA = "PEFT ShiRA", "PEFT LoRA"
SHIRA_TRAIN, FLOOR = "ShiraLinear (auto)", "nn.Linear, frozen (input grad only)"
SHIRA_SPMM_TRAIN = "ShiraLinear spmm (torch's matmul + sparse kernels)"
MEMORY_METHODS = {"shira": SHIRA_TRAIN, "peft_shira": PEFT_SHIRA, "peft_lora": PEFT_LORA,
                  "linear": FLOOR}

TARGET_UNFUSED, TARGET_FUSED, TARGET_SHIRA_SPEEDUP = 1.10, 1.02, 2.0


# ---------------------------------------------------------------------------------------------
# The machine.
# ---------------------------------------------------------------------------------------------


def _cpu_ticks() -> dict[int, tuple[str, int]]:
    """{pid: (name, utime + stime)} of every process but this one and its descendants (the
    memory probes, a compiler building the native kernels)."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        procs[int(entry.name)] = (name, int(fields[1]), int(fields[11]) + int(fields[12]))
    ours, grew = {os.getpid()}, True
    while grew:
        grew = False
        for pid, (_, ppid, _) in procs.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                grew = True
    return {pid: (name, ticks) for pid, (name, _, ticks) in procs.items() if pid not in ours}


def _busy_between(before, after, seconds: float, threshold: float) -> list[tuple[str, float]]:
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (name, ticks) in after.items():
        if pid in before:
            percent = 100.0 * (ticks - before[pid][1]) / hz / seconds
            if percent > threshold:
                busy.append((f"{name} (pid {pid})", percent))
    return sorted(busy, key=lambda item: -item[1])


def busy_processes(threshold: float = 30.0, interval: float = 1.0) -> list[tuple[str, float]]:
    """Other processes using more than ``threshold`` % of one core over ``interval`` seconds."""
    if not Path("/proc/self/stat").exists():
        return []
    before = _cpu_ticks()
    time.sleep(interval)
    return _busy_between(before, _cpu_ticks(), interval, threshold)


class LoadMonitor:
    """Samples, every ``period`` seconds while the run goes on, which other processes used more
    than ``threshold`` % of a core (reading /proc costs next to nothing)."""

    def __init__(self, period: float = 5.0, threshold: float = 30.0):
        self.period, self.threshold = period, threshold
        self.samples, self.busy = 0, []  # busy: (seconds into the run, [(name, %)])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.perf_counter()

    def __enter__(self):
        if Path("/proc/self/stat").exists():
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self):
        before, t0 = _cpu_ticks(), time.perf_counter()
        while not self._stop.wait(self.period):
            after, t1 = _cpu_ticks(), time.perf_counter()
            busy = _busy_between(before, after, t1 - t0, self.threshold)
            self.samples += 1
            if busy:
                self.busy.append((t1 - self._start, busy))
            before, t0 = after, t1

    def note(self) -> str:
        if not self.samples:
            return "not sampled"
        if not self.busy:
            return (f"no other process above {self.threshold:.0f}% CPU in any of "
                    f"{self.samples} samples ({self.period:g} s apart)")
        worst: dict[str, float] = {}
        for _, busy in self.busy:
            for name, pct in busy:
                worst[name] = max(worst.get(name, 0.0), pct)
        names = ", ".join(f"{n} up to {p:.0f}%" for n, p in
                          sorted(worst.items(), key=lambda kv: -kv[1])[:6])
        return (f"**not quiet**: another process above {self.threshold:.0f}% CPU in "
                f"{len(self.busy)} of {self.samples} samples ({self.period:g} s apart): {names}")


def load_note(busy) -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    if not busy:
        return f"no other process above 30% CPU; load average {load}"
    listed = ", ".join(f"{name} {pct:.0f}%" for name, pct in busy[:6])
    return f"**not quiet**: {listed}; load average {load}"


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------
def interleaved(variants: dict, *, repeat: int, min_time: float, max_rounds: int) -> dict:
    """Time the callables of ``variants`` in rounds (sb.round_robin_until_tight: one untimed
    warm-up round, then rounds in a new random order each): at least ``repeat`` rounds, more
    (up to ``max_rounds``) until ``min_time`` seconds of rounds have passed.
    {name: (median s, times)}."""
    times = sb.round_robin_until_tight(variants, least=repeat, cap_s=min_time, rel=0.0,
                                       most=max(repeat, max_rounds))
    return {name: (statistics.median(ts), ts) for name, ts in times.items()}


def paired(first, second, *, least: int, min_time: float, most: int) -> list[float]:
    """Time ``first`` and ``second`` back to back, the order alternating, after one untimed
    call of each: at least ``least`` pairs, more (at most ``most``) until ``min_time`` seconds
    have passed. Returns the ratios second / first, one per pair: a slow spell of the machine
    slows both halves of a pair alike, so the ratios stay sharp where medians drift."""
    first(), second()
    ratios, started, k = [], time.perf_counter(), 0
    while k < least or (k < most and time.perf_counter() - started < min_time):
        t = {}
        for which, fn in ((0, first), (1, second)) if k % 2 == 0 else ((1, second), (0, first)):
            t0 = time.perf_counter()
            fn()
            t[which] = time.perf_counter() - t0
        ratios.append(t[1] / t[0])
        k += 1
    return ratios


def median_interval(values) -> tuple[float, float, float]:
    """The median and a distribution-free ~95% confidence interval for it (order statistics
    n/2 ∓ 0.98·√n, from the binomial distribution of how many values fall below the median)."""
    v = sorted(values)
    n = len(v)
    half = 0.98 * math.sqrt(n)
    lo = max(0, math.floor(n / 2 - half) - 1)
    hi = min(n - 1, math.ceil(n / 2 + half))
    return statistics.median(v), v[lo], v[hi]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.2f}"


def _spread(times) -> str:
    return f"{_ms(min(times))}–{_ms(max(times))}"


# ---------------------------------------------------------------------------------------------
# The layers of one shape.
# ---------------------------------------------------------------------------------------------
class Layers:
    """nn.Linear, a ShiraLinear and PEFT's ShiRA and LoRA layers sharing one base weight (the
    ShiraLinear's strategy is set per call), and a fused ShiraLinear on its own copy."""

    def __init__(self, shape, r: int, with_peft: bool):
        out_f, in_f = shape
        self.shape = shape
        self.linear = sb.make_linear(out_f, in_f, dtype=DTYPE, seed=0)
        self.shira = sb.shira_linear_layer(self.linear, r=r, seed=0)
        self.fused = sb.shira_linear_layer(sb.clone_linear(self.linear), r=r, seed=0)
        self.fused.merge()
        # nn.Linear on the fused layer's own weight and bias Parameters: in use, merge() writes
        # into the memory the base layer already had, so that is the memory to compare on.
        self.fused_base = torch.nn.Linear(in_f, out_f, device="meta")
        self.fused_base.weight, self.fused_base.bias = self.fused.weight, self.fused.bias
        self.peft_shira = sb.peft_shira_layer(self.linear, r=r, seed=0) if with_peft else None
        self.peft_lora = sb.peft_lora_layer(self.linear, r=r, seed=0) if with_peft else None

    def label(self) -> str:
        return f"{self.shape[0]}x{self.shape[1]}"

    def strategy_fn(self, strategy: str, x):
        layer = self.shira

        def run():
            layer.strategy = strategy
            return layer(x)
        return run

    def forward_variants(self, x, strategies=("fold", "spmm", "swap", "merge"), full=True) -> dict:
        v = {LINEAR: lambda: self.linear(x)}
        if full:
            v[UNFUSED] = self.strategy_fn("auto", x)
            v[FUSED] = lambda: self.fused(x)
        for s in strategies:
            v[f"ShiraLinear {s}"] = self.strategy_fn(s, x)
        if full and self.peft_shira is not None:
            v[PEFT_SHIRA] = lambda: self.peft_shira(x)
            v[PEFT_LORA] = lambda: self.peft_lora(x)
        return v


def _no_grad(variants: dict) -> dict:
    def wrap(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run
    return {name: wrap(fn) for name, fn in variants.items()}


def _inputs(shape, tokens: int, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(1000 + tokens)
    return torch.randn(tokens, shape[1], generator=gen, dtype=DTYPE).requires_grad_(requires_grad)


def _bits_sum(t: torch.Tensor) -> int:
    return int(t.detach().view(torch.int32).sum(dtype=torch.int64))


def _tolerance() -> float:
    """Relative error a correct layer stays within: a few hundred roundings of the dtype."""
    return 1e-4 if DTYPE == torch.float32 else 256 * torch.finfo(DTYPE).eps


def check_layers(layers: Layers) -> list[str]:
    """Cheap sanity checks before timing: every ShiraLinear path gives W + S's output; the base
    weight is unchanged afterwards; the PEFT adapters change the output."""
    notes = []
    x = _inputs(layers.shape, 4)
    before = _bits_sum(layers.linear.weight)
    with torch.no_grad():
        delta = layers.shira.delta
        ref = F.linear(x.double(), layers.linear.weight.double()
                       + layers.shira.scale * delta.to_dense(torch.float64), layers.linear.bias.double())
        base = layers.linear(x)
        scale = ref.abs().max().item()
        for strategy in ("auto", "fold", "spmm", "swap", "merge"):
            layers.shira.strategy = strategy
            err = (layers.shira(x).double() - ref).abs().max().item()
            ok = err <= _tolerance() * max(scale, 1.0)
            notes.append(f"ShiraLinear {strategy}: max |y − y_ref| = {err:.2e} "
                         f"({'ok' if ok else '**too large**'})")
        err = (layers.fused(x).double() - ref).abs().max().item()
        notes.append(f"ShiraLinear fused: max |y − y_ref| = {err:.2e} "
                     f"({'ok' if err <= _tolerance() * max(scale, 1.0) else '**too large**'})")
        layers.shira.strategy = "auto"
        for name, layer in ((PEFT_SHIRA, layers.peft_shira), (PEFT_LORA, layers.peft_lora)):
            if layer is not None:
                diff = (layer(x) - base).abs().max().item()
                notes.append(f"{name}: max |y − y_base| = {diff:.2e} "
                             f"({'non-trivial' if diff > 0 else '**adapter is zero**'})")
    same = _bits_sum(layers.linear.weight) == before
    notes.append("base weight bit-identical after all calls: " + ("yes" if same else "**NO**"))
    return notes


# ---------------------------------------------------------------------------------------------
# The measurements.
# ---------------------------------------------------------------------------------------------
def measure_forward(layers: Layers, args) -> dict:
    out = {}
    for tokens in args.forward_tokens:
        x = _inputs(layers.shape, tokens)
        res = interleaved(_no_grad(layers.forward_variants(x)), repeat=args.repeat,
                          min_time=args.min_time, max_rounds=args.max_rounds)
        out[tokens] = res
        base = res[LINEAR][0]
        print(f"[{layers.label()}] forward T={tokens}: " + ", ".join(
            f"{n} {m / base:.2f}x" for n, (m, _) in res.items() if n != LINEAR)
            + f" (nn.Linear {_ms(base)} ms)", flush=True)
    return out


def measure_fused(layers: Layers, args) -> dict:
    """The fused (merged) ShiraLinear against nn.Linear alone, in pairs: its forward is the
    very F.linear call nn.Linear makes, so the question is whether any overhead shows at all,
    which takes a sharper measure than the round-robin tables' medians. Paired with an
    nn.Linear on the same weight memory ("same") and with the base nn.Linear, whose weight is
    another copy ("base"). {tokens: {"same": ratios, "base": ratios}}."""
    out = {}
    for tokens in args.forward_tokens:
        x = _inputs(layers.shape, tokens)
        runs = _no_grad({"same": lambda: layers.fused_base(x), "base": lambda: layers.linear(x),
                         FUSED: lambda: layers.fused(x)})
        out[tokens] = {}
        for other in ("same", "base"):
            ratios = paired(runs[other], runs[FUSED], least=args.pairs,
                            min_time=args.min_time, most=20 * args.pairs)
            out[tokens][other] = ratios
            med, lo, hi = median_interval(ratios)
            print(f"[{layers.label()}] fused / nn.Linear ({other}) T={tokens}: {med:.3f}x "
                  f"(95% {lo:.3f}–{hi:.3f}, {len(ratios)} pairs)", flush=True)
    return out


def measure_crossover(layers: Layers, args) -> dict:
    """spmm, fold and swap against nn.Linear at args.crossover_tokens; where fold is still
    slower than spmm at the largest of them, the token count keeps doubling up to
    args.crossover_limit until fold is no slower."""
    out = {}
    tokens_list = list(args.crossover_tokens)
    while tokens_list:
        tokens = tokens_list.pop(0)
        x = _inputs(layers.shape, tokens)
        res = interleaved(_no_grad(layers.forward_variants(x, ("spmm", "fold", "swap"),
                                                           full=False)),
                          repeat=args.repeat, min_time=args.min_time, max_rounds=args.max_rounds)
        out[tokens] = res
        base = res[LINEAR][0]
        print(f"[{layers.label()}] crossover T={tokens}: spmm {res[SPMM][0] / base:.3f}x, "
              f"fold {res[FOLD][0] / base:.3f}x, swap {res[SWAP][0] / base:.3f}x", flush=True)
        if not tokens_list and res[FOLD][0] > res[SPMM][0] and 2 * tokens <= args.crossover_limit:
            tokens_list.append(2 * tokens)
    return out


TRAIN_CROSSOVER_FROM = 1  # the training-step crossover is timed from this many tokens


def measure_train_crossover(layers: Layers, token_counts, args) -> dict:
    """A training step with each strategy at the given token counts (the same steps as the
    training section's, the strategy forced)."""
    out = {}
    for tokens in token_counts:
        x = _inputs(layers.shape, tokens, requires_grad=True)
        step = sb.training_step(layers.shira, x)

        def forced(strategy):
            def run():
                layers.shira.strategy = strategy
                step()
            return run
        try:
            out[tokens] = interleaved({SPMM: forced("spmm"), FOLD: forced("fold"),
                                       SWAP: forced("swap")},
                                      repeat=args.repeat, min_time=args.min_time,
                                      max_rounds=args.max_rounds)
        finally:
            layers.shira.strategy = "auto"
            for p in sb.trainable_parameters(layers.shira):
                p.grad = None
        res = out[tokens]
        print(f"[{layers.label()}] training crossover T={tokens}: spmm {_ms(res[SPMM][0])} ms, "
              f"fold {_ms(res[FOLD][0])} ms, swap {_ms(res[SWAP][0])} ms", flush=True)
    return out


def train_variants(layers: Layers, x) -> dict:
    layers.shira.strategy = "auto"
    auto_step, spmm_step = sb.training_step(layers.shira, x), sb.training_step(layers.shira, x)

    def strategy_step(step, strategy):
        def run():
            layers.shira.strategy = strategy
            try:
                return step()
            finally:
                layers.shira.strategy = "auto"
        return run
    v = {SHIRA_TRAIN: auto_step, SHIRA_SPMM_TRAIN: strategy_step(spmm_step, "spmm")}
    if layers.peft_shira is not None:
        v[PEFT_SHIRA] = sb.training_step(layers.peft_shira, x)
        v[PEFT_LORA] = sb.training_step(layers.peft_lora, x)
    v[FLOOR] = sb.training_step(layers.linear, x, params=[])
    return v


def measure_training(layers: Layers, args) -> dict:
    out = {}
    for tokens in args.train_tokens:
        x = _inputs(layers.shape, tokens, requires_grad=True)
        res = interleaved(train_variants(layers, x), repeat=args.repeat,
                          min_time=args.min_time, max_rounds=args.max_rounds)
        for layer in (layers.shira, layers.peft_shira, layers.peft_lora):
            if layer is not None:
                for p in sb.trainable_parameters(layer):
                    p.grad = None
        out[tokens] = res
        print(f"[{layers.label()}] train T={tokens}: " + ", ".join(
            f"{n} {_ms(m)} ms" for n, (m, _) in res.items()), flush=True)
    return out


OVERHEAD_SHAPE, OVERHEAD_CALLS = (64, 64), 200


def measure_overhead(args, with_peft: bool) -> dict:
    """The time of one forward call on a layer so small (64x64, 1 token) that the call is all
    Python and dispatch: what each layer adds per call wherever its matmul is short (small
    models, GPU decoding). Each timed sample is OVERHEAD_CALLS calls. {name: (median, times)},
    seconds per call."""
    layers = Layers(OVERHEAD_SHAPE, 1, with_peft)
    x = _inputs(OVERHEAD_SHAPE, 1)
    variants = layers.forward_variants(x, strategies=("fold", "spmm"))

    def repeated(fn):
        def run():
            with torch.no_grad():
                for _ in range(OVERHEAD_CALLS):
                    fn()
        return run
    res = interleaved({n: repeated(fn) for n, fn in variants.items()}, repeat=args.repeat,
                      min_time=args.min_time, max_rounds=args.max_rounds)
    res = {n: (m / OVERHEAD_CALLS, [t / OVERHEAD_CALLS for t in ts]) for n, (m, ts) in res.items()}
    print("overhead per call: " + ", ".join(f"{n} {m * 1e6:.1f} µs" for n, (m, _) in res.items()),
          flush=True)
    return res


def overhead_table(res: dict) -> list[str]:
    base = res[LINEAR][0]
    lines = ["| variant | µs per call (median) | spread µs | more than nn.Linear, µs |",
             "|---|---:|---:|---:|"]
    for name, (median, times) in res.items():
        lines.append(f"| {name} | {median * 1e6:.1f} | {min(times) * 1e6:.1f}–"
                     f"{max(times) * 1e6:.1f} | {(median - base) * 1e6:+.1f} |")
    return lines


# Peak memory of one training step, in a fresh subprocess per (method, shape, tokens).
def memory_probe(spec: dict) -> dict:
    """Run in the subprocess: build one method's layer and input, run one untimed step, then
    measure the next step (gradients set to None first, as in every timed step)."""
    torch.set_num_threads(spec["threads"])
    if spec["method"] == "calibrate":
        nbytes = 256 * 2**20

        def touch():
            t = torch.empty(nbytes // 4, dtype=torch.float32)
            t.fill_(1.0)
            del t
        res = sb.rss_peak_during(touch)
        res["expected"] = nbytes / 2**20
        return res
    shape = tuple(spec["shape"])
    linear = sb.make_linear(*shape, dtype=DTYPE, seed=0)
    method, r = spec["method"], spec["r"]
    if method == "shira":
        layer = sb.shira_linear_layer(linear, r=r, seed=0)
    elif method == "peft_shira":
        layer = sb.peft_shira_layer(linear, r=r, seed=0)
    elif method == "peft_lora":
        layer = sb.peft_lora_layer(linear, r=r, seed=0)
    else:
        layer = linear.requires_grad_(False)
    x = _inputs(shape, spec["tokens"], requires_grad=True)
    params = sb.trainable_parameters(layer)
    step = sb.training_step(layer, x, params)
    step()  # one-time work (lazy initialisation, scratch buffers) is not the step's
    for p in params:
        p.grad = None
    x.grad = None
    return sb.rss_peak_during(step)


def run_probe(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", json.dumps(spec),
           "--dtype", str(DTYPE).removeprefix("torch.")]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    raise RuntimeError(f"memory probe {spec} failed:\n{done.stderr[-3000:]}")


def measure_memory(shapes, args, with_peft: bool) -> dict:
    threads = torch.get_num_threads()
    out = {"calibrate": run_probe({"method": "calibrate", "threads": threads})}
    print(f"memory calibration: a 256 MiB tensor measured as "
          f"{out['calibrate']['peak'] - out['calibrate']['before']:.1f} MiB "
          f"({out['calibrate']['how']})", flush=True)
    methods = ["shira", "peft_shira", "peft_lora", "linear"] if with_peft else ["shira", "linear"]
    for shape in shapes:
        for tokens in args.memory_tokens:
            for method in methods:
                # The peak moves by a few dozen pages from process to process (malloc's
                # arenas): the median of several fresh processes is the figure.
                runs = sorted((run_probe({"method": method, "shape": list(shape),
                                          "tokens": tokens, "r": args.r, "threads": threads})
                               for _ in range(args.memory_runs)),
                              key=lambda res: res["peak"] - res["before"])
                res = dict(runs[len(runs) // 2],
                           increases=[r["peak"] - r["before"] for r in runs])
                out[(shape, tokens, method)] = res
                print(f"[{shape[0]}x{shape[1]}] memory T={tokens} {MEMORY_METHODS[method]}: "
                      f"+{res['peak'] - res['before']:.2f} MiB (runs: "
                      + ", ".join(f"{v:.2f}" for v in res["increases"]) + ")", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------
def crossover_point(res: dict) -> int | None:
    """The smallest token count from which fold ≤ spmm at every larger measured count."""
    point = None
    for tokens in sorted(res, reverse=True):
        if res[tokens][FOLD][0] <= res[tokens][SPMM][0]:
            point = tokens
        else:
            break
    return point


def forward_tables(label: str, res: dict) -> list[str]:
    tokens = sorted(res)
    names = list(res[tokens[0]])
    lines = [f"Ratio to nn.Linear (median / median), {label}:", "",
             "| variant | " + " | ".join(f"T={t}" for t in tokens) + " |",
             "|---|" + "---:|" * len(tokens)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            f"{res[t][name][0] / res[t][LINEAR][0]:.3f}" for t in tokens) + " |")
    lines += ["", "| tokens | variant | median ms | spread ms (min–max) | × nn.Linear | rounds |",
              "|---:|---|---:|---:|---:|---:|"]
    for t in tokens:
        base = res[t][LINEAR][0]
        for name in names:
            median, times = res[t][name]
            lines.append(f"| {t} | {name} | {_ms(median)} | {_spread(times)} | "
                         f"{median / base:.3f} | {len(times)} |")
    return lines


def _strategy_table(results: list[dict], key: str, columns, cell) -> list[str]:
    """One row per token count measured in any result's ``key``, ``columns`` per shape, filled
    by ``cell(measurement)`` (– where a shape was not measured at that count)."""
    tokens = sorted({t for r in results for t in r[key]})
    head = "| tokens | " + " | ".join(" | ".join(f"{r['label']} {c}" for c in columns)
                                     for r in results)
    lines = [head + " |", "|---:|" + "---:|" * (len(columns) * len(results))]
    for t in tokens:
        cells = [" | ".join(["–"] * len(columns)) if r[key].get(t) is None else cell(r[key][t])
                 for r in results]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return lines


def _fold_ratio(spmm: float, fold: float) -> str:
    return f"{fold / spmm:.3f}" + (" ✓" if fold <= spmm else "")


def crossover_table(results: list[dict]) -> list[str]:
    def cell(c):
        base, spmm, fold, swap = c[LINEAR][0], c[SPMM][0], c[FOLD][0], c[SWAP][0]
        return (f"{spmm / base:.3f} | {fold / base:.3f} | {swap / base:.3f} | "
                f"{_fold_ratio(spmm, fold)}")
    return _strategy_table(results, "crossover", ("spmm ×", "fold ×", "swap ×", "fold/spmm"),
                           cell)


def train_crossover_table(results: list[dict]) -> list[str]:
    def cell(c):
        spmm, fold, swap = c[SPMM][0], c[FOLD][0], c[SWAP][0]
        return f"{_ms(spmm)} | {_ms(fold)} | {_ms(swap)} | {_fold_ratio(spmm, fold)}"
    return _strategy_table(results, "train_crossover",
                           ("spmm ms", "fold ms", "swap ms", "fold/spmm"), cell)


def training_table(label: str, res: dict) -> list[str]:
    lines = ["| tokens | method | median ms | spread ms (min–max) | × PEFT LoRA | × PEFT ShiRA | "
             "rounds |", "|---:|---|---:|---:|---:|---:|---:|"]
    for t in sorted(res):
        lora = res[t].get(PEFT_LORA, (None,))[0]
        shira = res[t].get(PEFT_SHIRA, (None,))[0]
        for name, (median, times) in res[t].items():
            lines.append(f"| {t} | {name} | {_ms(median)} | {_spread(times)} | "
                         f"{median / lora:.3f} | {median / shira:.3f} | {len(times)} |"
                         if lora else
                         f"| {t} | {name} | {_ms(median)} | {_spread(times)} | – | – | "
                         f"{len(times)} |")
    return lines


def memory_table(memory: dict, shapes, args, with_peft: bool) -> list[str]:
    methods = ["shira", "peft_shira", "peft_lora", "linear"] if with_peft else ["shira", "linear"]
    lines = ["| shape | tokens | method | RSS before the step MiB | peak increase in the step MiB "
             "(median) | runs, min–max MiB | × PEFT LoRA |", "|---|---:|---|---:|---:|---:|---:|"]
    for shape in shapes:
        for t in args.memory_tokens:
            lora = memory.get((shape, t, "peft_lora"))
            lora_inc = lora["peak"] - lora["before"] if lora else None
            for m in methods:
                res = memory[(shape, t, m)]
                inc = res["peak"] - res["before"]
                ratio = f"{inc / lora_inc:.2f}" if lora_inc else "–"
                lines.append(f"| {shape[0]}x{shape[1]} | {t} | {MEMORY_METHODS[m]} | "
                             f"{res['before']:.0f} | {inc:.2f} | {len(res['increases'])}, "
                             f"{min(res['increases']):.2f}–{max(res['increases']):.2f} | "
                             f"{ratio} |")
    return lines


def targets(results: list[dict], memory: dict | None, shapes, args,
            with_peft: bool) -> list[tuple[str, str, str]]:
    """(target, PASS/MISS/n.a., the measured figures)."""
    rows = []

    def verdict(ok):
        return "PASS" if ok else "MISS"

    def listing(figures, fmt="{:.3f}×"):
        return "; ".join(f"{s} T={t}: " + fmt.format(v) for s, t, v in figures)

    unfused = f"unfused forward at ≥128 tokens within {TARGET_UNFUSED:.2f}× of nn.Linear"
    fused = f"fused forward within {TARGET_FUSED:.2f}× of nn.Linear (every token count)"
    if "forward" in args.sections:
        figures = [(r["label"], t, r["forward"][t][UNFUSED][0] / r["forward"][t][LINEAR][0])
                   for r in results for t in r["forward"] if t >= 128]
        if figures:
            rows.append((unfused, verdict(max(v for *_, v in figures) <= TARGET_UNFUSED),
                         listing(figures)))
        figures = [(r["label"], t, median_interval(r["fused"][t]["same"]))
                   for r in results for t in r["fused"]]
        worst = max(med for *_, (med, _, _) in figures)
        rows.append((fused, verdict(worst <= TARGET_FUSED),
                     f"worst {worst:.3f}× (median of ratios paired on the same weight "
                     "memory); " + "; ".join(
                         f"{s} T={t}: {med:.3f}× ({lo:.3f}–{hi:.3f})"
                         for s, t, (med, lo, hi) in figures)))
    else:
        rows += [(unfused, "n.a.", "not measured"), (fused, "n.a.", "not measured")]

    not_lora = "training step no slower than PEFT LoRA (ShiraLinear / LoRA ≤ 1.00)"
    vs_shira = f"training step ≥ {TARGET_SHIRA_SPEEDUP:.0f}× faster than PEFT ShiRA"
    peak = "training-step peak memory no higher than PEFT LoRA's"
    if not with_peft:
        return rows + [(name, "n.a.", "peft is not installed") for name in (not_lora, vs_shira, peak)]
    if "train" in args.sections:
        figures = [(r["label"], t, r["train"][t][SHIRA_TRAIN][0] / r["train"][t][PEFT_LORA][0])
                   for r in results for t in r["train"]]
        rows.append((not_lora, verdict(max(v for *_, v in figures) <= 1.0), listing(figures)))
        figures = [(r["label"], t, r["train"][t][PEFT_SHIRA][0] / r["train"][t][SHIRA_TRAIN][0])
                   for r in results for t in r["train"]]
        # The frozen nn.Linear (torch's matmul, input gradient only) bounds what any adapter
        # built on torch's matmul could reach; fold runs its own matmul.
        bounds = [r["train"][t][PEFT_SHIRA][0] / r["train"][t][FLOOR][0]
                  for r in results for t in r["train"]]
        rows.append((vs_shira, verdict(min(v for *_, v in figures) >= TARGET_SHIRA_SPEEDUP),
                     "; ".join(f"{s} T={t}: {v:.2f}× faster (the frozen nn.Linear: {b:.2f}×)"
                               for (s, t, v), b in zip(figures, bounds))))
    else:
        rows += [(not_lora, "n.a.", "not measured"), (vs_shira, "n.a.", "not measured")]
    if memory is not None:
        figures = []
        for shape in shapes:
            for t in args.memory_tokens:
                ours, lora = memory[(shape, t, "shira")], memory[(shape, t, "peft_lora")]
                figures.append((f"{shape[0]}x{shape[1]}", t, ours["peak"] - ours["before"],
                                lora["peak"] - lora["before"]))
        rows.append((peak, verdict(all(o <= l for *_, o, l in figures)),
                     "; ".join(f"{s} T={t}: {o:.2f} vs {l:.2f} MiB" for s, t, o, l in figures)))
    else:
        rows.append((peak, "n.a.", "not measured"))
    return rows


def report(results, memory, overhead, args, busy_start, busy_end, monitor, with_peft,
           elapsed) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    shapes = [r["shape"] for r in results]
    peft_version = "not installed"
    if with_peft:
        import peft
        peft_version = peft.__version__
    def counts(table) -> str:
        first, last = table["cpu"].get(DTYPE, (None, None))
        return ("never" if first is None else f"{first}–{last} tokens" if last is not None
                else f"from {first} token{'s' if first > 1 else ''} on")
    threshold = counts(sparse_delta.FOLD_TOKENS)
    train_threshold = counts(sparse_delta.FOLD_TRAINING_TOKENS)
    sections = args.sections
    out = [
        "# ShiraLinear on the CPU: forward, crossover, training step, memory",
        "",
        f"Made by `{sb.command_line()}` on {now}; the run took {elapsed / 60:.1f} min.",
        "",
        "## Machine",
        "",
        f"- CPU: {sb.cpu_model()}; os.cpu_count() = {os.cpu_count()}",
        f"- torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}; "
        f"Python {platform.python_version()}; shira_kernels {shira_kernels.__version__}; "
        f"peft {peft_version}",
        f"- shira_kernels backend used for CPU tensors: {shira_kernels.backends.select('cpu')}",
        f"- other load at the start: {load_note(busy_start)}",
        f"- other load during the run: {monitor.note()}",
        f"- other load at the end: {load_note(busy_end)}",
        "",
        "## Setup",
        "",
        f"One linear layer per shape (out×in: {', '.join(r['label'] for r in results)}), "
        f"{str(DTYPE).removeprefix('torch.')}, "
        f"with bias, random weights. Every adapter has r = {args.r}: ShiraLinear and PEFT ShiRA "
        f"train r·(out+in) entries at random positions (their masks differ: each library draws "
        f"its own), PEFT LoRA is rank {args.r} with lora_alpha {2 * args.r} and no dropout; all "
        f"adapter values are random and non-zero (std {sb.ADAPTER_VALUE_STD}). nn.Linear, the "
        "unfused ShiraLinear and both PEFT layers wrap the same base weight; the fused "
        "ShiraLinear is merged into its own copy. The strategy rows are the same ShiraLinear "
        "with `.strategy` set to fold, spmm, swap or merge; \"auto\" runs fold in forward "
        f"calls without a backward at FOLD_TOKENS['cpu'][{DTYPE}]: {threshold}, in training "
        f"steps at FOLD_TRAINING_TOKENS['cpu'][{DTYPE}]: {train_threshold}, else spmm (swap "
        "from SWAP_FROM_TOKENS). fold runs "
        "this package's own matmul (csrc/cpu/folded_linear.cpp, S added to each panel of W as "
        "it is loaded); every other row, PEFT's included, runs torch's matmul for the dense part. "
        "So where fold is faster than nn.Linear the gain is its matmul's, not the adapter's: "
        "the training rows \"ShiraLinear spmm\" (torch's matmul plus the sparse kernels) show "
        "the adapter's own cost against LoRA's on equal dense ground.",
        "",
        "Forward calls run under torch.no_grad(). A training step sets the gradients to None, "
        "runs the forward, loss = mean(y²) and backward; the base weight and bias are frozen, "
        "the adapter is trainable and the input requires grad (as for a layer inside a "
        "network), nothing is updated. The frozen nn.Linear row has the same loss and only "
        "the input gradient: the floor for anything built on torch's matmul.",
        "",
        "The variants of one configuration are timed in rounds (each round calls every "
        "variant once, in a new random order each time) after one untimed warm-up round: "
        f"at least {args.repeat} rounds, more (at most {args.max_rounds}) until a configuration "
        f"has run about {args.min_time:g} s. Times are medians; the spread is min–max; ratios "
        "are ratios of medians measured side by side in the same rounds.",
        "",
        f"Sections measured: {', '.join(s for s in SECTIONS if s in sections)}.",
        "",
        "## Checks before timing",
        "",
    ]
    for r in results:
        out += [f"- {r['label']}: " + "; ".join(r["checks"])]
    out += [""]
    if "forward" in sections:
        for r in results:
            out += [f"## Forward, {r['label']}", ""] + forward_tables(r["label"], r["forward"]) \
                + [""]
        out += ["## Fused (merged) ShiraLinear against nn.Linear, in pairs", "",
                "The fused layer's forward is the same F.linear call nn.Linear makes, so the "
                "round-robin tables above can only say it is level within their noise (a few "
                "percent between runs), and they run it on another copy of the weight than "
                "nn.Linear's. Here the fused layer and one nn.Linear alone are timed back to "
                "back, the order alternating, and each pair gives one ratio fused / nn.Linear: "
                "a slow spell of the machine slows both halves of a pair. The nn.Linear is "
                "either one holding the fused layer's own weight and bias Parameters (same "
                "memory: in use, merge() writes into the very memory the base layer had) or the "
                "base nn.Linear of the tables above (another copy of the weight; where a weight "
                "lies in memory can move a memory-bound call by a few percent with no code "
                f"involved). At least {args.pairs} pairs each, more (up to {20 * args.pairs}) "
                f"until {args.min_time:g} s have passed. The interval is a distribution-free "
                "~95% confidence interval of the median (order statistics). The fused-forward "
                "target below uses the same-memory medians.", "",
                "| shape | tokens | same memory: median | 95% interval | pairs "
                "| another copy: median | 95% interval | pairs |",
                "|---|---:|---:|---|---:|---:|---|---:|"]
        for r in results:
            for t, pair in r["fused"].items():
                cells = []
                for other in ("same", "base"):
                    med, lo, hi = median_interval(pair[other])
                    cells.append(f"{med:.3f} | {lo:.3f}–{hi:.3f} | {len(pair[other])}")
                out.append(f"| {r['label']} | {t} | " + " | ".join(cells) + " |")
        out += [""]
    if "crossover" in sections:
        points = {r["label"]: crossover_point(r["crossover"]) for r in results}
        overall = None if None in points.values() else max(points.values())
        out += ["## spmm / fold crossover", "",
                "Ratio to nn.Linear at each token count for three unfused strategies (✓: fold "
                f"≤ spmm). Where fold is still slower at {max(args.crossover_tokens)} tokens, "
                f"the count keeps doubling (up to {args.crossover_limit}) for that shape until "
                "it is not.", ""] + crossover_table(results) + [""]
        for r in results:
            p = points[r["label"]]
            out.append(f"- {r['label']}: fold ≤ spmm from {p} tokens on (at every larger "
                       "measured count)" if p is not None else f"- {r['label']}: fold is "
                       f"slower than spmm at {max(r['crossover'])} tokens")
        wins = [t for t in sorted(results[0]["crossover"])
                if all(t in r["crossover"] and r["crossover"][t][FOLD][0]
                       <= r["crossover"][t][SPMM][0] for r in results)]
        out += ["", "fold ≤ spmm on every shape at: "
                + (", ".join(map(str, wins)) if wins else "no measured count") + " tokens",
                "", f"**measured crossover: {overall} tokens**" if overall is not None else
                "**measured crossover: none within the measured token counts**",
                "",
                f"(FOLD_TOKENS['cpu'][{DTYPE}], where auto folds in calls without a "
                f"backward, is {threshold} in this checkout. The crossover is the smallest "
                "measured count from which fold is no slower than spmm on every shape; the "
                "true point lies between it and the count measured before it.)", ""]
        if any(r["train_crossover"] for r in results):
            tpoints = {r["label"]: crossover_point(r["train_crossover"]) for r in results}
            out += ["### A training step with each strategy", "",
                    f"Forward, loss and backward as in the training sections below, at the "
                    f"counts above from {TRAIN_CROSSOVER_FROM} tokens (✓: fold ≤ spmm).", ""] \
                + train_crossover_table(results) + [""]
            for r in results:
                p = tpoints[r["label"]]
                out.append(f"- {r['label']}: fold ≤ spmm from {p} tokens on" if p is not None
                           else f"- {r['label']}: fold is slower than spmm at "
                                f"{max(r['train_crossover'])} tokens")
            toverall = None if None in tpoints.values() else max(tpoints.values())
            out += ["", f"**measured training crossover: {toverall} tokens**"
                    if toverall is not None else
                    "**measured training crossover: none within the measured token counts**",
                    "", f"(FOLD_TRAINING_TOKENS['cpu'][{DTYPE}], where auto folds in calls "
                    f"that record a backward, is {train_threshold} in this checkout.)", ""]
    if "train" in sections:
        for r in results:
            out += [f"## Training step, {r['label']}", ""] \
                + training_table(r["label"], r["train"]) + [""]
    if overhead is not None:
        out += [f"## Per-call overhead ({OVERHEAD_SHAPE[0]}x{OVERHEAD_SHAPE[1]}, 1 token)", "",
                "A forward call on a layer this small is almost all Python and dispatch; the "
                "last column is what each layer adds per call to nn.Linear's, which matters "
                "wherever the matmul itself is short (small models, decoding on a GPU). Each "
                f"sample times {OVERHEAD_CALLS} calls under torch.no_grad(); ShiraLinear has "
                "r = 1 here (128 entries).", ""] + overhead_table(overhead) + [""]
    if memory is not None:
        cal = memory["calibrate"]
        out += [
            "## Peak memory of one training step", "",
            f"Each row is the median of {args.memory_runs} fresh Python subprocesses; each "
            "builds the layer and input, runs one "
            "untimed step, sets the gradients to None, calls gc.collect() and malloc_trim(0), "
            "then measures the next step: the peak resident set size during the step minus the "
            "resident set size just before it. The peak is the kernel's high-water mark "
            "(VmHWM in /proc/self/status), reset to the current RSS just before the step by "
            "writing 5 to /proc/self/clear_refs (where that is not possible, the growth of "
            "getrusage's ru_maxrss). torch's CPU allocator does not cache, so tensor memory "
            "shows up in RSS; calibration: one 256 MiB fp32 tensor, allocated and filled in a "
            f"probe, was measured as {cal['peak'] - cal['before']:.1f} MiB ({cal['how']}). The "
            "step's gradients (kept after it) and every temporary count; the model and input "
            "(in the 'before' column) do not.", ""]
        out += memory_table(memory, shapes, args, with_peft) + [""]
    out += ["## Targets", "", "| target | result | measured |", "|---|---|---|"]
    for name, verdict, figures in targets(results, memory, shapes, args, with_peft):
        out.append(f"| {name} | **{verdict}** | {figures} |")
    out += ["", "This is a shared machine and wall times are noisy from run to run; the ratios, "
            "measured side by side in one run, are what to compare.", ""]
    return "\n".join(out)


SECTIONS = ("forward", "crossover", "train", "overhead", "memory")


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.replace(" ", "").split(",") if t]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"small shapes ({', '.join(f'{m}x{n}' for m, n in QUICK_SHAPES)}) and "
                        "fewer rounds, to try the script")
    p.add_argument("--shapes", default=None, help="comma list of OUTxIN (overrides --quick's)")
    p.add_argument("--r", type=int, default=32)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="the layers' and inputs' dtype (default float32)")
    p.add_argument("--repeat", type=int, default=None,
                   help="least timed rounds per configuration (default 5, --quick 3)")
    p.add_argument("--min-time", type=float, default=None,
                   help="add rounds until a configuration has run this many seconds "
                        "(default 1.5, --quick 0.2)")
    p.add_argument("--max-rounds", type=int, default=40)
    p.add_argument("--pairs", type=int, default=None,
                   help="least timed pairs of the fused/nn.Linear comparison (default 30, "
                        "--quick 10)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma list of what to measure (default all: {','.join(SECTIONS)})")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--crossover-tokens", default=",".join(map(str, CROSSOVER_TOKENS)))
    p.add_argument("--crossover-limit", type=int, default=2048,
                   help="how far the crossover search may double past --crossover-tokens")
    p.add_argument("--memory-tokens", default=",".join(map(str, TRAIN_TOKENS)))
    p.add_argument("--memory-runs", type=int, default=3,
                   help="fresh processes per memory figure, the median kept (default 3)")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "shira_linear_cpu.md"),
                   help="markdown file to write, or - to print only")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    global DTYPE
    DTYPE = DTYPES[args.dtype]
    if args.memory_probe is not None:
        print("PROBE " + json.dumps(memory_probe(json.loads(args.memory_probe))), flush=True)
        return 0
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    else:
        shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    args.sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = args.sections - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    if args.no_memory:
        args.sections.discard("memory")
    args.repeat = args.repeat or (3 if args.quick else 5)
    args.pairs = args.pairs or (10 if args.quick else 30)
    for flag in ("repeat", "pairs", "memory_runs"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    args.min_time = args.min_time if args.min_time is not None else (0.2 if args.quick else 1.5)
    args.forward_tokens, args.train_tokens = FORWARD_TOKENS, TRAIN_TOKENS
    args.crossover_tokens = _int_list(args.crossover_tokens)
    args.memory_tokens = _int_list(args.memory_tokens)
    with_peft = sb.peft_available()
    if not with_peft:
        print("peft is not installed (pip install peft): the PEFT rows are left out", flush=True)

    started = time.perf_counter()
    busy_start = busy_processes()
    print(f"other load: {load_note(busy_start)}", flush=True)
    results = []
    with LoadMonitor() as monitor:
        for shape in shapes:
            t0 = time.perf_counter()
            layers = Layers(shape, args.r, with_peft)
            res = {"shape": shape, "label": layers.label(), "checks": check_layers(layers)}
            print(f"[{layers.label()}] built and checked in {time.perf_counter() - t0:.1f} s: "
                  + "; ".join(res["checks"]), flush=True)
            if "forward" in args.sections:
                res["forward"] = measure_forward(layers, args)
                res["fused"] = measure_fused(layers, args)
            if "crossover" in args.sections:
                res["crossover"] = measure_crossover(layers, args)
                res["train_crossover"] = measure_train_crossover(
                    layers, [t for t in sorted(res["crossover"]) if t >= TRAIN_CROSSOVER_FROM],
                    args)
            if "train" in args.sections:
                res["train"] = measure_training(layers, args)
            results.append(res)
            del layers
            gc.collect()
        overhead = measure_overhead(args, with_peft) if "overhead" in args.sections else None
        memory = measure_memory(shapes, args, with_peft) if "memory" in args.sections else None
    busy_end = busy_processes()
    text = report(results, memory, overhead, args, busy_start, busy_end, monitor, with_peft,
                  time.perf_counter() - started)
    print()
    print(text)
    if "crossover" in args.sections:
        points = [crossover_point(r["crossover"]) for r in results]
        print()
        print("measured crossover: " + (f"{max(points)} tokens" if None not in points
                                        else "none within the measured counts"))
    sb.write_report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
