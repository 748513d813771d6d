"""What the two banks share (AdapterBank for SHiRA deltas, BinaryAdapterBank for 1-bit LoRA
adapters): their view as a collection of named adapters over named layers, and for mixed
batches the check of the rows' names, the check of a layer's input against them, and the
layers' forwards replaced for the block."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

BASE = "__base__"  # "no adapter" in a list of names, as in PEFT's adapter_names


class NamedAdapters:
    """A bank as a collection: ``name in bank``, ``len(bank)``, iteration over the adapters'
    names, and the names of the layers and adapters. The bank keeps ``_layers`` (layer name →
    module, in model order) and ``_adapters`` (adapter name → its data, in order added)."""

    _layers: dict
    _adapters: dict
    _mixing: int = 0  # mixed() blocks open (only in the thread holding the bank's lock)

    def _refuse_in_block(self, what: str) -> None:
        """Inside a mixed() block (the bank's lock is reentrant: only the block's own thread
        gets here) the rows' slots are fixed: an adapter removed or added meanwhile would make
        a row run another adapter than the one it names."""
        if self._mixing:
            raise RuntimeError(f"a mixed() block is open; {what} after the block")

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the layers that can take adapters, in model order."""
        return tuple(self._layers)

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the adapters, in the order they were added."""
        return tuple(self._adapters)

    def __contains__(self, name) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._adapters))


def batch_names(adapter_names) -> list:
    """adapter_names as a list, one name (or None / "__base__") per batch row; a clear error
    for anything else."""
    names = (list(adapter_names) if isinstance(adapter_names, Sequence)
             and not isinstance(adapter_names, str) else None)
    if not names:
        raise ValueError(f"adapter_names must be a non-empty list with one name (or None) per "
                         f"batch row, got {adapter_names!r}")
    bad = [n for n in names if n is not None and not isinstance(n, str)]
    if bad:
        raise TypeError(f"adapter_names must hold str or None, got {bad[0]!r}")
    return names


def used_names(names: list) -> list[str]:
    """The adapters the rows name, each once, in order of first use."""
    return list(dict.fromkeys(n for n in names if n is not None and n != BASE))


def check_batch(layer: str, x: torch.Tensor, rows: int) -> None:
    if x.dim() < 2 or x.shape[0] != rows:
        raise ValueError(f"layer {layer!r}: mixed batch of {rows} rows, but its input has shape "
                         f"{tuple(x.shape)} (the first dim must be the batch)")


class MixedLayer:
    """A layer's forward inside its bank's mixed() blocks: ``compute(module, adapters, x, rows)``
    with ``adapters`` a container of adapters in slots (add, remove, index, in, len; a
    SlotList also subset) and ``rows`` each batch row's slot in it (int64, -1 the base).

    One object per bank and layer for the bank's life: ``adapters`` holds all the bank's
    adapters on the layer, changed in place by the bank's add and remove, and a block only sets
    the rows (``start_block``). So a compiled model meets the same forward and the same
    adapters block after block: a new assignment of rows to adapters (same batch size) reuses
    its graph, and only an add or remove recompiles. Eager forwards over a SlotList run only
    the block's own adapters (``block_adapters``, ``block_rows``): that op's cost per call
    grows with the adapters it is given, and a bank may hold many more than a batch names. A
    SparseDeltaSet is packed (the same inputs whatever its count) and runs whole. Either way
    the same groups run, so the same bits.

    ``key`` is what the adapters were prepared for (the weight's dtype and device); the bank
    rebuilds the layer when it changes. Installed as the module's forward, the object also marks
    the layer as serving a block: the next block to reach the layer (another bank of the same
    model, in this thread or another) sees it and refuses."""

    __slots__ = ("name", "module", "adapters", "compute", "key", "rows", "block_adapters",
                 "block_rows")

    def __init__(self, name: str, module: nn.Module, adapters, compute: Callable, key=None):
        self.name, self.module, self.adapters, self.compute = name, module, adapters, compute
        self.key = key
        self.rows = self.block_adapters = self.block_rows = None

    def start_block(self, names: list, used: list) -> None:
        """The rows of a block whose batch rows name ``names`` (``used``: the adapters among
        them, each once): -1 for None / "__base__" and for an adapter not on this layer. Each
        layer gets its own ``rows`` tensor: dynamo guards on whether two graph inputs are one
        tensor, so sharing them where the slots happen to agree would recompile where they
        stop to."""
        here = [n for n in used if n in self.adapters]
        device = self.module.weight.device
        slot = {n: self.adapters.index(n) for n in here}
        self.rows = torch.tensor([slot.get(n, -1) for n in names], dtype=torch.int64,
                                 device=device)
        if not isinstance(self.adapters, SlotList):  # packed: whole, or none if none is used
            self.block_adapters, self.block_rows = (self.adapters if here else ()), self.rows
            return
        slot = {n: i for i, n in enumerate(here)}
        self.block_rows = torch.tensor([slot.get(n, -1) for n in names], dtype=torch.int64,
                                       device=device)
        self.block_adapters = self.adapters.subset(here)

    def __call__(self, x):
        if torch.compiler.is_compiling():
            adapters, rows = self.adapters, self.rows
        else:
            adapters, rows = self.block_adapters, self.block_rows
        check_batch(self.name, x, rows.numel())
        if not len(adapters):  # eager, and none of the block's adapters is on this layer
            return F.linear(x, self.module.weight, self.module.bias)
        return self.compute(self.module, adapters, x, rows)


class SlotList:
    """Named items in slots (a list, None where a slot is free): removing one frees its slot and
    leaves the others where they are, and add takes the lowest free slot (as SparseDeltaSet
    does for sparse deltas)."""

    __slots__ = ("items", "_index")

    def __init__(self):
        self.items: list = []
        self._index: dict[str, int] = {}

    def add(self, name: str, item) -> int:
        slot = next((i for i, entry in enumerate(self.items) if entry is None), len(self.items))
        if slot == len(self.items):
            self.items.append(None)
        self.items[slot] = item
        self._index[name] = slot
        return slot

    def remove(self, name: str) -> None:
        self.items[self._index.pop(name)] = None

    def index(self, name: str) -> int:
        return self._index[name]

    def subset(self, names: list) -> "SlotList":
        """A SlotList of ``names``' items, in slots 0, 1, ... in that order."""
        part = SlotList()
        part.items = [self.items[self._index[n]] for n in names]
        part._index = {n: i for i, n in enumerate(names)}
        return part

    def __contains__(self, name) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self._index)


def start_block(layers: Iterable[MixedLayer], names: list) -> None:
    """Every layer's rows for a block whose batch rows name ``names``."""
    used = used_names(names)
    for layer in layers:
        layer.start_block(names, used)


# Each bank's lock orders its own blocks; this one orders the check and the swap of a layer's
# forward between banks, so that two blocks can never both take one layer.
_replacing = threading.Lock()


@contextlib.contextmanager
def forwards_replaced(modules: Mapping[str, nn.Module],
                      forwards: Mapping[str, MixedLayer]) -> Iterator[None]:
    """modules[name].forward is forwards[name] for the block (an instance attribute); on exit,
    also by an exception, each module's forward is what it was. A layer already serving
    another block raises RuntimeError (nothing replaced): had both gone ahead, the block that
    ended last would put back the other's forward for good."""
    restore = {}
    try:
        with _replacing:
            for name, forward in forwards.items():
                module = modules[name]
                previous = module.__dict__.get("forward")
                if isinstance(previous, MixedLayer):
                    raise RuntimeError(f"layer {name!r} already serves another mixed() block "
                                       "(another bank of the same model, in this thread or "
                                       "another): one block at a time per layer")
                restore[name] = (previous, forward)
                module.forward = forward
        yield
    finally:
        with _replacing:
            for name, (previous, installed) in restore.items():
                module = modules[name]
                if module.__dict__.get("forward") is not installed:
                    continue  # replaced since by someone else, who will put theirs back
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous
