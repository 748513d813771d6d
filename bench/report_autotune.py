"""How well "auto" chooses, and what choosing costs: issue 17's targets on this machine.

    python bench/report_autotune.py [--shapes 4096x4096,11008x4096] [--dtypes fp32,bf16,fp16]
                                    [--tokens 1,16,128,2048] [--modes inference,training]
                                    [--repeat 3] [--out docs/benchmarks/autotune_cpu.md]

In a fresh tuning cache (a temporary folder), so that every decision is measured in this run:
  * the first training step of one Llama-shaped block (7 ShiraLinear layers, r = hidden/128)
    in a new process, then the first step of a second process reading the first one's cache:
    the seconds spent tuning, and the step times;
  * for each shape, dtype, token count and inference/training: ShiraLinear with strategy
    "auto" against each strategy forced (fold, spmm, swap), timed round robin in one process,
    with nn.Linear (forward) and PEFT LoRA r = 32 (training step) as references, and for a
    training step the frozen layer's own (its forward and x's gradient: the floor of any
    adapter's step). auto / best forced is the target (≤ 1.05).
A markdown report goes to --out ("-": print only).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("shira_kernels") is None:  # run from a source checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from shira_kernels import tuning  # noqa: E402
from shira_kernels.harness import benchmark as hb  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STRATEGIES = ("fold", "spmm", "swap")

_FIRST_STEP = """
import json, sys, time, torch
from shira_kernels import tuning
from shira_kernels.harness import benchmark as hb
hidden, inter, tokens, dtype = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
dtype = getattr(torch, dtype)
shapes = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]
r = max(1, hidden // 128)
layers = [hb.shira_linear_layer(hb.make_linear(o, i, dtype=dtype, seed=k), r=r, seed=k)
          for k, (o, i) in enumerate(shapes)]
xs = [torch.randn(tokens, i, dtype=dtype, requires_grad=True) for _, i in shapes]
steps = [hb.training_step(layer, x) for layer, x in zip(layers, xs)]
from shira_kernels import backends
backends.select("cpu")  # the CPU extension loads here, not in the timed step
times = []
for _ in range(2):
    t0 = time.perf_counter()
    for step in steps:
        step()
    times.append(time.perf_counter() - t0)
entries = list(tuning.measured_decisions().values())
print(json.dumps({"steps_s": times, "measured": len(entries),
                  "tuning_s": sum(e["tuning_s"] for e in entries)}))
"""


def first_step(hidden: int, inter: int, tokens: int, dtype: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", _FIRST_STEP, str(hidden), str(inter),
                          str(tokens), dtype], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the first-step process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cell(shape, dtype, tokens: int, training: bool, repeat: int, min_time: float,
         with_peft: bool) -> dict:
    base = hb.make_linear(*shape, dtype=dtype)
    layer = hb.shira_linear_layer(base, r=32)
    # Training: an inner layer of a model, whose input needs its gradient too.
    x = torch.randn(tokens, shape[1], dtype=dtype, requires_grad=training)

    def ours(strategy):
        def run():
            layer.strategy = strategy
            if training:
                step()
            else:
                with torch.no_grad():
                    layer(x)
        return run
    step = hb.training_step(layer, x)
    variants = {name: ours(name) for name in ("auto",) + STRATEGIES}
    if training and with_peft:
        lora = hb.peft_lora_layer(hb.clone_linear(base), r=32)
        variants["PEFT LoRA"] = hb.training_step(lora, x)
    if training:
        variants["frozen layer"] = hb.training_step(hb.clone_linear(base).requires_grad_(False), x)
    if not training:
        def dense():
            with torch.no_grad():
                base(x)
        variants["nn.Linear"] = dense
    # At least `repeat` rounds, more (at most 30) until min_time seconds have passed.
    times = hb.round_robin_until_tight(variants, least=repeat, cap_s=min_time, rel=0.0,
                                       most=max(30, repeat))
    result = {name: statistics.median(ts) for name, ts in times.items()}
    layer.strategy = "auto"
    nnz = layer.shira_values.numel()
    entry = hb_entry(dtype, tokens, training, shape, nnz)
    return {"shape": shape, "dtype": dtype, "tokens": tokens, "training": training,
            "ms": {k: v * 1e3 for k, v in result.items()}, "chosen": entry}


def hb_entry(dtype, tokens, training, shape, nnz):
    from shira_kernels.ops import sparse_delta as sd
    entry = sd.strategy_entry("cpu", dtype, tokens, training, shape, nnz) or {}
    return entry.get("value", sd.static_strategy("cpu", dtype, tokens, training))


def table(rows: list[dict]) -> list[str]:
    lines = ["| shape | dtype | tokens | mode | auto ran | fastest forced | auto ms | fold | spmm | "
             "swap | auto / best forced | reference ms | best ours / reference | frozen layer ms |",
             "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = r["ms"]
        best = min(ms[s] for s in STRATEGIES)
        fastest = min(STRATEGIES, key=ms.get)
        ref_name = "PEFT LoRA" if r["training"] else "nn.Linear"
        ref = ms.get(ref_name)
        ref_cell = f"{ref:.3g} ({ref_name})" if ref else "—"
        ratio = f"{min(ms['auto'], best) / ref:.2f}" if ref else "—"
        mark = "" if ms["auto"] <= 1.05 * best else " **over**"
        floor = f"{ms['frozen layer']:.3g}" if "frozen layer" in ms else "—"
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {str(r['dtype'])[6:]} | "
                     f"{r['tokens']} | {'training' if r['training'] else 'inference'} | "
                     f"{r['chosen']} | {fastest} | {ms['auto']:.3g} | {ms['fold']:.3g} | {ms['spmm']:.3g} | "
                     f"{ms['swap']:.3g} | {ms['auto'] / best:.2f}{mark} | {ref_cell} | {ratio} | "
                     f"{floor} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096,11008x4096",
                        help="the layers of the auto-against-forced table ('' to skip it)")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--tokens", default="1,16,128,2048")
    parser.add_argument("--modes", default="inference,training")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=1.0,
                        help="seconds a configuration's rounds should take at least")
    parser.add_argument("--first-step", default="4096,11008,128,bfloat16", metavar="H,I,T,DTYPE",
                        help="the block whose first training step is timed ('' to skip)")
    parser.add_argument("--out", default="docs/benchmarks/autotune_cpu.md")
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="shira-tune-")
    os.environ[tuning.CACHE_DIR_ENV] = cache
    os.environ[tuning.MODE_ENV] = "auto"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    lines = [f"# Autotuning on {hb.cpu_model()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}", "",
             f"`{hb.command_line()}`, {time.strftime('%Y-%m-%d')}. Every decision measured in "
             f"this run (a fresh tuning cache). Times are medians of round-robin rounds in one "
             f"process; compare ratios, not times across runs.", ""]
    if args.first_step:
        hidden, inter, tokens, dtype = args.first_step.split(",")
        cold = first_step(int(hidden), int(inter), int(tokens), dtype, env)
        warm = first_step(int(hidden), int(inter), int(tokens), dtype, env)
        lines += [f"## First training step of one Llama block ({hidden}/{inter}, {tokens} "
                  f"tokens, {dtype}, 7 layers)", "",
                  "| process | decisions measured | tuning s | step 1 s | step 2 s |",
                  "|---|---:|---:|---:|---:|",
                  f"| first (empty cache) | {cold['measured']} | {cold['tuning_s']:.2f} | "
                  f"{cold['steps_s'][0]:.2f} | {cold['steps_s'][1]:.2f} |",
                  f"| second (reads the cache) | {warm['measured']} | {warm['tuning_s']:.2f} | "
                  f"{warm['steps_s'][0]:.2f} | "
                  f"{warm['steps_s'][1]:.2f} |", ""]
        print("\n".join(lines[-6:]), flush=True)
    rows = []
    with_peft = hb.peft_available()
    for shape in [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]:
        for dtype in [DTYPES[d] for d in args.dtypes.split(",")]:
            for tokens in [int(t) for t in args.tokens.split(",")]:
                for mode in args.modes.split(","):
                    rows.append(cell(shape, dtype, tokens, mode == "training", args.repeat,
                                     args.min_time, with_peft))
                    print(table(rows[-1:])[-1], flush=True)
    over = [r for r in rows if r["ms"]["auto"] > 1.05 * min(r["ms"][s] for s in STRATEGIES)]
    same = [r for r in over if r["chosen"] == min(STRATEGIES, key=r["ms"].get)]
    lines += [] if not rows else ["## auto against each strategy forced", "",
              "Training: a step of an inner layer (x needs its gradient too), against PEFT LoRA "
              "r = 32 on the same input; inference: a forward under no_grad, against nn.Linear "
              "on the same weight.", "", *table(rows), "",
              f"auto within 1.05x of the best forced strategy in {len(rows) - len(over)} of "
              f"{len(rows)} configurations" + (
                  f"; in {len(same)} of the others auto ran the strategy that was fastest "
                  f"forced, so the gap is between two timings of the same code (the order of "
                  f"the rounds, the caches)" if same else "") + "."]
    spent = sorted((e["tuning_s"], k) for k, e in tuning.measured_decisions().items())
    if spent:
        lines += ["", f"Measuring took {sum(t for t, _ in spent):.1f} s for the {len(spent)} "
                      f"decisions of the table above, {spent[-1][0]:.2f} s at the most "
                      f"({spent[-1][1].split('|', 2)[-1]})."]
        lines += ["", "| decision | chose | candidates' ms | how |", "|---|---|---|---|"]
        for key, e in sorted(tuning.measured_decisions().items()):
            ms = ", ".join(f"{name} {t:.3g}" for name, t in sorted(e["ms"].items(),
                                                                 key=lambda kv: kv[1]))
            where = key.split('|', 2)[-1].replace('|', ' · ')
            lines.append(f"| {where} | {e['value']} | {ms} | {e['how']} |")
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
