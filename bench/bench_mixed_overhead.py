"""Per-call cost of a mixed batch (AdapterBank.mixed) as the bank grows, eager and compiled.

    python bench/bench_mixed_overhead.py [--banks 2,8,32,128] [--layers 8] [--features 256]
        [--rows 4] [--tokens 8] [--calls 50] [--rounds 5] [--compile-backend aot_eager]

A stack of square nn.Linear layers (ReLU between), every layer adapted by every adapter of the
bank (r = 8 budget: 8·(out + in) random entries per layer and adapter); each call is one
forward of a small batch whose rows name two of the bank's adapters and the base. The work per
call is the same whatever the bank size, so what grows with it is overhead: the per-call
Python, dispatch and (compiled) guard cost of the adapters the rows do not use. Per bank size:
ms per call eager and compiled (one graph per bank size, warmed before timing), the floor
(the plain model, no bank) and each time over the smallest bank's. Timed round robin over the
bank sizes, median of --rounds rounds of --calls calls each.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("shira_kernels") is None:  # run from a source checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import shira_kernels  # noqa: E402


def make_bank(adapters: int, layers: int, features: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(*[m for _ in range(layers)
                            for m in (nn.Linear(features, features), nn.ReLU())])
    nnz = 8 * 2 * features
    bank = shira_kernels.AdapterBank(model)
    for a in range(adapters):
        deltas = {}
        for i in range(0, 2 * layers, 2):
            flat = torch.randperm(features * features, generator=g)[:nnz]
            deltas[str(i)] = shira_kernels.SparseDelta.from_flat(
                flat, (features, features), torch.randn(nnz, generator=g) * 0.01)
        bank.add(f"a{a}", deltas)
    return model, bank


def per_call_ms(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--banks", default="2,8,32,128")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile-backend", default="aot_eager")
    args = p.parse_args(argv)
    banks = [int(b) for b in args.banks.split(",")]
    torch.manual_seed(0)
    names = (["a0", "a1", None] * args.rows)[:args.rows]
    x = torch.randn(args.rows, args.tokens, args.features)
    torch._dynamo.config.cache_size_limit = max(64, 4 * len(banks))
    cases = {}
    for k in banks:
        model, bank = make_bank(k, args.layers, args.features)
        compiled = torch.compile(model, backend=args.compile_backend)

        def eager(model=model, bank=bank):
            with bank.mixed(names):
                return model(x)

        def traced(model=model, bank=bank, compiled=compiled):
            with bank.mixed(names):
                return compiled(x)
        with torch.no_grad():
            eager(), traced(), traced()  # build the layers' sets; compile
            assert torch.allclose(eager(), traced(), rtol=1e-5, atol=1e-6)
        cases[k] = (eager, traced)
    floor_model = make_bank(1, args.layers, args.features)[0]
    times = {(k, kind): [] for k in banks for kind in ("eager", "compiled")}
    floor = []
    with torch.no_grad():
        for _ in range(args.rounds):
            floor.append(per_call_ms(lambda: floor_model(x), args.calls))
            for k in banks:
                for kind, fn in zip(("eager", "compiled"), cases[k]):
                    times[(k, kind)].append(per_call_ms(fn, args.calls))
    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"torch {torch.__version__}; {args.layers} layers {args.features}x{args.features}, "
          f"{args.rows} rows x {args.tokens} tokens naming {sorted(set(map(str, names)))}; "
          f"compiled with {args.compile_backend}; median of {args.rounds} rounds x "
          f"{args.calls} calls")
    print(f"plain model (no bank): {statistics.median(floor):.3f} ms per call")
    print("| adapters in the bank | eager ms/call | x smallest | compiled ms/call | x smallest |")
    print("|---|---|---|---|---|")
    k0 = banks[0]
    for k in banks:
        e, c = med[(k, "eager")], med[(k, "compiled")]
        print(f"| {k} | {e:.3f} | {e / med[(k0, 'eager')]:.2f} | {c:.3f} | "
              f"{c / med[(k0, 'compiled')]:.2f} |")


if __name__ == "__main__":
    main()
