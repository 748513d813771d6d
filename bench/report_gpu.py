"""The kernels on one CUDA GPU against what a user would run instead, side by side in one run.

    python bench/report_gpu.py --out docs/benchmarks/gpu_<card>.md [--blocks 32] [--quick]

  ceilings  device-to-device copy bandwidth and a bf16 matmul: the two numbers every figure
            below is read against
  switch    one adapter switch over the linear layers of --blocks Llama-7B blocks (bf16):
            scatter_swap_ (what AdapterBank.activate runs) on the cuda and triton backends,
            against a torch indexing loop and LoRA fusion (addmm_, and PEFT's fp32-delta
            merge), with the memory-traffic bound of the swap (32-byte sectors)
  linear    sparse_delta_linear on Llama's 4096x4096 and 11008x4096 layers, r=32, bf16, per
            backend and strategy, forward and training step (x and the adapter's values
            trained), against F.linear without adapter, PEFT ShiRA's formulation (clone W, add
            the densified delta) and LoRA r=32; then the token count from which "swap" beats
            "spmm" (sparse_delta.SWAP_FROM_TOKENS["cuda"])
  1-bit     binary_linear and binary_lora per backend against the dense bf16 products

Every output is checked against the op's reference before it is timed (relative error
column: ‖out − ref‖/‖ref‖ against the fp32 reference of the adapted layer; F.linear and LoRA
compute another function, so their large error shows that the check can tell); times are
medians of triton.testing.do_bench (CUDA events, L2 flushed per call). --profile prints a
torch.profiler view of training steps and sddmm against cuBLAS's dense gradient instead;
--dry-run runs the script on CPU tensors at toy sizes (to check it without a GPU).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shira_kernels  # noqa: E402
from shira_kernels.harness import benchmark as sb  # noqa: E402
from shira_kernels.formats import BinaryWeight, SparseDelta  # noqa: E402
from shira_kernels.ops import sparse_delta as sd  # noqa: E402

GPU_BACKENDS = ("cuda", "triton")
DRY_RUN = False  # --dry-run: the whole script on CPU tensors at toy sizes, to check it here
STRATEGIES = ("spmm", "swap", "merge")
LAYERS = {"q_proj 4096x4096": (4096, 4096), "up_proj 11008x4096": (11008, 4096)}
R = 32
SECTOR = 32  # bytes: the unit in which a GPU reads and writes scattered entries


def timed(fn, rep_ms: int) -> float:
    """Median milliseconds of fn() (CUDA events; L2 cleared before each call)."""
    if DRY_RUN:
        return 1e3 * sb.median_time(fn, warmup=1, repeat=3)[0]
    from triton.testing import do_bench

    return do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
def ceilings(device, rep: int) -> dict:
    n, k = (2**24, 512) if DRY_RUN else (2 * 2**30, 8192)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    copy_ms = timed(lambda: dst.copy_(src), rep)
    a = torch.randn(k, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, k, device=device, dtype=torch.bfloat16)
    mm_ms = timed(lambda: a @ b, rep)
    del src, dst
    return {"copy_GBps": 2 * n / copy_ms / 1e6, "bf16_TFLOPs": 2 * k**3 / mm_ms / 1e9}


def gpu_swap_case(blocks: int, device) -> sb.SwapCase:
    """sb.make_swap_case's layers built on the GPU (the CPU would take minutes for 32 blocks)."""
    shapes = sb.llama_linear_shapes(4096, 11008, blocks)
    gen = torch.Generator(device=device).manual_seed(0)
    case = sb.SwapCase(names=[n for n, _ in shapes], shapes=[s for _, s in shapes],
                       dtype=torch.bfloat16, r=R, weights=[], indices=[], values=[])
    for m, n in case.shapes:
        k = R * (m + n)
        case.weights.append(torch.randn(m, n, device=device, dtype=torch.bfloat16, generator=gen))
        idx = torch.randperm(m * n, device=device, generator=gen)[:k]
        case.indices.append(idx.sort().values.to(torch.int32))
        case.values.append(torch.randn(k, device=device, dtype=torch.bfloat16, generator=gen))
        case.lora_A.append(0.01 * torch.randn(R, n, device=device, dtype=torch.bfloat16, generator=gen))
        case.lora_B.append(0.01 * torch.randn(m, R, device=device, dtype=torch.bfloat16, generator=gen))
    return case


def measure_switch(blocks: int, device, bandwidth: float, rep: int) -> tuple[str, dict]:
    case = gpu_swap_case(blocks, device)
    bound_ms = sb.swap_traffic_bytes(case, line=SECTOR) / bandwidth * 1e3
    base_w, base_v = [w.clone() for w in case.weights], [v.clone() for v in case.values]

    def swap():
        shira_kernels.scatter_swap_(case.weights, case.indices, case.values)

    def restore():
        for t, saved in zip(case.weights + case.values, base_w + base_v):
            t.copy_(saved)

    def bits(ts):
        return [t.view(torch.int16) for t in ts]

    fns = {f"scatter_swap_ ({b})": (b, swap) for b in GPU_BACKENDS}
    fns["torch indexing loop"] = (None, lambda: sb.torch_loop_swap(case))
    fns["LoRA fusion, addmm_ (bf16)"] = (None, lambda: sb.lora_addmm_fuse(case))
    fns["LoRA merge, fp32 delta (PEFT's way)"] = (None, lambda: sb.peft_lora_merge(case))
    times, exact = {}, {}
    for name, (backend, fn) in fns.items():
        with shira_kernels.use_backend(backend):
            times[name] = timed(fn, rep)
            restore()
            if backend is not None:  # once: the adapter's values in W; twice: every bit back
                swap()
                once = all(torch.equal(w.view(-1)[i.long()], v) for w, i, v in
                           zip(case.weights, case.indices, base_v))
                swap()
                exact[name] = once and all(map(torch.equal, bits(case.weights + case.values),
                                               bits(base_w + base_v)))
        restore()
    best = min(times[f"scatter_swap_ ({b})"] for b in GPU_BACKENDS)
    rows = [[name, f"{t:.3f}", f"{t / best:.2f}x", f"{t / bound_ms:.2f}x",
             {True: "yes", False: "NO"}.get(exact.get(name), "-")] for name, t in times.items()]
    text = (f"{case.describe()}; traffic bound {bound_ms:.3f} ms at the measured copy "
            f"bandwidth.\n\n" + table(["method", "ms", "vs best swap", "vs bound",
                                        "swap and restore exact"], rows))
    del case, base_w, base_v
    torch.cuda.empty_cache()
    return text, {"times_ms": times, "bound_ms": bound_ms, "exact": exact}


# ---------------------------------------------------------------------------------------------
def linear_methods(x, weight, bias, delta, lora):
    """name → (backend or None, forward fn). delta's values require grad."""
    a, b = lora
    methods = {"F.linear, no adapter": (None, lambda: F.linear(x, weight, bias))}
    for backend in GPU_BACKENDS:
        for strategy in STRATEGIES:
            methods[f"{backend} {strategy}"] = (backend, lambda s=strategy: shira_kernels.sparse_delta_linear(
                x, weight, bias, delta, 1.0, strategy=s))
    methods["clone + dense add (PEFT ShiRA)"] = (None, lambda: sd.sparse_delta_linear_reference(
        x, weight, bias, delta, 1.0))
    methods[f"LoRA r={R}, unmerged"] = (None, lambda: F.linear(x, weight, bias) +
                                        F.linear(F.linear(x, a), b))
    return methods


def adapted_layer(m: int, n: int, device, gen):
    """A bf16 m×n weight and a SHiRA-Rand delta of r·(m+n) entries whose values train."""
    weight = (torch.randn(m, n, generator=gen) * n ** -0.5).to(device, torch.bfloat16)
    flat = sb.sample_distinct(m * n, R * (m + n), gen).sort().values
    delta = SparseDelta.from_flat(flat, (m, n), 0.01 * torch.randn(flat.numel(), generator=gen))
    delta = delta.to(device, torch.bfloat16)
    delta.values.requires_grad_(True)
    return weight, delta


def measure_linear(device, tokens_list, rep: int) -> tuple[str, dict]:
    out_text, data = [], {}
    crossover = {}
    for layer, (m, n) in LAYERS.items():
        gen = torch.Generator().manual_seed(m)
        weight, delta = adapted_layer(m, n, device, gen)
        values = delta.values
        bias = torch.zeros(m, device=device, dtype=torch.bfloat16)
        a = (0.01 * torch.randn(R, n, generator=gen)).to(device, torch.bfloat16).requires_grad_(True)
        b = (0.01 * torch.randn(m, R, generator=gen)).to(device, torch.bfloat16).requires_grad_(True)
        rows = []
        for tokens in tokens_list:
            x = torch.randn(tokens, n, device=device, dtype=torch.bfloat16).requires_grad_(True)
            gy = torch.randn(tokens, m, device=device, dtype=torch.bfloat16)
            methods = linear_methods(x, weight, bias, delta, (a, b))
            with torch.no_grad():
                ref = sd.sparse_delta_linear_reference(x.float(), weight.float(), bias.float(),
                                                       delta.with_values(values.float()), 1.0)
            fwd, train, err = {}, {}, {}
            for name, (backend, fn) in methods.items():
                with shira_kernels.use_backend(backend):
                    with torch.no_grad():
                        err[name] = rel_error(fn(), ref)
                        fwd[name] = timed(fn, rep)

                    def step(fn=fn):
                        x.grad = values.grad = a.grad = b.grad = None
                        fn().backward(gy)
                    train[name] = timed(step, rep)
            base_f, base_t = fwd["F.linear, no adapter"], train["F.linear, no adapter"]
            for name in methods:
                rows.append([layer.split()[0], tokens, name, f"{err[name]:.1e}",
                             f"{fwd[name]:.4f}", f"{fwd[name] / base_f:.2f}x",
                             f"{train[name]:.4f}", f"{train[name] / base_t:.2f}x"])
            data[f"{layer},{tokens}"] = {"forward_ms": fwd, "train_ms": train, "rel_error": err}
            spmm, swap = fwd[f"{GPU_BACKENDS[0]} spmm"], fwd[f"{GPU_BACKENDS[0]} swap"]
            crossover.setdefault(layer, None)
            if swap < spmm and crossover[layer] is None:
                crossover[layer] = tokens
        out_text.append(f"### {layer}, r={R} ({R * (m + n):,} entries, "
                        f"{R * (m + n) / (m * n):.2%}), bf16\n\n" + table(
                            ["layer", "tokens", "method", "rel. error", "forward ms", "vs F.linear",
                             "train step ms", "vs F.linear"], rows))
    summary = "; ".join(f"{k}: {v if v is not None else 'never in range'}"
                        for k, v in crossover.items())
    out_text.append(f"First token count at which {GPU_BACKENDS[0]} \"swap\" beats \"spmm\" (forward): "
                    f"{summary}.")
    data["swap_beats_spmm_from_tokens"] = crossover
    return "\n\n".join(out_text), data


# ---------------------------------------------------------------------------------------------
def measure_binary(device, tokens_list, rep: int) -> tuple[str, dict]:
    rows, data = [], {}
    for layer, (m, n) in LAYERS.items():
        gen = torch.Generator().manual_seed(m + 1)
        bw = BinaryWeight.from_float(torch.randn(m, n, generator=gen), "row").to(device)
        down = BinaryWeight.from_float(torch.randn(R, n, generator=gen), "row").to(device)
        up = BinaryWeight.from_float(torch.randn(m, R, generator=gen), "row").to(device)
        dense, d_dense, u_dense = (w.dequantize(torch.bfloat16) for w in (bw, down, up))
        for tokens in tokens_list:
            x = torch.randn(tokens, n, device=device, dtype=torch.bfloat16)
            products = {
                "linear": (lambda: F.linear(x, dense), x.float() @ bw.dequantize().T,
                           lambda: shira_kernels.binary_linear(x, bw)),
                "LoRA": (lambda: F.linear(F.linear(x, d_dense), u_dense),
                         (x.float() @ down.dequantize().T) @ up.dequantize().T,
                         lambda: shira_kernels.binary_lora(x, down, up))}
            for kind, (dense_fn, ref, ours) in products.items():
                with torch.no_grad():
                    dense_ms = timed(dense_fn, rep)
                    rows.append([layer.split()[0], tokens, f"dense bf16 {kind}",
                                 f"{rel_error(dense_fn(), ref):.1e}", f"{dense_ms:.4f}", "1.00x"])
                    for backend in GPU_BACKENDS:
                        with shira_kernels.use_backend(backend):
                            err, ms = rel_error(ours(), ref), timed(ours, rep)
                        rows.append([layer.split()[0], tokens, f"1-bit {kind} ({backend})",
                                     f"{err:.1e}", f"{ms:.4f}", f"{ms / dense_ms:.2f}x"])
                        data[f"{layer},{tokens},{kind},{backend}"] = {
                            "ms": ms, "dense_ms": dense_ms, "rel_error": err}
    return table(["layer", "tokens", "method", "rel. error", "ms", "vs dense bf16"], rows), data


# ---------------------------------------------------------------------------------------------
def _q_proj_case(device, tokens):
    m, n = LAYERS["q_proj 4096x4096"]
    weight, delta = adapted_layer(m, n, device, torch.Generator().manual_seed(1))
    x = torch.randn(tokens, n, device=device, dtype=torch.bfloat16, requires_grad=True)
    return weight, delta, x, torch.randn(tokens, m, device=device, dtype=torch.bfloat16)


def profile(device) -> None:
    """Where a training step's time goes (torch.profiler), and sddmm against the dense
    gradient read at S's entries (cuBLAS, all of it or 512 rows at a time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for tokens in (1, 2048):
        weight, delta, x, gy = _q_proj_case(device, tokens)
        for strategy in ("spmm", "swap"):
            def step():
                x.grad = delta.values.grad = None
                shira_kernels.sparse_delta_linear(x, weight, None, delta, strategy=strategy).backward(gy)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            print(f"\n### profile: q_proj training step, {tokens} tokens, {strategy} (5 steps)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14,
                                            max_name_column_width=60))
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=8,
                                            max_name_column_width=60))
    rows = []
    for tokens in (1, 16, 128, 2048, 8192):
        weight, delta, x, gy = _q_proj_case(device, tokens)
        s = delta.structure
        r_idx, c_idx = s.rows.long(), s.cols.long()
        xd = x.detach()

        def dense():
            return torch.mm(gy.T, xd, out_dtype=torch.float32)[r_idx, c_idx]

        def blocked(rows_per=512):
            out = torch.empty(delta.nnz, device=device)
            starts = s.row_offsets
            for r0 in range(0, weight.shape[0], rows_per):
                a, b = int(starts[r0]), int(starts[min(r0 + rows_per, weight.shape[0])])
                chunk = torch.mm(gy[:, r0:r0 + rows_per].T, xd, out_dtype=torch.float32)
                out[a:b] = chunk[r_idx[a:b] - r0, c_idx[a:b]]
            return out

        ref = (gy.double().T @ xd.double())[r_idx, c_idx]
        fns = {f"sddmm ({b})": (b, lambda: shira_kernels.sddmm(gy, xd, delta)) for b in GPU_BACKENDS}
        fns["dense gyT·x (cuBLAS, fp32 out), gathered"] = (None, dense)
        fns["512-row blocks of gyT·x, gathered"] = (None, blocked)
        for name, (backend, fn) in fns.items():
            with shira_kernels.use_backend(backend):
                err = rel_error(fn(), ref)
                rows.append([tokens, name, f"{err:.1e}", f"{timed(fn, 40):.4f}"])
    print("\n### sddmm on q_proj (262,144 entries), bf16\n")
    print(table(["tokens", "method", "rel. error", "ms"], rows))


# ---------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="-", help="markdown report path (json beside it)")
    parser.add_argument("--blocks", type=int, default=32, help="Llama-7B blocks for the switch")
    parser.add_argument("--quick", action="store_true", help="fewer sizes, shorter timing")
    parser.add_argument("--profile", action="store_true",
                        help="only profile a training step and compare sddmm ways (printed)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the script on the CPU (cpu/reference backends, toy sizes)")
    args = parser.parse_args()
    global GPU_BACKENDS, DRY_RUN, LAYERS
    if args.dry_run:
        GPU_BACKENDS, DRY_RUN = ("cpu", "reference"), True
        LAYERS = {"q_proj 96x64": (96, 64), "up_proj 160x64": (160, 64)}
        sb.llama_linear_shapes = lambda hidden, intermediate, blocks: [
            (f"w{k}", (96, 64)) for k in range(blocks)]
    elif not torch.cuda.is_available():
        print("report_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.profile:
        profile(device)
        return 0
    rep = 20 if args.quick else 60
    tokens = [1, 128, 2048] if args.quick or args.dry_run else [1, 16, 128, 512, 2048, 8192]
    if args.dry_run:
        name, card = "CPU (dry run)", "CPU, dry run"
    else:
        props = torch.cuda.get_device_properties(device)
        name = props.name
        card = (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
                f"{props.multi_processor_count} SMs")
    head = (f"# shira_kernels on {name}\n\nCommand: `{sb.command_line()}`  \n{card}; torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}), triton "
            f"{__import__('triton').__version__}.\n")
    sections, data = [head], {"device": name}
    ceil = ceilings(device, rep)
    data["ceilings"] = ceil
    sections.append(f"## Ceilings\n\nDevice-to-device copy {ceil['copy_GBps']:.0f} GB/s (read + "
                    f"write); bf16 8192³ matmul {ceil['bf16_TFLOPs']:.0f} TFLOP/s.")
    for title, run in (
            (f"## Adapter switch, {args.blocks} Llama-7B blocks",
             lambda: measure_switch(args.blocks, device, ceil["copy_GBps"] * 1e9, rep)),
            ("## sparse_delta_linear", lambda: measure_linear(device, tokens, rep)),
            ("## 1-bit matmuls (row-wise α, μ; x bf16)",
             lambda: measure_binary(device, [1, 16, 128, 2048] if not args.quick else [1, 128], rep))):
        text, part = run()
        sections.append(f"{title}\n\n{text}")
        data[title.lstrip("# ")] = part
        print(f"{title}\n\n{text}\n", flush=True)
    report = "\n\n".join(sections)
    sb.write_report(report, args.out)
    if args.out != "-":
        Path(args.out).with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
