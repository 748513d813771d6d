"""Batched scatter-swap in one Triton launch over a task table (see ops/scatter_swap.py)."""
import triton
import triton.language as tl


@triton.jit
def _swap_block(weight_addr, value_addr, k, offs, mask, ELEM: tl.constexpr):
    weight = weight_addr.to(tl.pointer_type(ELEM))
    value = value_addr.to(tl.pointer_type(ELEM))
    old = tl.load(weight + k, mask=mask)
    new = tl.load(value + offs, mask=mask)
    tl.store(weight + k, new, mask=mask)
    tl.store(value + offs, old, mask=mask)


@triton.jit
def _scatter_swap_kernel(tasks_ptr, blocks_ptr, BLOCK: tl.constexpr):
    # One program per row of the block table: entries [start, start + BLOCK) of one task.
    pid = tl.program_id(0).to(tl.int64)
    task = tasks_ptr + 6 * tl.load(blocks_ptr + 2 * pid)
    start = tl.load(blocks_ptr + 2 * pid + 1)
    n = tl.load(task + 3)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    index_addr = tl.load(task + 1)
    if tl.load(task + 5) != 0:
        k = tl.load(index_addr.to(tl.pointer_type(tl.int64)) + offs, mask=mask, other=0)
    else:
        k = tl.load(index_addr.to(tl.pointer_type(tl.int32)) + offs, mask=mask, other=0).to(tl.int64)
    # Swap bit patterns as integers: exact for fp32, fp16 and bf16 alike.
    if tl.load(task + 4) == 2:
        _swap_block(tl.load(task), tl.load(task + 2), k, offs, mask, tl.int16)
    else:
        _swap_block(tl.load(task), tl.load(task + 2), k, offs, mask, tl.int32)


def scatter_swap(tasks, blocks, block: int) -> None:
    """Launch over ``tasks`` [T, 6] and ``blocks`` [B, 2] (int64, on the tensors' device)."""
    num_blocks = blocks.shape[0]
    if num_blocks:
        _scatter_swap_kernel[(num_blocks,)](tasks, blocks, BLOCK=block)
