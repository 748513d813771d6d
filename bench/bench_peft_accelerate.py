"""PEFT's own ShiRA layer before and after shira_kernels.integrations.peft.accelerate().

Groups (pytest-benchmark), per layer shape (out x in):

  peft_train_step[<out>x<in>-T<T>]  one training step at T tokens (gradients set to None,
                                    forward, loss = mean of the squared output, backward; base
                                    frozen, shira_weight trainable, the input requires grad as
                                    inside a network)
  peft_merge_unmerge[<out>x<in>]    merge() then unmerge() of the adapter

Variants: "peft-ShiRA" (peft.tuners.shira.Linear as PEFT ships it: the forward clones W and adds
the adapter densely, merge adds and unmerge subtracts a sparse COO tensor) and
"peft-ShiRA-accelerated" (the same layer after accelerate(): sparse_delta_linear forward,
scatter_swap_ merge / unmerge). Each variant has its own copy of the base weight.

Defaults: a Llama-shaped 4096x4096 projection, r = 32 (r·(out+in) entries, random non-zero
values), fp32 on the CPU, training at 128 and 2048 tokens. Override for small runs, e.g.

    SHIRA_BENCH_SHAPES=256x256 SHIRA_BENCH_TRAIN_TOKENS=16 \\
        python -m pytest bench/bench_peft_accelerate.py --benchmark-only -q

(SHIRA_BENCH_TOKENS also sets the training token counts when SHIRA_BENCH_TRAIN_TOKENS is unset;
SHIRA_BENCH_R and SHIRA_BENCH_ROUNDS set the rank and the timed rounds). Skipped where peft is
not installed. Nothing here asserts on time.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from shira_kernels.harness import benchmark as sb

from conftest import RANK, ROUNDS, TRAIN_TOKENS, WARMUP_ROUNDS, env, env_shapes

pytestmark = pytest.mark.skipif(not sb.peft_available(),
                                reason="peft is not installed (pip install peft)")


SHAPES = env_shapes(env("SHIRA_BENCH_SHAPES", "4096x4096"))
DTYPE = torch.float32
VARIANTS = ("peft-ShiRA", "peft-ShiRA-accelerated")


def _shape_id(shape) -> str:
    return f"{shape[0]}x{shape[1]}"


class Layers:
    """PEFT's ShiRA layer twice, same mask and values, each on its own copy of one base weight;
    the second one accelerated."""

    def __init__(self, shape):
        from shira_kernels.integrations.peft import accelerate

        out_f, in_f = shape
        self.shape = shape
        linear = sb.make_linear(out_f, in_f, dtype=DTYPE, seed=0)
        self.peft = sb.peft_shira_layer(linear, r=RANK, seed=0)
        self.accelerated = accelerate(sb.peft_shira_layer(sb.clone_linear(linear), r=RANK,
                                                          seed=0))

    def get(self, variant: str):
        return self.peft if variant == "peft-ShiRA" else self.accelerated


@pytest.fixture(scope="module", params=SHAPES, ids=_shape_id)
def layers(request):
    built = Layers(request.param)
    yield built
    del built


@pytest.fixture(autouse=True)
def _quiet():
    # PEFT warns about sparse_coo_tensor's invariant checks on every delta it builds.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _describe(benchmark, group: str, layers: Layers, variant: str, tokens: int | None = None):
    suffix = f"-T{tokens}" if tokens is not None else ""
    benchmark.group = f"{group}[{_shape_id(layers.shape)}{suffix}]"
    benchmark.extra_info.update(shape=_shape_id(layers.shape), rank=RANK, dtype="fp32",
                                variant=variant)
    if tokens is not None:
        benchmark.extra_info["tokens"] = tokens


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tokens", TRAIN_TOKENS)
def test_peft_train_step(benchmark, layers, tokens, variant):
    _describe(benchmark, "peft_train_step", layers, variant, tokens)
    layer = layers.get(variant)
    params = sb.trainable_parameters(layer)
    assert params and not layer.get_base_layer().weight.requires_grad
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, layers.shape[1], generator=gen, dtype=DTYPE).requires_grad_()
    try:
        benchmark.pedantic(sb.training_step(layer, x, params), rounds=ROUNDS,
                           warmup_rounds=WARMUP_ROUNDS)
        assert all(p.grad is not None for p in params)
    finally:
        for p in params:  # do not keep gradients alive into the next test
            p.grad = None


@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_merge_unmerge(benchmark, layers, variant):
    _describe(benchmark, "peft_merge_unmerge", layers, variant)
    layer = layers.get(variant)

    def merge_unmerge():
        layer.merge()
        layer.unmerge()

    benchmark.pedantic(merge_unmerge, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    assert not layer.merged
