"""AdapterBank: many named SHiRA adapters for one model, switched in and out of its weights
exactly, with one batched scatter_swap_ per switch.

How it works. For every adapter and layer the bank keeps the sorted flat indices and ONE value
buffer. While the adapter is inactive the buffer holds the values that must stand in W while it
is active: round(base + scale·delta), computed in fp32 and rounded once to W's dtype when the
adapter is added. Activating swaps buffer and W's entries, so the buffer then holds the base
entries; deactivating swaps them back. Only bit patterns move, so the base comes back bit for
bit after any sequence of switches.

Switching A → B directly is also one swap over all layers. On a layer both touch, the swap runs
over the union U of their indices with a scratch buffer holding B's values at B's entries and
A's held-aside base at A-only entries; afterwards W holds B's values at B's entries and the base
at A-only ones, and two gathers on the small vectors restore the bookkeeping (A's buffer gets its
active values back from the scratch; B's buffer gets the base from the scratch for B∖A and from
A's old buffer for A∩B). The union and its index maps are built once per (A, B) pair and kept,
as are all buffers, so their addresses stay stable and scatter_swap_'s launch tables are reused.
A layer only one of the two touches simply swaps with that adapter's own buffer.

A fusion, ``activate(["a", "b"], weights=[1.0, 0.5])``, is a derived adapter over the union of
the adapters' indices with values round(base + Σ weight_k·scale_k·delta_k) (sum in fp32, one
rounding). It is computed once per (names, weights) and cached (the least recently used inactive
fusions are dropped past ``max_fusions``); it switches like any adapter.

Threads. Every method that reads or writes the weights holds ``bank.lock`` (a threading.RLock).
A forward running in another thread while a switch happens could read half-switched weights;
to exclude that, take the same lock around forwards: either ``bank.guard_forward()`` (forward
pre- and post-hooks on the model that acquire and release it; the post-hook also runs when the
forward raises) or ``with bank.reading(): model(x)``. Forwards are then serialized with switches
and with one another. Without either, switching while another thread runs the model is a race.
guard_forward() covers the forward only: a backward runs after the post-hook has released the
lock, and a switch in between rewrites weights that autograd saved (autograd then raises its
in-place error). A training step (forward and backward) holds ``bank.reading()`` around both;
a guarded forward that records a backward warns once.

Faults. A switch (and a fusion's activation) is one transaction: the batched swap and the
bank's bookkeeping either both happen or neither does, whatever raises in between (a
MemoryError, an error in a callback) or interrupts it (a KeyboardInterrupt is held back for
the few microseconds it takes). So ``deactivate()`` always restores the base exactly.

FSDP2. On a model sharded with ``torch.distributed.fsdp.fully_shard`` a layer's weight is a
DTensor whose rows are split over the ranks (Shard(0)); each rank holds rows [start, start +
rows) as its local tensor. The bank maps every adapter's flat indices (row·in + col) to that
local tensor once, when the adapter is added, keeps only the entries of this rank's rows, and
switches by swapping those in the local shard: the same exact swap, no collective, and the next
forward's all-gather carries the switched entries. FSDP2 keeps a module's parameters gathered
after a forward in some cases (the root's, without a backward); the bank reshards the model's
FSDP modules first (``FSDPModule.reshard()``, which frees the gathered copy, no communication),
so that no stale gathered weight is read. Calls that need entries of other ranks' rows are
collective (every rank calls them with the same arguments): save() and load() (the base
entries' checksum; a bit-exact sum of bit patterns, over the adapter's entries only) and
add_from_model() (the sharded adapter values). mixed() is refused on a sharded layer.

Rules the bank relies on: the model's structure does not change while the bank is in use (build
the bank after replace_linear), its layers' weights are distinct memory or one tied Parameter
(the bank refuses others: an adapter of one would be read as another's base), no ShiraLinear
of the model is merged (its merge swaps entries of the same weights; the bank refuses to work
while one is), and nothing else writes the weights while an adapter is active. All adapted
layers must live on one device.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._checks import (FLOAT_DTYPES, check_representable, check_scale, check_size,
                      validate_indices)
from ._concurrency import reading as weight_reading
from ._mixed import (BASE, MixedLayer, NamedAdapters, batch_names, forwards_replaced,
                     start_block, used_names)
from .formats import SparseDelta, SparseDeltaSet, flat_index_dtype
from .nn.quantized import QuantizedShiraLinear, _is_torchao_weight, quantized_format
from .nn.shira_linear import ShiraLinear
from .ops.multi_delta import multi_delta_linear
from .ops.scatter_swap import adapted_entries, swap_transaction

try:  # torch.distributed may be absent from a build; then no weight is a DTensor
    from torch.distributed.fsdp import FSDPModule as _FSDPModule
    from torch.distributed.tensor import DTensor as _DTensor
    from torch.distributed.tensor import Shard as _ShardPlacement
except ImportError:  # pragma: no cover
    _FSDPModule = _DTensor = _ShardPlacement = None

__all__ = ["AdapterBank"]

# Integer types of a float's width: the bit patterns that _RowShard.gather sums.
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _is_dtensor(t) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def _memory(weight) -> tuple[str, int, int] | None:
    """(device, first byte, end byte) of the memory ``weight``'s elements span, or None where
    its address means nothing here: a meta tensor (address 0), a DTensor or other tensor
    subclass (the address of a wrapper, or none), an empty tensor."""
    if (type(weight) not in (torch.Tensor, nn.Parameter) or weight.is_meta
            or weight.layout != torch.strided or not weight.numel()):
        return None
    extent = 1 + sum((size - 1) * stride for size, stride in zip(weight.shape, weight.stride()))
    start = weight.data_ptr()
    return str(weight.device), start, start + extent * weight.element_size()


class _RowShard:
    """Where this rank's FSDP2 shard of a layer's weight sits: rows [start, start + rows) of the
    out × in weight, the local tensor being rows × in. FSDP2 splits dim 0 as torch.chunk does:
    ceil(out / world) rows per rank, fewer (or none) on the last ones."""

    __slots__ = ("start", "rows", "cols", "group")

    def __init__(self, layer: str, weight):
        placements, mesh = tuple(weight.placements), weight.device_mesh
        sharded = [d for d, p in enumerate(placements) if not p.is_replicate()]
        # Exactly Shard(0) (not a strided or other subclass: FSDP2 + tensor parallel), on one
        # mesh dim; replicated dims (HSDP) hold the same rows.
        if (len(sharded) != 1 or type(placements[sharded[0]]) is not _ShardPlacement
                or placements[sharded[0]].dim != 0 or weight.dim() != 2):
            raise ValueError(f"layer {layer!r}: the bank handles weights sharded by rows as "
                             f"FSDP2 does (one Shard(0) placement), got placements {placements} "
                             f"for a weight of shape {tuple(weight.shape)}")
        dim = sharded[0]
        world, coordinate = mesh.size(dim), mesh.get_coordinate()
        if coordinate is None:
            raise ValueError(f"layer {layer!r}: this rank is not in the weight's device mesh")
        out, self.cols = weight.shape
        chunk = -(-out // world)
        self.start = min(coordinate[dim] * chunk, out)
        self.rows = min(chunk, out - self.start)
        self.group = mesh.get_group(dim)
        with torch.no_grad():
            local_shape = tuple(weight.to_local().shape)
        if local_shape != (self.rows, self.cols):
            raise ValueError(f"layer {layer!r}: the local shard has shape {local_shape}, not the "
                             f"rows [{self.start}, {self.start + self.rows}) of "
                             f"{tuple(weight.shape)} that row sharding gives this rank")

    @property
    def offset(self) -> int:
        """The flat index of the shard's first entry in the full weight."""
        return self.start * self.cols

    def split(self, indices: torch.Tensor, values: torch.Tensor):
        """(local indices, their values) of the sorted global ``indices`` in this shard."""
        flat = indices.long()
        lo, hi = (int(torch.searchsorted(flat, bound))
                  for bound in (self.offset, self.offset + self.rows * self.cols))
        return (flat[lo:hi] - self.offset).to(indices.dtype), values[lo:hi]

    def gather(self, indices: torch.Tensor, local_entries) -> torch.Tensor:
        """The full weight's entries at global ``indices`` (int64, any order): each rank reads
        those in its rows with ``local_entries(local indices)`` and an all_reduce sums their
        bit patterns as integers, zeros elsewhere, so every float arrives bit for bit (-0.0 and
        NaN payloads too). A collective over the shard's group: every rank must call it with the
        same indices. Moves len(indices) integers, not the weight."""
        mine = (indices >= self.offset) & (indices < self.offset + self.rows * self.cols)
        values = local_entries(indices[mine] - self.offset)
        bits = torch.zeros(indices.numel(), dtype=torch.int64, device=values.device)
        bits[mine] = values.view(_BITS[values.dtype]).long()
        torch.distributed.all_reduce(bits, group=self.group)
        return bits.to(_BITS[values.dtype]).view(values.dtype)


class _Entry:
    """One adapter (or fusion) on one layer. ``buf`` holds the active values while the owner is
    inactive and the held-aside base entries while it is active. ``delta``/``scale`` are kept
    for adapters (fusions and save() need them), None for fusions.
    On an FSDP2-sharded layer ``indices``, ``buf`` and ``delta`` cover this rank's rows only
    (indices into the local shard) and ``full`` keeps the adapter's (global indices, delta)
    as given; None elsewhere (the indices are global)."""

    __slots__ = ("indices", "buf", "delta", "scale", "full")

    def __init__(self, indices, buf, delta=None, scale=None, full=None):
        self.indices, self.buf, self.delta, self.scale = indices, buf, delta, scale
        self.full = full

    def given(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(global indices, delta) as the adapter was given."""
        return self.full if self.full is not None else (self.indices, self.delta)


def _rows_through_deltas(module: nn.Linear, delta_set: SparseDeltaSet, x, rows) -> torch.Tensor:
    """A layer's forward inside AdapterBank.mixed (MixedLayer's compute): each batch row (x's
    first dim) through its adapter."""
    return multi_delta_linear(x, module.weight, module.bias, delta_set, rows)


class _Slot:
    """What can be active: an adapter (key: its name) or a fusion (key: (names, weights)).
    ``entries`` maps layer → _Entry in the bank's layer order."""

    __slots__ = ("key", "entries")

    def __init__(self, key, entries: dict[str, _Entry]):
        self.key, self.entries = key, entries

    @property
    def names(self) -> tuple[str, ...]:
        return (self.key,) if isinstance(self.key, str) else self.key[0]


class _Both:
    """Index maps of an A → B switch on a layer both touch (over the small vectors only)."""

    __slots__ = ("layer", "a", "b", "union", "scratch", "fill", "pos_a", "map_b")

    def __init__(self, layer: str, a: _Entry, b: _Entry):
        self.layer = layer
        ia, ib = a.indices.long(), b.indices.long()
        na, nb = ia.numel(), ib.numel()
        union, inverse = torch.unique(torch.cat([ib, ia]), sorted=True, return_inverse=True)
        nu = union.numel()
        pos_b, pos_a = inverse[:nb], inverse[nb:]
        arange_a = torch.arange(na, device=ia.device)
        # Scratch source is cat(B.buf, A.buf): B's active values win on A∩B, A's held base
        # fills A∖B.
        fill = torch.empty(nu, dtype=torch.long, device=ia.device)
        fill[pos_a] = nb + arange_a
        fill[pos_b] = torch.arange(nb, device=ia.device)
        # After the swap, B's base comes from cat(scratch, A's old buf): the scratch (what W
        # held) is the base on B∖A, A's old buffer is the base on A∩B.
        a_of_u = torch.full((nu,), -1, dtype=torch.long, device=ia.device)
        a_of_u[pos_a] = arange_a
        a_at_b = a_of_u[pos_b]
        # int32 maps (index_select takes them) keep a cached pair at about 12 bytes per union
        # entry plus the union and the scratch.
        map_dtype = torch.int32 if nu + na < 2**31 else torch.long
        self.a, self.b = a, b
        self.union = union.to(a.indices.dtype)
        self.scratch = torch.empty(nu, dtype=a.buf.dtype, device=a.buf.device)
        self.fill, self.pos_a = fill.to(map_dtype), pos_a.to(map_dtype)
        self.map_b = torch.where(a_at_b >= 0, a_at_b + nu, pos_b).to(map_dtype)


class _PairPlan:
    """Everything a direct A → B switch needs, built once and reused (stable addresses)."""

    __slots__ = ("layers", "indices", "values", "both")

    def __init__(self, a: _Slot, b: _Slot, layer_order: dict[str, int]):
        self.layers, self.indices, self.values, self.both = [], [], [], []
        for layer in sorted(set(a.entries) | set(b.entries), key=layer_order.__getitem__):
            ea, eb = a.entries.get(layer), b.entries.get(layer)
            if ea is not None and eb is not None:
                both = _Both(layer, ea, eb)
                self.both.append(both)
                index, value = both.union, both.scratch
            else:  # one side only: a plain swap with that side's own buffer
                entry = ea if ea is not None else eb
                index, value = entry.indices, entry.buf
            self.layers.append(layer)
            self.indices.append(index)
            self.values.append(value)


def _finite_number(value, what: str) -> float:
    return check_scale(value, what)  # TypeError for a non-number, ValueError for NaN or inf


class _ForwardGuard:
    """Handle returned by AdapterBank.guard_forward(): while it is on, the model's forward (an
    instance attribute in front of the class's, with its signature) runs under the bank's lock
    and releases it however the forward ends. (Forward hooks cannot: torch skips even its
    always_call hooks when a KeyboardInterrupt ends the forward, which left the lock held for
    good.) remove() puts the forward back."""

    def __init__(self, bank: "AdapterBank", model: nn.Module):
        self._bank, self._model = bank, model
        self._on = True
        self._previous = model.__dict__.get("forward")  # someone else's instance forward
        inner = model.forward

        @functools.wraps(inner)
        def guarded_forward(*args, **kwargs):
            if not self._on:  # removed while another wrapper kept a reference to this one
                return inner(*args, **kwargs)
            with bank.lock:
                output = inner(*args, **kwargs)
            bank._warn_if_backward_follows(output)
            return output

        self._installed = guarded_forward
        model.forward = guarded_forward

    def remove(self) -> None:
        with self._bank.lock:
            self._on = False
            if self._model.__dict__.get("forward") is self._installed:
                if self._previous is None:
                    del self._model.forward
                else:
                    self._model.forward = self._previous
            # else: wrapped since by someone else, whose wrapper calls ours: it passes through
            if self._bank._guard is self:
                self._bank._guard = None

    def __enter__(self) -> "_ForwardGuard":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _same_adapter(a, b) -> bool:
    """Whether two (SparseDelta, scale) entries of tied layers are one adapter: nonzero
    entries at the same indices, with scale·values equal up to each value's rounding in its
    dtype. (hotswap gives a tied layer the owner's adapter divided by its own scale, each
    value rounded once, in a mask of the layer's own capacity padded with zero values.)"""
    (da, sa), (db, sb) = a, b
    if da.values.dtype != db.values.dtype:
        return False
    va, vb = sa * da.values.double(), sb * db.values.double()
    nonzero_a, nonzero_b = va != 0, vb != 0
    if not torch.equal(da.flat_indices[nonzero_a].long(), db.flat_indices[nonzero_b].long()):
        return False
    # hotswap's value for a layer of scale s is v·round(s_bank / s) rounded in fp32 and then
    # to the dtype: within 2 fp32 roundings and one of the dtype of the exact v·s_bank / s, so
    # two such layers' scale·values differ by at most 2·eps of the dtype.
    info = torch.finfo(da.values.dtype)
    return torch.allclose(va[nonzero_a], vb[nonzero_b], rtol=2 * info.eps,
                          atol=info.tiny * max(abs(sa), abs(sb)))


class AdapterBank(NamedAdapters):
    """Many named sparse adapters for one model; exact switching, fusion, save and load.

    The layers that can take adapters are the model's nn.Linear modules (ShiraLinear included),
    addressed by their names in ``model.named_modules()``. A layer whose weight Parameter is
    shared with an earlier one is addressed by the earlier name only; distinct weight tensors
    over the same memory are refused (ValueError naming both layers: tie them as one Parameter).

    >>> bank = AdapterBank(model)
    >>> bank.add("task_a", {"fc1": delta_a1, "fc2": (delta_a2, 0.5)}, scale=2.0)
    >>> bank.add_from_model("task_b", trained_shira_model)
    >>> bank.activate("task_a"); bank.activate("task_b")      # one batched swap each
    >>> bank.activate(["task_a", "task_b"], weights=[1.0, 0.5])  # fusion
    >>> bank.deactivate()                                       # base weights, bit for bit

    Caches: ``max_pairs`` direct-switch plans (least recently used dropped; one costs about
    16 bytes + one weight element per entry of the union of the two adapters, on layers both
    touch) and ``max_fusions`` fusions (indices + one value buffer each). A dropped plan is
    rebuilt on the next such switch, which then costs one sort of the two index sets.

    See the module docstring for how switching works and for thread safety (``lock``,
    ``guard_forward()``, ``reading()``).
    """

    def __init__(self, model: nn.Module, *, max_fusions: int = 8, max_pairs: int = 64):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.max_fusions = check_size(max_fusions, "max_fusions", minimum=0)
        self.max_pairs = check_size(max_pairs, "max_pairs", minimum=0)
        self.model = model
        self.lock = threading.RLock()
        self._fsdp_modules = ([m for m in model.modules() if isinstance(m, _FSDPModule)]
                              if _FSDPModule is not None else [])
        self._reshard()  # the sharded parameters registered, so the layers' weights are DTensors
        self._layers: dict[str, nn.Linear] = {}
        self._alias: dict[str, str] = {}
        self._alias_modules: dict[str, nn.Linear] = {}
        first_owner: dict[int, str] = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                owner = first_owner.setdefault(id(module.weight), name)
                if owner != name:  # tied weight: two names for one tensor would swap it twice
                    self._alias[name] = owner
                    self._alias_modules[name] = module
                else:
                    self._layers[name] = module
        if not self._layers:
            raise ValueError("the model has no nn.Linear layer to take adapters")
        self._check_distinct_memory()
        # Per layer: its FSDP2 row shard, or None for a whole (unsharded) weight.
        self._shards: dict[str, _RowShard | None] = {
            name: _RowShard(name, module.weight) if _is_dtensor(module.weight) else None
            for name, module in self._layers.items()}
        self._order = {name: i for i, name in enumerate(self._layers)}
        self._adapters: dict[str, _Slot] = {}
        self._fusions: OrderedDict[tuple, _Slot] = OrderedDict()
        self._pairs: OrderedDict[tuple[_Slot, _Slot], _PairPlan] = OrderedDict()
        self._hotswapped: str | None = None
        # Per servable layer an adapter touches, its forward in mixed() blocks: made by the
        # first block, then kept up to date by add() and remove() (None until then).
        self._mixed: dict[str, MixedLayer] | None = None
        # The same for each layer whose weight is tied to a served one (its own bias), kept as
        # long as the owner's: a switch adapts the shared weight, so a mixed block adapts both.
        self._mixed_aliases: dict[str, MixedLayer] = {}
        self._active: _Slot | None = None
        self._guard: _ForwardGuard | None = None
        self._held = threading.local()  # per-thread depth of reading()
        self._warned_backward = False
        self._check_unmerged()

    # -- what is there (also NamedAdapters: layers, names, in, len, iter) -----------------------
    @property
    def active(self) -> str | tuple[str, ...] | None:
        """None (base weights), an adapter's name, or the names of the active fusion."""
        slot = self._active
        if slot is None:
            return None
        return slot.key if isinstance(slot.key, str) else slot.key[0]

    @property
    def active_weights(self) -> tuple[float, ...] | None:
        """The weights of the active fusion (None unless a fusion is active)."""
        slot = self._active
        return None if slot is None or isinstance(slot.key, str) else slot.key[1]

    def __repr__(self) -> str:
        return (f"AdapterBank({len(self._layers)} layers, adapters={list(self._adapters)}, "
                f"active={self.active!r})")

    def _slot(self, name: str) -> _Slot:
        slot = self._adapters.get(name)
        if slot is None:
            raise KeyError(f"no adapter named {name!r} (have {list(self._adapters)})")
        return slot

    def deltas(self, name: str) -> dict[str, tuple[SparseDelta, float]]:
        """Adapter ``name`` as given: {layer: (SparseDelta, scale)} (copies)."""
        with self.lock:
            out = {}
            for layer, e in self._slot(name).entries.items():
                indices, delta = e.given()
                out[layer] = (SparseDelta(self._layers[layer].weight.shape, indices.clone(),
                                          delta.clone()), e.scale)
            return out

    def prepared(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (indices, values)}: the values that stand in W while ``name`` is active
        (copies). On an FSDP2-sharded layer, those of this rank's rows (global flat indices)."""
        with self.lock:
            slot = self._slot(name)
            out = {}
            for layer, e in slot.entries.items():
                if slot is self._active:  # the buffer holds the base; W holds the values
                    weight = self._weight(layer)
                    with weight_reading(weight):  # not while a "swap" call changes W
                        values = weight.view(-1)[e.indices.long()]
                else:
                    values = e.buf.clone()
                shard = self._shards[layer]
                indices = (e.indices.clone() if shard is None
                           else (e.indices.long() + shard.offset).to(e.indices.dtype))
                out[layer] = (indices, values)
            return out

    # -- the weights ------------------------------------------------------------------------------
    def _reshard(self) -> None:
        """Put the model's FSDP2 modules in their sharded state (no communication): a module
        gathered by a forward (the root after a forward without backward) would otherwise keep
        a full copy that a switch of the shards does not reach."""
        for module in self._fsdp_modules:
            module.reshard()

    def _weight(self, layer: str) -> torch.Tensor:
        """The tensor the bank reads and swaps for ``layer``, detached: the weight, or this
        rank's local shard of an FSDP2-sharded one."""
        module = self._layers[layer]
        shard = self._shards[layer]
        if shard is None:
            return module.weight.detach()
        if not _is_dtensor(module.weight):  # gathered since: back to the shards
            self._reshard()
            if not _is_dtensor(module.weight):
                raise RuntimeError(f"layer {layer!r}: its weight was sharded when the bank was "
                                   "built but is not now (the model changed under the bank)")
        with torch.no_grad():
            local = module.weight.to_local()
        if tuple(local.shape) != (shard.rows, shard.cols):
            raise RuntimeError(f"layer {layer!r}: the local shard has shape "
                               f"{tuple(local.shape)}, not {(shard.rows, shard.cols)} as when "
                               "the bank was built (the model changed under the bank)")
        return local.detach()

    # -- checks -----------------------------------------------------------------------------------
    def _check_unmerged(self) -> None:
        # Tied layers too: a merged alias holds base entries of the owner's weight.
        for name, module in (*self._layers.items(), *self._alias_modules.items()):
            if isinstance(module, ShiraLinear) and module.merged:
                raise RuntimeError(
                    f"layer {name!r} is a merged ShiraLinear; unmerge() it before using the "
                    "AdapterBank (its merge swaps entries of the same weight, so the bank's "
                    "held-aside base entries would be wrong)")

    def _check_distinct_memory(self) -> None:
        """Refuse distinct weight tensors over the same memory (``nn.Parameter(w.data)``, a
        load_state_dict(assign=True) of a tied model): an adapter of one would be read as the
        other's base, and a switch of one would adapt the other unseen. They are not taken as
        tied, since torch does not keep them so (a .half() or .to() gives each its own copy)."""
        spans = sorted((*span, layer) for layer, module in self._layers.items()
                       if (span := _memory(module.weight)) is not None)
        furthest = None  # (device, end, layer) of the span reaching furthest so far
        for device, start, end, layer in spans:
            if furthest is not None and furthest[0] == device and start < furthest[1]:
                raise ValueError(
                    f"layers {furthest[2]!r} and {layer!r} have distinct weight tensors over the "
                    "same memory, which the bank would take for two weights; tie them if they "
                    f"are one (model.get_submodule({layer!r}).weight = "
                    f"model.get_submodule({furthest[2]!r}).weight) or give each its own copy")
            if furthest is None or furthest[0] != device or end > furthest[1]:
                furthest = (device, end, layer)

    def _check_new_name(self, name) -> None:
        # BASE names the base in mixed() rows: an adapter of that name could not be served.
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"an adapter name must be a non-empty str other than {BASE!r}, got "
                             f"{name!r}")
        if name in self._adapters:
            raise ValueError(f"an adapter named {name!r} is already in the bank; remove() it first")

    def _layer(self, layer, where: str) -> nn.Linear:
        if layer in self._alias:
            raise ValueError(f"{where}: layer {layer!r} shares its weight with layer "
                             f"{self._alias[layer]!r}; address it by that name")
        module = self._layers.get(layer)
        if module is None:
            raise ValueError(f"{where}: the model has no nn.Linear layer named {layer!r}")
        return module

    def _validated(self, name: str, adapter, scale) -> list[tuple[str, torch.Tensor,
                                                                  torch.Tensor, float]]:
        """[(layer, canonical indices, values, scale)] in layer order, on the weights' device;
        private copies, so later edits of the caller's tensors cannot reach the bank."""
        if not isinstance(adapter, Mapping) or not adapter:
            raise ValueError(f"adapter {name!r} must be a non-empty mapping layer name → "
                             "SparseDelta or (SparseDelta, scale)")
        default_scale = _finite_number(scale, f"adapter {name!r}: scale")
        out = []
        for layer, item in adapter.items():
            where = f"adapter {name!r}, layer {layer!r}"
            module = self._layer(layer, f"adapter {name!r}")
            layer_scale = default_scale
            if isinstance(item, tuple) and len(item) == 2:
                item, layer_scale = item
                layer_scale = _finite_number(layer_scale, f"{where}: scale")
            if not isinstance(item, SparseDelta):
                raise TypeError(f"{where}: expected a SparseDelta or (SparseDelta, scale), got "
                                f"{type(item).__name__}")
            weight = module.weight
            if _is_torchao_weight(weight):  # it reports the dtype it was quantized from
                raise ValueError(f"{where}: the weight is quantized ({quantized_format(module)}); "
                                 "the bank cannot switch an adapter into a quantized weight "
                                 "(docs/quantized.md, \"AdapterBank\")")
            if weight.dtype not in FLOAT_DTYPES or not weight.is_contiguous():
                raise ValueError(f"{where}: the weight must be a contiguous float32/float16/"
                                 f"bfloat16 tensor, got {weight.dtype}"
                                 f"{'' if weight.is_contiguous() else ' (not contiguous)'}")
            if tuple(item.shape) != tuple(weight.shape):
                raise ValueError(f"{where}: the delta has shape {tuple(item.shape)} but the "
                                 f"weight has {tuple(weight.shape)}")
            indices, values = item.flat_indices, item.values
            try:  # re-checked: the delta's tensors may have been edited since it was built
                validate_indices(indices, weight.numel(), name="indices")
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: {e}") from None
            if (values.dtype not in FLOAT_DTYPES or values.dim() != 1
                    or values.numel() != indices.numel()):
                raise ValueError(f"{where}: values must be 1-D float32/float16/bfloat16 with one "
                                 f"entry per index, got {values.dtype} of shape "
                                 f"{tuple(values.shape)} for {indices.numel()} indices")
            if not bool(torch.isfinite(values).all()):
                raise ValueError(f"{where}: the delta has non-finite values")
            indices = indices.detach().to(weight.device)
            values = values.detach().to(weight.device)
            if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
                order = torch.argsort(indices)
                indices, values = indices[order], values[order]
            out.append((layer, indices.to(flat_index_dtype(weight.shape)).clone().contiguous(),
                        values.clone().contiguous(), layer_scale))
        out.sort(key=lambda item: self._order[item[0]])
        return out

    # -- base entries -----------------------------------------------------------------------------
    def _base_entries(self, layer: str, indices: torch.Tensor) -> torch.Tensor:
        """The BASE weight's entries at ``indices`` (int64; local ones on a sharded layer): W's,
        except where the active slot holds the base aside."""
        weight = self._weight(layer)
        # Under the weight's lock, shared: a "swap"-strategy call in another thread (a
        # ShiraLinear of the model) has W + S in these entries for its length.
        with weight_reading(weight):
            values = weight.view(-1)[indices]  # advanced indexing: a copy
        held = self._active.entries.get(layer) if self._active is not None else None
        if held is not None and held.indices.numel() and indices.numel():
            held_indices = held.indices.long()
            pos = torch.searchsorted(held_indices, indices).clamp_(max=held_indices.numel() - 1)
            hit = held_indices[pos] == indices
            values[hit] = held.buf[pos[hit]]
        return values

    def _file_base(self, layer: str, shape: tuple[int, int], indices: torch.Tensor) -> torch.Tensor:
        # The base_entries hook of shira_format: names the layer when it cannot be answered.
        module = self._layer(layer, "adapter file")
        if tuple(module.weight.shape) != tuple(shape):
            raise ValueError(f"layer {layer!r}: the weight has shape {tuple(module.weight.shape)} "
                             f"but the adapter's delta has {tuple(shape)}")
        indices = indices.to(module.weight.device).long()
        shard = self._shards[layer]
        if shard is None:
            return self._base_entries(layer, indices)
        return shard.gather(indices, lambda local: self._base_entries(layer, local))

    # -- adding and removing ----------------------------------------------------------------------
    def add(self, name: str, adapter: Mapping, scale: float = 1.0) -> None:
        """Add adapter ``name`` (a non-empty str other than "__base__", which names the base in
        mixed() rows): {layer: SparseDelta} or {layer: (SparseDelta, layer_scale)}.

        Everything is checked first (ValueError naming the adapter and the layer; the bank and
        the model are unchanged on failure). The values that will stand in W are prepared here,
        from the base entries even while another adapter is active.
        """
        with self.lock:
            self._refuse_in_block("add adapters")
            self._check_new_name(name)
            self._check_unmerged()
            entries = {}
            # Outside inference_mode: the buffers are swapped later, also outside it.
            with torch.inference_mode(False), torch.no_grad():
                for layer, indices, values, layer_scale in self._validated(name, adapter, scale):
                    full, shard = None, self._shards[layer]
                    if shard is not None:  # once: the entries of this rank's rows, local
                        full = (indices, values)
                        indices, values = shard.split(indices, values)
                    base = self._base_entries(layer, indices.long())
                    # fp32 arithmetic, one rounding to W's dtype (as ShiraLinear.merge does).
                    active = adapted_entries(base, values, layer_scale)
                    check_representable(active, f"adapter {name!r}, layer {layer!r}", base=base)
                    entries[layer] = _Entry(indices, active, values, layer_scale, full)
            self._adapters[name] = _Slot(name, entries)
            try:
                if self._mixed is not None:
                    for layer in entries:
                        if self._servable(layer):
                            served = self._mixed_layer(layer)  # a new one already has it
                            if name not in served.adapters:
                                self._offer(served, name)
            except BaseException:  # all or nothing: out of the mixed layers' sets, and the bank
                self._forget(name)
                raise

    def add_from_model(self, name: str, model: nn.Module) -> None:
        """Add every ShiraLinear of ``model`` (this bank's model or one of the same structure)
        as adapter ``name``: its indices, current values and scale, under its module name.
        Collective where ``model`` is FSDP2-sharded (its values are gathered). A
        QuantizedShiraLinear in ``model`` is a ValueError naming it (the bank holds no adapter
        on a quantized weight: docs/quantized.md); nothing is added then."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        adapter, came_from = {}, {}
        for layer, module in model.named_modules():
            if isinstance(module, QuantizedShiraLinear):
                # Not dropped unseen: the bank switches adapters into the weights, and a
                # quantized weight cannot take one (docs/quantized.md, "AdapterBank").
                raise ValueError(
                    f"adapter {name!r}: layer {layer!r} is a QuantizedShiraLinear "
                    f"({module.quant_format}); the bank cannot switch an adapter into a "
                    "quantized weight, so it cannot hold this layer's adapter. Serve it through "
                    "the layer itself, or add the other layers' adapters with bank.add(), or "
                    "dequantize() the layer first")
            if isinstance(module, ShiraLinear):
                values = module.shira_values.detach()
                if _is_dtensor(values):  # FSDP2 shards the values too: gather them (collective)
                    values = values.full_tensor()
                entry = (SparseDelta(module.weight.shape, module.shira_flat_indices.detach(),
                                     values), module.scale)
                # Layers that share one weight (tied) go to the weight's first layer: the bank
                # holds one adapter per weight, so their adapters must be the same one.
                owner = self._alias.get(layer, layer)
                if owner in adapter and not _same_adapter(adapter[owner], entry):
                    raise ValueError(
                        f"adapter {name!r}: layers {came_from[owner]!r} and {layer!r} share one "
                        "weight but carry different adapters (indices, or scale·values); a bank "
                        "holds one adapter per weight")
                adapter.setdefault(owner, entry)
                came_from.setdefault(owner, layer)
        if not adapter:
            raise ValueError(f"adapter {name!r}: the model has no ShiraLinear layer")
        self.add(name, adapter)

    def remove(self, name: str) -> None:
        """Remove adapter ``name`` (and the cached fusions that use it); not while active."""
        with self.lock:
            self._refuse_in_block("remove adapters")
            slot = self._slot(name)
            if self._active is not None and name in self._active.names:
                raise RuntimeError(f"adapter {name!r} is active ({self.active!r}); deactivate() "
                                   "or switch away first")
            self._forget(name)
            dropped = {slot} | {f for key, f in self._fusions.items() if name in key[0]}
            for fusion in dropped - {slot}:
                del self._fusions[fusion.key]
            self._forget_pairs(dropped)

    def _forget(self, name: str) -> None:
        """Take adapter ``name`` out of the bank and of the mixed layers' sets."""
        for layer in self._adapters.pop(name).entries:
            served = (self._mixed or {}).get(layer)
            if served is not None and name in served.adapters:
                served.adapters.remove(name)

    def _forget_pairs(self, slots) -> None:
        for key in [key for key in self._pairs if key[0] in slots or key[1] in slots]:
            del self._pairs[key]

    # -- switching --------------------------------------------------------------------------------
    def activate(self, name, weights: Sequence[float] | None = None) -> None:
        """Make adapter ``name`` active, or the fusion of a list of names (``weights``, one
        number per name as a list or a 1-D tensor, default to 1 each); None deactivates. One
        batched scatter_swap_ whatever was active before."""
        with self.lock:
            if name is None:
                if weights is not None:
                    raise ValueError("weights are only for a fusion (a list of names)")
                self._switch(None)
            elif isinstance(name, str):
                if weights is not None:
                    raise ValueError("weights are only for a fusion; pass a list of names")
                self._switch(self._slot(name))
            else:
                self._check_unmerged()
                self._switch(self._fusion(name, weights))

    def deactivate(self) -> None:
        """Restore the base weights (bit for bit)."""
        with self.lock:
            self._switch(None)

    def _switch(self, target: _Slot | None) -> None:
        current = self._active
        if target is current:
            return
        self._refuse_in_block("activate or deactivate adapters")  # its layers read the base
        self._check_unmerged()
        if current is None or target is None:
            slot = target if target is not None else current
            layers = list(slot.entries)
            indices = [e.indices for e in slot.entries.values()]
            values = [e.buf for e in slot.entries.values()]
            both = ()
        else:
            plan = self._pair_plan(current, target)
            layers, indices, values, both = plan.layers, plan.indices, plan.values, plan.both
            with torch.no_grad():
                for m in both:
                    torch.index_select(torch.cat([m.b.buf, m.a.buf]), 0, m.fill, out=m.scratch)
        # One transaction (swap_transaction): if the swap raises (it validates everything
        # first), nothing changed; if the bookkeeping after it raises, or is interrupted, the
        # swap is undone and the buffers put back, so the bank's books and the weights agree
        # whatever happens, and deactivate() can always restore the base.
        def commit():
            with torch.no_grad():
                # The new buffers, computed before any is written (nothing changes until the
                # copies; A's held base is read out of A's buffer first).
                updates = []
                for m in both:
                    held = torch.cat([m.scratch, m.a.buf])
                    updates.append((m, m.scratch.index_select(0, m.pos_a),
                                    held.index_select(0, m.map_b), held))
                try:
                    for m, new_a, new_b, _ in updates:
                        m.a.buf.copy_(new_a)
                        m.b.buf.copy_(new_b)
                    self._active = target
                except BaseException:
                    # Put the old buffers back before the swap is undone: A's is the tail of
                    # `held`; B's (its active values) stands in W at B's entries right now.
                    for m, _, _, held in updates:
                        m.a.buf.copy_(held[m.scratch.numel():])
                        weight = self._weight(m.layer).view(-1)
                        m.b.buf.copy_(weight[m.b.indices.long()])
                    self._active = current
                    raise

        # Layers without entries here (a shard holding none of an adapter's rows) have nothing
        # to swap.
        kept = [i for i, index in enumerate(indices) if index.numel()]
        weights = [self._weight(layers[i]) for i in kept]
        for i, weight in zip(kept, weights):  # the swap's own message would name list positions
            if (values[i].dtype, values[i].device) != (weight.dtype, weight.device):
                raise ValueError(f"layer {layers[i]!r}: the weight is {weight.dtype} on "
                                 f"{weight.device}, the bank's values for it {values[i].dtype} on "
                                 f"{values[i].device} (the model was converted after the bank "
                                 "was built: convert it back, or build a new bank)")
        swap_transaction(weights, [indices[i] for i in kept], [values[i] for i in kept], commit)

    def _pair_plan(self, a: _Slot, b: _Slot) -> _PairPlan:
        key = (a, b)
        plan = self._pairs.get(key)
        if plan is not None:
            self._pairs.move_to_end(key)
            return plan
        with torch.inference_mode(False):  # its buffers are written by later switches
            plan = _PairPlan(a, b, self._order)
        self._pairs[key] = plan
        while len(self._pairs) > max(self.max_pairs, 1):
            self._pairs.popitem(last=False)
        return plan

    # -- fusions ----------------------------------------------------------------------------------
    def _fusion(self, names, weights) -> _Slot:
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or not names:
            raise ValueError(f"a fusion needs a non-empty list of adapter names, got {names!r}")
        names = tuple(names)
        for i, name in enumerate(names):  # before set(), which cannot hash a list among them
            if not isinstance(name, str):
                raise TypeError(f"name[{i}] must be an adapter name (str), got "
                                f"{type(name).__name__} {name!r:.60}")
        if len(set(names)) != len(names):
            raise ValueError(f"a fusion lists an adapter twice: {names!r}")
        for name in names:
            self._slot(name)
        if weights is None:
            weights = (1.0,) * len(names)
        if isinstance(weights, torch.Tensor):
            if weights.dim() != 1:  # tolist() would give nested lists or a bare number
                raise ValueError(f"weights must be one number per adapter (a list, or a 1-D "
                                 f"tensor), got a tensor of shape {tuple(weights.shape)}")
            weights = weights.tolist()
        try:
            weights = tuple(weights)
        except TypeError:  # a bare number: one weight per name is needed
            raise TypeError(f"weights must be a list of numbers, one per adapter, got "
                            f"{type(weights).__name__} {weights!r:.60}") from None
        weights = tuple(_finite_number(w, f"fusion weights[{i}]") for i, w in enumerate(weights))
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} names but {len(weights)} weights")
        key = (names, weights)
        slot = self._fusions.get(key)
        if slot is not None:
            self._fusions.move_to_end(key)
            return slot
        slot = _Slot(key, self._fused_entries(names, weights))
        self._fusions[key] = slot
        # Drop the least recently used fusions past the limit, never the active one.
        for old_key in list(self._fusions):
            if len(self._fusions) <= max(self.max_fusions, 1):
                break
            old = self._fusions[old_key]
            if old is not self._active and old is not slot:
                del self._fusions[old_key]
                self._forget_pairs({old})
        return slot

    # inference_mode(False) outermost: it turns grad mode back on, so no_grad must come after.
    @torch.inference_mode(False)  # the buffers are swapped later, also outside inference_mode
    @torch.no_grad()
    def _fused_entries(self, names, weights) -> dict[str, _Entry]:
        parts: dict[str, list[tuple[_Entry, float]]] = {}
        for name, weight in zip(names, weights):
            for layer, entry in self._adapters[name].entries.items():
                parts.setdefault(layer, []).append((entry, weight * entry.scale))
        entries = {}
        for layer in sorted(parts, key=self._order.__getitem__):
            layer_parts = parts[layer]
            union, inverse = torch.unique(torch.cat([e.indices.long() for e, _ in layer_parts]),
                                          sorted=True, return_inverse=True)
            total = torch.zeros(union.numel(), dtype=torch.float32, device=union.device)
            start = 0
            for entry, coefficient in layer_parts:
                n = entry.indices.numel()
                total.index_add_(0, inverse[start:start + n], coefficient * entry.delta.float())
                start += n
            base = self._base_entries(layer, union)
            active = adapted_entries(base, total, 1.0)  # one rounding onto the base
            check_representable(active, f"fusion {list(names)} with weights {list(weights)}, "
                                f"layer {layer!r}", base=base)
            entries[layer] = _Entry(union.to(layer_parts[0][0].indices.dtype), active)
        return entries

    # -- many adapters in one batch ---------------------------------------------------------------
    @contextlib.contextmanager
    def mixed(self, adapter_names: Sequence[str | None]):
        """``with bank.mixed(["a", None, "b", ...]): model(x)``: each row of the batch (the
        first dim of every adapted layer's input) through its own adapter (None or "__base__":
        the base), by multi_delta_linear on every layer an adapter of the bank touches (and on
        the layers tied to its weight, as a switch adapts them too). No
        weight is written and no adapter needs activating; the bank's lock is held for the
        block (no switch meanwhile; put a backward inside it too). The values keep the
        adapter's scale and meet x in its dtype (a delta given in fp32 is rounded once to a
        bf16 weight's dtype), so a row's output matches activate(name) then the forward within
        the rounding of a bf16/fp16 weight, not bit for bit. Under torch.compile a block reuses
        the graph of the blocks before it with the same batch size, whatever adapters its rows
        name; an add() or remove() recompiles once.

        Raises while an adapter or fusion is active (its values are in the weights), for an
        unknown name, and in a layer whose input's first dim is not len(adapter_names).
        """
        names = batch_names(adapter_names)
        with self.lock:
            if self._active is not None:
                raise RuntimeError(f"mixed batches read the base weights, but {self.active!r} is "
                                   "active (fused into them); deactivate() first")
            self._check_unmerged()
            used = used_names(names)
            for n in used:
                self._slot(n)  # KeyError naming it
            layers = self._mixed_layers()
            for layer, module in self._layers.items():
                touching = [n for n in used if layer in self._adapters[n].entries]
                if not touching:
                    continue
                if self._shards[layer] is not None:
                    raise TypeError(f"layer {layer!r} is FSDP2-sharded; mixed batches need the "
                                    "whole weight on every rank")
                if type(module) is not nn.Linear:
                    raise TypeError(f"layer {layer!r} is a {type(module).__name__}; mixed "
                                    "batches run plain nn.Linear layers")
                for n in touching:
                    if n not in layers[layer].adapters:
                        self._mixed_delta(layer, n)  # left out as it does not fit: the error
            serving = {layer: served for layer, served in layers.items() if len(served.adapters)}
            for alias, owner in self._alias.items():
                if owner in serving:
                    serving[alias] = self._mixed_alias(alias, serving[owner])
            self._mixing += 1
            try:
                with forwards_replaced({**self._layers, **self._alias_modules}, serving):
                    start_block(serving.values(), names)
                    yield self
            finally:
                self._mixing -= 1

    def hotswap(self, name: str | None) -> None:
        """Serve adapter ``name`` unfused through the model's own ShiraLinear layers (None: their
        adapters all zero, the base): each adapted layer gets the adapter's entries in place by
        ShiraLinear.hotswap_ (a smaller mask padded with zero-valued entries), a layer the
        adapter does not touch an all-zero adapter. A layer whose weight is tied to an adapted
        one gets the same entries (as activate() adapts it through the shared weight). The
        tensors stay the same objects, so a compiled model serves every adapter without
        recompiling (PEFT's compiled hot-swap, for SHiRA). The values are the adapter's times
        its scale over the layer's ``scale`` (rounded once to the layer's values' dtype; exact
        when the scales are equal).

        All or nothing: every layer, tied ones included, is checked before any is written (an
        entry on a layer that is not a ShiraLinear, more entries than a layer holds, a merged
        layer, a layer of scale 0). Refused while an adapter is active (fused into the weights)
        and on FSDP2-sharded layers.

        The model's QuantizedShiraLinear layers get an all-zero adapter (their values zeroed in
        place, their base never written): no adapter of the bank touches a quantized weight
        (add() refuses one), so each serves its base, as a ShiraLinear the adapter does not
        touch does.
        """
        with self.lock:
            if self._active is not None:
                raise RuntimeError(f"{self.active!r} is active (fused into the weights); "
                                   "deactivate() before a hot-swap")
            entries = {} if name is None else self._slot(name).entries  # KeyError naming it
            plan = []
            # A layer tied to an earlier one's weight gets its owner's adapter (zeros where the
            # owner gets zeros), as activate() and mixed() adapt it with the shared weight.
            layers = [(layer, module, layer) for layer, module in self._layers.items()]
            layers += [(alias, self._alias_modules[alias], owner)
                       for alias, owner in self._alias.items()]
            for layer, module, owner in layers:
                tied = "" if layer == owner else f" (its weight tied to layer {owner!r})"
                if owner in entries and not isinstance(module, ShiraLinear):
                    raise TypeError(f"layer {layer!r}{tied} is a {type(module).__name__}, not a "
                                    f"ShiraLinear: adapter {name!r} cannot be hot-swapped into "
                                    "it (nn.replace_linear makes the layers)")
                if not isinstance(module, ShiraLinear):
                    continue
                if self._shards[owner] is not None:
                    raise TypeError(f"layer {layer!r} is FSDP2-sharded; hot-swap needs the whole "
                                    "layer on every rank")
                if module.merged:
                    raise RuntimeError(f"layer {layer!r} is merged; unmerge() it before a "
                                       "hot-swap")
                if owner in entries and module.scale == 0:
                    raise ValueError(f"layer {layer!r}{tied} has scale 0: no values can carry "
                                     f"adapter {name!r} through it")
                shape = tuple(module.weight.shape)
                if owner in entries:
                    e = entries[owner]
                    indices, values = e.given()
                    capacity = module.shira_values.numel()
                    if indices.numel() > capacity:
                        raise ValueError(f"adapter {name!r} has {indices.numel()} entries on "
                                         f"layer {layer!r}{tied}, more than its {capacity}")
                    values = (values.float() * (e.scale / module.scale)).to(
                        module.shira_values.dtype)
                    if not bool(torch.isfinite(values).all()):
                        raise ValueError(f"adapter {name!r}, layer {layer!r}{tied}: its values "
                                         f"times its scale {e.scale} over the layer's scale "
                                         f"{module.scale} do not fit {values.dtype}")
                    delta = SparseDelta(shape, indices, values)
                else:
                    delta = SparseDelta(shape, torch.empty(0, dtype=torch.int64),
                                        torch.empty(0, dtype=module.shira_values.dtype))
                plan.append((module, delta))
            quantized = [m for m in self.model.modules() if isinstance(m, QuantizedShiraLinear)]
            if not plan and not quantized:
                raise ValueError("the model has no ShiraLinear layer to hot-swap into")
            for module, delta in plan:
                module.hotswap_(delta)
            with torch.no_grad():
                for module in quantized:
                    module.shira_values.zero_()
            self._hotswapped = name

    @property
    def hotswapped(self) -> str | None:
        """The adapter the last hotswap() put in the ShiraLinear layers (None: none, or the
        base)."""
        return self._hotswapped

    def _servable(self, layer: str) -> bool:
        """Whether mixed() can serve ``layer``: a plain nn.Linear with its whole weight here."""
        return self._shards[layer] is None and type(self._layers[layer]) is nn.Linear

    def _mixed_layers(self) -> dict[str, MixedLayer]:
        """The MixedLayer of every servable layer an adapter touches, each prepared for its
        weight's current dtype and device (built by the first call)."""
        if self._mixed is None:
            self._mixed = {}
            for slot in self._adapters.values():
                for layer in slot.entries:
                    if layer not in self._mixed and self._servable(layer):
                        self._mixed_layer(layer)
        for layer in list(self._mixed):
            self._mixed_layer(layer)
        return self._mixed

    def _mixed_alias(self, alias: str, served: MixedLayer) -> MixedLayer:
        """The forward in mixed blocks of layer ``alias``, whose weight is ``served``'s: the
        same adapters over that weight, with its own bias."""
        module = self._alias_modules[alias]
        if type(module) is not nn.Linear:
            raise TypeError(f"layer {alias!r} shares its weight with {served.name!r} and is a "
                            f"{type(module).__name__}; mixed batches run plain nn.Linear layers")
        cached = self._mixed_aliases.get(alias)
        if cached is None or cached.adapters is not served.adapters:
            cached = self._mixed_aliases[alias] = MixedLayer(alias, module, served.adapters,
                                                             served.compute, served.key)
        return cached

    def _mixed_layer(self, layer: str) -> MixedLayer:
        """``layer``'s MixedLayer with every adapter on it that fits the weight's dtype; made
        again, from the bank's deltas, after the model was cast or moved."""
        weight = self._layers[layer].weight
        key = (weight.dtype, weight.device, tuple(weight.shape))
        served = self._mixed.get(layer)
        if served is None or served.key != key:
            served = self._mixed[layer] = MixedLayer(
                layer, self._layers[layer], SparseDeltaSet(tuple(weight.shape)),
                _rows_through_deltas, key)
            for name, slot in self._adapters.items():
                if layer in slot.entries:
                    self._offer(served, name)
        return served

    def _offer(self, served: MixedLayer, name: str) -> None:
        """Add adapter ``name``'s delta to ``served``'s set, unless it does not fit the
        weight's dtype (a block that uses it then raises, naming it)."""
        try:
            delta, scale = self._mixed_delta(served.name, name)
        except ValueError:
            return
        served.adapters.add(name, delta, scale)

    def _mixed_delta(self, layer: str, name: str) -> tuple[SparseDelta, float]:
        """Adapter ``name``'s (delta, scale) on ``layer`` with its values in the weight's dtype,
        as a mixed batch uses them; ValueError if they do not fit it."""
        weight = self._layers[layer].weight
        e = self._adapters[name].entries[layer]
        # Kept for later blocks, so never made as inference tensors (a first block may run
        # inside inference_mode, a later one train).
        with torch.inference_mode(False), torch.no_grad():
            values, scale = e.delta.to(weight.dtype), e.scale
            # A value past the weight's dtype (1e5 in fp16 with scale 1e-3), or flushed to 0 by
            # it, whose scaled value fits: scale it first (fp32, one rounding).
            if bool((~torch.isfinite(values) | ((values == 0) & (e.delta != 0))).any()):
                values, scale = (e.delta.float() * e.scale).to(weight.dtype), 1.0
                if not bool(torch.isfinite(values).all()):
                    raise ValueError(f"adapter {name!r}, layer {layer!r}: scale·delta does not "
                                     f"fit the weight's {weight.dtype}, which a mixed batch "
                                     "needs; activate() the adapter instead")
            return SparseDelta(tuple(weight.shape), e.indices, values), scale

    # -- thread safety ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def reading(self):
        """``with bank.reading(): model(x)``: no switch can happen during the block (for a
        training step, put the backward inside it too)."""
        with self.lock:
            self._held.reading = getattr(self._held, "reading", 0) + 1
            try:
                yield self
            finally:
                self._held.reading -= 1

    def _held_by_reading(self) -> int:
        return getattr(self._held, "reading", 0)

    def guard_forward(self) -> _ForwardGuard:
        """Make every forward of the model hold ``lock``, so that forwards and switches
        exclude each other. Returns a handle whose remove() (or ``with`` exit) takes the guard
        off; calling it again returns the same handle.

        Forwards only: the lock is released when the forward returns, before any backward.
        For training while another thread may switch, hold ``with bank.reading():`` around
        the forward and the backward (a guarded forward that records a backward warns once)."""
        with self.lock:
            if self._guard is None:
                self._guard = _ForwardGuard(self, self.model)
            return self._guard

    def _warn_if_backward_follows(self, output) -> None:
        # After the lock is released: under warnings-as-errors this raises.
        if (not self._warned_backward and isinstance(output, torch.Tensor)
                and output.requires_grad and self._held_by_reading() == 0):
            self._warned_backward = True
            warnings.warn("AdapterBank.guard_forward() covers forwards only: this forward "
                          "records a backward, which runs after the lock is released; hold "
                          "`with bank.reading():` around forward and backward when another "
                          "thread may switch adapters", stacklevel=3)

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, name: str, path) -> None:
        """Write adapter ``name`` to ``path`` (shira_kernels.io.shira_format), with the checksum
        of the bank's base entries under it. Collective on an FSDP2-sharded model (every rank
        calls it; the base entries come from all shards)."""
        from .io.shira_format import save_adapter

        with self.lock:
            save_adapter(path, self.deltas(name), base_entries=self._file_base)

    def load(self, name: str, path) -> None:
        """Add the adapter in ``path`` as ``name``. The file must pass its content checksum
        (every tensor and the metadata) and have been saved against this base (checksum of the
        base entries); values that are not finite, or that overflow the weight's dtype once
        added, are refused. Any problem is a ValueError and leaves the bank unchanged.
        Collective on an FSDP2-sharded model, as save()."""
        from .io.shira_format import load_adapter

        with self.lock:
            self._check_new_name(name)
            self.add(name, load_adapter(path, base_entries=self._file_base))

    # -- PEFT checkpoints -------------------------------------------------------------------------
    def add_peft(self, name: str, path, *, scale: float = 1.0) -> None:
        """Add the SHiRA adapter that PEFT's ``save_pretrained`` wrote to directory ``path``
        (adapter_config.json + adapter_model.safetensors) as ``name``; PEFT's module paths
        (``base_model.model.`` stripped) are the layer names. ``scale`` is PEFT's scaling, 1.0
        unless the adapter was used with ``set_scale`` (it is not saved; TypeError if it is not
        a real number, ValueError if not finite). Any problem with the checkpoint is a
        ValueError naming the file, key or layer. The bank is unchanged after any error.
        See shira_kernels.io.peft_format."""
        from .io.peft_format import peft_adapter_deltas

        with self.lock:
            self._check_new_name(name)  # before reading the checkpoint, as load() does
            shapes = {layer: tuple(module.weight.shape) for layer, module in self._layers.items()}
            self.add(name, peft_adapter_deltas(path, shapes, scale=scale))

    def save_peft(self, name: str, path, *, base_model_name_or_path: str | None = None,
                  task_type: str | None = None) -> int:
        """Write adapter ``name`` as a PEFT SHiRA checkpoint directory, which
        ``PeftModel.from_pretrained(base_model, path)`` loads onto this bank's base model.
        PEFT needs r·(out+in) entries on every layer with one r (returned); per-layer scales
        are folded into the values. See shira_kernels.io.peft_format."""
        from .io.peft_format import write_peft_adapter

        return write_peft_adapter(path, self.deltas(name),
                                  base_model_name_or_path=base_model_name_or_path,
                                  task_type=task_type)
