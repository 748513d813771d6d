"""MoSA, Mixture of Sparse Adapters (Zhang et al., 2023, arXiv:2312.02923): "split & merge".

An adapter's weight matrices are dealt out into k disjoint sparse modules of equal size
(masks.split_mask); every training step activates a random subset of the modules, and only the
active modules' entries take part in the forward and get gradients; after training the modules
merge into one adapter, which costs nothing extra at inference. Two adapters are split here:

    MoSABottleneck   AdaptFormer's bottleneck, scale·up(relu(down(x))), added in parallel to a
                     block (ParallelAdapter); merge() gives a dense Bottleneck whose entries are
                     the union of the modules (all of them).
    MoSAShiraLinear  a ShiraLinear's sparse delta (fixed index set); merge() gives a ShiraLinear
                     holding the union as one SparseDelta, by default merged into the weight.

hierarchical=True splits twice: k coarse groups, each split again into k_fine modules; a step
activates `active` groups and, in each, `active_fine` of its modules. Eval mode runs every
module (as after the merge). rescale=True (the default) multiplies the active entries by
(all modules)/(active modules), as inverted dropout does, so that a layer's expected output
in training matches its output with every module; rescale=False runs the plain sum.

Why this layout (SparseModules):
- Each module's values are a Parameter of their own. An inactive module is not in the step's
  autograd graph, so its .grad stays None and an optimizer skips it entirely: AdamW applies no
  weight decay and no momentum to it. (A zero gradient would still move it: Adam's running
  averages and AdamW's decay act on every parameter that has a grad.) So zero gradients with
  zero_grad(set_to_none=True), torch's default.
- One sorted index set for the whole mask is derived once, with each sorted position's module
  and its place in that module. A step's active subset gets its own sorted indices, its
  SparseStructure (CSR by rows and by columns) and a gather permutation, all by filtering the
  full structure with a boolean mask over the entries (nonzero, bincount + cumsum, a prefix
  sum to renumber the transposed permutation): O(nnz + out + in), no sort, and cached per
  subset (LRU of 64; k = 4 with 2 active has 6 subsets). The values are the active modules'
  Parameters concatenated and gathered into index order (O(nnz), differentiable: the gather's
  backward scatters the gradient back, the concatenation's splits it per module).
- The kernels then run on the active entries only: ShiraLinear's sparse_delta_linear, and for
  the bottleneck (which has no base weight) sparse_product_add: spmm forward, the transposed
  spmm for the input gradient and sddmm for the values' gradient. No dense masked matmul:
  a step's adapter costs O(tokens·active entries).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .._checks import check_float_tensor, check_scale, check_size, validate_indices
from ..formats import SparseDelta, SparseStructure, flat_index_dtype
from ..masks import check_seed, split_mask
from ..nn import ShiraLinear
from ..nn._wrap import (adopt_linear, check_copyable, check_loadable, check_strict_keys,
                        load_is_strict)
from ..ops.sparse_delta import sparse_delta_linear_unpacked, sparse_product_add_unpacked

__all__ = ["Bottleneck", "MoSABottleneck", "MoSAShiraLinear", "ParallelAdapter", "SparseModules",
           "merge_mosa"]

_PLAN_CACHE = 64
_FIELDS = ("rows", "cols", "row_offsets", "t_offsets", "t_cols", "t_perm")


# ---------------------------------------------------------------------------------------------
# The split: which modules a step activates.
# ---------------------------------------------------------------------------------------------
def _check_split(k, active, hierarchical, k_fine, active_fine) -> tuple[int, int, int, int]:
    """(k, active, k_fine, active_fine), checked; k_fine = active_fine = 1 when flat."""
    k = check_size(k, "k")
    active = check_size(active, "active")
    if active > k:
        raise ValueError(f"active must be between 1 and k={k}, got {active}")
    if not isinstance(hierarchical, bool):
        raise TypeError(f"hierarchical must be a bool, got {type(hierarchical).__name__}")
    if not hierarchical:
        if k_fine is not None or active_fine is not None:
            raise ValueError("k_fine and active_fine split each of the k groups again: pass "
                             "hierarchical=True with them")
        return k, active, 1, 1
    k_fine = check_size(2 if k_fine is None else k_fine, "k_fine")
    active_fine = check_size(1 if active_fine is None else active_fine, "active_fine")
    if active_fine > k_fine:
        raise ValueError(f"active_fine must be between 1 and k_fine={k_fine}, got {active_fine}")
    return k, active, k_fine, active_fine


class _Activation:
    """What the MoSA layers share: the split's sizes, the random draw of a step's modules, a
    pinned choice (set_active), eval mode's "all modules", and a load checked whole (the
    layer's own tensors and every SparseModules) before torch copies any of it."""

    def _init_activation(self, k, active, hierarchical, k_fine, active_fine, rescale, seed):
        self.k, self.active, self.k_fine, self.active_fine = _check_split(
            k, active, hierarchical, k_fine, active_fine)
        self.hierarchical = hierarchical
        if not isinstance(rescale, bool):
            raise TypeError(f"rescale must be a bool, got {type(rescale).__name__}")
        self.rescale = rescale
        seed = check_seed(seed)
        if self.k_fine > 1:  # SparseModules splits group g again with seed + 1 + g
            check_seed(seed + self.k, "seed + k (the last group's second split)")
        self.generator = torch.Generator().manual_seed(seed)
        self.pinned: tuple[int, ...] | None = None
        self.last_active: tuple[int, ...] | None = None
        self.merged = False  # merge() was called: the module it returned replaces this one

    @property
    def n_modules(self) -> int:
        return self.k * self.k_fine

    def draw(self) -> tuple[int, ...]:
        """A random subset, as training draws it: `active` of the k groups and, in each,
        `active_fine` of its k_fine modules (module id = group·k_fine + fine)."""
        groups = torch.randperm(self.k, generator=self.generator)[:self.active].tolist()
        chosen = []
        for group in groups:
            fine = torch.randperm(self.k_fine, generator=self.generator)[:self.active_fine]
            chosen += [group * self.k_fine + f for f in fine.tolist()]
        return tuple(sorted(chosen))

    def set_active(self, modules: Sequence[int] | None) -> None:
        """Pin the modules that training forwards use (None: draw per forward again). Eval mode
        uses every module regardless."""
        if modules is None:
            self.pinned = None
            return
        try:
            chosen = [check_size(m, "modules[i]", minimum=0) for m in modules]
        except TypeError as e:
            raise TypeError(f"modules must be a sequence of module ids: {e}") from None
        if not chosen:
            raise ValueError("modules must name at least one module")
        if max(chosen) >= self.n_modules:
            raise ValueError(f"modules must be ids in [0, {self.n_modules}), got {max(chosen)}")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"modules has repeated ids: {list(modules)}")
        self.pinned = tuple(sorted(chosen))

    def _step_modules(self) -> tuple[int, ...]:
        if self.merged:
            raise RuntimeError("this MoSA layer was merged into another module by merge(); use "
                               "that one (merge_mosa(model) puts it in the model's place)")
        if not self.training:
            chosen = tuple(range(self.n_modules))
        else:
            chosen = self.pinned if self.pinned is not None else self.draw()
        self.last_active = chosen
        return chosen

    def _factor(self, chosen) -> float:
        return self.n_modules / len(chosen) if self.rescale else 1.0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checked before torch copies any of it: torch copies this layer's own tensors (the base
        # weight and bias, the biases) before its modules load theirs, so a module refusing its
        # part after that would leave the layer changed.
        assign = local_metadata.get("assign_to_params_buffers", False)
        check_loadable(self, state_dict, prefix, assign=assign)
        for name, child in self.named_children():
            if isinstance(child, SparseModules):
                child._check_loadable(state_dict, f"{prefix}{name}.", assign)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _split_repr(self) -> str:
        split = (f"k={self.k}x{self.k_fine}, active={self.active}x{self.active_fine}"
                 if self.hierarchical else f"k={self.k}, active={self.active}")
        return f"{split}, rescale={self.rescale}"


# ---------------------------------------------------------------------------------------------
# One sparse matrix split into modules.
# ---------------------------------------------------------------------------------------------
def _check_module_indices(indices: torch.Tensor, shape: tuple[int, int], name: str) -> None:
    """Raise unless ``indices`` [modules, size] are a split of entries of a ``shape`` matrix as
    SparseModules holds one: each module's row int32/int64, in range, unique and sorted
    ascending (validate_indices, naming ``name[j]``), and no entry in two modules."""
    numel = shape[0] * shape[1]
    for j in range(indices.shape[0]):
        validate_indices(indices[j], numel, name=f"{name}[{j}]", ascending=True)
    flat = torch.sort(indices.reshape(-1)).values
    if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
        raise ValueError(f"{name}: modules overlap (an entry is in two modules)")


class SparseModules(nn.Module):
    """A sparse matrix [out, in] on a fixed mask, dealt out into n disjoint equal modules, each
    module's values a Parameter of its own (``module_values[j]``, in the order of its sorted
    indices ``module_flat_indices[j]``).

    mask: bool [out, in]; k, k_fine: split_mask into k groups, each split again into k_fine
    (module j = group j // k_fine); init: a dense [out, in] tensor the values start from
    (default zeros); seed: the split's shuffle.
    """

    module_flat_indices: torch.Tensor

    def __init__(self, mask: torch.Tensor, k: int, *, k_fine: int = 1, seed: int = 0,
                 init: torch.Tensor | None = None, dtype=None, device=None):
        super().__init__()
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
            raise TypeError("mask must be a 2-D bool tensor")
        k, k_fine = check_size(k, "k"), check_size(k_fine, "k_fine")
        self.shape = (int(mask.shape[0]), int(mask.shape[1]))
        nnz, parts = int(mask.sum()), k * k_fine
        if nnz == 0:
            raise ValueError("mask has no True entry")
        if nnz % parts:
            split = f"k={k}" if k_fine == 1 else f"k·k_fine={k}·{k_fine}"
            raise ValueError(f"cannot split {nnz} entries into {split} = {parts} equal modules "
                             f"({nnz} is not divisible by {parts})")
        modules = []
        for g, group in enumerate(split_mask(mask, k, seed=seed)):
            modules += split_mask(group, k_fine, seed=seed + 1 + g) if k_fine > 1 else [group]
        index_dtype = flat_index_dtype(self.shape)
        device = mask.device if device is None else device
        indices = torch.stack([m.reshape(-1).nonzero().view(-1) for m in modules]).to(device)
        if init is None:
            values = torch.zeros(indices.shape, dtype=dtype, device=device)
        else:
            if tuple(init.shape) != self.shape:
                raise ValueError(f"init has shape {tuple(init.shape)}, the mask {self.shape}")
            values = init.detach().to(device=device, dtype=dtype or init.dtype).reshape(-1)[indices]
        self.register_buffer("module_flat_indices", indices.to(index_dtype))
        self.module_values = nn.ParameterList([nn.Parameter(v.clone()) for v in values])
        self._derive()

    @property
    def n_modules(self) -> int:
        return self.module_flat_indices.shape[0]

    @property
    def nnz(self) -> int:
        return self.module_flat_indices.numel()

    def _derive(self) -> None:
        """The whole mask's sorted indices and structure, each position's module and place."""
        indices = self.module_flat_indices  # valid: split_mask's, or checked before a load
        n, size = indices.shape
        flat = indices.reshape(-1).long()
        order = torch.argsort(flat)
        sorted_flat = flat[order]
        structure = SparseStructure.build(sorted_flat, self.shape)
        self.register_buffer("_flat", sorted_flat.to(indices.dtype), persistent=False)
        self.register_buffer("_owner", torch.div(order, size, rounding_mode="floor"),
                             persistent=False)
        self.register_buffer("_slot", order - self._owner * size, persistent=False)
        for name in _FIELDS:
            self.register_buffer(f"_{name}", getattr(structure, name), persistent=False)
        self._plans: OrderedDict = OrderedDict()

    def _apply(self, fn, *args, **kwargs):
        self._plans = OrderedDict()  # the cached plans live on the old device
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checked before torch copies anything: a rejected load leaves the modules as they were.
        self._check_loadable(state_dict, prefix,
                             local_metadata.get("assign_to_params_buffers", False))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._derive()

    def _check_loadable(self, state_dict, prefix: str, assign: bool = False) -> None:
        """Raise before torch copies anything unless this split's part of ``state_dict``
        loads: the indices (checked as the state_dict holds them: the cast to the buffer's
        dtype would wrap an int64 index past int32 and truncate a float one), every module's
        values (check_loadable on module_values: torch loads them after the indices) and, in
        a strict load, no key missing or unexpected. A MoSA layer calls it for its modules
        before torch copies the layer's own tensors."""
        key = prefix + "module_flat_indices"
        if key in state_dict:
            new = state_dict[key]
            if not isinstance(new, torch.Tensor):
                raise TypeError(f"load_state_dict: {key} must be a tensor, got "
                                f"{type(new).__name__}")
            if tuple(new.shape) != tuple(self.module_flat_indices.shape):
                n, size = self.module_flat_indices.shape
                raise ValueError(f"load_state_dict: {key} has shape {tuple(new.shape)}, this "
                                 f"layer's ({n}, {size}) ({n} modules of {size} entries); build "
                                 "the layer with that split to load it")
            check_copyable(key, new)  # read (checked, derived from) even by an assign load
            try:
                _check_module_indices(new, self.shape, key)
            except (TypeError, ValueError) as e:
                raise type(e)(f"load_state_dict: {e}") from None
        check_loadable(self.module_values, state_dict, prefix + "module_values.", assign=assign)
        if load_is_strict():  # torch's `strict` in _load_from_state_dict is always True
            check_strict_keys(self, state_dict, prefix)

    def _plan(self, chosen: tuple[int, ...]):
        """(sorted flat indices, SparseStructure, gather) of the chosen modules' entries:
        values = cat(chosen modules' values)[gather] is in their sorted order. O(nnz)."""
        plan = self._plans.get(chosen)
        if plan is not None:
            self._plans.move_to_end(chosen)
            return plan
        n, size = self.module_flat_indices.shape
        out_f, in_f = self.shape
        device = self._flat.device
        picked = torch.zeros(n, dtype=torch.bool, device=device)
        ids = torch.tensor(chosen, dtype=torch.long, device=device)
        picked[ids] = True
        keep = picked[self._owner]                        # per sorted entry of the whole mask
        where = keep.nonzero().view(-1)
        rows, cols = self._rows[where], self._cols[where]
        row_offsets = torch.zeros(out_f + 1, dtype=torch.int64, device=device)
        row_offsets[1:] = torch.cumsum(torch.bincount(rows.long(), minlength=out_f), 0)
        t_offsets = torch.zeros(in_f + 1, dtype=torch.int64, device=device)
        t_offsets[1:] = torch.cumsum(torch.bincount(cols.long(), minlength=in_f), 0)
        t_keep = keep[self._t_perm]                       # the transposed order, filtered
        renumber = torch.cumsum(keep.long(), 0) - 1       # whole-mask position → kept position
        structure = SparseStructure(rows=rows, cols=cols, row_offsets=row_offsets,
                                    t_offsets=t_offsets, t_cols=self._t_cols[t_keep],
                                    t_perm=renumber[self._t_perm[t_keep]])
        rank = torch.full((n,), -1, dtype=torch.long, device=device)
        rank[ids] = torch.arange(len(chosen), device=device)
        gather = rank[self._owner[where]] * size + self._slot[where]
        plan = (self._flat[where], structure, gather)  # a fresh tensor: callers may keep it
        self._plans[chosen] = plan
        if len(self._plans) > _PLAN_CACHE:
            self._plans.popitem(last=False)
        return plan

    def operands(self, chosen: tuple[int, ...]):
        """(values, flat indices, structure) of the chosen modules, for the kernels; the values
        are differentiable in exactly the chosen modules' Parameters."""
        flat, structure, gather = self._plan(chosen)
        parts = [self.module_values[j] for j in chosen]
        values = (parts[0] if len(parts) == 1 else torch.cat(parts)).index_select(0, gather)
        return values, flat, structure

    @torch.no_grad()
    def delta(self, dtype: torch.dtype | None = None) -> SparseDelta:
        """Every module's entries as one SparseDelta (the union, detached)."""
        values, flat, structure = self.operands(tuple(range(self.n_modules)))
        values = values.detach().clone() if dtype is None else values.detach().to(dtype)
        return SparseDelta(self.shape, flat.clone(), values)

    @torch.no_grad()
    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The merged matrix [out, in]: every module's values at their entries, zeros elsewhere."""
        first = self.module_values[0]
        dense = torch.zeros(self.shape, dtype=dtype or first.dtype, device=first.device)
        flat = self.module_flat_indices.long()
        for j, values in enumerate(self.module_values):
            dense.view(-1)[flat[j]] = values.detach().to(dense.dtype)
        return dense

    def extra_repr(self) -> str:
        return f"shape={self.shape}, modules={self.n_modules}x{self.module_flat_indices.shape[1]}"


def _sparse_matmul(x2, values, structure, scale, out_features):
    """scale·x·Sᵀ with gradients to x and S's values (sparse_product_add on a zero y)."""
    return sparse_product_add_unpacked(x2.new_zeros(x2.shape[0], out_features), x2,
                                       (out_features, x2.shape[1]), values, structure, scale)


# ---------------------------------------------------------------------------------------------
# The bottleneck adapter (AdaptFormer) and its MoSA split.
# ---------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """AdaptFormer's adapter: y = scale·up(relu(down(x))), down d→r, up r→d (biases on both),
    down Kaiming-uniform and up zero at the start (the branch starts at 0). The same-budget
    baseline of MoSABottleneck, and what its merge() returns."""

    def __init__(self, d: int, r: int, *, scale: float = 0.1, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        d, r = check_size(d, "d"), check_size(r, "r")
        self.scale = check_scale(scale)
        self.down = nn.Linear(d, r, bias=bias, device=device, dtype=dtype)
        self.up = nn.Linear(r, d, bias=bias, device=device, dtype=dtype)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
            for b in (self.down.bias, self.up.bias):
                if b is not None:
                    b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(torch.relu(self.down(x)))

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class ParallelAdapter(nn.Module):
    """block(x) + adapter(x): an adapter beside a block (AdaptFormer puts it beside the MLP)."""

    def __init__(self, block: nn.Module, adapter: nn.Module):
        super().__init__()
        self.block, self.adapter = block, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + self.adapter(x)


class MoSABottleneck(_Activation, nn.Module):
    """A Bottleneck whose down [r, d] and up [d, r] weights are each split into the same k
    (hierarchical: k·k_fine) modules; module j of the adapter is module j of both. Biases are
    dense and always trained. merge() returns the dense Bottleneck of the union.

    k, active: modules and how many a training step activates (hierarchical: groups, then
    k_fine modules per group and active_fine of them); r·d must divide into the modules.
    """

    def __init__(self, d: int, r: int, *, k: int = 4, active: int = 2,
                 hierarchical: bool = False, k_fine: int | None = None,
                 active_fine: int | None = None, scale: float = 0.1, bias: bool = True,
                 rescale: bool = True, seed: int = 0, device=None, dtype=None):
        super().__init__()
        dense = Bottleneck(d, r, scale=scale, bias=bias, device=device, dtype=dtype)
        self._build(dense, k, active, hierarchical, k_fine, active_fine, rescale, seed)

    @classmethod
    def from_bottleneck(cls, bottleneck: Bottleneck, *, k: int = 4, active: int = 2,
                        hierarchical: bool = False, k_fine: int | None = None,
                        active_fine: int | None = None, rescale: bool = True,
                        seed: int = 0) -> "MoSABottleneck":
        """Split a Bottleneck's weights (copied; ``bottleneck`` is left as it is) into modules:
        the MoSA adapter starts exactly where the dense one does."""
        if not isinstance(bottleneck, Bottleneck):
            raise TypeError(f"bottleneck must be a Bottleneck, got {type(bottleneck).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._build(bottleneck, k, active, hierarchical, k_fine, active_fine, rescale, seed)
        return layer

    def _build(self, dense, k, active, hierarchical, k_fine, active_fine, rescale, seed):
        self._init_activation(k, active, hierarchical, k_fine, active_fine, rescale, seed)
        self.d, self.r, self.scale = dense.down.in_features, dense.down.out_features, dense.scale
        for name, w in (("down", dense.down.weight), ("up", dense.up.weight)):
            mask = torch.ones(w.shape, dtype=torch.bool, device=w.device)
            try:
                modules = SparseModules(mask, self.k, k_fine=self.k_fine, seed=seed, init=w)
            except ValueError as e:
                raise ValueError(f"{name} ({w.shape[0]}x{w.shape[1]} = {w.numel()} entries): "
                                 f"{e}") from None
            setattr(self, f"{name}_modules", modules)
        bias = [None if b is None else nn.Parameter(b.detach().clone())
                for b in (dense.down.bias, dense.up.bias)]
        self.down_bias, self.up_bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen = self._step_modules()
        check_float_tensor("x", x, self.down_modules.module_values[0].dtype,
                           self.down_modules.module_values[0].device)
        if x.dim() == 0 or x.shape[-1] != self.d:
            raise ValueError(f"x has shape {tuple(x.shape)}; its last dim must be d = {self.d}")
        factor = self._factor(chosen)
        x2 = x.reshape(-1, self.d).contiguous()
        values, _, structure = self.down_modules.operands(chosen)
        h = _sparse_matmul(x2, values, structure, factor, self.r)
        if self.down_bias is not None:
            h = h + self.down_bias
        values, _, structure = self.up_modules.operands(chosen)
        y = _sparse_matmul(torch.relu(h), values, structure, factor, self.d)
        if self.up_bias is not None:
            y = y + self.up_bias
        return (self.scale * y).view(*x.shape[:-1], self.d)

    @torch.no_grad()
    def merge(self) -> Bottleneck:
        """The dense Bottleneck whose weights are every module's entries (a new module, in this
        one's training mode; this one refuses further forwards). merge_mosa(model) swaps it
        into the model."""
        first = self.down_modules.module_values[0]
        dense = Bottleneck(self.d, self.r, scale=self.scale, bias=self.down_bias is not None,
                           device=first.device, dtype=first.dtype)
        dense.down.weight.copy_(self.down_modules.to_dense())
        dense.up.weight.copy_(self.up_modules.to_dense())
        if self.down_bias is not None:
            dense.down.bias.copy_(self.down_bias)
            dense.up.bias.copy_(self.up_bias)
        dense.train(self.training)  # it takes this layer's place: in eval mode if this one was
        self.merged = True
        return dense

    def extra_repr(self) -> str:
        return f"d={self.d}, r={self.r}, scale={self.scale}, {self._split_repr()}"


# ---------------------------------------------------------------------------------------------
# A ShiraLinear's sparse delta, split.
# ---------------------------------------------------------------------------------------------
class MoSAShiraLinear(_Activation, nn.Linear):
    """nn.Linear plus a SHiRA delta whose entries are split into MoSA modules: y = x·(W +
    scale·S_active)ᵀ + b through sparse_delta_linear, S_active the step's modules. The base
    weight and bias are the wrapped layer's Parameters (frozen). merge() gives one ShiraLinear
    with the union as its SparseDelta (merged into W by default)."""

    def __init__(self, *args, **kwargs):
        raise TypeError("build a MoSAShiraLinear with MoSAShiraLinear.from_shira(shira_layer, "
                        "k=..., active=...) or .from_linear(linear, k=..., active=..., r=...)")

    @classmethod
    def from_shira(cls, layer: ShiraLinear, *, k: int = 4, active: int = 2,
                   hierarchical: bool = False, k_fine: int | None = None,
                   active_fine: int | None = None, rescale: bool = True,
                   seed: int = 0) -> "MoSAShiraLinear":
        """Split ``layer``'s index set (its values are copied into the modules; its weight and
        bias Parameters are shared). ``layer`` itself is not used afterwards."""
        if not isinstance(layer, ShiraLinear):
            raise TypeError(f"layer must be a ShiraLinear, got {type(layer).__name__}")
        if layer.merged:
            raise ValueError("layer is merged: unmerge() it first (its weight holds the delta)")
        delta = layer.delta

        def init(new):
            new._init_activation(k, active, hierarchical, k_fine, active_fine, rescale, seed)
            mask = torch.zeros(delta.shape, dtype=torch.bool, device=delta.values.device)
            mask.view(-1)[delta.flat_indices.long()] = True
            dense = torch.zeros(delta.shape, dtype=delta.values.dtype,
                                device=delta.values.device)
            dense.view(-1)[delta.flat_indices.long()] = delta.values.detach()
            new.shira_modules = SparseModules(mask, new.k, k_fine=new.k_fine, seed=seed,
                                              init=dense)
            new.scale, new.strategy = layer.scale, layer.strategy
        return adopt_linear(cls, layer, init)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, k: int = 4, active: int = 2,
                    hierarchical: bool = False, k_fine: int | None = None,
                    active_fine: int | None = None, rescale: bool = True, seed: int = 0,
                    **shira_kwargs) -> "MoSAShiraLinear":
        """ShiraLinear.from_linear(linear, **shira_kwargs) (r / density / mask / scale), split."""
        return cls.from_shira(ShiraLinear.from_linear(linear, seed=seed, **shira_kwargs), k=k,
                              active=active, hierarchical=hierarchical, k_fine=k_fine,
                              active_fine=active_fine, rescale=rescale, seed=seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen = self._step_modules()
        values, flat, structure = self.shira_modules.operands(chosen)
        weight = self.weight
        return sparse_delta_linear_unpacked(x, weight, self.bias, weight.shape, values, flat,
                                            structure, self.scale * self._factor(chosen),
                                            self.strategy)

    @property
    def delta(self) -> SparseDelta:
        """Every module's entries as one SparseDelta (detached)."""
        return self.shira_modules.delta()

    @torch.no_grad()
    def merge(self, into_weight: bool = True) -> ShiraLinear:
        """One ShiraLinear over the same weight and bias Parameters (in this layer's training
        mode), its delta the union of the modules; with into_weight (default) its merge() has
        put W + scale·S into the weight (forward is then a plain linear; unmerge() restores
        the base bit for bit). This layer refuses further forwards; merge_mosa(model) swaps
        the result into the model."""
        if not isinstance(into_weight, bool):
            raise TypeError(f"into_weight must be a bool, got {type(into_weight).__name__}")
        if self.merged:  # a second merge would add the delta into the shared weight again
            raise RuntimeError("this MoSA layer was already merged by merge(); use the module "
                               "that call returned")
        delta = self.delta

        def init(new):
            new._init_adapter(delta.flat_indices, self.scale)
            new.shira_values.copy_(delta.values)
            new.strategy = self.strategy
        merged = adopt_linear(ShiraLinear, self, init)
        merged.train(self.training)  # it takes this layer's place: in eval mode if this one was
        merged.shira_values.requires_grad_(False)
        if into_weight:
            merged.merge()
        self.merged = True
        return merged

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, nnz={self.shira_modules.nnz}, scale={self.scale}, "
                f"{self._split_repr()}")


def merge_mosa(model: nn.Module, into_weight: bool = True) -> list[str]:
    """Replace every MoSA layer of ``model`` by its merge() (MoSABottleneck → Bottleneck,
    MoSAShiraLinear → ShiraLinear, merged into the weight unless into_weight=False); returns
    the replaced names. A layer held in several places (shared) is merged once and that one
    result put in each of them, every place named. All or nothing: every layer is merged
    before any is replaced, and if one merge is refused (W + scale·S would overflow the
    weight's dtype) the ones before it are undone, so the model is left as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, (MoSABottleneck, MoSAShiraLinear)):
        raise TypeError("model is itself a MoSA layer: call its merge()")
    if not isinstance(into_weight, bool):
        raise TypeError(f"into_weight must be a bool, got {type(into_weight).__name__}")
    # Every place (named_modules() would name a shared layer once), and each layer once,
    # under its first name: merging it twice would add a ShiraLinear's delta twice into W.
    places = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
              if isinstance(m, (MoSABottleneck, MoSAShiraLinear))]
    first: dict[int, tuple[str, nn.Module]] = {}
    for name, module in places:
        first.setdefault(id(module), (name, module))
    chosen = list(first.values())
    trainable = [(p, p.requires_grad) for p in model.parameters()]  # merge() freezes W, b
    done = []
    try:
        for name, module in chosen:
            done.append(module.merge(into_weight) if isinstance(module, MoSAShiraLinear)
                        else module.merge())
    except BaseException as e:
        # Newest first: layers sharing a weight get their entries back in swap order.
        for (_, module), merged in reversed(list(zip(chosen, done))):
            if isinstance(merged, ShiraLinear):
                merged.unmerge()  # the base bit for bit
            module.merged = False
        for p, flag in trainable:
            p.requires_grad_(flag)
        if isinstance(e, ValueError):  # merge()'s own message does not know the layer's name
            raise ValueError(f"layer {name!r}: {e}") from None
        raise
    result = {id(module): merged for (_, module), merged in zip(chosen, done)}
    for name, module in places:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, result[id(module)])
    return [name for name, _ in places]
