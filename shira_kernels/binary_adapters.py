"""BinaryAdapterBank: many named 1-bit LoRA adapters for one model, each batch row through its
own (S-LoRA-style serving of 1-bit adapters).

    bank = BinaryAdapterBank(model)            # the model's plain nn.Linear layers, untouched
    bank.add_from_model("math", tuned)         # the packed BinaryLoRALinear layers of a copy
    bank.add("code", {"layers.0.q": (down, up, 2.0)})
    with bank.mixed(["math", None, "code"]):   # one name per batch row (None: the base)
        y = model(x)

Inside ``mixed`` every layer an adapter of the bank touches runs x·Wᵀ + b plus
multi_binary_lora over the rows' adapters: one dense matmul for the whole batch and one group per
adapter, each group in the strategy binary_lora's "auto" takes for its rows. A 1-bit adapter is
never fused into the weights (W + scale·up·down is not a W of W's dtype), so nothing is written
and nothing needs activating; a batch of one adapter is ``mixed([name] * batch)``.

Threads: the bank's methods hold ``bank.lock`` (an RLock) and ``mixed`` holds it for its block,
so adapters are not added or removed under a running mixed batch, and mixed blocks in two
threads take turns. Inside a block the layers' forwards are the mixed ones for every thread: run
the model in the block's thread only (nothing is written either way, so a stray forward gets
an error or the block's adapters, never a changed weight).
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping

import torch
from torch import nn

from ._checks import check_scale
from ._mixed import (BASE, MixedLayer, NamedAdapters, SlotList, batch_names, forwards_replaced,
                     start_block, used_names)
from .formats import BinaryWeight
from .nn.binary import BinaryAdapter, BinaryLoRALinear
from .ops.multi_binary import multi_binary_lora
from .ops.multi_delta import base_linear

_Adapter = tuple[BinaryWeight, BinaryWeight, float]  # (down [r, in], up [out, r], scale)


def _rows_through_branches(module: nn.Linear, adapters: SlotList, x, rows) -> torch.Tensor:
    """A layer's forward inside BinaryAdapterBank.mixed (MixedLayer's compute)."""
    # The base product on the kernel tuned for a mixed batch's (multi_delta_linear's base).
    return base_linear(x, module.weight, module.bias) + multi_binary_lora(x, adapters.items, rows)


class BinaryAdapterBank(NamedAdapters):
    """Named 1-bit LoRA adapters (packed down and up BinaryWeights and a scale per layer) for
    ``model``'s plain nn.Linear layers (``layers``), served per batch row by ``mixed``."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self._layers = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
        self._adapters: dict[str, dict[str, _Adapter]] = {}
        self.lock = threading.RLock()
        # Per layer an adapter touches, its forward in mixed() blocks, kept up to date by add
        # and remove (the adapters in place, so a compiled model keeps its graph).
        self._mixed: dict[str, MixedLayer] = {}

    def __repr__(self) -> str:
        return f"BinaryAdapterBank({len(self._layers)} layers, adapters={list(self._adapters)})"

    def adapter(self, name: str) -> dict[str, _Adapter]:
        """Adapter ``name``'s layers: layer name → (down, up, scale)."""
        if name not in self._adapters:
            raise KeyError(f"no adapter {name!r} in the bank (adapters: {list(self._adapters)})")
        return dict(self._adapters[name])

    # -- adding and removing -------------------------------------------------------------------
    def _checked(self, name: str, layer, entry, scale: float) -> _Adapter:
        where = f"adapter {name!r}, layer {layer!r}"
        if layer not in self._layers:
            raise KeyError(f"{where}: the model has no plain nn.Linear of that name (layers: "
                           f"{list(self._layers)[:8]}{' ...' if len(self._layers) > 8 else ''})")
        if isinstance(entry, BinaryAdapter):
            if entry.activation is not None:
                raise ValueError(f"{where}: a BinaryAdapter with activation "
                                 f"{entry.activation!r} is not a LoRA branch (activation None)")
            down, up = entry.binary_weights()
            if entry.packed:
                # Copies: the bank keeps the adapter as it is now, not the module's buffers,
                # which a later load_state_dict into the tuned copy would overwrite in place.
                down, up = (BinaryWeight(bw.packed.clone(), bw.alpha.clone(), bw.mu.clone(),
                                         bw.shape[1]) for bw in (down, up))
            entry = (down, up, entry.scale)
        if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
            raise TypeError(f"{where}: give a BinaryAdapter or (down, up[, scale]) BinaryWeights, "
                            f"got {type(entry).__name__}")
        down, up, own = (*entry, 1.0) if len(entry) == 2 else entry
        for part, bw in (("down", down), ("up", up)):
            if not isinstance(bw, BinaryWeight):
                raise TypeError(f"{where}: {part} must be a BinaryWeight, got "
                                f"{type(bw).__name__}")
        module = self._layers[layer]
        r = down.shape[0]
        if down.shape[1] != module.in_features or tuple(up.shape) != (module.out_features, r):
            raise ValueError(f"{where}: down {tuple(down.shape)} and up {tuple(up.shape)} do not "
                             f"make a rank-r branch of a layer {module.out_features}x"
                             f"{module.in_features} (down [r, in], up [out, r])")
        if down.packed.device != module.weight.device or up.packed.device != module.weight.device:
            raise ValueError(f"{where}: the adapter is on {down.packed.device}/"
                             f"{up.packed.device}, the layer's weight on {module.weight.device}")
        for part, bw in (("down", down), ("up", up)):  # BinaryWeight itself does not look
            if not bool(torch.isfinite(torch.cat([bw.alpha, bw.mu])).all()):
                raise ValueError(f"{where}: {part}'s α or μ is not finite")
        return down, up, check_scale(own, f"{where}'s scale") * scale

    def add(self, name: str, adapter: Mapping, scale: float = 1.0) -> None:
        """Add adapter ``name``: a mapping layer name → a packed BinaryAdapter without activation
        (a BinaryLoRALinear's .lora) or (down, up[, scale]) BinaryWeights; ``scale`` multiplies
        every layer's own. Everything is checked first: a refused call adds nothing."""
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"an adapter name must be a non-empty str other than {BASE!r}, got "
                             f"{name!r}")
        if not isinstance(adapter, Mapping) or not adapter:
            raise ValueError(f"adapter {name!r} must be a non-empty mapping layer name → "
                             f"adapter, got {type(adapter).__name__}")
        scale = check_scale(scale)
        with self.lock:
            self._refuse_in_block("add adapters")
            if name in self._adapters:
                raise ValueError(f"an adapter named {name!r} is already in the bank; remove() it "
                                 "first")
            self._adapters[name] = {layer: self._checked(name, layer, entry, scale)
                                    for layer, entry in adapter.items()}
            for layer, entry in self._adapters[name].items():
                if layer not in self._mixed:
                    self._mixed[layer] = MixedLayer(layer, self._layers[layer], SlotList(),
                                                    _rows_through_branches)
                self._mixed[layer].adapters.add(name, entry)

    def add_from_model(self, name: str, model: nn.Module, scale: float = 1.0) -> None:
        """Add adapter ``name`` from ``model``'s BinaryLoRALinear layers (a copy of the bank's
        model with the adapter trained; each branch packed or fake-quantized as it stands),
        matched to the bank's layers by module name."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        layers = {layer: m.lora for layer, m in model.named_modules()
                  if isinstance(m, BinaryLoRALinear)}
        if not layers:
            raise ValueError(f"adapter {name!r}: the model has no BinaryLoRALinear layer")
        self.add(name, layers, scale)

    def remove(self, name: str) -> None:
        with self.lock:
            self._refuse_in_block("remove adapters")
            for layer in self.adapter(name):  # KeyError naming it
                self._mixed[layer].adapters.remove(name)
            del self._adapters[name]

    # -- many adapters in one batch -----------------------------------------------------------
    @contextlib.contextmanager
    def mixed(self, adapter_names):
        """``with bank.mixed(["a", None, "b", ...]): model(x)``: each row of the batch (the
        first dim of every adapted layer's input) through its own adapter (None or "__base__":
        the base alone), differentiable in x, on every layer an adapter of the bank touches.
        Under torch.compile a block reuses the graph of the blocks before it with the same batch
        size; an add() or remove() recompiles once. Raises for an unknown name, a list that is
        not one name per row, and in a layer whose input's first dim is not
        len(adapter_names)."""
        names = batch_names(adapter_names)
        with self.lock:
            used = used_names(names)
            for n in used:
                self.adapter(n)  # KeyError naming it
            serving = {layer: served for layer, served in self._mixed.items()
                       if len(served.adapters)}
            self._mixing += 1
            try:
                with forwards_replaced(self._layers, serving):
                    start_block(serving.values(), names)
                    yield self
            finally:
                self._mixing -= 1
