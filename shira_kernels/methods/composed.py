"""Composable sparse fine-tunes (LT-SFT: Ansell et al., ACL 2022) on this package's layers.

A sparse fine-tune (SFT) is a SHiRA adapter whose entries are chosen as LT-SFT chooses them:
fine-tune the weights densely for a short while, keep the entries that changed most, then train
only those entries, starting again from the base. SFTs trained apart (a language's by masked-LM,
a task's with its source language's SFT applied) are composed by addition at inference:
``AdapterBank.activate([language, task])`` writes base + Σ deltas into the weights, one rounding
per entry, and ``deactivate()`` puts the base back bit for bit.

change_masks  LT-SFT's selection: per nn.Linear weight, the entries of largest |tuned − base|
sparsify      replace named nn.Linear layers by ShiraLinear layers that train exactly given masks

What exists already does the rest: transfer.sparse_diff ranks the change, ShiraLinear trains the
entries, AdapterBank.add_from_model extracts the trained deltas and fuses them.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .._checks import check_scale
from ..nn.shira_linear import ShiraLinear, replace_linear
from ..transfer import sparse_diff

__all__ = ["change_masks", "sparsify"]


def _linears(model, what: str) -> dict[str, nn.Linear]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} must be an nn.Module, got {type(model).__name__}")
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def change_masks(base: nn.Module, tuned: nn.Module, *, density: float | None = None,
                 r: int | None = None, layers: Iterable[str] | None = None
                 ) -> dict[str, torch.Tensor]:
    """LT-SFT's mask: for each chosen nn.Linear, a bool mask [out, in] of the budget's entries of
    largest |tuned.weight − base.weight| (ranked in fp32, ties to the lower flat index).

    ``tuned`` is a (densely) fine-tuned copy of ``base``; layers are matched by module name.
    layers: the names to mask (each an nn.Linear of both models, same weight shape); None takes
    every nn.Linear of ``tuned`` whose weight differs from base's somewhere (the ones the dense
    phase trained). Give exactly one of density or r (shira_kernels.masks.budget); every chosen
    layer gets its full budget. Masks are on the tuned weights' devices.
    """
    base_linears, tuned_linears = _linears(base, "base"), _linears(tuned, "tuned")
    if layers is None:
        names = [name for name, m in tuned_linears.items()
                 if name in base_linears and m.weight.shape == base_linears[name].weight.shape
                 and not torch.equal(m.weight.detach().cpu(),
                                     base_linears[name].weight.detach().cpu())]
        if not names:
            raise ValueError("no nn.Linear weight of tuned differs from base's: nothing was "
                             "fine-tuned (or pass layers=)")
    else:
        try:
            names = [layers] if isinstance(layers, str) else list(layers)
        except TypeError:
            raise TypeError("layers must be a layer name, an iterable of names or None, got "
                            f"{type(layers).__name__}") from None
        if not names:
            raise ValueError("layers is empty: name at least one nn.Linear, or pass None")
        for name in names:
            for what, found in (("base", base_linears), ("tuned", tuned_linears)):
                if name not in found:
                    raise ValueError(f"layers names {name!r}, which is no nn.Linear of {what}")
            # Here, not in sparse_diff: its message would name its own arguments.
            tuned_shape = tuple(tuned_linears[name].weight.shape)
            base_shape = tuple(base_linears[name].weight.shape)
            if tuned_shape != base_shape:
                raise ValueError(f"layer {name!r} (in layers) has a weight of shape "
                                 f"{tuned_shape} in tuned but {base_shape} in base")
    tuned_weights = {name: tuned_linears[name].weight.detach() for name in names}
    base_weights = {name: base_linears[name].weight.detach() for name in names}
    deltas = sparse_diff(tuned_weights, base_weights, density=density, r=r, keys=names)
    masks = {}
    for name in names:
        delta = deltas[name]
        mask = torch.zeros(delta.shape[0] * delta.shape[1], dtype=torch.bool,
                           device=delta.flat_indices.device)
        mask[delta.flat_indices.long()] = True
        masks[name] = mask.view(delta.shape)
    return masks


def sparsify(model: nn.Module, masks: Mapping[str, torch.Tensor], *,
             scale: float = 1.0) -> list[str]:
    """Replace each nn.Linear named in ``masks`` (module names of ``model``) by a ShiraLinear that
    trains exactly that bool mask's entries (values start at zero: the model is unchanged until
    trained). Every mask is checked before any layer is replaced, so a refused call leaves the
    model as it was. Returns the replaced names in model order."""
    linears = _linears(model, "model")
    scale = check_scale(scale)
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError("masks must be a non-empty mapping of layer name → bool mask")
    for name, mask in masks.items():
        module = linears.get(name)
        if name == "" and module is not None:  # no parent to put a new layer in
            raise ValueError("masks names '', the model itself: sparsify replaces layers inside "
                             "a model; use ShiraLinear.from_linear(model, mask=...)")
        if module is None:
            raise ValueError(f"masks names {name!r}, which is no nn.Linear of the model")
        if isinstance(module, ShiraLinear):
            raise ValueError(f"layer {name!r} is already a ShiraLinear")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"masks[{name!r}] must be a bool tensor, got {got}")
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise ValueError(f"masks[{name!r}] has shape {tuple(mask.shape)} but the layer's "
                             f"weight has {tuple(module.weight.shape)}")
        if not bool(mask.any()):
            raise ValueError(f"masks[{name!r}] selects no entry")
        if not module.weight.is_contiguous():
            raise ValueError(f"layer {name!r}: the weight must be contiguous (the adapter's "
                             "entries are swapped into it)")
    mask_of = {id(linears[name]): mask for name, mask in masks.items()}
    return replace_linear(model, filter=lambda name, module: name in masks,
                          factory=lambda linear: ShiraLinear.from_linear(
                              linear, mask=mask_of[id(linear)], scale=scale))
