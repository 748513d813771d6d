"""The measurements behind `shira-kernels bench`: this package and the usual ways, side by side.

One run builds a Llama-shaped model (no download: blocks of the seven projections q, k, v, o,
gate, up, down, named as in Llama so PEFT's target_modules find them) and measures

  switch    adapter switch A → B at a few layer counts (bf16 weights): the AdapterBank (one
            batched scatter-swap) against PEFT ShiRA and PEFT LoRA (unmerge A, set_adapter B,
            merge B) and the same LoRA merge without PEFT (benchmark.peft_lora_merge: the
            delta in fp32, rounded once, subtracted for A and added for B);
  drift     the largest change of any base weight after many switches and the return to the
            base (bf16 weights, one block); the bank must show exactly 0;
  forward   latency of the model at 1, 16 and 128 tokens (fp32, no grad): the base model,
            ShiraLinear unfused and fused, PEFT ShiRA, PEFT LoRA;
  train     time and peak memory of one training step (forward, loss, backward, adapters
            trainable, base frozen): ShiraLinear, PEFT ShiRA, PEFT LoRA;
  binary    binary_linear and binary_lora (1-bit weights) against the same products as dense
            fp32 matmuls, at 1, 16 and 128 tokens.

Every number is kept with its median, min, max and count, a distribution-free ~95% confidence
interval of the median (benchmark.median_ci) and its ratio to the best alternative measured in
the same run (below 1: ours is faster, or smaller). Times are taken in rounds, round robin over
the methods compared, until every median's interval is within ±5% of it or a time cap per
configuration is reached (at least --repeat rounds either way); results.md lists the figures
whose interval stayed wider. Results go to DIR/results.json and DIR/results.md, plots to
DIR/*.png (matplotlib). Without peft the PEFT comparisons are skipped (and said so); without
matplotlib the plots are.

The peak memory of a CPU training step is measured as bench/report_shira_linear.py does: in a
fresh subprocess per method, the peak resident set size during the step (VmHWM, reset just
before it through /proc/self/clear_refs) minus the resident set size before it; the median of
MEMORY_RUNS such processes per method. On CUDA it is
torch.cuda.max_memory_allocated() during the step minus the memory allocated before it.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import gc
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__, backends
from ..adapters import AdapterBank
from ..formats import BinaryWeight, SparseDelta
from ..nn.shira_linear import replace_linear
from ..ops.binary import binary_linear, binary_lora
from . import benchmark as sb

__all__ = ["BenchConfig", "LlamaShapedModel", "PROJECTIONS", "make_config", "parse_size",
           "run_bench", "SCHEMA"]

SCHEMA = "shira-kernels-bench/1"
SIZE_ENV = "SHIRA_KERNELS_BENCH_SIZE"
ENABLE_HINT = "pip install 'shira-kernels[bench]'"
# (hidden, intermediate, blocks). Quick: Llama's 4096/11008 proportions at 1/8 width, about
# 1 minute on 2 idle CPU cores; full: half width (the `info` block), about 6 minutes there.
# FULL_SIZE is also the size of the README's headline table.
QUICK_SIZE = (512, 1376, 4)
FULL_SIZE = (2048, 5504, 4)
# Timing rounds go on until every compared median's ~95% interval is within ±CI_TARGET of it,
# or until this many seconds of rounds per configuration (a forward at 16 tokens, a switch of
# 14 layers, ...) have passed.
CI_TARGET = 0.05
QUICK_TIME_CAP_S = 3.0
FULL_TIME_CAP_S = 10.0
# The drift check runs on one block of at most this size (what it shows does not depend on it).
DRIFT_MAX = (512, 1376)
FORWARD_TOKENS = (1, 16, 128)
TRAIN_TOKENS = 128
BINARY_TOKENS = (1, 16, 128)
BINARY_RANK = 32

# What one run can measure; `--only` picks a subset (forward includes the training step).
GROUPS = ("forward", "switch", "drift", "binary", "memory")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Method names (the same name means the same method in every group).
BANK = "AdapterBank (scatter-swap)"
PEFT_SHIRA = "PEFT ShiRA"
PEFT_LORA = "PEFT LoRA"
LORA_MERGE = "LoRA merge, fp32 delta (torch)"
BASE = "base model (no adapter)"
UNFUSED = "ShiraLinear unfused"
FUSED = "ShiraLinear fused (merged)"
SHIRA = "ShiraLinear"
BINARY_LINEAR = "binary_linear (1-bit)"
DENSE_LINEAR = "dense F.linear (fp32)"
BINARY_LORA = "binary_lora (1-bit)"
DENSE_LORA = "dense LoRA, two F.linear (fp32)"
PEFT_METHODS = (PEFT_SHIRA, PEFT_LORA)


# ---------------------------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    quick: bool
    device: str
    hidden: int
    intermediate: int
    blocks: int
    r: int
    repeat: int
    drift_switches: int
    seed: int = 0
    size_source: str = "default"
    switch_blocks: list[int] = field(default_factory=list)
    forward_tokens: list[int] = field(default_factory=lambda: list(FORWARD_TOKENS))
    train_tokens: int = TRAIN_TOKENS
    binary_tokens: list[int] = field(default_factory=lambda: list(BINARY_TOKENS))
    binary_rank: int = BINARY_RANK
    drift_hidden: int = 0
    drift_intermediate: int = 0
    groups: list[str] = field(default_factory=lambda: list(GROUPS))
    forward_dtype: str = "float32"
    switch_dtype: str = "bfloat16"
    lora_scale: float = sb.DEFAULT_LORA_SCALE
    ci_target: float = CI_TARGET
    time_cap_s: float = 0.0  # 0: exactly `repeat` rounds

    @property
    def layers(self) -> int:
        return len(PROJECTIONS) * self.blocks


def parse_size(text: str) -> tuple[int, int, int]:
    """'HIDDEN,INTERMEDIATE,BLOCKS' (also with x or spaces) → three positive ints."""
    parts = [p for p in text.replace("x", ",").replace(" ", ",").split(",") if p]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"a size is HIDDEN,INTERMEDIATE,BLOCKS (three positive integers), got "
                         f"{text!r}")
    return values  # type: ignore[return-value]


def default_r(hidden: int) -> int:
    """r = hidden/128 (32 at Llama-7B's 4096): about 1.6% of each weight, as SHiRA uses."""
    return max(1, hidden // 128)


def make_config(*, quick: bool = False, device: str = "cpu", size: str | None = None,
                r: int | None = None, repeat: int | None = None,
                drift_switches: int = 1000, seed: int = 0,
                only: str | None = None) -> BenchConfig:
    source = "default"
    if size is None and os.environ.get(SIZE_ENV):
        size, source = os.environ[SIZE_ENV], f"${SIZE_ENV}"
    elif size is not None:
        source = "--size-override"
    default = QUICK_SIZE if quick else FULL_SIZE
    hidden, intermediate, blocks = parse_size(size) if size else default
    r = default_r(hidden) if r is None else int(r)
    if r < 1 or r * (hidden + intermediate) > hidden * min(hidden, intermediate):
        raise ValueError(f"r={r} is too large for {hidden}x{hidden} weights")
    if drift_switches < 2:
        raise ValueError("--drift-switches must be at least 2")
    groups = list(GROUPS)
    if only is not None:
        groups = [g.strip() for g in only.split(",") if g.strip()]
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown or not groups:
            raise ValueError(f"--only takes a comma-separated subset of {','.join(GROUPS)}, "
                             f"got {only!r}")
    cfg = BenchConfig(quick=quick, device=device, hidden=hidden, intermediate=intermediate,
                      blocks=blocks, r=r, repeat=repeat or (5 if quick else 9),
                      drift_switches=int(drift_switches), seed=seed, size_source=source,
                      groups=[g for g in GROUPS if g in groups],
                      time_cap_s=QUICK_TIME_CAP_S if quick else FULL_TIME_CAP_S)
    cfg.switch_blocks = sorted({1, max(1, blocks // 2), blocks})
    cfg.drift_hidden = min(hidden, DRIFT_MAX[0])
    cfg.drift_intermediate = min(intermediate, DRIFT_MAX[1])
    cfg.binary_rank = min(BINARY_RANK, hidden)
    return cfg


# ---------------------------------------------------------------------------------------------
# The model: Llama's block structure, plain torch.
# ---------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, q_proj, k_proj, v_proj, o_proj, heads: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.heads = heads

    def forward(self, x):  # x: [tokens, hidden]
        tokens, hidden = x.shape

        def heads(y):
            return y.view(tokens, self.heads, hidden // self.heads).transpose(0, 1)
        y = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                           heads(self.v_proj(x)), is_causal=True)
        return self.o_proj(y.transpose(0, 1).reshape(tokens, hidden))


class _MLP(nn.Module):
    def __init__(self, gate_proj, up_proj, down_proj):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Block(nn.Module):
    def __init__(self, self_attn, mlp, input_layernorm, post_attention_layernorm):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaShapedModel(nn.Module):
    """``layers.{b}.self_attn.{q,k,v,o}_proj`` and ``layers.{b}.mlp.{gate,up,down}_proj``
    (bias-free nn.Linear, the order and names of benchmark.llama_linear_shapes), RMSNorms
    before attention and MLP and at the end, causal attention with 64-wide heads. Input and
    output: hidden states [tokens, hidden] (one sequence, no embedding)."""

    def __init__(self, hidden: int, intermediate: int, linears, norms=None):
        super().__init__()
        linears = list(linears)
        if len(linears) % len(PROJECTIONS):
            raise ValueError("need seven linear layers per block")
        blocks = len(linears) // len(PROJECTIONS)
        self.hidden, self.intermediate = hidden, intermediate
        head_dim = 64 if hidden % 64 == 0 else hidden
        weight = linears[0].weight
        if norms is None:
            norms = [nn.RMSNorm(hidden, eps=1e-6, device=weight.device, dtype=weight.dtype)
                     for _ in range(2 * blocks + 1)]
            for norm in norms:
                norm.requires_grad_(False)
        self._norms = list(norms)  # plain list: the modules are registered below
        self.layers = nn.ModuleList()
        for b in range(blocks):
            q, k, v, o, gate, up, down = linears[7 * b:7 * b + 7]
            self.layers.append(_Block(_Attention(q, k, v, o, hidden // head_dim),
                                      _MLP(gate, up, down), norms[2 * b], norms[2 * b + 1]))
        self.norm = norms[-1]

    @classmethod
    def build(cls, hidden: int, intermediate: int, blocks: int, *, dtype=torch.float32,
              device="cpu", seed: int = 0) -> "LlamaShapedModel":
        """Seeded random weights (benchmark.make_linear: uniform ±1/√in), everything frozen."""
        linears = []
        for k, (_, (out_f, in_f)) in enumerate(sb.llama_linear_shapes(hidden, intermediate,
                                                                       blocks)):
            linear = sb.make_linear(out_f, in_f, dtype=dtype, bias=False, seed=seed + k)
            linears.append(linear.to(device).requires_grad_(False))
        return cls(hidden, intermediate, linears)

    @classmethod
    def from_weights(cls, hidden: int, intermediate: int, weights) -> "LlamaShapedModel":
        """A model whose projections use the given [out, in] tensors (not copied), frozen."""
        linears = []
        for w in weights:
            linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            linear.weight = nn.Parameter(w, requires_grad=False)
            linears.append(linear)
        return cls(hidden, intermediate, linears)

    def linears(self) -> list[nn.Module]:
        """The seven projections of every block, in order (whatever module each now is)."""
        out = []
        for block in self.layers:
            a, m = block.self_attn, block.mlp
            out += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
        return out

    def shared(self, blocks: int | None = None) -> "LlamaShapedModel":
        """A new model over the same projection and norm modules (first ``blocks`` blocks):
        replacing a projection in it (replace_linear, PEFT) leaves this model as it is."""
        blocks = len(self.layers) if blocks is None else blocks
        norms = self._norms[:2 * blocks] + [self.norm]
        return LlamaShapedModel(self.hidden, self.intermediate,
                                self.linears()[:7 * blocks], norms)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.norm(x)


def _seeds(start: int):
    counter = itertools.count(start)
    return lambda: next(counter)


def shira_model(base: LlamaShapedModel, r: int, seed: int = 0) -> LlamaShapedModel:
    """``base.shared()`` with every projection a ShiraLinear (benchmark.shira_linear_layer:
    random mask, random non-zero values, strategy auto); only the adapters are trainable."""
    model = base.shared()
    seed_of = _seeds(seed)
    replace_linear(model, list(PROJECTIONS),
                   factory=lambda linear: sb.shira_linear_layer(linear, r=r, seed=seed_of()))
    return model


def peft_model(base: LlamaShapedModel, kind: str, r: int, seed: int = 0) -> LlamaShapedModel:
    """``base.shared()`` with every projection PEFT's ShiRA or LoRA layer (benchmark's
    peft_shira_layer / peft_lora_layer: non-zero adapters, base frozen)."""
    make = sb.peft_shira_layer if kind == "shira" else sb.peft_lora_layer
    model = base.shared()
    seed_of = _seeds(seed)
    with _quiet():
        replace_linear(model, list(PROJECTIONS),
                       factory=lambda linear: make(linear, r=r, seed=seed_of()))
    return model


@contextlib.contextmanager
def _quiet():
    """PEFT warns about adapter names, sparse invariants, merging; not what the user runs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------
# Results.
# ---------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    id: str
    group: str
    metric: str
    method: str
    role: str  # "ours", "alternative" or "reference"
    unit: str
    median: float | None = None
    min: float | None = None
    max: float | None = None
    n: int = 0
    ratio: float | None = None  # median / best alternative's median in the same metric
    best_alternative: str | None = None
    skipped: str | None = None
    params: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    ci95: list[float] | None = None  # [low, high]: benchmark.median_ci of the values
    # Timings: whether ci95 came within ±ci_target of the median (False: the time cap came
    # first); None for figures not timed in rounds (drift, memory).
    ci_tight: bool | None = None


class Results:
    def __init__(self):
        self.items: list[Measurement] = []

    def add(self, group, metric, method, role, unit, values=None, *, skipped=None, params=None,
            extra=None, key=None, target: float | None = None) -> Measurement:
        """``target``: for timings taken until their interval is within ±target of the median,
        which fills ``ci_tight``."""
        m = Measurement(id=f"{group}/{key or metric}/{method}", group=group, metric=metric,
                        method=method, role=role, unit=unit, skipped=skipped,
                        params=dict(params or {}), extra=dict(extra or {}))
        if values is not None and skipped is None:
            values = [float(v) for v in values]
            m.median, m.min, m.max = statistics.median(values), min(values), max(values)
            m.n = len(values)
            m.ci95 = list(sb.median_ci(values))
            if target is not None:
                m.ci_tight = sb.interval_within(values, target)
        self.items.append(m)
        return m

    def skip(self, group, metric, methods, unit, reason, *, params=None, key=None):
        for method in methods:
            self.add(group, metric, method, "alternative", unit, skipped=reason, params=params,
                     key=key)

    def metrics(self) -> list[str]:
        seen = {}
        for m in self.items:
            seen.setdefault(m.metric, None)
        return list(seen)

    def of(self, metric) -> list[Measurement]:
        return [m for m in self.items if m.metric == metric]

    def finish(self) -> None:
        """Fill every measurement's ratio to the best (least) alternative of its metric."""
        for metric in self.metrics():
            items = self.of(metric)
            alts = [m for m in items if m.role == "alternative" and m.median is not None]
            best = min(alts, key=lambda m: m.median) if alts else None
            for m in items:
                if best is None or m.median is None:
                    continue
                m.best_alternative = best.method
                if best.median > 0:
                    m.ratio = m.median / best.median
                elif m.median == 0:
                    m.ratio = 1.0

    def comparisons(self) -> list[dict]:
        """One row per (metric, our method): ours against the best alternative."""
        rows = []
        for metric in self.metrics():
            items = self.of(metric)
            alts = [m for m in items if m.role == "alternative" and m.median is not None]
            best = min(alts, key=lambda m: m.median) if alts else None
            skipped = sorted({m.method for m in items if m.skipped})
            for ours in (m for m in items if m.role == "ours"):
                rows.append({"metric": metric, "group": ours.group, "unit": ours.unit,
                             "ours": _summary(ours),
                             "best_alternative": _summary(best) if best else None,
                             "ratio": ours.ratio,
                             "skipped_alternatives": skipped})
        return rows


def _summary(m: Measurement) -> dict:
    return {"method": m.method, "median": m.median, "min": m.min, "max": m.max, "n": m.n,
            "ci95": m.ci95, "ci_tight": m.ci_tight}


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------
def round_robin(fns: dict, *, repeat: int, device: torch.device, cap_s: float = 0.0,
                rel: float = CI_TARGET) -> dict[str, list[float]]:
    """Times (ms) of each callable (benchmark.round_robin_until_tight): one untimed warm-up
    round, then rounds calling each once, in a new random order each round, so that a change
    of load on a shared machine, or a predecessor's traffic, hits all alike; at least
    ``repeat`` rounds, more until every median's ~95% interval is within ±``rel`` of it or
    ``cap_s`` seconds of rounds have passed. Each call is synchronised with the device."""
    runs = {name: sb.synced(fn, device) for name, fn in fns.items()}
    times = sb.round_robin_until_tight(runs, least=repeat, cap_s=cap_s, rel=rel)
    return {name: [t * 1e3 for t in ts] for name, ts in times.items()}


# ---------------------------------------------------------------------------------------------
# Progress on stderr.
# ---------------------------------------------------------------------------------------------
class Progress:
    """tqdm on stderr when it is importable, else one line per step."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, file=sys.stderr, unit="step", dynamic_ncols=True,
                                desc="bench")

    def step(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            if self.done:
                self.bar.update(1)
            self.bar.set_description_str(text)
        else:
            print(f"[{self.done + 1}/{self.total}] {text}", file=sys.stderr, flush=True)
        self.done += 1

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.total - self.bar.n)
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# Switching: one bf16 model, adapters A and B as swap cases, one switcher per method.
# ---------------------------------------------------------------------------------------------
class _BankSwitcher:
    def __init__(self, bank: AdapterBank, a: str, b: str):
        self.bank, self.names, self.k = bank, (a, b), 0

    def begin(self):
        self.k = 0
        self.bank.activate(self.names[0])

    def switch(self):
        self.k ^= 1
        self.bank.activate(self.names[self.k])

    def end(self):
        self.bank.deactivate()


class _PeftSwitcher:
    """PEFT's way with merged weights: unmerge the active adapter, set_adapter the other,
    merge it."""

    def __init__(self, model, a: str = "A", b: str = "B"):
        self.model, self.names, self.k = model, (a, b), 0

    def begin(self):
        self.k = 0
        with _quiet():
            self.model.set_adapter(self.names[0])
            self.model.merge_adapter()

    def switch(self):
        self.k ^= 1
        with _quiet():
            self.model.unmerge_adapter()
            self.model.set_adapter(self.names[self.k])
            self.model.merge_adapter()

    def end(self):
        with _quiet():
            self.model.unmerge_adapter()


class _LoraMergeSwitcher:
    """LoRA merged into the weights as PEFT computes it (benchmark.peft_lora_merge: B·A·scale in
    fp32, cast to the weight's dtype, added), unmerged with the negative scale. (In bf16 on a
    CPU, W.addmm_(B, A) is far slower than this: no fast bf16 matmul there.)"""

    def __init__(self, case_a: sb.SwapCase, case_b: sb.SwapCase, scale: float):
        self.cases, self.scale, self.k = (case_a, case_b), scale, 0

    def begin(self):
        self.k = 0
        sb.peft_lora_merge(self.cases[0], self.scale)

    def switch(self):
        sb.peft_lora_merge(self.cases[self.k], -self.scale)
        self.k ^= 1
        sb.peft_lora_merge(self.cases[self.k], self.scale)

    def end(self):
        sb.peft_lora_merge(self.cases[self.k], -self.scale)


def _case_to(case: sb.SwapCase, device, *, weights: bool = True) -> sb.SwapCase:
    move = (lambda ts: [t.to(device) for t in ts])
    return sb.SwapCase(names=case.names, shapes=case.shapes, dtype=case.dtype, r=case.r,
                       weights=move(case.weights) if weights else [],
                       indices=move(case.indices), values=move(case.values),
                       lora_A=move(case.lora_A), lora_B=move(case.lora_B))


def _case_prefix(case: sb.SwapCase, n: int, weights) -> sb.SwapCase:
    return sb.SwapCase(names=case.names[:n], shapes=case.shapes[:n], dtype=case.dtype, r=case.r,
                       weights=list(weights[:n]), indices=case.indices[:n],
                       values=case.values[:n], lora_A=case.lora_A[:n], lora_B=case.lora_B[:n])


class SwitchSetup:
    """A bf16 Llama-shaped model whose weights and sparse adapter A come from one swap case
    (benchmark.make_swap_case: r·(out+in) random entries per weight, and a rank-r LoRA) and
    adapter B from another; every method applies these same adapters."""

    def __init__(self, hidden, intermediate, blocks, r, device, seed, with_peft, scale):
        shapes = sb.llama_linear_shapes(hidden, intermediate, blocks)
        self.device, self.r, self.scale, self.with_peft = device, r, scale, with_peft
        self.case_a = _case_to(sb.make_swap_case(shapes, r=r, dtype=torch.bfloat16, seed=seed),
                               device)
        self.case_b = _case_to(sb.make_swap_case(shapes, r=r, dtype=torch.bfloat16,
                                                 seed=seed + 1), device, weights=False)
        self.weights = self.case_a.weights
        self.snapshot = [w.clone() for w in self.weights]
        self.model = LlamaShapedModel.from_weights(hidden, intermediate, self.weights)
        self.names = [name for name, _ in shapes]
        self.bank = AdapterBank(self.model)
        self._bank_blocks: set[int] = set()

    def _deltas(self, case, n):
        return {name: SparseDelta(shape, idx, vals) for name, shape, idx, vals in
                zip(case.names[:n], case.shapes[:n], case.indices[:n], case.values[:n])}

    def bank_switcher(self, blocks: int) -> _BankSwitcher:
        n = 7 * blocks
        if blocks not in self._bank_blocks:
            self.bank.add(f"A@{blocks}", self._deltas(self.case_a, n))
            self.bank.add(f"B@{blocks}", self._deltas(self.case_b, n))
            self._bank_blocks.add(blocks)
        return _BankSwitcher(self.bank, f"A@{blocks}", f"B@{blocks}")

    def lora_merge_switcher(self, blocks: int) -> _LoraMergeSwitcher:
        n = 7 * blocks
        return _LoraMergeSwitcher(_case_prefix(self.case_a, n, self.weights),
                                  _case_prefix(self.case_b, n, self.weights), self.scale)

    def peft_switcher(self, blocks: int, kind: str) -> _PeftSwitcher:
        import peft

        n = 7 * blocks
        view = self.model.shared(blocks)
        linears = view.linears()
        if kind == "shira":
            entries = {(name, id(linear)): idx for case, name in ((self.case_a, "A"),
                                                                  (self.case_b, "B"))
                       for linear, idx in zip(linears, case.indices[:n])}

            def mask_of(name, base_layer):
                weight = base_layer.weight
                mask = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
                mask[entries[(name, id(base_layer))].long()] = 1
                return mask.view(weight.shape)

            def config(name):
                cfg = peft.ShiraConfig(r=self.r, target_modules=list(PROJECTIONS))
                # The same entries as the bank's adapters (PEFT's custom mask hook).
                cfg.mask_fn = lambda base_layer, r, **kw: mask_of(name, base_layer)
                return cfg
        else:
            def config(name):
                return peft.LoraConfig(r=self.r, lora_alpha=self.scale * self.r,
                                       lora_dropout=0.0, target_modules=list(PROJECTIONS))
        with _quiet():
            model = peft.get_peft_model(view, config("A"), adapter_name="A")
            model.add_adapter("B", config("B"))
        with torch.no_grad():
            for k, linear in enumerate(linears):
                layer = model.base_model.model.get_submodule(self.names[k])
                for case, name in ((self.case_a, "A"), (self.case_b, "B")):
                    if kind == "shira":
                        # PEFT orders its entries row-major, as the sorted flat indices are.
                        layer.shira_weight[name].copy_(case.values[k].float())
                    else:
                        layer.lora_A[name].weight.copy_(case.lora_A[k].float())
                        layer.lora_B[name].weight.copy_(case.lora_B[k].float())
        return _PeftSwitcher(model)

    def switchers(self, blocks: int) -> dict:
        out = {BANK: lambda: self.bank_switcher(blocks)}
        if self.with_peft:
            out[PEFT_SHIRA] = lambda: self.peft_switcher(blocks, "shira")
            out[PEFT_LORA] = lambda: self.peft_switcher(blocks, "lora")
        out[LORA_MERGE] = lambda: self.lora_merge_switcher(blocks)
        return out

    @torch.no_grad()
    def restore(self) -> None:
        for w, s in zip(self.weights, self.snapshot):
            w.copy_(s)

    @torch.no_grad()
    def drift(self) -> tuple[float, int]:
        """(max |W − W₀| over all weights, how many entries are not bit-identical)."""
        worst, changed = 0.0, 0
        for w, s in zip(self.weights, self.snapshot):
            changed += int((w.view(torch.int16) != s.view(torch.int16)).sum())
            worst = max(worst, float((w.float() - s.float()).abs().max()))
        return worst, changed


def measure_switch(cfg: BenchConfig, results: Results, progress: Progress, device, with_peft):
    setup = SwitchSetup(cfg.hidden, cfg.intermediate, cfg.blocks, cfg.r, device, cfg.seed,
                        with_peft, cfg.lora_scale)
    for blocks in cfg.switch_blocks:
        layers = 7 * blocks
        metric = f"adapter switch A→B, {layers} layers"
        progress.step(f"switch, {layers} layers")
        params = {"layers": layers, "blocks": blocks, "dtype": "bfloat16", "r": cfg.r}
        # Every method switches the same weights, in turn (round robin, as the forward):
        # each switch is a pass over its entries whose time does not depend on the values
        # the others left there; the base is put back from the snapshot afterwards.
        switchers = {method: make() for method, make in setup.switchers(blocks).items()}
        slowest = 0.0
        for switcher in switchers.values():
            switcher.begin()
            # One untimed switch here and one in round_robin's warm-up round: both directions'
            # plans and caches are built. This one also tells how long a switch takes.
            _, (seconds,) = sb.median_time(sb.synced(switcher.switch, device), warmup=0, repeat=1)
            slowest = max(slowest, seconds)
        # At least --repeat rounds, fewer (at least 3) where they would run past the time cap.
        least = cfg.repeat
        if cfg.time_cap_s and slowest * least > cfg.time_cap_s:
            least = min(least, max(3, int(cfg.time_cap_s / max(slowest, 1e-9))))
        times = round_robin({method: s.switch for method, s in switchers.items()}, repeat=least,
                            device=device, cap_s=cfg.time_cap_s, rel=cfg.ci_target)
        for switcher in reversed(switchers.values()):
            switcher.end()
        sb.device_sync(device)()
        setup.restore()
        for method in switchers:
            results.add("switch", metric, method, "ours" if method == BANK else "alternative",
                        "ms", times[method], params=params, key=f"layers={layers}",
                        target=cfg.ci_target)
        del switchers
        if not with_peft:
            results.skip("switch", metric, PEFT_METHODS, "ms", _PEFT_SKIP, params=params,
                         key=f"layers={layers}")
    del setup
    gc.collect()


def measure_drift(cfg: BenchConfig, results: Results, progress: Progress, device, with_peft):
    setup = SwitchSetup(cfg.drift_hidden, cfg.drift_intermediate, 1, default_r(cfg.drift_hidden),
                        device, cfg.seed + 10, with_peft, cfg.lora_scale)
    metric = f"max base-weight drift after {cfg.drift_switches} switches"
    params = {"switches": cfg.drift_switches, "layers": 7, "dtype": "bfloat16",
              "hidden": cfg.drift_hidden, "intermediate": cfg.drift_intermediate}
    entries = sum(w.numel() for w in setup.weights)
    for method, make in setup.switchers(1).items():
        progress.step(f"drift, {method}")
        switcher = make()
        switcher.begin()
        for _ in range(cfg.drift_switches):
            switcher.switch()
        switcher.end()
        sb.device_sync(device)()
        worst, changed = setup.drift()
        setup.restore()
        results.add("drift", metric, method, "ours" if method == BANK else "alternative",
                    "max |ΔW|", [worst], params=params,
                    extra={"changed_entries": changed, "entries": entries,
                           "bit_exact": changed == 0}, key="drift")
    if not with_peft:
        results.skip("drift", metric, PEFT_METHODS, "max |ΔW|", _PEFT_SKIP, params=params,
                     key="drift")


# ---------------------------------------------------------------------------------------------
# Forward, training, 1-bit.
# ---------------------------------------------------------------------------------------------
def _tokens(n: int) -> str:
    return f"{n} token{'s' * (n != 1)}"


def _hidden_states(cfg, tokens, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, cfg.hidden, generator=gen).to(device)


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def measure_forward_and_train(cfg: BenchConfig, results: Results, progress: Progress, device,
                              with_peft):
    progress.step("build the fp32 models")
    base = LlamaShapedModel.build(cfg.hidden, cfg.intermediate, cfg.blocks, device=device,
                                  seed=cfg.seed)
    unfused = shira_model(base, cfg.r, seed=cfg.seed)
    # The fused model merges the same adapters into its own copy of the same weights.
    fused = shira_model(LlamaShapedModel.build(cfg.hidden, cfg.intermediate, cfg.blocks,
                                               device=device, seed=cfg.seed), cfg.r, seed=cfg.seed)
    for layer in fused.linears():
        layer.merge()
    models = {BASE: (base, "reference"), UNFUSED: (unfused, "ours"), FUSED: (fused, "ours")}
    if with_peft:
        models[PEFT_SHIRA] = (peft_model(base, "shira", cfg.r, cfg.seed), "alternative")
        models[PEFT_LORA] = (peft_model(base, "lora", cfg.r, cfg.seed), "alternative")
    for tokens in cfg.forward_tokens:
        progress.step(f"forward, {_tokens(tokens)}")
        x = _hidden_states(cfg, tokens, device, 100 + tokens)
        metric = f"forward latency, {_tokens(tokens)}"
        params = {"tokens": tokens, "dtype": "float32", "layers": cfg.layers}
        with _quiet():
            times = round_robin({name: _no_grad(lambda m=m: m(x)) for name, (m, _) in
                                 models.items()}, repeat=cfg.repeat, device=device,
                                cap_s=cfg.time_cap_s, rel=cfg.ci_target)
        base_ms = statistics.median(times[BASE])
        for name, (_, role) in models.items():
            results.add("forward", metric, name, role, "ms", times[name], params=params,
                        extra={"ratio_to_base": statistics.median(times[name]) / base_ms},
                        key=f"tokens={tokens}", target=cfg.ci_target)
        if not with_peft:
            results.skip("forward", metric, PEFT_METHODS, "ms", _PEFT_SKIP, params=params,
                         key=f"tokens={tokens}")
    progress.step(f"training step, {cfg.train_tokens} tokens")
    del models[BASE], models[FUSED]
    x = _hidden_states(cfg, cfg.train_tokens, device, 7)
    metric = f"training step, {cfg.train_tokens} tokens"
    params = {"tokens": cfg.train_tokens, "dtype": "float32", "layers": cfg.layers}
    steps = {name: sb.training_step(m, x) for name, (m, _) in models.items()}
    with _quiet():
        times = round_robin(steps, repeat=cfg.repeat, device=device, cap_s=cfg.time_cap_s,
                            rel=cfg.ci_target)
    for name, (m, role) in models.items():
        trainable = sum(p.numel() for p in sb.trainable_parameters(m))
        results.add("train", metric, SHIRA if name == UNFUSED else name,
                    "ours" if name == UNFUSED else role, "ms", times[name], params=params,
                    extra={"trainable_parameters": trainable},
                    key=f"time,tokens={cfg.train_tokens}", target=cfg.ci_target)
        for p in sb.trainable_parameters(m):
            p.grad = None
    if not with_peft:
        results.skip("train", metric, PEFT_METHODS, "ms", _PEFT_SKIP, params=params,
                     key=f"time,tokens={cfg.train_tokens}")
    del models, steps, base, unfused, fused
    gc.collect()


def measure_binary(cfg: BenchConfig, results: Results, progress: Progress, device):
    out_f, in_f, rank = cfg.intermediate, cfg.hidden, cfg.binary_rank
    dense = sb.make_linear(out_f, in_f, bias=False, seed=cfg.seed + 50).weight.detach().to(device)
    down = sb.make_linear(rank, in_f, bias=False, seed=cfg.seed + 51).weight.detach().to(device)
    up = sb.make_linear(out_f, rank, bias=False, seed=cfg.seed + 52).weight.detach().to(device)
    bw, bdown, bup = (BinaryWeight.from_float(w) for w in (dense, down, up))
    scale = cfg.lora_scale
    for tokens in cfg.binary_tokens:
        progress.step(f"1-bit, {_tokens(tokens)}")
        x = _hidden_states(cfg, tokens, device, 200 + tokens)
        fns = {BINARY_LINEAR: lambda: binary_linear(x, bw),
               DENSE_LINEAR: lambda: F.linear(x, dense),
               BINARY_LORA: lambda: binary_lora(x, bdown, bup, scale),
               DENSE_LORA: lambda: F.linear(F.linear(x, down), up) * scale}
        times = round_robin({k: _no_grad(f) for k, f in fns.items()}, repeat=cfg.repeat,
                            device=device, cap_s=cfg.time_cap_s, rel=cfg.ci_target)
        suffix = _tokens(tokens)
        common = {"tokens": tokens, "x_dtype": "float32"}
        linear_params = dict(common, shape=[out_f, in_f],
                             weight_bytes={"1-bit": bw.nbytes, "fp32": dense.numel() * 4})
        lora_params = dict(common, shape=[out_f, in_f], rank=rank,
                           weight_bytes={"1-bit": bdown.nbytes + bup.nbytes,
                                         "fp32": (down.numel() + up.numel()) * 4})
        for name, role, metric, params in (
                (BINARY_LINEAR, "ours", f"1-bit linear {out_f}x{in_f}, {suffix}", linear_params),
                (DENSE_LINEAR, "alternative", f"1-bit linear {out_f}x{in_f}, {suffix}",
                 linear_params),
                (BINARY_LORA, "ours", f"1-bit LoRA {out_f}x{in_f} r={rank}, {suffix}",
                 lora_params),
                (DENSE_LORA, "alternative", f"1-bit LoRA {out_f}x{in_f} r={rank}, {suffix}",
                 lora_params)):
            results.add("binary", metric, name, role, "ms", times[name], params=params,
                        key=f"{'lora' if 'LoRA' in metric else 'linear'},tokens={tokens}",
                        target=cfg.ci_target)


# ---------------------------------------------------------------------------------------------
# Peak memory of a training step.
# ---------------------------------------------------------------------------------------------
_MEMORY_METHODS = {"shira": SHIRA, "peft_shira": PEFT_SHIRA, "peft_lora": PEFT_LORA}
MEMORY_RUNS = 3  # fresh processes per CPU memory figure (the median is the figure)


def _training_model(cfg: BenchConfig, method: str, device):
    base = LlamaShapedModel.build(cfg.hidden, cfg.intermediate, cfg.blocks, device=device,
                                  seed=cfg.seed)
    if method == "shira":
        return shira_model(base, cfg.r, seed=cfg.seed)
    return peft_model(base, method.removeprefix("peft_"), cfg.r, cfg.seed)


def memory_probe(spec: dict) -> dict:
    """Build one method's model and input, run one untimed step, then measure the next."""
    cfg = BenchConfig(**spec["config"])
    torch.set_num_threads(spec["threads"])
    device = torch.device(cfg.device)
    model = _training_model(cfg, spec["method"], device)
    x = _hidden_states(cfg, cfg.train_tokens, device, 7)
    step = sb.training_step(model, x)
    with _quiet():
        step()  # lazy initialisation and scratch buffers are not the step's
        for p in sb.trainable_parameters(model):
            p.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            return {"before": before / 2**20,
                    "peak": torch.cuda.max_memory_allocated(device) / 2**20,
                    "how": "torch.cuda.max_memory_allocated"}
        return sb.rss_peak_during(step)


def _probe_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def measure_memory(cfg: BenchConfig, results: Results, progress: Progress, device, with_peft):
    methods = ["shira"] + (["peft_shira", "peft_lora"] if with_peft else [])
    progress.step("training-step peak memory")
    metric = f"training-step peak memory, {cfg.train_tokens} tokens"
    params = {"tokens": cfg.train_tokens, "dtype": "float32", "layers": cfg.layers}
    found: dict[str, list[dict]] = {method: [] for method in methods}
    if device.type == "cuda":
        for method in methods:  # in this process, one after another
            spec = {"config": asdict(cfg), "method": method, "threads": torch.get_num_threads()}
            found[method].append(memory_probe(spec))
            gc.collect()
            torch.cuda.empty_cache()
    else:
        # Fresh processes, one per method in each round (a round's may run together: each
        # measures only itself). The RSS peak moves from process to process (malloc's
        # arenas and trim thresholds), so each figure is the median of MEMORY_RUNS rounds.
        for _ in range(MEMORY_RUNS):
            procs = {}
            for method in methods:
                spec = {"config": asdict(cfg), "method": method,
                        "threads": torch.get_num_threads()}
                procs[method] = subprocess.Popen(
                    [sys.executable, "-m", "shira_kernels.harness.bench_suite", "--memory-probe",
                     json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True, env=_probe_env())
            for method, proc in procs.items():
                out, err = proc.communicate()
                lines = [ln for ln in out.splitlines() if ln.startswith("PROBE ")]
                if proc.returncode != 0 or not lines:
                    found[method].append({"error": (err or out)[-2000:]})
                else:
                    found[method].append(json.loads(lines[-1][len("PROBE "):]))
    for method in methods:
        runs = found[method]
        name = _MEMORY_METHODS[method]
        role = "ours" if method == "shira" else "alternative"
        failed = [res for res in runs if "error" in res]
        if failed:
            progress.note(f"memory probe for {name} failed:\n{failed[0]['error']}")
            results.add("memory", metric, name, role, "MiB", skipped="the probe failed",
                        params=params, extra={"error": failed[0]["error"]}, key="memory")
            continue
        results.add("memory", metric, name, role, "MiB",
                    [res["peak"] - res["before"] for res in runs], params=params,
                    extra={"before_mib": [res["before"] for res in runs],
                           "peak_mib": [res["peak"] for res in runs],
                           "how": runs[0]["how"]}, key="memory")
    if not with_peft:
        results.skip("memory", metric, PEFT_METHODS, "MiB", _PEFT_SKIP, params=params,
                     key="memory")


# ---------------------------------------------------------------------------------------------
# The machine, the report, the plots.
# ---------------------------------------------------------------------------------------------
_PEFT_SKIP = f"peft is not installed ({ENABLE_HINT} enables it)"


def _physical_cores() -> int | None:
    """The CPU's cores as lscpu counts them (distinct physical id, core id pairs of
    /proc/cpuinfo); None where that file does not say."""
    cores, package = set(), None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "physical id":
                package = value
            elif key == "core id":
                cores.add((package, value))
    return len(cores) or None


def _usable_threads() -> int | None:
    """The hardware threads this process may run on (its affinity mask), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def machine(device: torch.device) -> dict:
    out = {"platform": platform.platform(), "cpu": sb.cpu_model(),
           "cpu_count": os.cpu_count(), "cpu_cores": _physical_cores(),
           "cpu_threads": _usable_threads(),
           "torch_threads": torch.get_num_threads(), "device": str(device), "gpu": None,
           "backend": backends.select(device)}
    try:
        out["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                  / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        out["memory_gib"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out["gpu"] = torch.cuda.get_device_name(device)
        out["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        out["gpu_capability"] = f"{props.major}.{props.minor}"
    try:
        out["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return out


def _busy_note() -> str | None:
    """A warning when the machine already looks busy (timings will be noisy)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load > 0.5 * cores:
        return (f"note: the load average is {load:.2f} on {cores} cores before the run; other "
                "work on the machine makes the timings noisy (the ratios suffer less)")
    return None


def _module_version(name: str) -> str | None:
    try:
        module = __import__(name)
    except ImportError:
        return None
    return getattr(module, "__version__", "?")


def versions() -> dict:
    return {"shira_kernels": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": _module_version("triton"), "peft": _module_version("peft"),
            "matplotlib": _module_version("matplotlib"), "tqdm": _module_version("tqdm")}


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "max |ΔW|":
        return "0" if value == 0 else f"{value:.3g}"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if value >= 100:
        return f"{value:.0f} ms"
    if value >= 1:
        return f"{value:.2f} ms"
    return f"{value:.3f} ms"


def _interval(m: dict | None, unit: str) -> str:
    """The ~95% interval of the median and the count, "0.301–0.322 (n=57)" (below
    MIN_CI_VALUES values: min–max, "(n=3: min–max)"); a trailing * where the interval stayed
    wider than the target (the time cap came first)."""
    if not m or m["median"] is None:
        return "–"
    if m["n"] <= 1:
        return "(1 run)"
    low, high = m.get("ci95") or (m["min"], m["max"])
    text = f"{_fmt(low, unit)}–{_fmt(high, unit)}".replace(" ms–", "–").replace(" MiB–", "–")
    count = f"n={m['n']}" + (": min–max" if m["n"] < sb.MIN_CI_VALUES else "")
    return f"{text} ({count})" + ("*" if m.get("ci_tight") is False else "")


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.3g}%"


def _deviation(m: dict) -> str:
    """How far the interval reaches from the median, "−3.1%, +4.0%" (whole percents from 10%)."""
    low, high = m["ci95"]
    if not m["median"]:
        return "–"
    below, above = ((m["median"] - low) / m["median"], (high - m["median"]) / m["median"])
    return ", ".join(f"{sign}{x:.1%}" if x < 0.1 else f"{sign}{x:.0%}"
                     for sign, x in (("−", below), ("+", above)))


def _ratio(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}x" if value < 10 else f"{value:.1f}x"


TABLE_HEAD = ("metric", "ours", "median", "95% CI (n)", "best alternative", "median",
              "95% CI (n)", "ratio")


def table_rows(comparisons: list[dict]) -> list[tuple[str, ...]]:
    rows = []
    for c in comparisons:
        ours, alt, unit = c["ours"], c["best_alternative"], c["unit"]
        alt_name = alt["method"] if alt else ("skipped: " + ", ".join(c["skipped_alternatives"])
                                              if c["skipped_alternatives"] else "–")
        rows.append((c["metric"], ours["method"], _fmt(ours["median"], unit),
                     _interval(ours, unit), alt_name, _fmt(alt["median"], unit) if alt else "–",
                     _interval(alt, unit), _ratio(c["ratio"])))
    return rows


def text_table(rows: list[tuple[str, ...]]) -> str:
    rows = [TABLE_HEAD] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEAD))]
    right = {2, 3, 5, 6, 7}
    lines = []
    for k, row in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                 enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _size(cfg: dict) -> str:
    return (f"hidden {cfg['hidden']}, intermediate {cfg['intermediate']}, {cfg['blocks']} "
            f"block{'s' * (cfg['blocks'] != 1)}")


def _processor(mach: dict) -> str:
    """The device that ran the timings: the GPU's name, or the CPU model with its cores and
    the threads this process had (as lscpu says them)."""
    cores = mach.get("cpu_cores")
    threads = mach.get("cpu_threads") or mach.get("cpu_count")
    cpu = (f"{mach['cpu']}, {f'{cores} cores / ' if cores else ''}{threads} threads "
           f"(torch uses {mach['torch_threads']})")
    if mach.get("gpu"):
        return f"GPU {mach['gpu']} (host CPU {cpu})"
    return f"CPU {cpu}"


def run_header(data: dict) -> list[str]:
    """What the figures are of, at the top of results.md and of the printed table: the model
    size, dtypes and r, the processor, and (for --quick or another size than the README's
    headline table) that only the ratios measured in this run compare with that table."""
    cfg, mach = data["config"], data["machine"]
    lines = [f"Model: Llama-shaped, {_size(cfg)} ({7 * cfg['blocks']} adapted layers), "
             f"r = {cfg['r']}; forward and training in {cfg['forward_dtype']}, switching and "
             f"drift in {cfg['switch_dtype']}.",
             f"Measured on: {_processor(mach)}, device {mach['device']}."]
    full = dict(zip(("hidden", "intermediate", "blocks"), FULL_SIZE))
    if (cfg["hidden"], cfg["intermediate"], cfg["blocks"]) != FULL_SIZE:
        smaller = cfg["hidden"] * cfg["intermediate"] * cfg["blocks"] < math.prod(FULL_SIZE)
        lines.append(
            ("--quick: " if cfg["quick"] else "")
            + f"these figures are for a {'smaller' if smaller else 'different'} model than the "
            f"README's headline table ({_size(full)}, r = {default_r(FULL_SIZE[0])}, measured "
            "on a shared 2-core AMD EPYC). They are not comparable with its milliseconds or "
            "MiB: compare them with it only as ratios, each measured side by side in this run.")
    elif mach.get("gpu"):
        lines.append("The README's headline table was measured on a CPU: compare these GPU "
                     "figures with it only as ratios, each measured side by side in this run.")
    return lines


def _timing_rule(cfg: dict) -> str:
    if not cfg.get("time_cap_s"):
        return (f"Times are medians of {cfg['repeat']} rounds, the methods of one configuration "
                "timed round robin (no time cap: no more rounds).")
    return (f"Times are medians of rounds, the methods of one configuration timed round "
            f"robin: at least {cfg['repeat']} rounds (at least 3 where {cfg['repeat']} rounds "
            "of the slowest switch would run past the time cap), and more until every method's "
            "median has its ~95% confidence interval (order statistics n/2 ∓ 0.98·√n, at "
            f"least {sb.MIN_CI_VALUES} rounds) within ±{_pct(cfg.get('ci_target', CI_TARGET))} of "
            f"it, or until {cfg['time_cap_s']:g} s of rounds per configuration have passed.")


def _capped(data: dict) -> list[dict]:
    """The timings whose interval stayed wider than the target (the time cap came first)."""
    return [m for m in data["measurements"] if m.get("ci_tight") is False]


def markdown(data: dict) -> str:
    cfg, mach, ver = data["config"], data["machine"], data["versions"]
    target = cfg.get("ci_target", CI_TARGET)
    out = ["# shira-kernels bench", ""]
    out += [f"- {line}" for line in run_header(data)]
    out += ["", f"Made by `{data['command']}` on {data['created']}; the run took "
            f"{data['elapsed_s']:.0f} s.", "",
            "## Machine", "",
            f"- {_processor(mach)}, {mach.get('memory_gib')} GiB; {mach['platform']}",
            f"- device {mach['device']}" + (f": {mach['gpu']}" if mach.get("gpu") else "")
            + f"; shira_kernels backend {mach['backend']}",
            f"- load average (1, 5, 15 min): {mach.get('load_average_start')} at the start, "
            f"{mach.get('load_average_end')} at the end (this run's own work included)",
            "- versions: " + ", ".join(f"{k} {v if v is not None else 'not installed'}"
                                       for k, v in ver.items()), "",
            "## Setup", "",
            f"Llama-shaped model: {_size(cfg)} ({7 * cfg['blocks']} adapted projections), "
            f"r = {cfg['r']} (SHiRA: r·(out+in) entries per weight; LoRA: rank r, scale "
            f"{cfg['lora_scale']}). Forward and training in {cfg['forward_dtype']}, switching "
            f"and drift in {cfg['switch_dtype']}. Switch times at "
            f"{', '.join(str(n) for n in cfg['switch_layers'])} "
            f"layers; drift after {cfg['drift_switches']} switches A→B→A… on one block of "
            f"{cfg['drift_hidden']}/{cfg['drift_intermediate']}. " + _timing_rule(cfg)
            + " The ratio is ours / the best alternative (below 1: ours is faster or smaller).",
            ""]
    if data["skipped"]:
        out += ["## Skipped", ""] + [f"- {s['what']}: {s['reason']}" for s in data["skipped"]] \
            + [""]
    capped = _capped(data)
    out += [f"## Intervals wider than ±{_pct(target)}", ""]
    if capped:
        out += [f"The time cap per configuration came before these intervals narrowed to "
                f"±{_pct(target)} (marked * below): read their medians with the interval.", ""]
        out += [f"- {m['metric']}, {m['method']}: {_fmt(m['median'], m['unit'])}, interval "
                f"{_fmt(m['ci95'][0], m['unit'])}–{_fmt(m['ci95'][1], m['unit'])} "
                f"({_deviation(m)}) after {m['n']} rounds" for m in capped]
    else:
        out += [f"None: every timing's interval is within ±{_pct(target)} of its median."]
    out += ["", "## Summary", "", "| " + " | ".join(TABLE_HEAD) + " |",
            "|---|---|---:|---:|---|---:|---:|---:|"]
    out += ["| " + " | ".join(row) + " |" for row in table_rows(data["comparisons"])]
    out += ["", "## Every measurement", "",
            "| group | metric | method | role | median | 95% CI of the median | min | max | n "
            "| × best alternative |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in data["measurements"]:
        unit = m["unit"]
        if m["skipped"]:
            out.append(f"| {m['group']} | {m['metric']} | {m['method']} | {m['role']} | "
                       f"skipped: {m['skipped']} | | | | | |")
            continue
        if m["n"] < sb.MIN_CI_VALUES or not m.get("ci95"):
            ci = f"– (n < {sb.MIN_CI_VALUES})"
        else:
            ci = f"{_fmt(m['ci95'][0], unit)}–{_fmt(m['ci95'][1], unit)} ({_deviation(m)})"
        ci += "*" if m.get("ci_tight") is False else ""
        out.append(f"| {m['group']} | {m['metric']} | {m['method']} | {m['role']} | "
                   f"{_fmt(m['median'], unit)} | {ci} | {_fmt(m['min'], unit)} | "
                   f"{_fmt(m['max'], unit)} | {m['n']} | {_ratio(m['ratio'])} |")
    drift = [m for m in data["measurements"] if m["group"] == "drift" and not m["skipped"]]
    if drift:
        out += ["", "Drift: entries not bit-identical to the base after the switches: "
                + "; ".join(f"{m['method']} {m['extra']['changed_entries']:,} of "
                            f"{m['extra']['entries']:,}" for m in drift) + "."]
    if data["plots"]:
        out += ["", "## Plots", "", "Error bars: the ~95% interval of each median (memory: "
                "min–max of its processes)."]
        out += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in data["plots"]]
    out += ["", "Wall times on a shared machine are noisy; the ratios, measured side by side in "
            "one run, are what to compare.", ""]
    return "\n".join(out)


def plots(data: dict, out_dir: Path) -> tuple[list[str], str | None]:
    """The PNG files written, or ([], why not)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], f"matplotlib is not installed ({ENABLE_HINT} enables the plots)"
    ms = [m for m in data["measurements"] if m["median"] is not None]
    written = []

    def save(fig, name):
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))

    groups = {m["group"] for m in ms}
    # Switch time against the number of layers.
    if "switch" in groups:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        _switch_plot(ax, ms, data)
        save(fig, "switch_time_vs_layers.png")
    if "forward" in groups:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        _forward_plot(ax, ms, data)
        save(fig, "forward_latency_vs_tokens.png")
    if groups & {"train", "memory"}:
        fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.2))
        _training_plot(axes, ms, data)
        save(fig, "training_time_memory.png")
    return written, None


def _error_bars(rows: list[dict]) -> list[list[float]]:
    """matplotlib's yerr (below, above) from each measurement's ~95% interval of the median."""
    bounds = [m.get("ci95") or (m["min"], m["max"]) for m in rows]
    return [[m["median"] - lo for m, (lo, _) in zip(rows, bounds)],
            [hi - m["median"] for m, (_, hi) in zip(rows, bounds)]]


def _plot_title(what: str, dtype: str, data: dict) -> str:
    """Two lines: what, and the size, dtype, r and processor it was measured with."""
    cfg, mach = data["config"], data["machine"]
    where = f"GPU {mach['gpu']}" if mach.get("gpu") else \
        f"CPU {mach['cpu']}, {mach.get('cpu_threads') or mach.get('cpu_count')} threads"
    return (f"{what}\nhidden {cfg['hidden']} / intermediate {cfg['intermediate']} / "
            f"{cfg['blocks']} blocks, r = {cfg['r']}, {dtype}; {where}")


def _lines(ax, ms, group: str, x: str) -> None:
    """One line per method of ``group``: its medians against params[x], with error bars."""
    for method in dict.fromkeys(m["method"] for m in ms if m["group"] == group):
        rows = sorted((m for m in ms if m["group"] == group and m["method"] == method),
                      key=lambda m: m["params"][x])
        ax.errorbar([m["params"][x] for m in rows], [m["median"] for m in rows],
                    yerr=_error_bars(rows), marker="o", capsize=3, label=method)


def _switch_plot(ax, ms, data) -> None:
    _lines(ax, ms, "switch", "layers")
    ax.set_xticks(data["config"]["switch_layers"])
    ax.set(xlabel="adapted layers", ylabel="switch A→B (ms, log; bars: 95% CI of the median)",
           yscale="log")
    ax.set_title(_plot_title("Adapter switch time", data["config"]["switch_dtype"], data),
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _forward_plot(ax, ms, data) -> None:
    _lines(ax, ms, "forward", "tokens")
    ax.set(xlabel="tokens (log)", ylabel="forward latency (ms, log; bars: 95% CI of the median)",
           xscale="log", yscale="log")
    ax.set_title(_plot_title(f"Forward latency, {7 * data['config']['blocks']} layers",
                             data["config"]["forward_dtype"], data), fontsize=9)
    tokens = data["config"]["forward_tokens"]
    ax.set_xticks(tokens, [str(t) for t in tokens])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _training_plot(axes, ms, data) -> None:
    ax_t, ax_m = axes
    for ax, group, label in ((ax_t, "train", "training step (ms; bars: 95% CI of the median)"),
                             (ax_m, "memory", "peak memory of the step (MiB; bars: min–max)")):
        rows = [m for m in ms if m["group"] == group]
        names = [m["method"] for m in rows]
        colors = ["tab:green" if m["role"] == "ours" else "tab:gray" for m in rows]
        ax.bar(range(len(rows)), [m["median"] for m in rows], color=colors,
               yerr=_error_bars(rows), capsize=3)
        ax.set_xticks(range(len(rows)), names, rotation=15, fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    ax_t.figure.suptitle(_plot_title(f"Training, {data['config']['train_tokens']} tokens",
                                     data["config"]["forward_dtype"], data), fontsize=9)


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------
def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def run_bench(cfg: BenchConfig, out_dir, *, command: str = "shira-kernels bench",
              progress: bool = True) -> dict:
    """Run every measurement, print the table, write results.json, results.md and the plots
    into ``out_dir``; returns the results as written to the JSON file."""
    started = time.perf_counter()
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device "
                           f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'none'})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    described = machine(device)  # before the run: its load average is the machine's own
    with_peft = sb.peft_available()
    skipped = []
    if not with_peft:
        skipped.append({"what": "PEFT ShiRA and PEFT LoRA (switching, drift, forward, training, "
                                "memory)", "reason": _PEFT_SKIP})
    per_group = {"forward": 2 + len(cfg.forward_tokens), "switch": len(cfg.switch_blocks),
                 "drift": 4 if with_peft else 2, "binary": len(cfg.binary_tokens), "memory": 1}
    steps = sum(per_group[g] for g in cfg.groups) + 1
    bar = Progress(steps, enabled=progress)
    load = _busy_note()
    if load:
        bar.note(load)
    for s in skipped:
        bar.note(f"skipping {s['what']}: {s['reason']}")
    results = Results()
    try:
        measures = {"forward": measure_forward_and_train, "switch": measure_switch,
                    "drift": measure_drift, "memory": measure_memory,
                    "binary": lambda c, r, b, d, _: measure_binary(c, r, b, d)}
        for group in cfg.groups:
            measures[group](cfg, results, bar, device, with_peft)
        bar.step("results and plots")
        results.finish()
        data = {
            "schema": SCHEMA,
            "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": command,
            "elapsed_s": 0.0,
            "machine": described,
            "versions": versions(),
            "config": dict(asdict(cfg), switch_layers=[7 * b for b in cfg.switch_blocks]),
            "skipped": skipped,
            "comparisons": results.comparisons(),
            "measurements": [asdict(m) for m in results.items],
            "plots": [],
        }
        written, why_not = plots(data, out_dir)
        if why_not:
            skipped.append({"what": "plots", "reason": why_not})
            bar.note(f"skipping the plots: {why_not}")
        data["plots"] = [Path(p).name for p in written]
    finally:
        bar.close()
    data["elapsed_s"] = round(time.perf_counter() - started, 1)
    with contextlib.suppress(OSError):
        data["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    data = _jsonable(data)
    (out_dir / "results.json").write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    (out_dir / "results.md").write_text(markdown(data), encoding="utf-8")
    print("\n".join(run_header(data)) + "\n")
    print(text_table(table_rows(data["comparisons"])))
    capped = _capped(data)
    if capped:
        print(f"* {len(capped)} of the timings ended at the time cap with their 95% interval "
              f"wider than ±{_pct(data['config']['ci_target'])} of the median (listed in "
              "results.md)")
    for s in skipped:
        print(f"skipped {s['what']}: {s['reason']}")
    bank_drift = [m for m in data["measurements"]
                  if m["group"] == "drift" and m["method"] == BANK]
    if bank_drift and bank_drift[0]["median"] != 0:
        print("WARNING: the AdapterBank changed the base weights; it must restore them exactly")
    print(f"written: {out_dir / 'results.json'}, {out_dir / 'results.md'}"
          + "".join(f", {out_dir / p}" for p in data["plots"])
          + f" ({data['elapsed_s']:.0f} s)")
    return data


def _probe_main(argv) -> int:
    if len(argv) != 2 or argv[0] != "--memory-probe":
        print("usage: python -m shira_kernels.harness.bench_suite --memory-probe SPEC_JSON",
              file=sys.stderr)
        return 2
    print("PROBE " + json.dumps(memory_probe(json.loads(argv[1]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main(sys.argv[1:]))
