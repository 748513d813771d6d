"""Time SHiRA on quantized bases: this package's QuantizedShiraLinear against PEFT's SHiRA layer
on the same quantized layer, in one run, on the CPU.

    python bench/report_quantized.py [--shapes 4096x4096,11008x4096] [--tokens 128] [--r 32]
        [--kinds bnb-int8,bnb-nf4,torchao-int8,torchao-int4] [--dtypes fp32,bf16]
        [--cap-s 20] [--out docs/benchmarks/quantized_cpu.md]
    python bench/report_quantized.py --quick        # a toy shape, one short round: checks it runs

Shapes are out x in. Per quantized kind (bitsandbytes int8 / nf4, torchao int8 weight-only,
torchao int4 weight-only as IntxWeightOnlyConfig: the int4 layout torchao runs on a CPU), input
dtype and shape, one base layer is quantized from a random float layer and adapted twice with
the same mask (PEFT's random mask, r·(out+in) entries) and the same random values:
  - this package: ShiraLinear.from_linear(base, mask=...) → QuantizedShiraLinear: the base's own
    quantized forward plus spmm (backward: spmm_t and sddmm in one pass);
  - PEFT SHiRA: peft.tuners.shira.Linear on the same base (what get_peft_model builds), whose
    forward dequantizes the weight, adds the adapter as a dense m×n tensor and runs F.linear;
  - the quantized base alone (what the adapter costs on top of it).
Timed: the forward without autograd, and a training step (forward, loss = mean square, backward
to the adapter's values and to x), round robin until each median's ~95% interval is within ±5%
or --cap-s seconds pass; plus the peak resident memory of one training step. Before timing, the
two adapted layers' outputs are compared (their relative difference is printed: they differ by
the base's quantized kernel against PEFT's dequantized matmul, not by the adapter).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import statistics
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("shira_kernels") is None:  # run from a source checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from shira_kernels.harness import benchmark as sb  # noqa: E402
from shira_kernels.nn import ShiraLinear  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PACKAGE = {"bnb-int8": "bitsandbytes", "bnb-nf4": "bitsandbytes", "torchao-int8": "torchao",
           "torchao-int4": "torchao"}


def _torchao_config(kind):
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    if kind == "torchao-int8":
        return Int8WeightOnlyConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))


def quantized_base(kind: str, out_f: int, in_f: int, dtype: torch.dtype, seed: int) -> nn.Module:
    """A quantized linear of ``kind`` made from a random float linear of ``dtype``."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=False).to(dtype)
    if kind.startswith("torchao"):
        from torchao.quantization import quantize_
        quantize_(linear, _torchao_config(kind))
        return linear
    import bitsandbytes as bnb
    if kind == "bnb-int8":
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False,
                                         has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False,
                                         quant_type="nf4")
    return layer.to("cpu")  # bitsandbytes quantizes on the move to the device


class _Holder(nn.Module):
    """One quantized layer called ``proj`` for get_peft_model; for torchao it carries what
    PEFT reads from a transformers model (hf_quantizer's config) to requantize on merge."""

    def __init__(self, layer: nn.Module, kind: str):
        super().__init__()
        self.proj = layer
        if kind.startswith("torchao"):
            self.hf_quantizer = types.SimpleNamespace(quantization_config=types.SimpleNamespace(
                get_apply_tensor_subclass=lambda: _torchao_config(kind)))

    def forward(self, x):
        return self.proj(x)


def adapted_pair(kind: str, out_f: int, in_f: int, dtype: torch.dtype, r: int, seed: int = 0):
    """(the base, PEFT's SHiRA layer on it, this package's layer on it), same mask and values."""
    import peft
    base = quantized_base(kind, out_f, in_f, dtype, seed)
    config = peft.ShiraConfig(r=r, target_modules=["proj"], random_seed=seed)
    peft_layer = peft.get_peft_model(_Holder(base, kind), config).get_submodule(
        "base_model.model.proj")
    if peft_layer.get_base_layer() is not base:
        raise RuntimeError("PEFT did not wrap the quantized layer as expected")
    rows, cols = peft_layer.shira_indices["default"].long()
    values = torch.randn(rows.numel(), generator=torch.Generator().manual_seed(seed + 1)) * 0.01
    with torch.no_grad():
        peft_layer.shira_weight["default"].copy_(values)
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    mask[rows, cols] = True
    ours = ShiraLinear.from_linear(base, mask=mask)
    flat = rows * in_f + cols  # ours holds the entries in sorted flat order
    with torch.no_grad():
        ours.shira_values.copy_(values[torch.argsort(flat)].to(ours.shira_values.dtype))
    return base, peft_layer, ours


def step_of(layer: nn.Module, x: torch.Tensor):
    return sb.training_step(layer, x)


def forward_of(layer: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            layer(x)
    return run


def measure(kind, out_f, in_f, dtype, tokens, r, cap_s, least):
    base, peft_layer, ours = adapted_pair(kind, out_f, in_f, dtype, r)
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(3)).to(dtype)
    layers = {"this package": ours, "PEFT SHiRA": peft_layer, "quantized base alone": base}
    with torch.no_grad():
        a = ours(x).double()
        try:
            b = peft_layer(x).double()
            rel, failed = float((a - b).norm() / b.norm()), None
        except RuntimeError as e:  # PEFT's layer cannot run this case: reported, not timed
            rel, failed = None, f"{type(e).__name__}: {str(e).splitlines()[0]}"
            del layers["PEFT SHiRA"]
    xg = x.clone().requires_grad_()
    forward = sb.round_robin_until_tight({n: forward_of(m, x) for n, m in layers.items()},
                                         least=least, cap_s=cap_s)
    # The base alone has no trainable parameter: its step is the gradient of x only.
    training = sb.round_robin_until_tight({n: step_of(m, xg) for n, m in layers.items()},
                                          least=least, cap_s=cap_s)
    peaks = {}
    for name, layer in layers.items():
        step = step_of(layer, xg)
        step()
        mem = sb.rss_peak_during(step)
        peaks[name] = mem["peak"] - mem["before"]
    return ({n: statistics.median(t) for n, t in forward.items()},
            {n: statistics.median(t) for n, t in training.items()}, peaks, rel, failed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,11008x4096", help="out x in, commas")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--kinds", default=",".join(PACKAGE))
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--cap-s", type=float, default=20.0,
                        help="seconds of timed rounds per measurement at most")
    parser.add_argument("--least", type=int, default=5, help="rounds at least")
    parser.add_argument("--quick", action="store_true",
                        help="a toy shape (96x64, 8 tokens, r 2), 2 rounds: checks the script runs")
    parser.add_argument("--out", default=None,
                        help="'-' only prints (default: docs/benchmarks/quantized_cpu.md; "
                        "with --quick, '-')")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.tokens, args.r, args.cap_s, args.least = "96x64", 8, 2, 0.0, 2
    out = args.out or ("-" if args.quick else "docs/benchmarks/quantized_cpu.md")
    if importlib.util.find_spec("peft") is None:
        print("peft is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return 2
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    for k in kinds:
        if k not in PACKAGE:
            parser.error(f"unknown kind {k!r}; one of {', '.join(PACKAGE)}")
    missing = sorted({PACKAGE[k] for k in kinds if importlib.util.find_spec(PACKAGE[k]) is None})
    kinds = [k for k in kinds if PACKAGE[k] not in missing]
    started = dt.datetime.now(dt.timezone.utc)
    lines = ["# SHiRA on quantized bases (CPU)", "",
             f"Made by `{sb.command_line()}` on {started:%Y-%m-%d %H:%M} UTC.", "",
             f"- CPU: {sb.cpu_model()}; os.cpu_count() = {os.cpu_count()}; torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads; "
             + "; ".join(f"{p} {_version(p)}" for p in ("bitsandbytes", "torchao", "peft")),
             f"- {args.tokens} tokens, r = {args.r} (r·(out+in) entries, PEFT's random mask, "
             "the same for both), no bias. Medians of rounds timed round robin. ×: the row's "
             "time over this package's (PEFT SHiRA's × is this package's speed-up). Peak: "
             "resident memory growth during one training step.",
             "- this package: QuantizedShiraLinear (base forward + spmm; backward spmm_t + "
             "sddmm); PEFT SHiRA: dequantize, add the dense delta, F.linear.", ""]
    if missing:
        lines += [f"Not measured: {', '.join(missing)} not installed.", ""]
    for label in args.dtypes.split(","):
        dtype = DTYPES[label]
        for out_f, in_f in shapes:
            lines += [f"## {label}, {out_f}x{in_f}", "",
                      "| base | layer | forward ms | × | training step ms | × | peak MiB |",
                      "|---|---|---:|---:|---:|---:|---:|"]
            for kind in kinds:
                print(f"{label} {out_f}x{in_f} {kind}", file=sys.stderr, flush=True)
                fwd, train, peaks, rel, failed = measure(kind, out_f, in_f, dtype, args.tokens,
                                                         args.r, args.cap_s, args.least)
                ours_f, ours_t = fwd["this package"], train["this package"]
                for name in fwd:
                    lines.append(f"| {kind} | {name} | {fwd[name] * 1e3:.2f} | "
                                 f"{fwd[name] / ours_f:.2f} | {train[name] * 1e3:.2f} | "
                                 f"{train[name] / ours_t:.2f} | {peaks[name]:.0f} |")
                if failed:
                    lines.append(f"| {kind} | PEFT SHiRA fails: {failed} | | | | | |")
                else:
                    lines.append(f"| {kind} | (outputs: this package vs PEFT, relative "
                                 f"difference {rel:.1e}) | | | | | |")
            lines.append("")
    sb.publish_report(lines, out)
    return 0


def _version(package: str) -> str:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # not installed
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
