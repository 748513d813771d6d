"""The `shira-kernels` command (also `python -m shira_kernels`).

  shira-kernels info    versions, devices, which backend runs each device and why others don't,
                        and a short scatter-swap timing against a torch indexing loop.
  shira-kernels demo    a short story: two SHiRA adapters trained, switched, fused, saved and
                        reloaded with the AdapterBank (under a minute on a laptop CPU).
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

import torch

from . import __version__, _native, backends


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
    rows = [("cpu", f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
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
            lanes = _native.module("cpu").vector_lanes()
            state += f" (built for this CPU: {lanes}-lane fp32 vectors, "
            state += "AVX-512)" if lanes == 16 else "no AVX-512)"
        rows.append((name, state))
    return rows


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
    command = "shira-kernels " + " ".join(args.argv)
    try:
        bench_suite.run_bench(cfg, args.out, command=command, progress=not args.no_progress)
    except RuntimeError as exc:
        print(f"shira-kernels bench: {exc}", file=sys.stderr)
        return 1
    return 0


def demo(args: argparse.Namespace) -> int:
    from .harness import demo as story

    return story.run(steps=args.steps, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shira-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, devices, backends and a short timing")
    p_info.add_argument("--no-timing", action="store_true", help="skip the scatter-swap timing")
    p_info.add_argument("--hidden", type=int, default=2048, help="hidden size of the timed block")
    p_info.add_argument("--intermediate", type=int, default=5504,
                        help="MLP size of the timed block")
    p_info.set_defaults(run=info)

    p_demo = sub.add_parser("demo", help="train, switch, fuse, save and reload two adapters")
    p_demo.add_argument("--steps", type=int, default=40, help="training steps per adapter")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(run=demo)

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
    p_bench.add_argument("--r", type=int, default=None,
                         help="adapter budget r (default hidden/128, at least 1)")
    p_bench.add_argument("--repeat", type=int, default=None,
                         help="timed rounds per configuration (default 5 with --quick, else 9)")
    p_bench.add_argument("--drift-switches", type=int, default=1000,
                         help="switches before the drift of the base weights is measured")
    p_bench.add_argument("--seed", type=int, default=0)
    p_bench.add_argument("--only", default=None, metavar="GROUPS",
                         help="measure only these, comma-separated: forward (with the training "
                              "step), switch, drift, binary, memory (default: all)")
    p_bench.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    p_bench.set_defaults(run=bench)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
