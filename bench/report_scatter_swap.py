"""Time scatter_swap_ on the CPU against its alternatives and its memory-traffic bound.

    python bench/report_scatter_swap.py [--blocks N] [--out docs/benchmarks/scatter_swap_cpu.md]

For each dtype (fp32, bf16) this builds one case (Llama blocks, a sparse adapter of r·(out+in)
entries per weight and a rank-r LoRA), measures the machine's copy bandwidth, and times, on the
same tensors: scatter_swap_ on every backend available for CPU tensors, the same swap as a Python
loop of torch indexing, LoRA fusion with addmm_, and PEFT's LoRA merge. The least time the swap
could take is its traffic (swap_traffic_bytes) over the copy bandwidth. A markdown report is
written to --out (use --out - to only print it).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("shira_kernels") is None:  # run from a source checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import shira_kernels  # noqa: E402
from shira_kernels.harness import benchmark as sb  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _snapshot(case):
    return ([w.view(-1)[i].clone() for w, i in zip(case.weights, case.indices)],
            [v.clone() for v in case.values])


def _same(a, b) -> bool:
    return all(torch.equal(_bits(x), _bits(y)) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def time_swap(swap, case, repeat: int):
    """median_time of a self-inverse swap, called an even number of times, checked restored."""
    before = _snapshot(case)
    median, times = sb.median_time(swap, warmup=1, repeat=repeat)
    if (1 + repeat) % 2:
        swap()
    if not _same(before, _snapshot(case)):
        raise RuntimeError("swapping an even number of times did not restore the tensors")
    return median, times


def run_dtype(label: str, args) -> dict:
    shapes = sb.llama_linear_shapes(args.hidden, args.intermediate, args.blocks)
    case = sb.make_swap_case(shapes, r=args.r, dtype=DTYPES[label], seed=0)
    print(f"[{label}] {case.describe()}", flush=True)
    bandwidth = sb.copy_bandwidth(repeat=args.repeat)
    traffic = sb.swap_traffic_bytes(case)
    rows = []  # (name, kind, median s, times)
    for backend in shira_kernels.backends.available("cpu"):
        def swap(backend=backend):
            with shira_kernels.use_backend(backend):
                shira_kernels.scatter_swap_(case.weights, case.indices, case.values)
        median, times = time_swap(swap, case, args.repeat)
        rows.append((f"scatter_swap_ ({backend} backend)", "op", median, times))
        print(f"[{label}]   {rows[-1][0]}: {median * 1e3:.2f} ms", flush=True)
    alternatives = [
        ("torch indexing loop (index/index_put_)", lambda: sb.torch_loop_swap(case), args.repeat,
         True),
        ("LoRA fusion, W.addmm_(B, A)", lambda: sb.lora_addmm_fuse(case), args.merge_repeat,
         False),
        ("PEFT-style LoRA merge (fp32 delta)", lambda: sb.peft_lora_merge(case),
         args.merge_repeat, False),
    ]
    for name, fn, repeat, self_inverse in alternatives:
        if self_inverse:
            median, times = time_swap(fn, case, repeat)
        else:
            median, times = sb.median_time(fn, warmup=1, repeat=repeat)
        rows.append((name, "alt", median, times))
        print(f"[{label}]   {name}: {median * 1e3:.2f} ms", flush=True)
    result = {"label": label, "describe": case.describe(), "bandwidth": bandwidth,
              "traffic": traffic, "bound": traffic / bandwidth, "rows": rows,
              "entries": case.swapped_entries, "weight_bytes": case.weight_bytes}
    del case
    return result


def table(res: dict) -> str:
    ops = [r for r in res["rows"] if r[1] == "op"]
    best = min(ops, key=lambda r: r[2])
    bound = res["bound"]
    lines = ["| variant | median ms | spread ms (min–max) | × best op backend | × bound |",
             "|---|---:|---:|---:|---:|"]
    for name, _, median, times in res["rows"]:
        tag = " **(best)**" if name == best[0] else ""
        lines.append(f"| {name}{tag} | {median * 1e3:.2f} | {min(times) * 1e3:.2f}–"
                     f"{max(times) * 1e3:.2f} | {median / best[2]:.2f} | {median / bound:.2f} |")
    lines.append(f"| traffic bound: {res['traffic'] / 2**20:.1f} MiB at "
                 f"{res['bandwidth'] / 1e9:.1f} GB/s copy bandwidth | {bound * 1e3:.2f} | – | "
                 f"{bound / best[2]:.2f} | 1.00 |")
    lines.append("")
    lines.append(f"op / bound (best backend, {best[0]}): **{best[2] / bound:.2f}×**; "
                 + "; ".join(f"{name} is {median / best[2]:.1f}× the op"
                             for name, kind, median, _ in res["rows"] if kind == "alt") + ".")
    return "\n".join(lines)


def report(results: list[dict], args) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# scatter_swap_ on the CPU",
        "",
        f"Made by `{sb.command_line()}` on {now}.",
        "",
        "## Machine",
        "",
        f"- CPU: {sb.cpu_model()}; os.cpu_count() = {os.cpu_count()}",
        f"- torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}; "
        f"Python {platform.python_version()}; shira_kernels {shira_kernels.__version__}",
        f"- backends available for CPU tensors: {', '.join(shira_kernels.backends.available('cpu'))}",
        "",
        "## Setup",
        "",
        f"{args.blocks} Llama block(s), hidden {args.hidden}, intermediate {args.intermediate}: "
        "the seven projections (q, k, v, o, gate, up, down) per block. Each out×in weight gets "
        f"r·(out+in) swapped entries with r = {args.r} (as many as a rank-{args.r} LoRA has "
        "parameters), at distinct random positions, sorted int32 indices; the LoRA variants use "
        f"A [r, in] and B [out, r] of rank {args.r} on the same weights, scale "
        f"{sb.DEFAULT_LORA_SCALE}. Every variant runs on the same tensors. Times are medians "
        f"of {args.repeat} calls after one warm-up ({args.merge_repeat} for the two LoRA "
        "merges); the swaps are self-inverse and were checked to restore the tensors.",
        "",
        "The bound is the least the swap must move (each distinct 64-byte line of a weight "
        "holding a swapped entry read and written once, the indices read, the values read and "
        "written) divided by the bandwidth of a plain 256 MiB `dst.copy_(src)` (read + write "
        "counted), measured in the same run.",
        "",
        "This is a shared machine and wall times are noisy from run to run; the ratios, measured "
        "side by side in one run, are what to compare.",
        "",
    ]
    for res in results:
        out += [f"## {res['label']}", "", res["describe"] + ".", "", table(res), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--r", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5, help="timed calls per swap variant")
    p.add_argument("--merge-repeat", type=int, default=None,
                   help="timed calls for the LoRA merges (default: --repeat)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "scatter_swap_cpu.md"),
                   help="markdown file to write, or - to print only")
    args = p.parse_args(argv)
    if args.merge_repeat is None:
        args.merge_repeat = args.repeat
    labels = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in labels:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    results = [run_dtype(label, args) for label in labels]
    text = report(results, args)
    print()
    print(text)
    sb.write_report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
