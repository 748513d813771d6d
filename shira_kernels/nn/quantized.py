"""SHiRA adapters on quantized base layers (issue 20): the base's own quantized forward plus the
sparse product, never a dense m×n delta.

  QuantizedShiraLinear   y = base_layer(x) + scale·x·Sᵀ; ShiraLinear.from_linear returns one
                         for a quantized layer (bitsandbytes Linear8bitLt / Linear4bit,
                         torchao-quantized nn.Linear)
  quantized_format       which quantized format a layer holds (None: not a quantized one)
  merge_error            why a merge into that format is refused, and what to do instead
  dequantize_weight      the layer's weight as a float tensor (for score masks and dequantize())

The base is frozen and runs as it is (its kernels, hooks and state_dict entries, under the
prefix ``base_layer.``, as PEFT names it). A quantized weight cannot take the adapter exactly:
its entries are integer codes times a scale shared by a row or a block, and W + scale·S is in
general not on that grid, so merge() refuses (``dequantize()`` gives a plain ShiraLinear, which
merges exactly). Neither bitsandbytes nor torchao is imported here: a layer of theirs can only
exist once its package was imported, so the checks look in sys.modules. The sparse product is
ops.sparse_delta.sparse_product_add (spmm forward; gx by spmm_t and the values' gradient by
sddmm, fused on the CPU).
"""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from .._checks import FLOAT_DTYPES, check_float_tensor, check_scale, validate_indices
from ..formats import SparseDelta
from ..masks import make_mask, mask_to_indices
from ..ops.sparse_delta import sparse_product_add_unpacked
from ._adapter_state import SparseAdapterState
from ._wrap import check_strict_keys, load_is_strict

_SCORE_MASKS = ("wm", "snip")  # the masks that read the weight's values


# ---------------------------------------------------------------------------------------------
# Quantized formats.
# ---------------------------------------------------------------------------------------------
def _bnb():
    return sys.modules.get("bitsandbytes")


def _torchao_tensor_class():
    utils = sys.modules.get("torchao.utils")
    return getattr(utils, "TorchAOBaseTensor", None)


def _is_torchao_weight(weight) -> bool:
    cls = _torchao_tensor_class()
    return cls is not None and isinstance(weight, cls)


def quantized_format(layer: nn.Module) -> str | None:
    """A description of ``layer``'s quantized format ("bitsandbytes int8 (LLM.int8, per-row
    absmax)", "bitsandbytes nf4 (4-bit, blocks of 64)", "torchao Int8Tensor", ...), or None
    for a layer that is not one of the supported quantized kinds. A supported kind that is not
    quantized yet (bitsandbytes quantizes when the layer is moved to its device) is a
    ValueError."""
    bnb = _bnb()
    if bnb is not None and isinstance(layer, bnb.nn.Linear8bitLt):
        weight = layer.weight
        if weight.dtype != torch.int8 or _bnb_int8_scales(layer) is None:
            raise ValueError("the bitsandbytes Linear8bitLt is not quantized (its weight is "
                             f"{weight.dtype}; has_fp16_weights=True keeps it so): build it "
                             "with has_fp16_weights=False and move it to its device (.to(...)) "
                             "first")
        return "bitsandbytes int8 (LLM.int8, per-row absmax)"
    if bnb is not None and isinstance(layer, bnb.nn.Linear4bit):
        weight = layer.weight
        if not getattr(weight, "bnb_quantized", False) or weight.quant_state is None:
            raise ValueError("the bitsandbytes Linear4bit is not quantized yet: move it to its "
                             "device (.to(...)) first")
        return (f"bitsandbytes {weight.quant_type} (4-bit, blocks of "
                f"{weight.quant_state.blocksize})")
    weight = getattr(layer, "weight", None)
    if isinstance(layer, nn.Linear) and _is_torchao_weight(weight):
        return f"torchao {type(weight).__name__}"
    return None


def _bnb_int8_scales(layer: nn.Module) -> torch.Tensor | None:
    """A bitsandbytes Linear8bitLt's per-row scales: on the weight until the first forward,
    which moves them to the layer's state."""
    scales = getattr(layer.weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(layer, "state", None), "SCB", None)
    return scales


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The quantized ``layer``'s weight as a float [out, in] tensor (a new tensor: the m×n
    copy this module's forward never makes)."""
    fmt = quantized_format(layer)
    if fmt is None:
        raise TypeError(f"layer is not a supported quantized layer: {type(layer).__name__}")
    weight = layer.weight
    with torch.no_grad():
        if fmt.startswith("torchao"):
            return weight.dequantize()
        functional = _bnb().functional
        if fmt.startswith("bitsandbytes int8"):
            return functional.int8_vectorwise_dequant(weight.data, _bnb_int8_scales(layer))
        data, quant_state = _bnb_4bit_unpacked(weight)
        return functional.dequantize_4bit(data, quant_state)


def _bnb_4bit_unpacked(weight) -> tuple[torch.Tensor, object]:
    """A bitsandbytes Params4bit's codes and quant_state in bitsandbytes' storage layout,
    without changing the weight. An inference forward on a CPU repacks the weight in place for
    bitsandbytes' CPU kernel (quant_state.packing_format_for_cpu: another code layout, absmax
    transposed to bf16, quant_state.dtype bf16); its _save_to_state_dict undoes that with
    functional._convert_weight_packed_for_cpu_inverse, which this runs on a copy of the
    quant_state (it replaces the state's fields, never writes the weight's codes), so the result
    is what bitsandbytes would save, and the layer keeps its packed layout."""
    quant_state = weight.quant_state
    if not getattr(quant_state, "packing_format_for_cpu", False):
        return weight.data, quant_state
    inverse = _bnb().functional._convert_weight_packed_for_cpu_inverse
    return inverse(weight.data, copy.copy(quant_state))


def merge_error(quant_format: str) -> RuntimeError:
    """The error of a merge into a quantized weight of ``quant_format`` (quantized_format's
    description): why it is refused and what to do instead."""
    return RuntimeError(
        f"cannot merge a SHiRA adapter into a {quant_format} weight: its entries are integer "
        "codes times a scale shared by a row or block, and W + scale·S is in general not on "
        "that grid, so merge would requantize (lossy, and unmerge could not restore the base). "
        "Use the unfused forward, or dequantize first: layer.dequantize() gives a ShiraLinear "
        "on the dequantized weight, which merges exactly")


def _layer_shape(layer: nn.Module) -> tuple[int, int]:
    return int(layer.out_features), int(layer.in_features)


def _adapter_dtype(layer: nn.Module, fmt: str) -> torch.dtype:
    """The values' dtype: the dtype the base was quantized from where the format records it
    (torchao's weight.dtype, bitsandbytes 4-bit's quant_state.dtype), else the bias's, else
    float32 (bitsandbytes int8 keeps no original dtype)."""
    if fmt.startswith("torchao"):
        dtype = layer.weight.dtype
    elif fmt.startswith("bitsandbytes int8"):
        dtype = layer.bias.dtype if layer.bias is not None else torch.float32
    else:
        quant_state = layer.weight.quant_state
        dtype = quant_state.dtype
        if getattr(quant_state, "packing_format_for_cpu", False):  # bf16 there: the original
            dtype = getattr(quant_state, "original_dtype", dtype)  # (see _bnb_4bit_unpacked)
    return dtype if dtype in FLOAT_DTYPES else torch.float32


def _device(layer: nn.Module) -> torch.device:
    return layer.weight.device


# ---------------------------------------------------------------------------------------------
# The layer.
# ---------------------------------------------------------------------------------------------
class QuantizedShiraLinear(SparseAdapterState, nn.Module):
    """A SHiRA sparse adapter on a frozen quantized linear: y = base_layer(x) + scale·x·Sᵀ.

    The adapter is ``shira_values`` (trainable) over the entries named by the buffer
    ``shira_flat_indices`` (sorted flat indices into the [out, in] weight), as in ShiraLinear;
    the derived structure lives in non-persistent buffers. Build one with
    ``ShiraLinear.from_linear(quantized_layer, ...)`` or ``QuantizedShiraLinear.from_quantized``.
    """

    shira_flat_indices: torch.Tensor

    def __init__(self, base_layer: nn.Module, *, indices: torch.Tensor, scale: float = 1.0,
                 dtype: torch.dtype | None = None):
        fmt = quantized_format(base_layer)
        if fmt is None:
            raise TypeError("base_layer must be a quantized linear (bitsandbytes Linear8bitLt / "
                            "Linear4bit, or an nn.Linear quantized by torchao), got "
                            f"{type(base_layer).__name__}")
        scale = check_scale(scale)
        shape = _layer_shape(base_layer)
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a tensor, got {type(indices).__name__}")
        device = _device(base_layer)
        # The layer's own copy: load_state_dict writes the buffer in place, which must not
        # reach the caller's tensor.
        indices = indices.to(device, copy=True)
        validate_indices(indices, shape[0] * shape[1], name="indices", ascending=True)
        if dtype is None:
            dtype = _adapter_dtype(base_layer, fmt)
        elif dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        delta = SparseDelta(shape, indices, torch.zeros(indices.numel(), dtype=dtype,
                                                         device=device))
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = shape[1], shape[0]
        self.quant_format = fmt
        self.scale = scale
        self.merged = False  # never: merge() refuses (see there)
        # SHiRA starts from zero: the adapted model equals the base until it is trained.
        self.shira_values = nn.Parameter(delta.values)
        self.register_buffer("shira_flat_indices", indices)
        self._set_structure(delta.structure)
        self.register_load_state_dict_post_hook(QuantizedShiraLinear._after_load)
        # Frozen, last (nothing above changes the base, so a refused call leaves it as it was):
        # the quantized codes are not trainable, and the bias stays as it was trained.
        for p in base_layer.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_quantized(cls, layer: nn.Module, *, r: int | None = None,
                       density: float | None = None, mask: str | torch.Tensor = "rand",
                       seed: int = 0, scale: float = 1.0, grads=None,
                       dtype: torch.dtype | None = None) -> "QuantizedShiraLinear":
        """Wrap the quantized ``layer`` (frozen, not copied). mask and budget as in
        ShiraLinear.from_linear: "rand", "struct" and "grad" need only the shape; "wm" and
        "snip" rank the dequantized weight, dequantized once here. dtype: the values' (default:
        the dtype the base was quantized from where the format records it, else float32)."""
        if quantized_format(layer) is None:
            raise TypeError("layer must be a quantized linear (bitsandbytes Linear8bitLt / "
                            "Linear4bit, or an nn.Linear quantized by torchao), got "
                            f"{type(layer).__name__}")
        scale = check_scale(scale)
        if isinstance(mask, str) and r is None and density is None:
            r = 32
        shape, device = _layer_shape(layer), _device(layer)
        if isinstance(mask, str) and mask in _SCORE_MASKS:
            weight = dequantize_weight(layer)
        else:  # the shape and device alone, without an m×n tensor behind them
            weight = torch.zeros((), device=device).expand(shape)
        chosen = make_mask(mask, weight, r=r, density=density, seed=seed, grads=grads)
        del weight
        indices = mask_to_indices(chosen).to(device)
        return cls(layer, indices=indices, scale=scale, dtype=dtype)

    @property
    def shape(self) -> tuple[int, int]:
        """The adapted weight's shape, (out_features, in_features)."""
        return self.out_features, self.in_features

    adapted_shape = shape

    # -- state_dict ---------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The adapter's entries, and what base_layer would refuse of its own part, are checked
        # before torch copies any of them: torch copies this layer's entries before base_layer
        # loads, so a base refusing its part after that would leave the adapter changed.
        # The tensors' own refusals first, then a strict load's missing or unexpected keys.
        strict_load = load_is_strict()  # torch's `strict` here is always True
        self._check_loadable(state_dict, prefix)
        self._check_base_loadable(state_dict, prefix + "base_layer.", local_metadata, strict_load)
        if strict_load:
            check_strict_keys(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _check_loadable(self, state_dict, prefix: str) -> None:
        idx_key, val_key = prefix + "shira_flat_indices", prefix + "shira_values"
        if idx_key not in state_dict and val_key not in state_dict:
            return
        indices = state_dict.get(idx_key, self.shira_flat_indices)
        values = state_dict.get(val_key, self.shira_values)
        self._check_loadable_entries(indices, values, idx_key, val_key, "indices=...")

    def _check_base_loadable(self, state_dict, prefix: str, local_metadata,
                             strict: bool) -> None:
        """Raise before anything is copied where base_layer's own load would refuse its part of
        ``state_dict``: torch's per-tensor checks (a tensor, of the same shape, that copies into
        a torchao weight), bitsandbytes int8's (weight_format, SCB), and with ``strict`` a
        missing or unexpected key. Submodules whose load this cannot predict (a
        _load_from_state_dict or pre-hooks of their own) are left to it."""
        if not strict and not any(key.startswith(prefix) for key in state_dict):
            return
        bnb = _bnb()
        assign = local_metadata.get("assign_to_params_buffers", False)
        strict_checked = []  # (module, its prefix), for the keys once every tensor passed
        for name, module in self.base_layer.named_modules():
            mprefix = prefix + name + "." if name else prefix
            part = {key: t for key, t in state_dict.items() if key.startswith(mprefix)}
            hooks = [getattr(h, "hook", h) for h in module._load_state_dict_pre_hooks.values()]
            own_load = type(module)._load_from_state_dict
            int8 = bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)
            if int8:
                known = (own_load is bnb.nn.Linear8bitLt._load_from_state_dict
                         and all(h is getattr(bnb.nn.modules, "maybe_rearrange_weight", None)
                                 for h in hooks))
            else:
                known = own_load is nn.Module._load_from_state_dict and not hooks
            if known and strict and not int8:  # int8 saves SCB and weight_format beside its own
                strict_checked.append((module, mprefix))
            if not part or not known:
                continue
            if int8:
                self._check_bnb_int8_loadable(module, part, mprefix, local_metadata, hooks)
            persistent = ((n, b) for n, b in module._buffers.items()
                          if n not in module._non_persistent_buffers_set)
            for pname, current in (*module._parameters.items(), *persistent):
                key = mprefix + pname
                if current is None or key not in part:
                    continue
                t = part[key]
                if not torch.overrides.is_tensor_like(t):
                    raise RuntimeError(f"load_state_dict: {key} must be a tensor, got "
                                       f"{type(t).__name__}; nothing was loaded")
                if current.dim() == 0 and t.dim() == 1 and t.shape[0] == 1:
                    t = t[0]  # torch's own allowance for 0-dim entries saved as [1]
                if t.shape != current.shape:
                    raise RuntimeError(f"load_state_dict: size mismatch for {key}: the "
                                       f"state_dict's has shape {tuple(t.shape)}, this layer's "
                                       f"{tuple(current.shape)}; nothing was loaded")
                if assign and _is_torchao_weight(current) and type(t) is not type(current):
                    # assigned, it would replace the quantized weight by another kind (a plain
                    # float one: the base dequantized, quant_format no longer true)
                    raise RuntimeError(f"load_state_dict(assign=True): {key} is a "
                                       f"{type(t).__name__}, not this layer's "
                                       f"{type(current).__name__}: assigned, it would replace "
                                       "the quantized base weight by another kind; load it "
                                       "without assign=True (a copy into the quantized weight) "
                                       "or quantize it the same way first; nothing was loaded")
                if not assign and _is_torchao_weight(current) and type(t) is not type(current):
                    # torchao copies only from a tensor of its own kind (a float one fails
                    # after the adapter was copied): try the copy on a clone.
                    try:
                        with torch.no_grad():
                            current.detach().clone().copy_(t)
                    except Exception as e:
                        raise RuntimeError(f"load_state_dict: {key} ({type(t).__name__}) does "
                                           f"not copy into this layer's {type(current).__name__} "
                                           f"weight ({e}); nothing was loaded") from None
        for module, mprefix in strict_checked:
            check_strict_keys(module, state_dict, mprefix)

    @staticmethod
    def _check_bnb_int8_loadable(module, part, prefix: str, local_metadata, hooks) -> None:
        """bitsandbytes Linear8bitLt's own refusals, before anything is copied: its pre-hook's
        (weight_format, run here on a copy), and the scales (SCB) it copies into the weight."""
        for hook in hooks:  # maybe_rearrange_weight: reads and pops from the copy only
            try:
                hook(part, prefix, local_metadata, True, [], [], [])
            except ValueError as e:
                raise ValueError(f"load_state_dict: {prefix}weight_format: {e}; nothing was "
                                 "loaded") from None
        weight, key = module.weight, prefix + "SCB"
        if local_metadata.get("assign_to_params_buffers", False) and prefix + "weight" in part:
            # assign=True puts the state_dict's tensor in the weight's place before
            # bitsandbytes reads the scales from it: a tensor that is not an Int8Params would
            # leave the layer without its int8 state (its next forward fails).
            weight = part[prefix + "weight"]
            int8_params = getattr(_bnb().nn, "Int8Params", None)
            if int8_params is not None and not isinstance(weight, int8_params):
                raise RuntimeError(
                    f"load_state_dict(assign=True): {prefix}weight is a "
                    f"{type(weight).__name__}, not a bitsandbytes Int8Params: assigned, it "
                    "would replace the quantized weight of this Linear8bitLt with a plain one "
                    "(bitsandbytes refuses its scales, and the layer's forward fails); load it "
                    "without assign=True, which copies into the quantized weight; nothing was "
                    "loaded")
        if key not in part:
            return
        scales = getattr(weight, "SCB", None)
        if scales is None:  # moved to the layer's state by its first forward
            raise RuntimeError(f"load_state_dict: {key}: bitsandbytes loads a Linear8bitLt's "
                               "scales only before its first forward (it refuses this one); "
                               "nothing was loaded")
        t = part[key]
        if not isinstance(t, torch.Tensor) or t.shape != scales.shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise RuntimeError(f"load_state_dict: {key} must be a tensor of shape "
                               f"{tuple(scales.shape)}, got {got}; nothing was loaded")

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base_layer(x), the quantized layer's own forward, plus scale·x·Sᵀ by spmm."""
        check_float_tensor("x", x)  # before the base runs: named as the caller knows it
        structure = self._structure_for_forward()
        y = self.base_layer(x)
        return sparse_product_add_unpacked(y, x, self.shape, self.shira_values, structure,
                                           self.scale)

    # -- merge --------------------------------------------------------------------------------
    def merge(self) -> None:
        """Refused: the quantized weight cannot hold W + scale·S exactly (see merge_error)."""
        raise merge_error(self.quant_format)

    def unmerge(self) -> None:
        """Nothing to undo: this layer is never merged."""

    def dequantize(self) -> nn.Module:
        """A ShiraLinear on the dequantized base weight (a new float tensor) with this layer's
        bias, mask, values (copied) and scale: it merges exactly, unlike this layer."""
        from .shira_linear import ShiraLinear  # shira_linear imports this module

        weight = dequantize_weight(self.base_layer).contiguous()
        bias = self.base_layer.bias
        layer = ShiraLinear(self.in_features, self.out_features, bias is not None,
                            indices=self.shira_flat_indices.clone(), scale=self.scale,
                            device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
            layer.shira_values.copy_(self.shira_values)
        layer.weight.requires_grad_(False)
        if bias is not None:
            layer.bias.requires_grad_(False)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.quant_format}, nnz={self.shira_flat_indices.numel()}, "
                f"scale={self.scale}")
