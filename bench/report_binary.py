"""Time the 1-bit ops on the CPU against dense matmuls, in one run.

    python bench/report_binary.py [--quick] [--shapes 4096x4096,...] [--tokens 1,16,...]
                                  [--out docs/benchmarks/binary_cpu.md]

binary_linear is compared, on the same inputs, with a dense fp32 and a dense bf16 matmul of the
dequantized weight, and with unpack-then-matmul (dequantize() then a matmul, per call); its
strategies "lut" (the default row, fp32 x) and "dequantize" in fp32 and with bf16 x (against the
dense bf16 matmul: the same inputs and output dtype), at 1, 8,
16, 128 and 2048 tokens on 768x768, 4096x4096 and 11008x4096 (out x in); its gradient of x with
gy·W on the dequantized weight (given, and dequantized per call). binary_lora is compared
with the dense fp32 adapter (two matmuls), and with bf16 x (its strategies and "auto") with the
dense bf16 adapter on weights dequantized beforehand, at ViT-B shapes (in = out = 768, r = 32, ReLU between)
at 1 and 197 tokens, and on a Llama-7B MLP projection (in 4096, out 11008, r = 32, no
activation, as Bi-LoRA) at 1, 16 and 128 tokens.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("shira_kernels") is None:  # run from a source checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import shira_kernels  # noqa: E402
from shira_kernels.ops.registry import lookup as kernel  # noqa: E402
from shira_kernels.harness import benchmark as sb  # noqa: E402
from shira_kernels.formats import BinaryWeight  # noqa: E402


COLD_MAX_TOKENS = 16  # up to here each call meets its weight in memory, as a model's layer does
COLD_BYTES = 256 * 2**20  # the copies of a weight cycled through: far above the caches here


def _timed(variants: dict, repeat: int, consecutive: bool = False) -> dict:
    """{name: (median s, times s)}: one warm-up round, then ``repeat`` rounds of the variants
    in a new random order each (sb.round_robin_until_tight), so that a slow spell of the
    machine, or a predecessor's traffic, falls on every variant alike; or, ``consecutive``,
    each variant's calls one after another (after one warm-up call), as a model's layers of
    one kind run in turn: below a millisecond a call's time depends on what ran just before
    it (what that left in the caches, whether the threads had gone idle), which rounds of
    unlike variants would mix into every figure."""
    with torch.no_grad():
        if consecutive:
            return {name: sb.median_time(fn, warmup=1, repeat=repeat)
                    for name, fn in variants.items()}
        times = sb.round_robin_until_tight(variants, least=repeat, cap_s=0.0)
    return {name: (statistics.median(ts), ts) for name, ts in times.items()}


def _copies(make, nbytes: int, cold: bool) -> list:
    """[make(i)] for as many i as make the copies together exceed COLD_BYTES where cold (each
    call then reads a weight no earlier call left in the caches, while code and activations
    stay warm, as in a model whose layers run in turn), else one."""
    return [make(i) for i in range(-(-COLD_BYTES // nbytes) if cold else 1)]


def _cycling(fn, items, start=0):
    """A call of fn on the next of items each time, from items[start]."""
    state = {"i": start}

    def call():
        state["i"] = (state["i"] + 1) % len(items)
        return fn(items[state["i"]])
    return call


def bound_line(shape, tokens, median, limits) -> str:
    """binary_linear's time against its two bounds: the packed signs read once at the measured
    memory rate, and 2·T·out·in flops at the faster of torch's measured fp32 and bf16 matmul
    rates (where the CPU has no bf16 instructions, torch's bf16 matmul crawls: a bound at its
    rate would bound nothing)."""
    out_f, in_f = shape
    sign_bytes = out_f * -(-in_f // 32) * 4
    memory_s = sign_bytes / limits["read"]
    rate_dtype = max(("fp32", "bf16"), key=lambda d: limits[d])
    flop_s = 2 * tokens * out_f * in_f / limits[rate_dtype]
    return (f"Bounds: the signs ({sign_bytes / 2**20:.2f} MiB) at {limits['read'] / 1e9:.1f} GB/s "
            f"take {memory_s * 1e3:.3f} ms; {2 * tokens * out_f * in_f / 1e9:.2f} GFLOP at "
            f"{limits[rate_dtype] / 1e9:.0f} GFLOP/s ({rate_dtype}) take {flop_s * 1e3:.3f} ms. "
            f"binary_linear takes {median / max(memory_s, flop_s):.1f}x the larger "
            f"({sign_bytes / median / 1e9:.1f} GB/s of signs).")


def linear_rows(shape, tokens, repeat, cold_max_tokens=COLD_MAX_TOKENS):
    out_f, in_f = shape
    g = torch.Generator().manual_seed(0)
    bw = BinaryWeight.from_float(torch.randn(out_f, in_f, generator=g))
    x = torch.randn(tokens, in_f, generator=g)
    x16 = x.to(torch.bfloat16)
    cold = tokens <= cold_max_tokens

    def signs_like(i):  # another weight of the same kind (random signs, bw's α and μ)
        packed = bw.packed if i == 0 else torch.randint_like(bw.packed, -2**31, 2**31 - 1)
        return BinaryWeight(packed, bw.alpha, bw.mu, in_f)
    binary = _copies(signs_like, bw.packed.numel() * 4, cold)
    w32 = _copies(lambda i: binary[i % len(binary)].dequantize(), out_f * in_f * 4, cold)
    w16 = _copies(lambda i: w32[i % len(w32)].to(torch.bfloat16), out_f * in_f * 2, cold)
    for b in binary:  # the kernel's sign panels, made once per weight as in use
        shira_kernels.binary_linear(x[:1], b)
    on_signs = {  # the variants that read the packed signs: each starts its cycle elsewhere,
        # so that no variant meets the copy another has just read in the same round
        "binary_linear (this package)": lambda b: shira_kernels.binary_linear(x, b),
        "unpack then fp32 matmul": lambda b: x @ b.dequantize().T,
        "binary_linear, lut strategy": lambda b: shira_kernels.binary_linear(x, b, strategy="lut"),
        "binary_linear, dequantize strategy":
            lambda b: shira_kernels.binary_linear(x, b, strategy="dequantize"),
        "binary_linear bf16 x (auto)": lambda b: shira_kernels.binary_linear(x16, b),
        "binary_linear bf16 x, lut strategy":
            lambda b: shira_kernels.binary_linear(x16, b, strategy="lut"),
        "binary_linear bf16 x, dequantize strategy":
            lambda b: shira_kernels.binary_linear(x16, b, strategy="dequantize"),
    }
    variants = {name: _cycling(fn, binary, k * len(binary) // len(on_signs))
                for k, (name, fn) in enumerate(on_signs.items())}
    variants["dense fp32 matmul"] = _cycling(lambda w: x @ w.T, w32)
    variants["dense bf16 matmul"] = _cycling(lambda w: x16 @ w.T, w16)
    first = ["binary_linear (this package)", "dense fp32 matmul", "dense bf16 matmul"]
    variants = {name: variants[name] for name in first + [n for n in variants if n not in first]}
    return _timed(variants, repeat, consecutive=cold)


def grad_x_rows(shape, tokens, repeat):
    out_f, in_f = shape
    g = torch.Generator().manual_seed(3)
    bw = BinaryWeight.from_float(torch.randn(out_f, in_f, generator=g))
    w32 = bw.dequantize()
    gy = torch.randn(tokens, out_f, generator=g)
    grad_x = kernel("binary_linear_grad_x", "cpu")
    variants = {
        "binary_linear's gradient of x (this package)":
            lambda: grad_x(gy, bw.packed, bw.alpha, bw.mu, in_f),
        "dense fp32 matmul gy·W": lambda: gy @ w32,
        "dequantize then fp32 matmul": lambda: gy @ bw.dequantize(),
    }
    return _timed(variants, repeat)


def lora_rows(tokens, repeat, in_f=768, out_f=768, rank=32, activation="relu"):
    g = torch.Generator().manual_seed(2)
    down = BinaryWeight.from_float(torch.randn(rank, in_f, generator=g))
    up = BinaryWeight.from_float(torch.randn(out_f, rank, generator=g))
    d32, u32 = down.dequantize(), up.dequantize()
    act = torch.relu if activation == "relu" else (lambda h: h)
    x = torch.randn(tokens, in_f, generator=g)
    x16, d16, u16 = x.to(torch.bfloat16), d32.to(torch.bfloat16), u32.to(torch.bfloat16)
    variants = {
        "binary_lora (this package)": lambda: shira_kernels.binary_lora(x, down, up, 0.1, activation),
        "dense fp32 adapter (2 matmuls)": lambda: 0.1 * F.linear(act(F.linear(x, d32)), u32),
        "dense bf16 adapter (2 matmuls)": lambda: 0.1 * F.linear(act(F.linear(x16, d16)), u16),
        "binary_lora bf16 x (auto)": lambda: shira_kernels.binary_lora(x16, down, up, 0.1,
                                                                       activation),
        "binary_lora bf16 x, lut strategy": lambda: shira_kernels.binary_lora(
            x16, down, up, 0.1, activation, strategy="lut"),
        "binary_lora bf16 x, dequantize strategy": lambda: shira_kernels.binary_lora(
            x16, down, up, 0.1, activation, strategy="dequantize"),
    }
    return _timed(variants, repeat)


def fmt_table(rows: dict, reference: str) -> list[str]:
    ref = rows[reference][0]
    out = ["| variant | median ms | spread ms | × " + reference + " |", "|---|---:|---:|---:|"]
    for name, (median, times) in rows.items():
        out.append(f"| {name} | {median * 1e3:.3f} | {min(times) * 1e3:.3f}–{max(times) * 1e3:.3f} "
                   f"| {median / ref:.2f} |")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--shapes", default=None, metavar="OUTxIN,...",
                        help="binary_linear's shapes (default 768x768,4096x4096,11008x4096)")
    parser.add_argument("--tokens", default=None, metavar="T,...",
                        help="binary_linear's token counts (default 1,8,16,128,2048; where "
                             "torch's bf16 matmul crawls, 2048 tokens of 11008x4096 take "
                             "minutes a call)")
    parser.add_argument("--out", default="docs/benchmarks/binary_cpu.md", help="'-' only prints")
    args = parser.parse_args(argv)
    shapes = [(96, 96), (256, 512)] if args.quick else [(768, 768), (4096, 4096), (11008, 4096)]
    token_counts = [1, 8] if args.quick else [1, 8, 16, 128, 2048]
    try:
        if args.shapes:
            shapes = [tuple(int(v) for v in s.split("x", 1)) for s in args.shapes.split(",")]
        if args.tokens:
            token_counts = [int(t) for t in args.tokens.split(",")]
        valid = (all(len(shape) == 2 and min(shape) >= 1 for shape in shapes)
                 and all(t >= 1 for t in token_counts))
    except ValueError:
        valid = False
    if not valid:
        parser.error(f"--shapes {args.shapes!r} / --tokens {args.tokens!r}: expected "
                     "OUTxIN,... and T,... (positive ints)")
    limits = {"read": sb.read_bandwidth(), "bf16": sb.matmul_peak(torch.bfloat16),
              "fp32": sb.matmul_peak(torch.float32)}
    started = dt.datetime.now(dt.timezone.utc)
    lines = ["# 1-bit ops on the CPU", "",
             f"Made by `{sb.command_line()}` on {started:%Y-%m-%d %H:%M} UTC.", "",
             f"- CPU: {sb.cpu_model()}; os.cpu_count() = {os.cpu_count()}; torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads; backend for CPU tensors: "
             f"{shira_kernels.backends.select('cpu')}",
             "- binary_linear (this package) and its bf16 row run strategy \"auto\": the faster of "
             "\"lut\" (the CPU kernel sums by table lookup, csrc/cpu/binary.cpp, the weight never "
             "formed) and \"dequantize\" (a block of rows of the weight at a time in x's dtype, "
             "handed to torch's matmul) as measured on this machine for the shape, dtype and "
             f"token class (tuning mode {shira_kernels.tuning.mode()!r}); the strategy rows force "
             "one. bf16 rows take x in bf16 (the dense bf16 matmul's inputs).",
             f"- Measured here in this run: memory read {limits['read'] / 1e9:.1f} GB/s (a sum over "
             f"256 MiB), torch's bf16 matmul {limits['bf16'] / 1e9:.1f} GFLOP/s "
             f"({sb.peak_size(torch.bfloat16)}³), fp32 {limits['fp32'] / 1e9:.1f} GFLOP/s "
             f"({sb.peak_size(torch.float32)}³); each binary_linear table ends with its bounds "
             "from these (flops at the faster rate).",
             (f"- binary_linear up to {COLD_MAX_TOKENS} tokens: each call of a variant reads "
              "another copy of its weight, cycling through copies that together exceed "
              f"{COLD_BYTES // 2**20} MiB, so every variant meets its weight in memory as a "
              "model's next layer does (code and activations warm); above, one weight, warm "
              "(compute-bound)." if not args.quick else
              "- --quick: one weight per variant, warm (the small shapes' copies would number "
              "hundreds of thousands)."),
             "- Times are medians of the given repeats after one warm-up. Where the weights "
             "are cold, each variant's calls run one after another (as a model's layers of one "
             "kind do); elsewhere a table's variants are timed in rounds, in a new random order "
             "each round. This is a shared machine: compare the ratios measured side by side "
             "within a table.", ""]
    lines += ["## binary_linear", ""]
    for shape in shapes:
        for tokens in token_counts:
            print(f"binary_linear {shape[0]}x{shape[1]} T={tokens}", file=sys.stderr, flush=True)
            rows = linear_rows(shape, tokens, args.repeat if tokens < 2048 else 3,
                               0 if args.quick else COLD_MAX_TOKENS)
            lines += [f"### {shape[0]}x{shape[1]}, {tokens} token(s)", ""]
            lines += fmt_table(rows, "binary_linear (this package)") + [""]
            median = rows["binary_linear (this package)"][0]
            lines += [bound_line(shape, tokens, median, limits), ""]
    lines += ["## Gradient of x through binary_linear (gy·W, as its backward computes it)", ""]
    for shape in shapes[-2:]:
        for tokens in ([1, 9] if args.quick else [1, 128]):
            lines += [f"### {shape[0]}x{shape[1]}, {tokens} token(s)", ""]
            lines += fmt_table(grad_x_rows(shape, tokens, args.repeat),
                               "binary_linear's gradient of x (this package)") + [""]
    lines += ["## binary_lora (ViT-B: in = out = 768, r = 32, ReLU)", ""]
    for tokens in ([1, 197] if not args.quick else [1, 9]):
        lines += [f"### {tokens} token(s)", ""]
        lines += fmt_table(lora_rows(tokens, args.repeat), "binary_lora (this package)") + [""]
    in_f, out_f = (256, 512) if args.quick else (4096, 11008)
    where = "small shapes" if args.quick else "Llama-7B MLP projection"
    lines += [f"## binary_lora ({where}: in = {in_f}, out = {out_f}, r = 32, no activation)", ""]
    for tokens in ([1, 9] if args.quick else [1, 16, 128]):
        lines += [f"### {tokens} token(s)", ""]
        lines += fmt_table(lora_rows(tokens, args.repeat, in_f, out_f, activation=None),
                           "binary_lora (this package)") + [""]
    sb.publish_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
