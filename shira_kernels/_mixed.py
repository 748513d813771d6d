"""What the two banks share (AdapterBank for SHiRA deltas, BinaryAdapterBank for 1-bit LoRA
adapters): their view as a collection of named adapters over named layers, and for mixed
batches the check of the rows' names, the check of a layer's input against them, and the
layers' forwards replaced for the block."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

BASE = "__base__"  # "no adapter" in a list of names, as in PEFT's adapter_names


class NamedAdapters:
    """A bank as a collection: ``name in bank``, ``len(bank)``, iteration over the adapters'
    names, and the names of the layers and adapters. The bank keeps ``_layers`` (layer name →
    module, in model order) and ``_adapters`` (adapter name → its data, in order added)."""

    _layers: dict
    _adapters: dict

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


class _MixedForward:
    """A layer's forward while a mixed block serves it: the next block to reach the layer
    (another bank on the same model, in this thread or another) sees it and refuses."""

    __slots__ = ("forward",)

    def __init__(self, forward: Callable):
        self.forward = forward

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


# Each bank's lock orders its own blocks; this one orders the check and the swap of a layer's
# forward between banks, so that two blocks can never both take one layer.
_replacing = threading.Lock()


@contextlib.contextmanager
def forwards_replaced(modules: Mapping[str, nn.Module],
                      forwards: Mapping[str, Callable]) -> Iterator[None]:
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
                if isinstance(previous, _MixedForward):
                    raise RuntimeError(f"layer {name!r} already serves another mixed() block "
                                       "(another bank of the same model, in this thread or "
                                       "another): one block at a time per layer")
                restore[name] = (previous, _MixedForward(forward))
                module.forward = restore[name][1]
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
