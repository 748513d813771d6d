"""Launch tables of the one-launch grouped kernels (multi_delta_linear's, on Triton and CUDA).

A call's groups are the adapters present in the batch: group i has the rows order[b0:b1] of
(b0, b1) = bounds[i] and the adapter in slot s = slots[i], whose CSR structure lies where the
set keeps it: its entries at [e0, e1) of the set's entry buffers (cols, values, rows) and its
row offsets, counted from e0, at offsets[o : o + rows + 1], with (e0, e1, o) = starts[s] (the
set's segments, formats.SparseDeltaSetState). The kernels read those buffers in place: a
call's tables grow with its groups and tiles, never with the adapters' entries (a copy of
those would move as many bytes as the sparse product reads). The work is cut into tiles that
never span two groups, each tile one program (Triton) or one block row of the grid (CUDA):

  spmm_tables:  tiles of up to ``tile_rows`` rows of one group; per group where its row
                offsets and its entries start in the buffers.
  sddmm_tables: tiles of up to ``tile_entries`` entries of one group, as positions in the
                set's entry buffers (the kernel writes each entry's gradient, times its
                group's scale, at the same position of a buffer like values); each entry sums
                over its group's rows, group_rows[2i : 2i + 2].

A call's integer tables are one int64 tensor, copied to the device at once.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class SpmmTables(NamedTuple):
    tile_group: torch.Tensor     # int64 [tiles]: the tile's group
    tile_start: torch.Tensor     # int64 [tiles]: its first position in order
    group_end: torch.Tensor      # int64 [groups]: b1 of each group
    group_offsets: torch.Tensor  # int64 [groups]: o, where the group's row offsets start
    group_entries: torch.Tensor  # int64 [groups]: e0, what its row offsets are counted from
    scales: torch.Tensor         # fp32 [groups]


class SddmmTables(NamedTuple):
    tile_group: torch.Tensor   # int64 [tiles]
    tile_start: torch.Tensor   # int64 [tiles]: its first entry in the entry buffers
    entry_end: torch.Tensor    # int64 [groups]: e1 of each group
    group_rows: torch.Tensor   # int64 [2·groups]: (b0, b1) of each group
    scales: torch.Tensor       # fp32 [groups]


def _int64_tables(device, *tables: list) -> list[torch.Tensor]:
    """The int lists as int64 tensors on ``device``: views of one tensor, one copy."""
    flat = torch.tensor([v for table in tables for v in table], dtype=torch.int64,
                        device=device)
    return list(flat.split([len(table) for table in tables]))


def _scales(scales, slots, device) -> torch.Tensor:
    return torch.tensor([float(scales[s]) for s in slots], dtype=torch.float32, device=device)


def _tiles(spans, size: int) -> tuple[list[int], list[int]]:
    """(tile_group, tile_start): group i's span [a, b) cut into tiles of up to ``size``."""
    tile_group, tile_start = [], []
    for i, (a, b) in enumerate(spans):
        starts = range(a, b, size)
        tile_group.extend([i] * len(starts))
        tile_start.extend(starts)
    return tile_group, tile_start


def spmm_tables(bounds, slots, starts, scales, tile_rows: int, device) -> SpmmTables:
    tables = _int64_tables(device, *_tiles(bounds, tile_rows), [b1 for _, b1 in bounds],
                           [starts[s][2] for s in slots], [starts[s][0] for s in slots])
    return SpmmTables(*tables, _scales(scales, slots, device))


def sddmm_tables(bounds, slots, starts, scales, tile_entries: int, device) -> SddmmTables:
    entries = [starts[s][:2] for s in slots]
    tables = _int64_tables(device, *_tiles(entries, tile_entries), [e1 for _, e1 in entries],
                           [b for bound in bounds for b in bound])
    return SddmmTables(*tables, _scales(scales, slots, device))
