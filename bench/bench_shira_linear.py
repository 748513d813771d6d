"""ShiraLinear against nn.Linear and PEFT's ShiRA and LoRA layers, one linear layer at a time.

Groups (pytest-benchmark), per layer shape (out x in) and token count T:

  forward[<out>x<in>-T<T>]     inference latency (under torch.no_grad): nn.Linear, ShiraLinear
                               unfused (strategy "auto"), ShiraLinear fused (merged: a plain
                               linear), PEFT ShiRA, PEFT LoRA
  train_step[<out>x<in>-T<T>]  one training step (gradients set to None, forward, loss = mean of
                               the squared output, backward; base frozen, adapter trainable, the
                               input requires grad as inside a network): ShiraLinear, PEFT ShiRA,
                               PEFT LoRA

Every adapter has r = 32 (r·(out+in) sparse entries, or a rank-32 LoRA) with random non-zero
values; fp32 on the CPU. Defaults: shapes 4096x4096 and 11008x4096, forward at 1, 16, 128 and
2048 tokens, training at 128 and 2048. Override for small runs, e.g.

    SHIRA_BENCH_SHAPES=256x256 SHIRA_BENCH_TOKENS=1,16 SHIRA_BENCH_TRAIN_TOKENS=16 \\
        python -m pytest bench/bench_shira_linear.py --benchmark-only -q

(SHIRA_BENCH_TOKENS alone also sets the training token counts; SHIRA_BENCH_R, SHIRA_BENCH_ROUNDS
set the rank and the timed rounds). The PEFT variants are skipped where peft is not installed.
Nothing here asserts on time; bench/report_shira_linear.py writes the summary report.
"""
from __future__ import annotations


import pytest
import torch

from shira_kernels.harness import benchmark as sb

from conftest import RANK, ROUNDS, TRAIN_TOKENS, WARMUP_ROUNDS, env, env_ints, env_shapes

HAS_PEFT = sb.peft_available()
NEEDS_PEFT = pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed (pip install peft)")


SHAPES = env_shapes(env("SHIRA_BENCH_SHAPES", "4096x4096,11008x4096"))
TOKENS = env_ints(env("SHIRA_BENCH_TOKENS", "1,16,128,2048"))
DTYPE = torch.float32


def _shape_id(shape) -> str:
    return f"{shape[0]}x{shape[1]}"


class Layers:
    """The layers of one shape. nn.Linear, the unfused ShiraLinear and both PEFT layers share one
    base weight (none of them changes it for good); the fused ShiraLinear has its own copy,
    merged once."""

    def __init__(self, shape):
        out_f, in_f = shape
        self.shape = shape
        self.linear = sb.make_linear(out_f, in_f, dtype=DTYPE, seed=0)
        fused_base = sb.clone_linear(self.linear)
        self.shira = sb.shira_linear_layer(self.linear, r=RANK, seed=0)
        self.fused = sb.shira_linear_layer(fused_base, r=RANK, seed=0)
        self.fused.merge()
        self.peft_shira = sb.peft_shira_layer(self.linear, r=RANK, seed=0) if HAS_PEFT else None
        self.peft_lora = sb.peft_lora_layer(self.linear, r=RANK, seed=0) if HAS_PEFT else None

    def get(self, variant: str) -> torch.nn.Module:
        return {"nn.Linear": self.linear, "ShiraLinear-unfused": self.shira,
                "ShiraLinear-fused": self.fused, "peft-ShiRA": self.peft_shira,
                "peft-LoRA": self.peft_lora}[variant]


@pytest.fixture(scope="module", params=SHAPES, ids=_shape_id)
def layers(request):
    built = Layers(request.param)
    yield built
    del built


def _inputs(layers: Layers, tokens: int, requires_grad: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, layers.shape[1], generator=gen, dtype=DTYPE)
    return x.requires_grad_(requires_grad)


def _describe(benchmark, group: str, layers: Layers, tokens: int, variant: str) -> None:
    benchmark.group = f"{group}[{_shape_id(layers.shape)}-T{tokens}]"
    benchmark.extra_info.update(shape=_shape_id(layers.shape), tokens=tokens, rank=RANK,
                                dtype="fp32", variant=variant)


def _variant(name: str):
    return pytest.param(name, marks=NEEDS_PEFT) if name.startswith("peft") else name


FORWARD_VARIANTS = [_variant(v) for v in ("nn.Linear", "ShiraLinear-unfused", "ShiraLinear-fused",
                                          "peft-ShiRA", "peft-LoRA")]
TRAIN_VARIANTS = [_variant(v) for v in ("ShiraLinear-unfused", "peft-ShiRA", "peft-LoRA")]


@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_forward(benchmark, layers, tokens, variant):
    _describe(benchmark, "forward", layers, tokens, variant)
    layer = layers.get(variant)
    x = _inputs(layers, tokens)
    if variant == "ShiraLinear-unfused":
        benchmark.extra_info["strategy"] = layer.strategy

    def forward():
        with torch.no_grad():
            return layer(x)

    y = benchmark.pedantic(forward, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    assert y.shape == (tokens, layers.shape[0])


@pytest.mark.parametrize("variant", TRAIN_VARIANTS)
@pytest.mark.parametrize("tokens", TRAIN_TOKENS)
def test_train_step(benchmark, layers, tokens, variant):
    _describe(benchmark, "train_step", layers, tokens, variant)
    layer = layers.get(variant)
    params = sb.trainable_parameters(layer)
    assert params and not layers.linear.weight.requires_grad
    x = _inputs(layers, tokens, requires_grad=True)
    try:
        benchmark.pedantic(sb.training_step(layer, x, params), rounds=ROUNDS,
                           warmup_rounds=WARMUP_ROUNDS)
        assert all(p.grad is not None for p in params) and layers.linear.weight.grad is None
    finally:
        for p in params:  # do not keep gradients alive into the next test
            p.grad = None
