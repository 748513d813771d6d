"""Launch tables of the one-launch grouped kernels (multi_delta_linear's, on Triton and CUDA).

A call's groups are the adapters present in the batch: group i has the rows
order[b0:b1] of (b0, b1) = bounds[i] and the adapter in slot slots[i]. Their CSR structures are
concatenated for the call (O(nnz) of the adapters present), and the work is cut into tiles that
never span two groups, each tile one program (Triton) or one block row of the grid (CUDA):

  spmm_tables:  tiles of up to ``tile_rows`` rows of one group; group i's CSR row offsets are
                offsets[i·(out + 1) : (i + 1)·(out + 1)], shifted to index the concatenated
                cols and values.
  sddmm_tables: tiles of up to ``tile_entries`` entries of one group, in the concatenated
                rows and cols; each entry sums over its group's rows, group_rows[2i : 2i + 2].
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class SpmmTables(NamedTuple):
    tile_group: torch.Tensor   # int64 [tiles]: the tile's group
    tile_start: torch.Tensor   # int64 [tiles]: its first position in order
    group_end: torch.Tensor    # int64 [groups]: b1 of each group
    offsets: torch.Tensor      # int64 [groups·(out + 1)]: the groups' row offsets, concatenated
    cols: torch.Tensor         # [nnz of the groups]
    values: torch.Tensor       # [nnz of the groups], contiguous
    scales: torch.Tensor       # fp32 [groups]


class SddmmTables(NamedTuple):
    tile_group: torch.Tensor   # int64 [tiles]
    tile_start: torch.Tensor   # int64 [tiles]: its first entry in rows/cols
    entry_end: torch.Tensor    # int64 [groups]: one past each group's last entry
    group_rows: torch.Tensor   # int64 [2·groups]: (b0, b1) of each group
    rows: torch.Tensor         # int32 [nnz of the groups]
    cols: torch.Tensor         # [nnz of the groups]
    sizes: list[int]           # each group's entry count (to split the result)


def _int64(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def spmm_tables(bounds, slots, offsets, cols, values, scales, tile_rows: int,
                device) -> SpmmTables:
    cat_offsets, cat_cols, cat_values, base = [], [], [], 0
    tile_group, tile_start = [], []
    for i, ((b0, b1), s) in enumerate(zip(bounds, slots)):
        cat_offsets.append(offsets[s] + base)
        cat_cols.append(cols[s])
        cat_values.append(values[s])
        base += values[s].numel()
        starts = range(b0, b1, tile_rows)
        tile_group.extend([i] * len(starts))
        tile_start.extend(starts)
    return SpmmTables(_int64(tile_group, device), _int64(tile_start, device),
                      _int64([b1 for _, b1 in bounds], device), torch.cat(cat_offsets),
                      torch.cat(cat_cols), torch.cat(cat_values).contiguous(),
                      torch.tensor([float(scales[s]) for s in slots], dtype=torch.float32,
                                   device=device))


def sddmm_tables(bounds, slots, rows, cols, tile_entries: int, device) -> SddmmTables:
    sizes = [rows[s].numel() for s in slots]
    tile_group, tile_start, entry_end, base = [], [], [], 0
    for i, n in enumerate(sizes):
        starts = range(base, base + n, tile_entries)
        tile_group.extend([i] * len(starts))
        tile_start.extend(starts)
        base += n
        entry_end.append(base)
    empty = torch.empty(0, dtype=torch.int32, device=device)
    return SddmmTables(_int64(tile_group, device), _int64(tile_start, device),
                       _int64(entry_end, device), _int64([b for bound in bounds for b in bound],
                                                         device),
                       torch.cat([rows[s] for s in slots]) if slots else empty,
                       torch.cat([cols[s] for s in slots]) if slots else empty, sizes)
