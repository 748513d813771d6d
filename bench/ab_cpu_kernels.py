"""Time the CPU kernels as a training step meets them, optionally against another checkout's
kernels (or this one's, built for another target) loaded in the same process.

    python bench/ab_cpu_kernels.py [--against DIR [--march TARGET]] [--shapes 2048x2048,4096x4096]
                                   [--tokens 128] [--dtype fp32|bf16|fp16] [--r R]
                                   [--kernels spmm,spmm_t_sddmm] [--step]

Before every call a dense matmul of the layer's own size runs (gy·W), as in a training step: it
streams the weight through the caches, so the kernel meets its activations cold. Warm-cache
timings (the same call repeated) hide what the kernels spend there. DIR is another checkout,
e.g. made with `git worktree add /tmp/old <rev>`; its csrc/cpu is built as a second extension
(for -march=TARGET, default native: `--against . --march x86-64-v3` times the AVX2 build of this
checkout) and each kernel both builds have must give the same values: the same bits where the
builds sum in the same order, else (another target's vectors, another checkout's blocking, the
1-bit kernels computed another way) to two units in the last place of a 16-bit output, 1e-5 of
an fp32 one, relative to the largest (a check of the build: the tests check the kernels). The
variants are timed in rounds, in a new random order each round (a fixed order had two copies
of one build read 0.90x and 1.09x of each other), and the medians compared side by side. Kernels: spmm (the
forward), spmm_t_sddmm (the spmm strategy's backward, where a build has it), sddmm with S's row
offsets derived by the kernel and given by the caller (where a build takes them), the fold
strategy's folded_linear and its gradient of x (where a build has them), and the 1-bit
binary_linear and its gradient of x on a weight of the layer's shape (where a build has them).
torch's own matmuls of the frozen layer (x·Wᵀ and gy·W) run in the same rounds, and the sparse
parts of a training step are printed as a share of them. Each sparse kernel's and dense matmul's
line ends with its bound: its flops at the peak of torch's matmul in the dtype (2048³, or
smaller where that is slow) or the bytes it must move at the memory's read rate (a sum over
256 MiB), whichever takes longer, both measured at the start of the run, and this checkout's
time as a multiple of it. --step times the whole layer too: ShiraLinear (strategy spmm) in a
training step and a forward, with each build's sparse kernels swapped into the registry in
turn, beside the frozen layer's step, PEFT LoRA's and nn.Linear's forward.
"""
from __future__ import annotations

import argparse
import functools
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import shira_kernels
from shira_kernels import _native
from shira_kernels.harness import benchmark as hb
from shira_kernels.harness.cpu_variant import build_cpu_variant
from shira_kernels.ops import binary as binary_ops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TORCH = "torch"  # the build name of the dense matmuls' rows


def plain_panels(row_bytes: torch.Tensor) -> torch.Tensor:
    """Sign panels as builds before sign_panels read them: the bytes in panels of 64 rows,
    not coded."""
    lanes, nbytes = row_bytes.shape
    count = -(-lanes // 64)
    padded = row_bytes.new_zeros((count * 64, nbytes))
    padded[:lanes] = row_bytes
    return padded.view(count, 64, nbytes).transpose(1, 2).contiguous()


def kernel_calls(mod, s, values, x, y, gy, gx, weight, bw):
    """name -> zero-argument call, for the kernels this build has."""
    calls = {"spmm": lambda: mod.spmm(y, x, s.row_offsets, s.cols, values, 1.0, True),
             "sddmm (offsets derived)": lambda: mod.sddmm(gy, x, s.rows, s.cols)}
    try:
        mod.sddmm(gy[:1], x[:1], s.rows, s.cols, s.row_offsets)
        calls["sddmm (offsets given)"] = lambda: mod.sddmm(gy, x, s.rows, s.cols, s.row_offsets)
    except TypeError:  # a build whose sddmm takes no offsets argument
        pass
    if hasattr(mod, "spmm_t_sddmm"):
        calls["spmm_t_sddmm"] = lambda: mod.spmm_t_sddmm(gx, gy, x, s.t_offsets, s.t_cols,
                                                        s.t_perm, values, 1.0, True)
    if hasattr(mod, "folded_linear"):  # the fold strategy: W + S inside one matmul
        calls["folded_linear"] = lambda: mod.folded_linear(
            x, weight, None, s.row_offsets, s.cols, None, values, 1.0, False)
        calls["folded_linear grad x"] = lambda: mod.folded_linear(
            gy, weight, None, s.t_offsets, s.t_cols, s.t_perm, values, 1.0, True)
    # The sign layouts differ between builds: panels made by the build (sign_panels: in some
    # builds each nibble in a code of their kernels), else panels of plain bytes, else the
    # older [words·4, out rounded up to 16] transpose, and the packed rows for the gradient.
    make_panels = getattr(mod, "sign_panels", plain_panels)
    panels = make_panels(bw.packed.contiguous().view(torch.uint8))
    panels_t = make_panels(binary_ops._sign_rows_t(bw.packed))
    older = bw.packed.new_zeros((bw.packed.shape[1] * 4, -(-bw.shape[0] // 16) * 16),
                                dtype=torch.uint8)
    older[:, :bw.shape[0]] = bw.packed.view(torch.uint8).t()
    for layout, extra in ((panels, ()), (older, ()), (older, (16,))):
        one_bit = (x, bw.packed, layout, bw.alpha, bw.mu, None, 1.0, *extra)
        try:
            mod.binary_linear(*one_bit)
        except (TypeError, RuntimeError):  # another layout, or a token limit (older builds)
            continue
        calls["binary_linear"] = functools.partial(mod.binary_linear, *one_bit)
        break
    if hasattr(mod, "binary_dequantize"):  # the "dequantize" strategy's weight, in x's dtype
        hi = (bw.mu + bw.alpha).to(x.dtype).expand(bw.shape[0]).contiguous()
        lo = (bw.mu - bw.alpha).to(x.dtype).expand(bw.shape[0]).contiguous()
        calls["binary_dequantize"] = lambda: mod.binary_dequantize(bw.packed, hi, lo,
                                                                   bw.shape[1])
    if hasattr(mod, "binary_linear_grad_x"):
        for signs in (panels_t, bw.packed):
            args = (gy, signs, bw.alpha, bw.mu, bw.shape[1])
            try:
                mod.binary_linear_grad_x(*args)
            except (TypeError, RuntimeError):
                continue
            calls["binary_linear_grad_x"] = functools.partial(mod.binary_linear_grad_x, *args)
            break
    return calls


def least_work(kernel: str, tokens: int, out_f: int, in_f: int, nnz: int, elem: int,
               col: int) -> tuple[int, int] | None:
    """(flops, bytes) that ``kernel`` cannot do without, for ``nnz`` entries of an out_f x in_f
    layer (elem bytes per activation, weight and value; col per index): every multiply-add
    counted twice, every operand read and every result written once (CSR offsets int64, the
    CSC's permutation int64, the values' gradient fp32). None: no bound given for it."""
    sparse = nnz * (elem + col) + (out_f + 1) * 8  # values, column indices, row offsets
    x, y = tokens * in_f * elem, tokens * out_f * elem
    if kernel == "spmm":  # y += x·Sᵀ
        return 2 * tokens * nnz, x + 2 * y + sparse
    if kernel.startswith("sddmm"):  # g = (gyᵀ·x) at the entries, fp32; rows given or derived
        return 2 * tokens * nnz, x + y + sparse - nnz * elem + nnz * col + 4 * nnz
    if kernel == "spmm_t_sddmm":  # gx += gy·S and the values' gradient, from S's CSC
        return 4 * tokens * nnz, 3 * x + y + sparse + nnz * (8 + 4) + (in_f - out_f) * 8
    if kernel == "binary_dequantize":  # the packed signs read, the weight written
        return 0, out_f * in_f // 8 + out_f * in_f * elem
    if kernel.startswith("dense"):  # torch's matmul of the frozen layer
        return 2 * tokens * out_f * in_f, out_f * in_f * elem + x + y
    return None


def agree(a, b) -> bool:
    """The same values, relative to b's largest: to two units in the last place of a 16-bit
    dtype (builds that sum in another order round a few outputs the other way), to 1e-5 in
    fp32 (sums of hundreds of terms in another order, or 1-bit products another way)."""
    if isinstance(a, tuple):
        return all(agree(p, q) for p, q in zip(a, b))
    if not b.numel():
        return a.numel() == 0
    tol = max(2 * torch.finfo(b.dtype).eps, 1e-5)
    return bool((a.double() - b.double()).abs().max() <= tol * b.double().abs().max())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", type=Path, default=None, help="another checkout to compare with")
    p.add_argument("--shapes", default="2048x2048,5504x2048,2048x5504,4096x4096",
                   help="comma list of OUTxIN")
    p.add_argument("--r", type=int, default=None,
                   help="SHiRA rank: r·(out+in) entries (default min(out, in) / 128)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="of the activations, weight and values (the 1-bit kernels take fp32)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--march", default="native", help="the target --against is built for")
    p.add_argument("--kernels", default=None,
                   help="comma list of the kernels to time (default all; the dense matmuls always)")
    p.add_argument("--step", action="store_true",
                   help="also time ShiraLinear's training step and forward (strategy spmm) with "
                        "each build's sparse kernels, beside the frozen layer and PEFT LoRA")
    args = p.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in shape.lower().split("x")) for shape in args.shapes.split(",")]
        if any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
            raise ValueError
    except ValueError:
        p.error(f"--shapes must be a comma list of OUTxIN with both ≥ 1, got {args.shapes!r}")
    if args.tokens < 1 or args.rounds < 1 or (args.r is not None and args.r < 1):
        p.error("--tokens, --rounds and --r must be ≥ 1")
    if args.against is not None and not any((args.against / "csrc" / "cpu").glob("*.cpp")):
        p.error(f"--against {args.against}: no csrc/cpu/*.cpp there (give a checkout's root)")
    if args.march != "native" and args.against is None:
        p.error("--march names the target of the --against build; give --against too")
    wanted = None if args.kernels is None else set(args.kernels.split(","))
    builds = {"this checkout": _native.module("cpu")}
    if args.against is not None:
        try:
            other = build_cpu_variant(args.against.resolve() / "csrc" / "cpu", args.march)
        except RuntimeError as exc:  # cpp_extension's compiler output is in the message
            p.error(f"--against {args.against} --march {args.march}: the build failed: "
                    f"{str(exc)[-1500:]}")
        name = str(args.against) + ("" if args.march == "native" else f" -march={args.march}")
        builds[name] = other
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    peak, read = hb.matmul_peak(dtype), hb.read_bandwidth()
    print(f"{args.tokens} tokens, {args.dtype}, {torch.get_num_threads()} threads, medians of "
          f"{args.rounds} rounds, a dense matmul of the layer's size before every call; bounds "
          f"at torch's {args.dtype} matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"({hb.peak_size(dtype)}³) and "
          f"a memory read rate of {read / 1e9:.1f} GB/s, both measured now")
    for out_f, in_f in shapes:
        shape = f"{out_f}x{in_f}"
        r = args.r or max(1, min(out_f, in_f) // 128)
        nnz = min(r * (out_f + in_f), out_f * in_f)
        flat = torch.randperm(out_f * in_f)[:nnz]
        delta = shira_kernels.SparseDelta.from_flat(flat, (out_f, in_f),
                                                    (torch.randn(nnz) * 0.01).to(dtype))
        s, values = delta.structure, delta.values
        x, gx = (torch.randn(args.tokens, in_f, dtype=dtype) for _ in range(2))
        gy, y = (torch.randn(args.tokens, out_f, dtype=dtype) for _ in range(2))
        weight = torch.randn(out_f, in_f, dtype=dtype)
        bw = shira_kernels.BinaryWeight.from_float(weight.float())
        calls = {}
        for build, mod in builds.items():
            for kernel, call in kernel_calls(mod, s, values, x.clone(), y.clone(), gy,
                                             gx.clone(), weight, bw).items():
                if wanted is None or kernel in wanted:
                    calls[(kernel, build)] = call
        if wanted is not None and wanted - {k for k, _ in calls}:
            p.error(f"--kernels: no build has {sorted(wanted - {k for k, _ in calls})}")
        for kernel in sorted({k for k, _ in calls}):  # every build, one input: they agree
            outs = [kernel_calls(mod, s, values, x, y.clone(), gy, gx.clone(), weight, bw)[kernel]()
                    for build, mod in builds.items() if (kernel, build) in calls]
            if not all(agree(o, outs[0]) for o in outs[1:]):
                raise SystemExit(f"{shape} {kernel}: the builds disagree")
        # The frozen layer's own matmuls (torch's, in the same rounds): what the sparse parts of
        # a training step add to.
        calls[("dense x·Wᵀ (frozen forward)", TORCH)] = lambda: x @ weight.T
        calls[("dense gy·W (frozen grad of x)", TORCH)] = lambda: gy @ weight
        times = {key: [] for key in calls}
        order, shuffle = list(calls), random.Random(0).shuffle
        for call in calls.values():
            call()
        for i in range(args.rounds):
            shuffle(order)  # a new order each round: no call always follows the same one
            for key in order:
                gy @ weight
                t = time.perf_counter()
                calls[key]()
                times[key].append(time.perf_counter() - t)
        print(f"\n{shape}, r = {r}, {nnz} entries")
        for kernel in sorted({k for k, _ in calls}):
            row = {b: statistics.median(times[(kernel, b)]) * 1e3 for b in [*builds, TORCH]
                   if (kernel, b) in times}
            text = ", ".join(f"{b}: {ms:.3f} ms" for b, ms in row.items())
            if len(row) == 2:
                mine, other = row.values()
                text += f"; this/other {mine / other:.3f}"
            work = least_work(kernel, args.tokens, out_f, in_f, nnz, x.element_size(),
                              s.cols.element_size())
            if work is not None:
                flop_s, byte_s = work[0] / peak, work[1] / read
                bound = max(flop_s, byte_s) * 1e3
                text += (f"; bound {bound:.3f} ms ({'flops' if flop_s > byte_s else 'bytes'}), "
                         f"×{next(iter(row.values())) / bound:.1f}")
            print(f"  {kernel:24s} {text}")
        ms = {k: statistics.median(v) for k, v in times.items()}
        if {("spmm", "this checkout"), ("spmm_t_sddmm", "this checkout")} <= ms.keys():
            sparse = ms[("spmm", "this checkout")] + ms[("spmm_t_sddmm", "this checkout")]
            frozen = ms[("dense x·Wᵀ (frozen forward)", TORCH)] + \
                ms[("dense gy·W (frozen grad of x)", TORCH)]
            print(f"  the sparse parts of a training step (spmm + spmm_t_sddmm), this checkout: "
                  f"{sparse / frozen:.0%} of the frozen layer's two matmuls")
        if args.step:
            whole_step(builds, (out_f, in_f), r, args.tokens, dtype, args.rounds)
    return 0


def with_kernels(mod):
    """The registry's CPU spmm, spmm_t_sddmm and sddmm as ``mod`` (a build) has them."""
    def spmm_t_sddmm(gx, gy, x, values, struct, scale):
        _, _, _, t_offsets, t_cols, t_perm = struct
        return mod.spmm_t_sddmm(gx, gy, x, t_offsets, t_cols, t_perm, values, scale,
                                overwrite_gx=True)
    return {"spmm": mod.spmm, "spmm_t_sddmm": spmm_t_sddmm, "sddmm": mod.sddmm}


def whole_step(builds, shape, r, tokens, dtype, rounds):
    """ShiraLinear (strategy spmm) in a training step (x needs its gradient too, as an inner
    layer's) and a forward under no_grad, with each build's kernels swapped into the registry
    before each call; the frozen layer's step, PEFT LoRA's and nn.Linear's forward in the same
    shuffled rounds. Prints medians and ratios."""
    from shira_kernels.ops import registry
    base = hb.make_linear(*shape, dtype=dtype)
    layer = hb.shira_linear_layer(base, r=r, strategy="spmm")
    x = torch.randn(tokens, shape[1], dtype=dtype, requires_grad=True)
    x_infer = x.detach()
    step = hb.training_step(layer, x)
    kernels = {build: with_kernels(mod) for build, mod in builds.items()}
    before = {op: registry.lookup(op, "cpu") for op in kernels["this checkout"]}

    def ours(build, training):
        def run():
            for op, fn in kernels[build].items():
                registry.register(op, "cpu", fn)
            if training:
                step()
            else:
                with torch.no_grad():
                    layer(x_infer)
        return run

    def dense():
        with torch.no_grad():
            base(x_infer)

    calls = {}
    for build in builds:
        calls[f"step, {build}"] = ours(build, True)
        calls[f"forward, {build}"] = ours(build, False)
    calls["step, frozen layer"] = hb.training_step(hb.clone_linear(base).requires_grad_(False), x)
    if hb.peft_available():
        calls["step, PEFT LoRA"] = hb.training_step(hb.peft_lora_layer(hb.clone_linear(base), r=r), x)
    calls["forward, nn.Linear"] = dense
    try:
        times = hb.round_robin_until_tight(calls, least=rounds, cap_s=0.0, seed=1)
    finally:
        for op, fn in before.items():
            registry.register(op, "cpu", fn)
    ms = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    print(f"  ShiraLinear r = {r}, strategy spmm, {tokens} tokens (medians of {rounds} shuffled "
          f"rounds):")
    for build in builds:
        text = f"    {build}: step {ms[f'step, {build}']:.2f} ms, " \
               f"{ms[f'step, {build}'] / ms['step, frozen layer']:.3f}x the frozen layer's"
        if "step, PEFT LoRA" in ms:
            text += f", {ms[f'step, {build}'] / ms['step, PEFT LoRA']:.3f}x PEFT LoRA's"
        text += f"; forward {ms[f'forward, {build}'] / ms['forward, nn.Linear']:.3f}x nn.Linear's"
        print(text)
    lora = f", PEFT LoRA {ms['step, PEFT LoRA']:.2f} ms" if "step, PEFT LoRA" in ms else ""
    print(f"    frozen layer: step {ms['step, frozen layer']:.2f} ms{lora}; nn.Linear forward "
          f"{ms['forward, nn.Linear']:.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
