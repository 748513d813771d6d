"""scatter_swap_ on the CPU against the usual ways of switching an adapter into a weight.

One group per dtype, "scatter_swap[fp32]" and "scatter_swap[bf16]", each timing on the same
tensors: the op on every backend available for CPU tensors, the same swap written as a Python
loop of torch indexing, fusing a LoRA of the same rank with addmm_, and PEFT's LoRA merge.

Default sizes are two Llama-7B blocks (hidden 4096, intermediate 11008, rank 32); override with
SHIRA_BENCH_HIDDEN, SHIRA_BENCH_INTERMEDIATE, SHIRA_BENCH_BLOCKS and SHIRA_BENCH_R, e.g.

    SHIRA_BENCH_HIDDEN=512 SHIRA_BENCH_INTERMEDIATE=1376 SHIRA_BENCH_BLOCKS=1 \\
        python -m pytest bench/ --benchmark-only -q

Nothing here asserts on time. The swaps are self-inverse, so after each swap benchmark (an even
number of calls) the weights and values must be back as they were: that is checked, cheaply,
on the swapped entries and on a bit-pattern sum of every weight.
"""
from __future__ import annotations

import os

import pytest
import torch

import shira_kernels
from shira_kernels.harness import benchmark as sb

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BACKENDS = shira_kernels.backends.available("cpu")
ROUNDS, WARMUP_ROUNDS = 5, 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


HIDDEN = _env_int("SHIRA_BENCH_HIDDEN", 4096)
INTERMEDIATE = _env_int("SHIRA_BENCH_INTERMEDIATE", 11008)
BLOCKS = _env_int("SHIRA_BENCH_BLOCKS", 2)
RANK = _env_int("SHIRA_BENCH_R", 32)


@pytest.fixture(scope="module", params=list(DTYPES))
def case(request):
    shapes = sb.llama_linear_shapes(HIDDEN, INTERMEDIATE, BLOCKS)
    built = sb.make_swap_case(shapes, r=RANK, dtype=DTYPES[request.param], seed=0)
    built.label = request.param
    yield built


def _group(benchmark, case) -> None:
    benchmark.group = f"scatter_swap[{case.label}]"
    benchmark.extra_info.update(
        dtype=case.label, layers=len(case.weights), rank=case.r,
        weight_bytes=case.weight_bytes, swapped_entries=case.swapped_entries)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _fingerprint(case):
    """What a swap may change (the indexed entries, the values), exactly, plus a checksum of
    every weight's bit patterns to catch a write anywhere else."""
    return ([w.view(-1)[i].clone() for w, i in zip(case.weights, case.indices)],
            [v.clone() for v in case.values],
            [int(_bits(w).sum(dtype=torch.int64)) for w in case.weights])


def _assert_same(before, after) -> None:
    for name, a, b in zip(("swapped entries", "values"), before[:2], after[:2]):
        for k, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(_bits(x), _bits(y)), f"{name} of layer {k} not restored"
    assert before[2] == after[2], "a weight changed outside the swapped entries"


def _bench_self_inverse(benchmark, case, swap) -> None:
    calls = 0

    def run():
        nonlocal calls
        swap()
        calls += 1

    before = _fingerprint(case)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    if calls % 2:
        run()
    _assert_same(before, _fingerprint(case))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_swap(benchmark, case, backend):
    _group(benchmark, case)
    benchmark.extra_info["traffic_bytes"] = sb.swap_traffic_bytes(case)

    def swap():
        with shira_kernels.use_backend(backend):
            shira_kernels.scatter_swap_(case.weights, case.indices, case.values)

    _bench_self_inverse(benchmark, case, swap)


def test_torch_loop_swap(benchmark, case):
    _group(benchmark, case)
    _bench_self_inverse(benchmark, case, lambda: sb.torch_loop_swap(case))


# The merges change the weights for good (they drift by a LoRA delta per call); the swaps above
# do not depend on the weights' values, and each checks against a snapshot taken just before.
def test_lora_addmm_fuse(benchmark, case):
    _group(benchmark, case)
    benchmark.pedantic(sb.lora_addmm_fuse, args=(case,), rounds=ROUNDS,
                       warmup_rounds=WARMUP_ROUNDS)


def test_peft_lora_merge(benchmark, case):
    _group(benchmark, case)
    benchmark.pedantic(sb.peft_lora_merge, args=(case,), rounds=ROUNDS,
                       warmup_rounds=WARMUP_ROUNDS)
