"""Turning other fine-tunes into sparse (SHiRA-style) adapters.

sparse_diff     a full fine-tune → one SparseDelta per weight: the largest |finetuned − base|
lora_to_sparse  a LoRA (scale·B·A) → the SparseDelta of its largest entries, row block by row
                block, so the dense update is never built whole; also the relative error
add_sparse      wa·a + wb·b of two SparseDeltas of one shape (union of their entries)

The budget is the one of shira_kernels.masks.budget: r·(out+in) entries (the parameter count of
a rank-r LoRA) or round(density·out·in). Entries are ranked by |ΔW| in fp32 and ties at the cut
go to the lower flat index, as for the score-based masks, so the choice does not depend on how a
device orders equal values. Values are fp32.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import torch

from .formats import SparseDelta, flat_index_dtype
from .masks import budget

__all__ = ["add_sparse", "lora_to_sparse", "sparse_diff"]


def _check_budget_args(r, density) -> None:
    if (r is None) == (density is None):
        got = "neither" if r is None else f"both r={r!r} and density={density!r}"
        raise ValueError(f"give exactly one of r= or density= (got {got})")


def _largest(scores: torch.Tensor, k: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the k largest of the 1-D ``scores`` (all of them when k ≥ their count).

    Ties at the cut go to the lower ``index`` (the entries' flat indices; None means the
    positions themselves are in flat-index order). The positions come in no particular order.
    """
    n = scores.numel()
    if k >= n:
        return torch.arange(n, device=scores.device)
    kth = torch.kthvalue(scores, n - k + 1).values  # the k-th largest
    above = torch.nonzero(scores > kth).view(-1)
    tied = torch.nonzero(scores == kth).view(-1)
    need = k - above.numel()
    if index is not None and need < tied.numel():
        tied = tied[torch.argsort(index[tied])]  # flat indices are unique: no ties left
    return torch.cat([above, tied[:need]])


# ---------------------------------------------------------------------------------------------
# Full fine-tune → sparse adapter.
# ---------------------------------------------------------------------------------------------
def _pick_keys(finetuned: Mapping, base: Mapping, keys) -> list[str]:
    if keys is None:
        chosen = [name for name, t in finetuned.items()
                  if isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_floating_point()
                  and isinstance(base.get(name), torch.Tensor) and base[name].dim() == 2
                  and base[name].is_floating_point()]
        if not chosen:
            raise ValueError("no 2-D floating-point tensor is present in both "
                             "finetuned_state_dict and base_state_dict")
        return chosen
    if isinstance(keys, str):
        keys = [keys]
    elif not isinstance(keys, Iterable):
        raise ValueError(f"keys must be an iterable of state_dict keys, got {type(keys).__name__}")
    keys = list(keys)
    if not keys:
        raise ValueError("keys is empty: name at least one weight, or pass keys=None for all")
    for name in keys:
        for what, sd in (("finetuned_state_dict", finetuned), ("base_state_dict", base)):
            if name not in sd:
                raise KeyError(f"keys names {name!r}, which {what} does not have")
            t = sd[name]
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                got = (f"a {t.dim()}-D {t.dtype} tensor" if isinstance(t, torch.Tensor)
                       else type(t).__name__)
                raise ValueError(f"{what}[{name!r}] must be a 2-D floating-point tensor, got {got}")
    return keys


def sparse_diff(finetuned_state_dict: Mapping[str, torch.Tensor],
                base_state_dict: Mapping[str, torch.Tensor], density: float | None = None,
                r: int | None = None, keys: Iterable[str] | None = None) -> dict[str, SparseDelta]:
    """A full fine-tune as sparse adapters: for each weight, the budget's entries of largest
    |ΔW|, ΔW = finetuned − base (in fp32), with ΔW's values there.

    keys: the weights to convert (each must be a 2-D floating tensor in both dicts); None takes
    every 2-D floating tensor present in both. Give exactly one of density or r; every weight
    gets its full budget, even where it barely changed (pass keys to leave weights out).
    Returns {key: SparseDelta} on the fine-tuned tensors' devices.
    """
    _check_budget_args(r, density)
    for what, sd in (("finetuned_state_dict", finetuned_state_dict),
                     ("base_state_dict", base_state_dict)):
        if not isinstance(sd, Mapping):
            raise ValueError(f"{what} must be a mapping of names to tensors, got "
                             f"{type(sd).__name__}")
    result = {}
    for name in _pick_keys(finetuned_state_dict, base_state_dict, keys):
        tuned, base = finetuned_state_dict[name], base_state_dict[name]
        if tuned.shape != base.shape:
            raise ValueError(f"{name!r} has shape {tuple(tuned.shape)} in finetuned_state_dict but "
                             f"{tuple(base.shape)} in base_state_dict")
        try:
            k = budget(tuned.shape, r=r, density=density)
        except ValueError as e:
            raise ValueError(f"{name!r}: {e}") from None
        delta = (tuned.detach().float() - base.detach().to(tuned.device).float()).view(-1)
        if torch.isnan(delta).any():
            raise ValueError(f"{name!r}: finetuned − base contains NaN; cannot rank its entries")
        pos = _largest(delta.abs(), k)
        result[name] = SparseDelta.from_flat(pos, tuned.shape, delta[pos])
    return result


def add_sparse(a: SparseDelta, b: SparseDelta, wa: float = 1.0, wb: float = 1.0) -> SparseDelta:
    """wa·a + wb·b: the union of the two index sets, values summed (in fp32, then cast to the
    promoted dtype of a's and b's values). Entries that cancel stay as explicit zeros."""
    for name, d in (("a", a), ("b", b)):
        if not isinstance(d, SparseDelta):
            raise TypeError(f"{name} must be a SparseDelta, got {type(d).__name__}")
    for name, w in (("wa", wa), ("wb", wb)):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"{name} must be a finite number, got {w!r}")
    if a.shape != b.shape:
        raise ValueError(f"a has shape {a.shape} but b has shape {b.shape}")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}")
    flat = torch.cat([a.flat_indices.long(), b.flat_indices.long()])
    values = torch.cat([a.values.float() * float(wa), b.values.float() * float(wb)])
    union, where = torch.unique(flat, sorted=True, return_inverse=True)
    summed = torch.zeros(union.numel(), dtype=torch.float32, device=values.device)
    summed.index_add_(0, where, values)
    dtype = torch.promote_types(a.dtype, b.dtype)
    return SparseDelta(a.shape, union.to(flat_index_dtype(a.shape)), summed.to(dtype))


# ---------------------------------------------------------------------------------------------
# LoRA → sparse adapter, block-wise.
# ---------------------------------------------------------------------------------------------
def lora_to_sparse(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float = 1.0,
                   r: int | None = None, density: float | None = None,
                   block_rows: int = 256) -> tuple[SparseDelta, float]:
    """Project the LoRA update ΔW = scale·(B·A) (B [out, rank], A [rank, in]) onto its budget's
    largest-|ΔW| entries. Returns (S, ‖ΔW − S‖_F / ‖ΔW‖_F); the error is 0.0 when ΔW = 0.

    Budget: r·(out+in) entries or a density; with neither, r is the LoRA's own rank, so S has
    exactly as many parameters as the LoRA. ΔW is computed ``block_rows`` rows at a time, each
    entry summed in fp64 and rounded once to fp32 (so its value does not depend on the
    blocking), keeping a running top-k: a block's entries above the current k-th largest |ΔW|
    (at most k of them) are merged with the k best so far. Peak memory is a few block-sized
    tensors (the fp64 block, then the fp32 block and its |·|) plus O(k), never the whole
    [out, in] update. The ranking is a total order (|ΔW| descending, then flat index
    ascending), so the result equals ranking the dense ΔW at once. The error is accumulated
    from the squares of the entries dropped and kept (no cancellation).
    """
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            got = (f"a {t.dim()}-D {t.dtype} tensor" if isinstance(t, torch.Tensor)
                   else type(t).__name__)
            raise ValueError(f"{name} must be a 2-D floating-point tensor, got {got}")
    rank, in_f = lora_A.shape
    out_f = lora_B.shape[0]
    if lora_B.shape[1] != rank:
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)} but lora_A has shape "
                         f"{tuple(lora_A.shape)}: lora_B must be [out, {rank}] (rank from lora_A)")
    if lora_A.device != lora_B.device:
        raise ValueError(f"lora_A is on {lora_A.device} but lora_B on {lora_B.device}")
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a number, got a tensor of shape {tuple(scale.shape)}")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if (isinstance(block_rows, bool) or not isinstance(block_rows, numbers.Integral)
            or block_rows < 1):
        raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
    if r is None and density is None:
        r = rank
    _check_budget_args(r, density)
    k = budget((out_f, in_f), r=r, density=density)

    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} has NaN or infinite entries")
    # fp64 products and sums, rounded once to fp32: each entry of ΔW is (but for a
    # one-in-billions rounding tie) the correctly rounded value, whatever the row blocking.
    a = lora_A.detach().double()
    b = lora_B.detach().double()
    device = a.device
    top_flat = torch.empty(0, dtype=torch.int64, device=device)
    top_vals = torch.empty(0, dtype=torch.float32, device=device)
    threshold = None  # the k-th largest |ΔW| so far, once k entries have been seen
    dropped_sq = 0.0  # Σ ΔW² over the entries not (or no longer) among the candidates
    for row0 in range(0, out_f, int(block_rows)):
        block = torch.matmul(b[row0:row0 + block_rows], a).mul_(float(scale))
        block = block.to(torch.float32).view(-1)
        scores = block.abs()
        if threshold is None:
            pos = _largest(scores, k)
        else:
            # Every later entry has a higher flat index than all kept ones, so a tie with the
            # threshold loses: only strictly larger entries can enter.
            pos = torch.nonzero(scores > threshold).view(-1)
            if pos.numel() > k:
                pos = pos[_largest(scores[pos], k)]  # pos is ascending: flat-index order
        del scores
        cand_flat = pos + row0 * in_f
        cand_vals = block[pos]
        block[pos] = 0
        dropped_sq += float(block.square_().sum())
        del block
        flat = torch.cat([top_flat, cand_flat])
        vals = torch.cat([top_vals, cand_vals])
        keep = _largest(vals.abs(), k, index=flat)
        if keep.numel() < vals.numel():
            evicted = torch.ones(vals.numel(), dtype=torch.bool, device=device)
            evicted[keep] = False
            dropped_sq += float(vals[evicted].double().square().sum())
        top_flat, top_vals = flat[keep], vals[keep]
        if top_vals.numel() == k:
            threshold = top_vals.abs().min()
    kept_sq = float(top_vals.double().square().sum())
    total_sq = kept_sq + dropped_sq
    if not math.isfinite(total_sq):
        raise ValueError("scale·lora_B·lora_A overflows float32")
    error = math.sqrt(dropped_sq / total_sq) if total_sq > 0 else 0.0
    return SparseDelta.from_flat(top_flat, (out_f, in_f), top_vals), error
