"""The Python each call spends around its kernel: ShiraLinear's forward and binary_lora.

    python bench/bench_python_overhead.py [--calls 20000] [--vit-rounds 1500]

1. Stubbed kernels: the CPU kernels a call reaches (folded_linear, spmm, binary_lora) are
   replaced in the registry by functions that return a ready tensor, so what is timed is the
   package's Python alone (checks, the strategy's memo, the eager autograd wrapper, the weight
   lock, the registry lookup): ShiraLinear 256x256 at 1 token under no_grad and with x
   requiring grad, binary_lora at ViT-B shapes at 1 token; medians of --calls warm calls,
   round robin, with an empty call as the floor. Run with SHIRA_KERNELS_TUNE=off (set here if
   unset) so no decision is measured with the stubs.
2. Real kernels, binary_lora at ViT-B shapes (768, r = 32, ReLU), 197 bf16 tokens, its
   dequantize strategy: the public function, the native call it ends in (both weights
   dequantized, then torch's matmuls) called directly, and the dense bf16 adapter (two torch
   matmuls on the dequantized weights); medians of --vit-rounds round-robin rounds. The first
   two's difference is the Python a call costs where a matmul has just run.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("shira_kernels") is None:  # run from a source checkout
    sys.path.insert(0, str(REPO))
os.environ.setdefault("SHIRA_KERNELS_TUNE", "off")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import shira_kernels  # noqa: E402
from shira_kernels import BinaryWeight, _native  # noqa: E402
from shira_kernels.nn import ShiraLinear  # noqa: E402
from shira_kernels.ops import registry  # noqa: E402


def round_robin(calls: dict, rounds: int) -> dict:
    for f in calls.values():
        f()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, f in calls.items():
            t = time.perf_counter_ns()
            f()
            times[name].append(time.perf_counter_ns() - t)
    return {name: statistics.median(ts) / 1e3 for name, ts in times.items()}


def no_grad(f):
    def run():
        with torch.no_grad():
            f()
    return run


def stubbed(calls: int) -> dict:
    torch.manual_seed(0)
    layer = ShiraLinear.from_linear(torch.nn.Linear(256, 256), r=4, mask="rand")
    x, x_grad = torch.randn(1, 256), torch.randn(1, 256, requires_grad=True)
    down = BinaryWeight.from_signs(torch.rand(32, 768) < 0.5, 0.1, 0.01)
    up = BinaryWeight.from_signs(torch.rand(768, 32) < 0.5, 0.2, 0.0)
    xb = torch.randn(1, 768)
    y, yb = torch.zeros(1, 256), torch.zeros(1, 768)
    before = {op: registry.lookup(op, "cpu") for op in ("folded_linear", "spmm", "binary_lora")}
    for op in ("folded_linear", "spmm"):
        registry.register(op, "cpu", lambda *a, **k: y)
    registry.register("binary_lora", "cpu", lambda *a, **k: yb)
    try:
        return round_robin({
            "empty call (no_grad)": no_grad(lambda: None),
            "ShiraLinear forward, no_grad": no_grad(lambda: layer(x)),
            "ShiraLinear forward, x requires grad": lambda: layer(x_grad),
            "binary_lora, no_grad": no_grad(lambda: shira_kernels.binary_lora(xb, down, up, 1.0,
                                                                             "relu")),
        }, calls)
    finally:
        for op, fn in before.items():
            registry.register(op, "cpu", fn)


def vit_binary_lora(rounds: int) -> dict:
    mod = _native.module("cpu")
    torch.manual_seed(0)
    r, d = 32, 768
    down = BinaryWeight.from_signs(torch.rand(r, d) < 0.5, 0.1, 0.01)
    up = BinaryWeight.from_signs(torch.rand(d, r) < 0.5, 0.2, 0.0)
    x = torch.randn(197, d, dtype=torch.bfloat16)
    wd, wu = down.dequantize().to(torch.bfloat16), up.dequantize().to(torch.bfloat16)
    return round_robin({
        "dense bf16 adapter (2 matmuls)": no_grad(lambda: F.linear(F.relu(F.linear(x, wd)), wu)),
        "native call (dequantize strategy)": no_grad(lambda: mod.binary_lora_dequantized(
            x, down.packed, down.alpha, down.mu, d, up.packed, up.alpha, up.mu, r, 1.0, True)),
        "binary_lora, dequantize strategy": no_grad(lambda: shira_kernels.binary_lora(
            x, down, up, 1.0, "relu", strategy="dequantize")),
    }, rounds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--vit-rounds", type=int, default=1500)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"SHIRA_KERNELS_TUNE={os.environ['SHIRA_KERNELS_TUNE']}")
    print("Python only (kernels stubbed), µs per call:")
    for name, us in stubbed(args.calls).items():
        print(f"  {name}: {us:.2f}")
    print("binary_lora at ViT-B shapes, 197 bf16 tokens, µs per call:")
    res = vit_binary_lora(args.vit_rounds)
    dense = res["dense bf16 adapter (2 matmuls)"]
    for name, us in res.items():
        print(f"  {name}: {us:.1f} ({us / dense:.2f}x the dense bf16 adapter)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
