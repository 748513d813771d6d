"""Sparse-delta matmul parts in Triton: spmm (y + scale·x·Sᵀ, CSR), sddmm (gradient of S's
values), add_at_indices (W + scale·S on S's entries) and grouped_spmm (many adapters' spmm over
their rows of one batch in one launch, for multi_delta_linear). Accumulation in fp32."""
import torch
import triton
import triton.language as tl

from .._group_tables import sddmm_tables, spmm_tables
from ._rounding import to_element


@triton.jit
def _entry_block(n, BLOCK: tl.constexpr):
    """This program's block of entries j of n (one program per block), and which exist."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return j, j < n


@triton.jit
def _load_index(indices, j, mask):
    """indices[j] as int64 (0 where masked off: a safe address)."""
    return tl.load(indices + j, mask=mask, other=0).to(tl.int64)


@triton.jit
def _row_products(x, t, t_mask, cols, values, start, end, n_cols, BLOCK_T: tl.constexpr,
                  BLOCK_NZ: tl.constexpr):
    """Σ_j values[j]·x[t, cols[j]] over one CSR row's entries j in [start, end), for the tokens
    t (fp32, [BLOCK_T]); entries a block at a time, the same order for every caller."""
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for j0 in range(start, end, BLOCK_NZ):
        j = j0 + tl.arange(0, BLOCK_NZ)
        j_mask = j < end
        c = _load_index(cols, j, j_mask)
        v = tl.load(values + j, mask=j_mask, other=0.0).to(tl.float32)
        xt = tl.load(x + t[:, None] * n_cols + c[None, :],
                     mask=t_mask[:, None] & j_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xt * v[None, :], axis=1)
    return acc


@triton.jit
def _spmm_kernel(y_in, y_out, x, offsets, cols, values, scale, tokens, n_rows, n_cols,
                 BLOCK_T: tl.constexpr, BLOCK_NZ: tl.constexpr):
    # One program per (output feature r, tile of tokens): the row's entries are read once per
    # tile and applied to all its tokens.
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < tokens
    start = tl.load(offsets + r)
    end = tl.load(offsets + r + 1)
    acc = _row_products(x, t, t_mask, cols, values, start, end, n_cols, BLOCK_T, BLOCK_NZ)
    y = tl.load(y_in + t * n_rows + r, mask=t_mask, other=0.0).to(tl.float32)
    tl.store(y_out + t * n_rows + r, to_element(y + scale * acc, y_out.dtype.element_ty),
             mask=t_mask)


@triton.jit
def _sddmm_kernel(gy, x, rows, cols, g, tokens, nnz, n_out, n_in,
                  BLOCK_T: tl.constexpr, BLOCK_NZ: tl.constexpr):
    # One program per block of entries, looping over all tokens; wide token tiles keep the
    # fp32 sum close to a pairwise one (few sequential adds), as accurate as a dense matmul.
    j, j_mask = _entry_block(nnz, BLOCK_NZ)
    r = _load_index(rows, j, j_mask)
    c = _load_index(cols, j, j_mask)
    acc = tl.zeros([BLOCK_NZ], dtype=tl.float32)
    for t0 in range(0, tokens, BLOCK_T):
        t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        m = (t < tokens)[:, None] & j_mask[None, :]
        a = tl.load(gy + t[:, None] * n_out + r[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.load(x + t[:, None] * n_in + c[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=0)
    tl.store(g + j, acc, mask=j_mask)


@triton.jit
def _add_at_indices_kernel(out, weight, numel, idx, values, saved, skipped, scale, nnz,
                           SAVE: tl.constexpr, BLOCK: tl.constexpr):
    j, in_range = _entry_block(nnz, BLOCK)
    k = _load_index(idx, j, in_range)
    # An index outside the weight is never read or written, only counted (ops/scatter_swap.py
    # says why the Python checks alone are not enough).
    m = in_range & (k >= 0) & (k < numel)
    tl.atomic_add(skipped, tl.sum((in_range & ~m).to(tl.int64), axis=0))
    w = tl.load(weight + k, mask=m, other=0.0)
    if SAVE:  # the base entries, exactly, to be swapped back later
        tl.store(saved + j, w, mask=m)
    v = tl.load(values + j, mask=m, other=0.0).to(tl.float32)
    tl.store(out + k, to_element(w.to(tl.float32) + scale * v, out.dtype.element_ty), mask=m)


def spmm(y_in, x, offsets, cols, values, scale: float, overwrite_y: bool = False):
    tokens, n_rows = y_in.shape
    # In place is safe: each program reads its elements of y_in before writing them.
    y_out = y_in if overwrite_y else torch.empty_like(y_in)
    if tokens and n_rows:
        block_t = min(64, triton.next_power_of_2(tokens))
        grid = (n_rows, triton.cdiv(tokens, block_t))
        _spmm_kernel[grid](y_in, y_out, x, offsets, cols, values, float(scale), tokens, n_rows,
                           x.shape[1], BLOCK_T=block_t, BLOCK_NZ=32)
    return y_out


def sddmm(gy, x, rows, cols, offsets=None):
    # offsets (S's CSR row offsets) is a hint for kernels walking S by rows; this one works
    # per entry and does not read it.
    nnz = rows.numel()
    g = torch.empty(nnz, dtype=torch.float32, device=gy.device)
    if nnz:
        block_nz = 64
        _sddmm_kernel[(triton.cdiv(nnz, block_nz),)](
            gy, x, rows, cols, g, gy.shape[0], nnz, gy.shape[1], x.shape[1],
            BLOCK_T=128, BLOCK_NZ=block_nz)
    return g


def add_at_indices(out, weight, idx, values, scale: float, saved=None) -> int:
    """out[idx] = weight[idx] + scale·values (saved, if given, gets weight[idx] first); returns
    how many entries were skipped for an index outside the weight."""
    nnz = idx.numel()
    if not nnz:
        return 0
    block = 1024
    skipped = torch.zeros(1, dtype=torch.int64, device=weight.device)
    _add_at_indices_kernel[(triton.cdiv(nnz, block),)](
        out, weight, weight.numel(), idx, values, saved if saved is not None else values,
        skipped, float(scale), nnz, SAVE=saved is not None, BLOCK=block)
    return int(skipped.item())


@triton.jit
def _grouped_spmm_kernel(y, x, order, tile_group, tile_start, group_end, group_offsets,
                         group_entries, offsets, cols, values, scales, n_rows, n_cols,
                         BLOCK_T: tl.constexpr, BLOCK_NZ: tl.constexpr):
    # _spmm_kernel over many adapters at once: one program per (output feature r, tile of one
    # group's rows); the group's CSR row offsets start at offsets[group_offsets[g]], counted
    # from entry group_entries[g] of the adapters' cols and values, and its rows are
    # order[tile_start .. group_end) (a tile never spans two groups).
    r = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    g = tl.load(tile_group + tile).to(tl.int64)
    p = tl.load(tile_start + tile).to(tl.int64) + tl.arange(0, BLOCK_T)
    p_mask = p < tl.load(group_end + g)
    t = tl.load(order + p, mask=p_mask, other=0).to(tl.int64)
    row_offsets = offsets + tl.load(group_offsets + g)
    e0 = tl.load(group_entries + g)
    start = e0 + tl.load(row_offsets + r)
    end = e0 + tl.load(row_offsets + r + 1)
    acc = _row_products(x, t, p_mask, cols, values, start, end, n_cols, BLOCK_T, BLOCK_NZ)
    scale = tl.load(scales + g)
    yv = tl.load(y + t * n_rows + r, mask=p_mask, other=0.0).to(tl.float32)
    tl.store(y + t * n_rows + r, to_element(yv + scale * acc, y.dtype.element_ty), mask=p_mask)


def grouped_spmm(y, x, order, bounds, slots, starts, offsets, cols, values, scales):
    """In place, for each group i: y[rows] += scales[s]·x[rows]·S_sᵀ with s = slots[i] and
    rows = order[bounds[i][0]:bounds[i][1]], in ONE launch (_group_tables.py: S_s read where
    the buffers offsets, cols and values hold it, at (e0, e1, o) = starts[s]; tiles of 64 rows
    of one group)."""
    n_rows = y.shape[1]
    if not slots or not n_rows:
        return y
    t = spmm_tables(bounds, slots, starts, scales, 64, y.device)
    _grouped_spmm_kernel[(n_rows, t.tile_group.numel())](
        y, x, order, t.tile_group, t.tile_start, t.group_end, t.group_offsets, t.group_entries,
        offsets, cols, values, t.scales, n_rows, x.shape[1], BLOCK_T=64, BLOCK_NZ=32)
    return y


@triton.jit
def _grouped_sddmm_kernel(gy, x, order, tile_group, tile_start, entry_end, group_rows, scales,
                          rows, cols, g, n_out, n_in, BLOCK_T: tl.constexpr,
                          BLOCK_NZ: tl.constexpr):
    # _sddmm_kernel over many adapters at once: one program per block of one group's entries
    # (positions in the adapters' rows/cols, and in g), over that group's rows order[b0:b1]
    # only, times the group's scale.
    tile = tl.program_id(0)
    grp = tl.load(tile_group + tile).to(tl.int64)
    j = tl.load(tile_start + tile).to(tl.int64) + tl.arange(0, BLOCK_NZ)
    j_mask = j < tl.load(entry_end + grp)
    r = _load_index(rows, j, j_mask)
    c = _load_index(cols, j, j_mask)
    b0 = tl.load(group_rows + 2 * grp)
    b1 = tl.load(group_rows + 2 * grp + 1)
    acc = tl.zeros([BLOCK_NZ], dtype=tl.float32)
    for p0 in range(b0, b1, BLOCK_T):
        p = p0 + tl.arange(0, BLOCK_T)
        p_mask = p < b1
        t = tl.load(order + p, mask=p_mask, other=0).to(tl.int64)
        m = p_mask[:, None] & j_mask[None, :]
        a = tl.load(gy + t[:, None] * n_out + r[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.load(x + t[:, None] * n_in + c[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=0)
    tl.store(g + j, tl.load(scales + grp) * acc, mask=j_mask)


def grouped_sddmm(gy, x, order, bounds, slots, starts, rows, cols, scales):
    """For each group i, scales[s]·sddmm(gy[rows_i], x[rows_i]) over its slot's entries (rows_i
    = order[bounds[i][0]:bounds[i][1]], s = slots[i], its entries at [e0, e1) of the buffers
    rows and cols, (e0, e1, _) = starts[s]), in ONE launch: fp32 like rows, each present
    adapter's gradient at its entries, 0 elsewhere."""
    g = torch.zeros(rows.numel(), dtype=torch.float32, device=gy.device)
    if slots and g.numel():
        t = sddmm_tables(bounds, slots, starts, scales, 64, gy.device)
        if t.tile_group.numel():
            _grouped_sddmm_kernel[(t.tile_group.numel(),)](
                gy, x, order, t.tile_group, t.tile_start, t.entry_end, t.group_rows, t.scales,
                rows, cols, g, gy.shape[1], x.shape[1], BLOCK_T=128, BLOCK_NZ=64)
    return g
