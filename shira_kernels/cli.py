"""The `shira-kernels` command (also `python -m shira_kernels`).

  shira-kernels info    versions, devices, which backend runs each device and why others don't,
                        and a short scatter-swap timing against a torch indexing loop.
  shira-kernels demo    a short story: two SHiRA adapters trained, switched, fused, saved and
                        reloaded with the AdapterBank (under a minute on a laptop CPU).
  shira-kernels tune    measure, for each layer shape of a Llama-shaped model, which strategy of
                        sparse_delta_linear is fastest on this machine (what "auto" then runs)
                        and which dense matmul a mixed batch's multi_delta_linear runs, keep
                        them in the tuning cache and print the table.
  shira-kernels bench   this package against PEFT ShiRA / LoRA on a Llama-shaped model: adapter
                        switching and drift, forward, training step and memory, 1-bit matmuls;
                        a table, DIR/results.json, DIR/results.md and plots (--quick: minutes).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import torch

from . import __version__, _machine, _native, backends


def _tool_version(command: list[str]) -> str:
    if shutil.which(command[0]) is None:
        return "not found"
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"error: {exc}"
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1].strip() if command[0] == "nvcc" and lines else (lines[0] if lines else "?")


def _versions() -> list[tuple[str, str]]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return [("shira_kernels", __version__), ("python", platform.python_version()),
            ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
            ("triton", triton_version), ("c++", _tool_version([os.environ.get("CXX", "c++"), "--version"])),
            ("nvcc", _tool_version(["nvcc", "--version"]))]


def _devices() -> list[tuple[str, str]]:
    rows = [("cpu", f"{_machine.cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, "
                    f"torch threads {torch.get_num_threads()}")]
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        rows.append((f"cuda:{i}", torch.cuda.get_device_name(i)))
    return rows


def _backend_rows(device_type: str) -> list[tuple[str, str]]:
    rows = []
    for name in backends.BACKENDS:
        reason = backends.unavailable_reason(name, device_type)
        state = "available" if reason is None else f"unavailable: {reason}"
        if name == "cpu" and reason is None:  # what -march=native gave this machine
            mod = _native.module("cpu")
            lanes = mod.vector_lanes()
            state += f" (built for this CPU: {lanes}-lane fp32 vectors, "
            state += "AVX-512" if lanes == 16 else "no AVX-512"
            state += ", AVX512-BF16)" if mod.bf16_dot_products() else ")"
        rows.append((name, state))
    return rows


def _machine_limits() -> list[str]:
    """What bounds are measured against (docs/benchmarks/): memory and matmul rates here."""
    from .harness.benchmark import (copy_bandwidth, matmul_peak, peak_size,
                                     read_bandwidth)

    def rate(per_s: float) -> str:  # a slow rate keeps two digits (not 0.0)
        giga = per_s / 1e9
        return f"{giga:8.1f}" if giga >= 1 else f"{giga:8.2g}"

    lines = ["machine limits (this process, measured now)",
             f"  memory read      {rate(read_bandwidth())} GB/s (sum over 256 MiB)",
             f"  memory copy      {rate(copy_bandwidth())} GB/s (read + write, 256 MiB)"]
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        lines.append(f"  {name:8s} matmul  {rate(matmul_peak(dtype))} GFLOP/s "
                     f"(torch, {peak_size(dtype)}³)")
    return lines


def _swap_timing(hidden: int, intermediate: int) -> list[str]:
    from .harness.benchmark import llama_linear_shapes, make_swap_case, median_time, torch_loop_swap
    from .ops import scatter_swap_

    case = make_swap_case(llama_linear_shapes(hidden, intermediate, blocks=1), r=32)
    lines = [f"scatter-swap, one Llama block: {case.describe()}"]
    loop_s, _ = median_time(lambda: torch_loop_swap(case), repeat=5)
    for name in backends.available("cpu"):
        with backends.use_backend(name):
            op_s, _ = median_time(lambda: scatter_swap_(case.weights, case.indices, case.values),
                                  repeat=5)
        lines.append(f"  scatter_swap_ [{name:9s}] {op_s * 1e3:8.2f} ms   "
                     f"{loop_s / op_s:5.1f}x faster than the torch loop")
    lines.append(f"  torch indexing loop       {loop_s * 1e3:8.2f} ms")
    return lines


def info(args: argparse.Namespace) -> int:
    print("versions")
    for key, value in _versions():
        print(f"  {key:14s} {value}")
    print("devices")
    for key, value in _devices():
        print(f"  {key:14s} {value}")
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device_type in device_types:
        print(f"backends for {device_type} tensors (automatic choice: {backends.select(device_type)})")
        for key, value in _backend_rows(device_type):
            print(f"  {key:14s} {value}")
    if not args.no_timing:
        print("\n".join(_machine_limits()))
        print("\n".join(_swap_timing(args.hidden, args.intermediate)))
    return 0


def bench(args: argparse.Namespace) -> int:
    from .harness import bench_suite

    try:
        cfg = bench_suite.make_config(quick=args.quick, device=args.device,
                                      size=args.size_override, r=args.r, repeat=args.repeat,
                                      drift_switches=args.drift_switches, seed=args.seed,
                                      only=args.only)
    except ValueError as exc:
        print(f"shira-kernels bench: {exc}", file=sys.stderr)
        return 2
    problem = _folder_problem(args.out)
    if problem:  # now, not after the measurements (the files are written last)
        args.parser.error(f"--out {args.out}: {problem}")
    command = "shira-kernels " + " ".join(args.argv)
    try:
        bench_suite.run_bench(cfg, args.out, command=command, progress=not args.no_progress)
    except RuntimeError as exc:
        print(f"shira-kernels bench: {exc}", file=sys.stderr)
        return 1
    return 0


def _folder_problem(path: str) -> str | None:
    """Why ``path`` cannot hold the bench's files, or None. The folder is made (the bench
    makes it anyway) and a temporary file written in it: what would fail once the
    measurements are done fails here instead."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "exists and is not a folder"
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return f"cannot write files there: {exc.strerror or exc}"
    return None


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, "
                                         f"got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    # torch's generators take [-2**63, 2**64) (masks.check_seed), and the commands derive more
    # seeds by adding offsets (a layer's index, a task's number): a signed 64-bit seed leaves
    # them room.
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not -2 ** 63 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"expected an integer in [-2**63, 2**63), got {text!r}")
    return value


def _size_pair(text: str) -> list[int]:
    values = _int_list(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two positive integers H,I (hidden and "
                                         f"intermediate size), got {text!r}")
    return values


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype_list(text: str) -> list[torch.dtype]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in _DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown dtype(s) {bad or text!r}; choose from "
                                         f"{', '.join(_DTYPES)}")
    return [_DTYPES[n] for n in names]


def tune(args: argparse.Namespace) -> int:
    """For each layer shape of a Llama-shaped model (hidden x hidden, intermediate x hidden,
    hidden x intermediate), dtype, token count and training/inference: the strategy
    sparse_delta_linear's "auto" runs on this machine, and the dense matmul a mixed batch's
    multi_delta_linear runs (torch's or the fold kernel's), measured now or read from the
    tuning cache ($SHIRA_KERNELS_CACHE, or $SHIRA_KERNELS_TUNE_CACHE), with each candidate's
    time."""
    from . import tuning
    from .ops import multi_delta as md
    from .ops import sparse_delta as sd

    if args.force:
        os.environ[tuning.MODE_ENV] = "force"
    try:  # the settings up front: each decision would raise on a bad one, mid-table
        tune_mode = tuning.mode()
        tuning.budget_s()
    except ValueError as exc:
        print(f"shira-kernels tune: {exc}", file=sys.stderr)
        return 2
    if tune_mode == "off":
        print(f"shira-kernels tune: {tuning.MODE_ENV}=off: nothing is measured", file=sys.stderr)
        return 2
    hidden, intermediate = args.size
    shapes = sorted({(hidden, hidden), (intermediate, hidden), (hidden, intermediate)})
    r = args.r if args.r is not None else max(1, hidden // 128)
    modes = {"both": (False, True), "inference": (False,), "training": (True,)}[args.mode]
    device = torch.device(args.device)
    print(f"tuning sparse_delta_linear's strategy on {tuning.fingerprint()['cpu']} "
          f"({tuning.arch_class(device.type)}, {torch.get_num_threads()} threads), "
          f"r={r} (nnz = r·(out+in)), cache {tuning.cache_file()}")
    print(f"  {'layer':>11s} {'dtype':8s} {'tokens':>6s} {'mode':9s} {'choice':6s} "
          f"{'ms per candidate':34s} {'mixed base (ms)':32s} tuning s  measured")
    total = 0.0
    for shape in shapes:
        for dtype in args.dtype:
            for tokens in args.tokens:
                for training in modes:
                    nnz = r * (shape[0] + shape[1])
                    choice = sd.auto_strategy(device, dtype, tokens, training, shape, nnz)
                    entry = sd.strategy_entry(device, dtype, tokens, training, shape, nnz) or {}
                    ms = "  ".join(f"{k} {v:.3g}" for k, v in entry.get("ms", {}).items())
                    base = md.base_choice(device, dtype, tokens, training, training, shape)
                    b_entry = md.base_entry(device, dtype, tokens, training, training,
                                            shape) or {}
                    b_ms = ", ".join(f"{k} {v:.3g}" for k, v in b_entry.get("ms", {}).items())
                    base_text = f"{base} ({b_ms})" if b_ms else base
                    measured = entry.get("source") == "measured"
                    spent = sum(e.get("tuning_s", 0.0) for e in (entry, b_entry)
                                if e.get("source") == "measured")
                    total += spent
                    print(f"  {shape[0]:>5d}x{shape[1]:<5d} {str(dtype)[6:]:8s} {tokens:6d} "
                          f"{'training' if training else 'inference':9s} {choice:6s} "
                          f"{ms:34s} {base_text:32s} {spent:7.2f}  "
                          f"{entry.get('how', '') if measured else 'read from the cache'}")
    print(f"tuning took {total:.1f} s in all (decisions found in the cache cost nothing)")
    return 0


def demo(args: argparse.Namespace) -> int:
    from .harness import demo as story

    return story.run(steps=args.steps, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shira-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, devices, backends and a short timing")
    p_info.add_argument("--no-timing", action="store_true", help="skip the timings (machine limits, scatter-swap)")
    p_info.add_argument("--hidden", type=_positive_int, default=2048, help="hidden size of the timed block")
    p_info.add_argument("--intermediate", type=_positive_int, default=5504,
                        help="MLP size of the timed block")
    p_info.set_defaults(run=info)

    p_demo = sub.add_parser("demo", help="train, switch, fuse, save and reload two adapters")
    p_demo.add_argument("--steps", type=_positive_int, default=40, help="training steps per adapter")
    p_demo.add_argument("--seed", type=_seed, default=0)
    p_demo.set_defaults(run=demo)

    p_tune = sub.add_parser("tune", description=tune.__doc__,
                            help="measure the fastest strategy per layer shape here and cache it")
    p_tune.add_argument("--size", type=_size_pair, default=[4096, 11008], metavar="H,I",
                        help="hidden and intermediate size (default 4096,11008: Llama-7B)")
    p_tune.add_argument("--r", type=_positive_int, default=None,
                        help="adapter budget r: nnz = r·(out+in) (default hidden/128)")
    p_tune.add_argument("--dtype", type=_dtype_list, default=[torch.float32, torch.bfloat16],
                        metavar="D,...", help="fp32, bf16, fp16 (default fp32,bf16)")
    p_tune.add_argument("--tokens", type=_int_list, default=[1, 128, 2048], metavar="T,...",
                        help="token counts (default 1,128,2048)")
    p_tune.add_argument("--mode", choices=("both", "inference", "training"), default="both")
    p_tune.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p_tune.add_argument("--force", action="store_true",
                        help="measure again, replacing the cached decisions")
    p_tune.set_defaults(run=tune)

    p_bench = sub.add_parser(
        "bench", help="measure against PEFT ShiRA/LoRA; table, results.json/.md, plots",
        description="Switch time and drift, forward latency, training step time and memory, "
                    "1-bit matmuls, measured side by side. Without peft the PEFT comparisons "
                    "are skipped and without matplotlib the plots (pip install "
                    "'shira-kernels[bench]' installs both).")
    p_bench.add_argument("--quick", action="store_true",
                         help="a smaller model and fewer rounds (a few minutes on 2 CPU cores)")
    p_bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p_bench.add_argument("--out", default="results", metavar="DIR",
                         help="where results.json, results.md and the plots go (default: results)")
    p_bench.add_argument("--size-override", default=None, metavar="H,I,B",
                         help="hidden, intermediate and number of blocks of the model, e.g. "
                              "64,160,2 (also $SHIRA_KERNELS_BENCH_SIZE)")
    p_bench.add_argument("--r", type=_positive_int, default=None,
                         help="adapter budget r (default hidden/128, at least 1)")
    p_bench.add_argument("--repeat", type=_positive_int, default=None,
                         help="the least timed rounds per configuration (default 5 with --quick, "
                              "else 9); more follow until the median's 95%% interval is within "
                              "±5%% or the time cap is reached")
    p_bench.add_argument("--drift-switches", type=int, default=1000,
                         help="switches before the drift of the base weights is measured")
    p_bench.add_argument("--seed", type=_seed, default=0)
    p_bench.add_argument("--only", default=None, metavar="GROUPS",
                         help="measure only these, comma-separated: forward (with the training "
                              "step), switch, drift, binary, memory (default: all)")
    p_bench.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    p_bench.set_defaults(run=bench, parser=p_bench)
    args = parser.parse_args(argv)
    if getattr(args, "device", None) == "cuda" and not torch.cuda.is_available():
        # a usage error here, not a traceback from the first CUDA call
        sub.choices[args.command].error("--device cuda: no CUDA device is available here")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
