"""Batched scatter-swap in one Triton launch over a task table (see ops/scatter_swap.py)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _swap_block(weight_addr, value_addr, k, offs, mask, ELEM: tl.constexpr):
    # mask excludes indices outside the weight: those entries are never touched.
    weight = weight_addr.to(tl.pointer_type(ELEM))
    value = value_addr.to(tl.pointer_type(ELEM))
    old = tl.load(weight + k, mask=mask)
    new = tl.load(value + offs, mask=mask)
    tl.store(weight + k, new, mask=mask)
    tl.store(value + offs, old, mask=mask)


@triton.jit
def _scatter_swap_kernel(tasks_ptr, blocks_ptr, skipped, BLOCK: tl.constexpr):
    # One program per row of the block table: entries [start, start + BLOCK) of one task.
    pid = tl.program_id(0).to(tl.int64)
    task = tasks_ptr + 7 * tl.load(blocks_ptr + 2 * pid)
    start = tl.load(blocks_ptr + 2 * pid + 1)
    n = tl.load(task + 3)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    index_addr = tl.load(task + 1)
    if tl.load(task + 5) != 0:
        k = tl.load(index_addr.to(tl.pointer_type(tl.int64)) + offs, mask=mask, other=0)
    else:
        k = tl.load(index_addr.to(tl.pointer_type(tl.int32)) + offs, mask=mask, other=0).to(tl.int64)
    # Every index is checked against the weight's size (ops/scatter_swap.py says why); the
    # entries outside are skipped and counted.
    inside = mask & (k >= 0) & (k < tl.load(task + 6))
    tl.atomic_add(skipped, tl.sum((mask & ~inside).to(tl.int64), axis=0))
    mask = inside
    # Swap bit patterns as integers: exact for fp32, fp16 and bf16 alike.
    if tl.load(task + 4) == 2:
        _swap_block(tl.load(task), tl.load(task + 2), k, offs, mask, tl.int16)
    else:
        _swap_block(tl.load(task), tl.load(task + 2), k, offs, mask, tl.int32)


def scatter_swap(tasks, blocks, block: int) -> int:
    """Launch over ``tasks`` [T, 7] and ``blocks`` [B, 2] (int64, on the tensors' device);
    returns the count of entries skipped for an index outside their weight (as the native
    kernels do; a device sync: switching is a state change, not a hot loop)."""
    num_blocks = blocks.shape[0]
    if not num_blocks:
        return 0
    skipped = torch.zeros(1, dtype=torch.int64, device=tasks.device)
    _scatter_swap_kernel[(num_blocks,)](tasks, blocks, skipped, BLOCK=block)
    return int(skipped.item())
