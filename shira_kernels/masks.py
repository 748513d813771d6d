"""SHiRA masks: which entries of a base weight W [out, in] an adapter trains.

A mask is a bool tensor [out, in] with exactly `budget(...)` True entries. The budget is given
either as r, PEFT's convention of matching a rank-r LoRA's parameter count (r·(out+in) entries),
or as a density in (0, 1] (round(density·out·in) entries).

Builders, one per SHiRA variant:
    rand_mask    SHiRA-Rand   uniformly random entries (seeded)
    struct_mask  SHiRA-Struct the diagonal, then whole rows and columns (seeded)
    wm_mask      SHiRA-WM     the entries of largest |W|
    grad_mask    SHiRA-Grad   the entries of largest accumulated |gradient|
    snip_mask    SHiRA-SNIP   the entries of largest |W ⊙ accumulated gradient|
make_mask dispatches by name (or checks a ready-made mask), split_mask deals one mask out into
k disjoint equal parts (MoSA), and mask_to_indices gives the sorted flat indices the kernels take.

Seeded masks are drawn on the CPU with a torch.Generator and then moved, so a seed gives the
same mask on every device. Score-based masks rank in fp32 and break ties by the lower flat index,
so they do not depend on how torch.topk happens to order equal values.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

from .formats import flat_index_dtype

__all__ = [
    "KINDS",
    "budget",
    "grad_mask",
    "make_mask",
    "mask_to_indices",
    "rand_mask",
    "snip_mask",
    "split_mask",
    "struct_mask",
    "wm_mask",
]

KINDS = ("rand", "struct", "wm", "grad", "snip")


# ---------------------------------------------------------------------------------------------
# Validation and the budget.
# ---------------------------------------------------------------------------------------------
def _shape2d(shape, name: str) -> tuple[int, int]:
    """(out, in) from a 2-D tensor or a 2-sequence of positive ints; ValueError otherwise."""
    if isinstance(shape, torch.Tensor):
        if shape.dim() != 2:
            raise ValueError(f"{name} must be 2-D [out, in], got shape {tuple(shape.shape)}")
        dims = tuple(shape.shape)
    else:
        try:
            dims = tuple(shape)
        except TypeError:
            raise ValueError(f"{name} must be a 2-D shape [out, in], got {shape!r}") from None
        if len(dims) != 2:
            raise ValueError(f"{name} must be 2-D [out, in], got shape {dims}")
        if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in dims):
            raise ValueError(f"{name} must be a shape of ints, got {dims}")
    if dims[0] < 1 or dims[1] < 1:
        raise ValueError(f"{name} must have positive sizes, got shape {dims}")
    return int(dims[0]), int(dims[1])


def _check_weight(weight, name: str = "weight") -> tuple[int, int]:
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    return _shape2d(weight, name)


def _check_mask(mask, name: str = "mask") -> tuple[int, int]:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor, got {got}")
    return _shape2d(mask, name)


def budget(shape, r: int | None = None, density: float | None = None) -> int:
    """Number of entries a SHiRA adapter trains in a weight of this shape [out, in].

    Give exactly one of r (entries = r·(out+in), the parameter count of a rank-r LoRA) or
    density (entries = round(density·out·in), density in (0, 1]). The count must be at least 1
    and at most out·in; a budget that does not fit raises ValueError rather than being clamped,
    so that a config mistake is not silently turned into a different adapter.
    """
    out_f, in_f = _shape2d(shape, "shape")
    total = out_f * in_f
    if (r is None) == (density is None):
        got = "neither" if r is None else f"both r={r!r} and density={density!r}"
        raise ValueError(f"give exactly one of r= or density= (got {got})")
    if r is not None:
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        count = int(r) * (out_f + in_f)
        asked = f"r={r}"
    else:
        if (isinstance(density, bool) or not isinstance(density, numbers.Real)
                or not math.isfinite(density) or not 0 < density <= 1):
            raise ValueError(f"density must be a float in (0, 1], got {density!r}")
        count = round(float(density) * total)
        asked = f"density={density}"
    if not 1 <= count <= total:
        raise ValueError(f"budget does not fit the shape: {asked} asks for {count} entries but a "
                         f"{out_f}x{in_f} weight has {total}")
    return count


def check_seed(seed, name: str = "seed", count: int = 1) -> int:
    """``seed`` as an int such that seed .. seed + count − 1 all fit torch's Generator (which
    takes [−2⁶³, 2⁶⁴) and would otherwise fail with an overflow that names nothing)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {seed!r}")
    seed = int(seed)
    if seed < -2 ** 63 or seed + count - 1 >= 2 ** 64:
        span = "" if count == 1 else f" (and {name} + {count - 1} for the last layer)"
        raise ValueError(f"{name} must lie in [-2**63, 2**64){span}, got {seed}")
    return seed


def _generator(seed) -> torch.Generator:
    return torch.Generator().manual_seed(check_seed(seed))


def _from_flat(flat_index: torch.Tensor, out_f: int, in_f: int, device) -> torch.Tensor:
    mask = torch.zeros(out_f * in_f, dtype=torch.bool, device=flat_index.device)
    mask[flat_index] = True
    return mask.view(out_f, in_f).to(device)


# ---------------------------------------------------------------------------------------------
# Seeded masks: SHiRA-Rand and SHiRA-Struct.
# ---------------------------------------------------------------------------------------------
def sample_distinct(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct int64 indices drawn uniformly from range(n), in random order, on the CPU."""
    if 4 * k > n:
        return torch.randperm(n, generator=gen)[:k]
    # Sparse budgets on big weights (r=32 on a 4096x14336 layer is about 1% of it): a full
    # randperm would cost 8 bytes per entry of the weight. Draw iid indices instead until k
    # distinct ones are in hand, then keep a random k of them. Every step is symmetric in the
    # index labels, so the kept set is still a uniformly random k-subset.
    seen = torch.empty(0, dtype=torch.int64)
    while seen.numel() < k:
        draw = torch.randint(n, (k + k // 4 + 16,), generator=gen)
        seen = torch.unique(torch.cat([seen, draw]))
    return seen[torch.randperm(seen.numel(), generator=gen)[:k]]


def rand_mask(shape, *, r: int | None = None, density: float | None = None, seed: int = 0,
              device=None) -> torch.Tensor:
    """SHiRA-Rand: `budget` entries chosen uniformly at random, reproducible from `seed`.

    shape may also be a 2-D tensor (its shape is used, and its device when device is None).
    """
    out_f, in_f = _shape2d(shape, "shape")
    if device is None and isinstance(shape, torch.Tensor):
        device = shape.device
    k = budget((out_f, in_f), r=r, density=density)
    flat = sample_distinct(out_f * in_f, k, _generator(seed))
    return _from_flat(flat, out_f, in_f, device)


def struct_mask(shape, *, r: int | None = None, density: float | None = None, seed: int = 0,
                device=None) -> torch.Tensor:
    """SHiRA-Struct: the diagonal plus whole rows and whole columns, exactly `budget` entries.

    The order, chosen so the count is exact whatever the budget:
      1. the diagonal (min(out, in) entries), so the sparse update can reach full rank;
      2. whole rows and whole columns, alternately (a row first), each picked at random among
         those not yet taken; a line adds only the entries not already in the mask;
      3. when the next line would overshoot, a random subset of its remaining entries fills the
         budget exactly, so at most one row or column is partial.
    A budget smaller than the diagonal gets a random subset of the diagonal instead.
    shape may also be a 2-D tensor (its shape is used, and its device when device is None).
    """
    out_f, in_f = _shape2d(shape, "shape")
    if device is None and isinstance(shape, torch.Tensor):
        device = shape.device
    k = budget((out_f, in_f), r=r, density=density)
    gen = _generator(seed)
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    diag = torch.arange(min(out_f, in_f))
    if k < diag.numel():
        pick = diag[torch.randperm(diag.numel(), generator=gen)[:k]]
        mask[pick, pick] = True
        return mask.to(device)
    mask[diag, diag] = True
    remaining = k - diag.numel()
    # Draw both line orders up front so the lines taken depend only on the seed and the shape.
    rows = torch.randperm(out_f, generator=gen).tolist()
    cols = torch.randperm(in_f, generator=gen).tolist()
    take_row = True
    # Every row taken means the mask is full (and likewise every column), which the budget
    # check rules out while entries remain, so the line lists cannot both run dry here.
    while remaining > 0:
        if (take_row and rows) or not cols:
            line = mask[rows.pop(), :]
        else:
            line = mask[:, cols.pop()]
        take_row = not take_row
        free = torch.nonzero(~line).view(-1)
        if free.numel() > remaining:
            free = free[torch.randperm(free.numel(), generator=gen)[:remaining]]
        line[free] = True  # line is a view, so this writes into mask
        remaining -= free.numel()
    return mask.to(device)


# ---------------------------------------------------------------------------------------------
# Score-based masks: SHiRA-WM, SHiRA-Grad, SHiRA-SNIP.
# ---------------------------------------------------------------------------------------------
def _top_k_mask(scores: torch.Tensor, k: int, what: str) -> torch.Tensor:
    """Bool mask of the k largest scores; ties at the cut go to the lower flat index."""
    flat = scores.reshape(-1)
    if torch.isnan(flat).any():
        raise ValueError(f"{what} contains NaN; cannot rank its entries")
    n = flat.numel()
    if k == n:
        return torch.ones_like(scores, dtype=torch.bool)
    # Threshold at the k-th largest value, then fill the remaining places from the entries
    # equal to it in index order (nonzero is ascending): deterministic on every device, which
    # torch.topk's order among equal values is not promised to be.
    kth = torch.kthvalue(flat, n - k + 1).values
    mask = flat > kth
    need = k - int(mask.sum())
    if need > 0:
        mask[torch.nonzero(flat == kth).view(-1)[:need]] = True
    return mask.view_as(scores)


def _accumulate(grads, shape: tuple[int, int], device, signed: bool) -> torch.Tensor:
    """fp32 sum of the gradients (or of their absolute values) on `device`."""
    if isinstance(grads, torch.Tensor):
        if grads.dim() == 2:
            grads = [grads]  # one gradient passed bare; iterating it would yield its rows
    elif not isinstance(grads, Iterable):
        raise ValueError(f"grads must be an iterable of {shape[0]}x{shape[1]} gradient tensors, "
                         f"got {type(grads).__name__}")
    total = None
    for i, g in enumerate(grads):
        if not isinstance(g, torch.Tensor):
            raise ValueError(f"grads[{i}] must be a tensor, got {type(g).__name__}")
        if tuple(g.shape) != shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but the weight has shape "
                             f"{shape}")
        if total is None:
            device = g.device if device is None else device
            total = torch.zeros(shape, dtype=torch.float32, device=device)
        g = g.detach().to(device=total.device, dtype=torch.float32)
        total.add_(g if signed else g.abs())
    if total is None:
        raise ValueError("grads is empty: pass at least one gradient from a calibration batch")
    return total


def wm_mask(weight: torch.Tensor, *, r: int | None = None,
            density: float | None = None) -> torch.Tensor:
    """SHiRA-WM: the `budget` entries of largest |W| (ranked in fp32, ties to the lower index)."""
    out_f, in_f = _check_weight(weight)
    k = budget((out_f, in_f), r=r, density=density)
    return _top_k_mask(weight.detach().float().abs(), k, "weight")


def grad_mask(weight_or_shape, grads, *, r: int | None = None,
              density: float | None = None) -> torch.Tensor:
    """SHiRA-Grad: the `budget` entries of largest accumulated |gradient|.

    grads is an iterable of gradient tensors of the weight's shape, one per calibration batch
    the caller ran (a single 2-D tensor counts as one). Σ|g| is accumulated in fp32. The mask
    is on the weight's device, or on the first gradient's when a shape is given.
    """
    if isinstance(weight_or_shape, torch.Tensor):
        shape = _check_weight(weight_or_shape, "weight_or_shape")
        device = weight_or_shape.device
    else:
        shape = _shape2d(weight_or_shape, "weight_or_shape")
        device = None
    k = budget(shape, r=r, density=density)
    return _top_k_mask(_accumulate(grads, shape, device, signed=False), k, "grads")


def snip_mask(weight: torch.Tensor, grads, *, r: int | None = None,
              density: float | None = None) -> torch.Tensor:
    """SHiRA-SNIP: the `budget` entries of largest |W ⊙ G|, G the fp32 sum of the gradients.

    The gradients are summed with their signs (the first-order change in loss from removing an
    entry uses the full-batch gradient), then multiplied by W; see grad_mask for grads.
    """
    shape = _check_weight(weight)
    k = budget(shape, r=r, density=density)
    total = _accumulate(grads, shape, weight.device, signed=True)
    return _top_k_mask((weight.detach().float() * total).abs(), k, "W * grads")


# ---------------------------------------------------------------------------------------------
# Dispatch, MoSA split, indices.
# ---------------------------------------------------------------------------------------------
def make_mask(kind, weight: torch.Tensor, *, r: int | None = None,
              density: float | None = None, seed: int = 0, grads=None) -> torch.Tensor:
    """A mask for `weight` by name — "rand", "struct", "wm", "grad" or "snip" — or a ready bool
    tensor, checked (shape; count against the budget when r or density is given) and returned
    on the weight's device. seed is used by rand/struct, grads by grad/snip (ignored otherwise).
    """
    shape = _check_weight(weight)
    if isinstance(kind, torch.Tensor):
        _check_mask(kind, "mask")
        if tuple(kind.shape) != shape:
            raise ValueError(f"mask has shape {tuple(kind.shape)} but the weight has shape "
                             f"{shape}")
        if r is not None or density is not None:
            k = budget(shape, r=r, density=density)
            count = int(kind.sum())
            if count != k:
                asked = f"r={r}" if r is not None else f"density={density}"
                raise ValueError(f"mask has {count} entries but {asked} asks for {k}")
        return kind.to(weight.device)
    if kind not in KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {', '.join(KINDS)} "
                         f"or a bool tensor")
    if kind == "rand":
        return rand_mask(shape, r=r, density=density, seed=seed, device=weight.device)
    if kind == "struct":
        return struct_mask(shape, r=r, density=density, seed=seed, device=weight.device)
    if kind == "wm":
        return wm_mask(weight, r=r, density=density)
    if grads is None:
        raise ValueError(f"mask kind {kind!r} needs grads: pass the weight's gradients from one "
                         f"or more calibration batches")
    if kind == "grad":
        return grad_mask(weight, grads, r=r, density=density)
    return snip_mask(weight, grads, r=r, density=density)


def split_mask(mask: torch.Tensor, k: int, *, seed: int = 0) -> list[torch.Tensor]:
    """MoSA's split: k disjoint bool masks of equal size whose union is `mask`.

    The True entries are shuffled with `seed` and dealt out in k equal runs. The count must be
    divisible by k: uneven experts would train different numbers of parameters.
    """
    out_f, in_f = _check_mask(mask)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    flat = torch.nonzero(mask.reshape(-1)).view(-1).cpu()
    if flat.numel() % k:
        raise ValueError(f"cannot split a mask of {flat.numel()} entries into k={k} equal parts "
                         f"({flat.numel()} is not divisible by {k})")
    flat = flat[torch.randperm(flat.numel(), generator=_generator(seed))]
    # tensor_split always gives k parts (empty ones for an empty mask), unlike chunk.
    return [_from_flat(part, out_f, in_f, mask.device) for part in flat.tensor_split(k)]


def mask_to_indices(mask: torch.Tensor) -> torch.Tensor:
    """Sorted flat indices (row·in + col) of the True entries; int32 when out·in < 2**31 (every
    index fits), else int64."""
    out_f, in_f = _check_mask(mask)
    flat = torch.nonzero(mask.reshape(-1)).view(-1)  # nonzero is in ascending order
    return flat.to(flat_index_dtype((out_f, in_f)))
