"""Time a batch whose sequences use different SHiRA adapters (multi_delta_linear) against its
alternatives, in one run, on the CPU (or a CUDA GPU: --device cuda).

    python bench/report_multi_adapter.py [--hidden 2048 --intermediate 5504] [--sequences 32]
        [--tokens 128] [--adapters 1,8,32] [--repeat 3] [--dtypes fp32,bf16] [--device cpu]
        [--out docs/benchmarks/multi_adapter_cpu.md]

The seven projections of one Llama-shaped block (bias-free), the batch's sequences x tokens as
rows, each sequence's adapter assigned round-robin from k distinct adapters (r = 32 budget:
32·(out + in) random entries per weight and adapter). Per dtype (fp32, bf16; --dtypes fp32 where
torch's bf16 matmul crawls, as on an AVX2-only CPU) and k, the forward
through the seven projections, timed round robin:
  - mixed: multi_delta_linear with each row's adapter (this package; its dense matmul of all
    rows "auto": torch's or this package's fold kernel with no entries, the faster measured on
    this machine), and the same with torch's matmul as the base (base="torch");
  - one adapter unfused: sparse_delta_linear, the spmm strategy, the same adapter for all rows
    (what mixing costs over serving one adapter);
  - group and switch: per adapter, its rows gathered, its entries swapped into the weights
    (scatter_swap_, as AdapterBank.activate does), F.linear, swapped back, rows scattered;
  - base only: F.linear with no adapter, the floor of every variant on torch's matmul; group
    and switch over it bounds how much faster than group and switch any mixed-batch method on
    torch's matmul can be here; and the base on this package's matmul (every row -1,
    base="fold"), the floor of mixed where "auto" took it;
  - PEFT LoRA r=32 with adapter_names= (k LoRA adapters on each layer, PEFT's per-sub-batch
    loop), where peft is installed;
  - 1-bit LoRA r=32 per row: the base product as BinaryAdapterBank.mixed runs it
    (multi_delta.base_linear: the mixed base's tuned kernel) plus multi_binary_lora with each
    row's packed adapter, and one adapter for all rows (F.linear plus binary_lora, as a
    BinaryLoRALinear layer runs it).
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
from shira_kernels.ops import multi_delta  # noqa: E402
from shira_kernels.harness import benchmark as sb  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def layer_case(out_f, in_f, dtype, adapters, seed, device="cpu"):
    """A weight, k adapters' deltas (a SparseDeltaSet, and each prepared for swapping: indices
    and the values that stand in W while it is active), on ``device`` (drawn on the CPU, so the
    same numbers on every device)."""
    g = torch.Generator().manual_seed(seed)
    weight = ((torch.rand(out_f, in_f, generator=g) * 2 - 1) / in_f ** 0.5).to(device, dtype)
    nnz = min(32 * (out_f + in_f), out_f * in_f)
    delta_set, swaps = shira_kernels.SparseDeltaSet((out_f, in_f)), []
    for a in range(adapters):
        flat = torch.randperm(out_f * in_f, generator=g)[:nnz]
        values = (torch.randn(nnz, generator=g) * 0.01).to(dtype)
        delta = shira_kernels.SparseDelta.from_flat(flat, (out_f, in_f), values,
                                                    dtype=dtype).to(device)
        delta_set.add(f"a{a}", delta, 1.0)
        indices = delta.flat_indices.to(torch.int64)
        swaps.append((indices, (weight.view(-1)[indices].float() + delta.values.float()).to(dtype)))
    return weight, delta_set, swaps


def binary_adapters(out_f, in_f, adapters, seed, device="cpu"):
    """k packed 1-bit LoRA adapters (r = 32) for one weight: (down, up, scale) each."""
    g = torch.Generator().manual_seed(seed + 1000)
    return [(shira_kernels.BinaryWeight.from_float(torch.randn(32, in_f, generator=g),
                                                   "petl").to(device),
             shira_kernels.BinaryWeight.from_float(torch.randn(out_f, 32, generator=g),
                                                   "row").to(device),
             0.01) for _ in range(adapters)]


def peft_lora_layer(weight, adapters):
    """PEFT's LoRA layer over ``weight`` with k adapters (r = 32, B random), or None."""
    if not sb.peft_available():
        return None
    import peft

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    layer = sb.peft_lora_layer(linear, r=32)  # adapter "default"
    config = peft.LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0)
    for a in range(1, adapters):
        layer.update_layer(f"a{a}", r=32, lora_alpha=64, lora_dropout=0.0,
                           init_lora_weights=True, use_rslora=False, lora_bias=False,
                           config=config)
    for module in layer.lora_B.values():
        with torch.no_grad():
            module.weight.normal_(0, 0.01)
    return layer.to(weight.device, weight.dtype)


BASE = "base only (F.linear, no adapter)"
SWITCH = "group and switch (activate per group)"


def variants(layers, x, row_adapter, names, groups):
    def mixed():
        for weight, delta_set, *_ in layers:
            shira_kernels.multi_delta_linear(x[weight.shape[1]], weight, None, delta_set,
                                             row_adapter)

    def mixed_on_torch():
        for weight, delta_set, *_ in layers:
            shira_kernels.multi_delta_linear(x[weight.shape[1]], weight, None, delta_set,
                                             row_adapter, base="torch")

    no_adapter = torch.full_like(row_adapter, -1)

    def base_on_fold():
        for weight, delta_set, *_ in layers:
            shira_kernels.multi_delta_linear(x[weight.shape[1]], weight, None, delta_set,
                                             no_adapter, base="fold")

    def single():
        for weight, delta_set, *_ in layers:
            _, delta, scale = delta_set.slots[0]
            shira_kernels.sparse_delta_linear(x[weight.shape[1]], weight, None, delta, scale,
                                              strategy="spmm")

    def group_and_switch():
        for weight, _, swaps, *_ in layers:
            xs = x[weight.shape[1]]
            y = xs.new_empty(xs.shape[0], weight.shape[0])
            for a, rows in enumerate(groups):
                indices, values = swaps[a]
                shira_kernels.scatter_swap_([weight], [indices], [values])
                y.index_copy_(0, rows, F.linear(xs.index_select(0, rows), weight))
                shira_kernels.scatter_swap_([weight], [indices], [values])  # back, bit for bit

    def base_only():  # any way of serving adapters costs at least this
        for weight, *_ in layers:
            F.linear(x[weight.shape[1]], weight)

    out = {"mixed (this package)": mixed, "mixed, base on torch's matmul": mixed_on_torch,
           "one adapter, unfused": single,
           "group and switch (activate per group)": group_and_switch,
           BASE: base_only, "base only, this package's matmul (fold kernel)": base_on_fold}
    if all(layer[3] is not None for layer in layers):
        def peft_lora():
            for weight, _, _, lora, _ in layers:
                lora(x[weight.shape[1]], adapter_names=names)
        out["PEFT LoRA, adapter_names="] = peft_lora

    def binary_mixed():
        for weight, _, _, _, adapters in layers:
            xs = x[weight.shape[1]]
            multi_delta.base_linear(xs, weight) + shira_kernels.multi_binary_lora(
                xs, adapters, row_adapter)

    def binary_single():
        for weight, _, _, _, adapters in layers:
            xs = x[weight.shape[1]]
            F.linear(xs, weight) + shira_kernels.binary_lora(xs, *adapters[0])

    out["1-bit LoRA mixed (multi_binary_lora)"] = binary_mixed
    out["1-bit LoRA, one adapter (binary_lora)"] = binary_single
    return out


def sb_shapes(hidden, intermediate):
    """(out, in) of one Llama-shaped block's seven projections."""
    return [shape for _, shape in sb.llama_linear_shapes(hidden, intermediate, blocks=1)]


def run(hidden, intermediate, sequences, tokens, adapters, dtype, repeat, device):
    shapes = sb_shapes(hidden, intermediate)
    layers = []
    for k, (out_f, in_f) in enumerate(shapes):
        weight, delta_set, swaps = layer_case(out_f, in_f, dtype, adapters, seed=k,
                                              device=device)
        layers.append((weight, delta_set, swaps, peft_lora_layer(weight, adapters),
                       binary_adapters(out_f, in_f, adapters, seed=k, device=device)))
    g = torch.Generator().manual_seed(99)
    x = {f: torch.randn(sequences * tokens, f, generator=g).to(device, dtype)
         for f in {s[1] for s in shapes}}
    per_sequence = [s % adapters for s in range(sequences)]
    row_adapter = torch.tensor(per_sequence).repeat_interleave(tokens).to(device)
    lora_names = ["default" if a == 0 else f"a{a}" for a in per_sequence]
    names = [n for n in lora_names for _ in range(tokens)]
    groups = [(row_adapter == a).nonzero().view(-1) for a in range(adapters)]
    fns = {name: sb.synced(fn, device)
           for name, fn in variants(layers, x, row_adapter, names, groups).items()}
    with torch.no_grad():
        times = sb.round_robin_until_tight(fns, least=repeat, cap_s=15.0, most=repeat + 4)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--adapters", default="1,8,32")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (a CUDA GPU)")
    parser.add_argument("--out", default=None,
                        help="'-' only prints (default docs/benchmarks/multi_adapter_DEVICE.md, "
                             "DEVICE cpu or cuda)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda") or (device.type == "cuda"
                                              and not torch.cuda.is_available()):
        parser.error(f"--device {args.device!r}: cpu, or cuda where torch sees a CUDA GPU")
    out = args.out or f"docs/benchmarks/multi_adapter_{device.type}.md"
    counts = [int(v) for v in args.adapters.split(",")]
    labels = [v.strip() for v in args.dtypes.split(",") if v.strip()]
    unknown = [v for v in labels if v not in DTYPES]
    if unknown or not labels:
        parser.error(f"--dtypes takes a comma list of {', '.join(DTYPES)}; got {args.dtypes!r}")
    started = dt.datetime.now(dt.timezone.utc)
    where = ("CPU" if device.type == "cpu"
             else f"GPU: {torch.cuda.get_device_name(device)}, backend for CUDA tensors "
                  f"{shira_kernels.backends.select(device)}; CPU")
    lines = [f"# Many SHiRA adapters in one batch ({device.type.upper()})", "",
             f"Made by `{sb.command_line()}` on {started:%Y-%m-%d %H:%M} UTC.", "",
             f"- {where}: {sb.cpu_model()}; os.cpu_count() = {os.cpu_count()}; torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads",
             f"- The forward of one Llama-shaped block's seven projections (hidden {args.hidden}, "
             f"intermediate {args.intermediate}, no bias) on {args.sequences} sequences x "
             f"{args.tokens} tokens; sequence s uses adapter s mod k; r = 32 budget per adapter "
             "and weight. Times are medians of rounds in which the variants are timed round robin.",
             "- mixed: multi_delta_linear; one adapter, unfused: sparse_delta_linear (spmm) with "
             "adapter 0 for every row; group and switch: per adapter, scatter_swap_ its entries "
             "in, F.linear on its rows, swap back; PEFT LoRA: k LoRA r=32 adapters, "
             "adapter_names= per row; 1-bit LoRA: packed r=32 1-bit adapters, each row's own "
             "(multi_binary_lora, after the mixed base's product as BinaryAdapterBank.mixed runs it) "
             "or adapter 0 for all (binary_lora, after F.linear); base "
             "only: F.linear alone.", ""]
    bounds, bases = [], []
    for label in labels:
        dtype = DTYPES[label]
        lines += [f"## {label}", "",
                  "| adapters | variant | ms | × mixed |", "|---:|---|---:|---:|"]
        for k in counts:
            print(f"{label}, {k} adapters", file=sys.stderr, flush=True)
            t = run(args.hidden, args.intermediate, args.sequences, args.tokens, k, dtype,
                    args.repeat, device)
            ref = t["mixed (this package)"]
            for name, seconds in t.items():
                lines.append(f"| {k} | {name} | {seconds * 1e3:.1f} | {seconds / ref:.2f} |")
            decided = []
            for out_f, in_f in sorted(set(sb_shapes(args.hidden, args.intermediate))):
                e = multi_delta.base_entry(device, dtype, args.sequences * args.tokens, False,
                                           False, (out_f, in_f))
                decided.append(f"{out_f}x{in_f} {e['value']} ("
                               + ", ".join(f"{n} {ms:.1f} ms" for n, ms in e["ms"].items())
                               + ")" if e else f"{out_f}x{in_f} torch ("
                               + ("tuning off)" if device.type == "cpu"
                                  else "the fold kernel is the CPU's)"))
            bases.append(f"- {label}, {k} adapters: " + "; ".join(decided))
            bounds.append(f"- {label}, {k} adapters: group and switch takes "
                          f"{t[SWITCH] / t[BASE]:.2f}x the base's F.linear alone, so no way "
                          "of mixing adapters (which must at least run that F.linear) can be "
                          f"more than {t[SWITCH] / t[BASE]:.2f}x faster than group and switch "
                          f"here; it takes {t[SWITCH] / ref:.2f}x mixed's time.")
        lines.append("")
    lines += ["## The base product mixed ran", "",
              "multi_delta_linear's dense matmul of all rows, \"auto\": torch's or this "
              "package's fold kernel with no entries, whichever measured faster on this machine "
              "per layer shape (tuning; the candidates' times on the slice it measured):", ""]
    lines += bases + ["", "## Bound (on torch's matmul)", ""] + bounds + [""]
    sb.publish_report(lines, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
