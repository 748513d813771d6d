"""The `shira-kernels` command (also `python -m shira_kernels`).

  shira-kernels info    versions, devices, which backend runs each device and why others don't,
                        and a short scatter-swap timing against a torch indexing loop.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys

import torch

from . import __version__, backends


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
        rows.append((name, "available" if reason is None else f"unavailable: {reason}"))
    return rows


def _swap_timing(hidden: int, intermediate: int) -> list[str]:
    from .benchmark import llama_linear_shapes, make_swap_case, median_time, torch_loop_swap
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
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
