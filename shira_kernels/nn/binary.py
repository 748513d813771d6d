"""1-bit adapter modules: BinaryAdapter (AdaptFormer's parallel bottleneck, down → ReLU → up)
and BinaryLoRALinear (an nn.Linear plus a 1-bit LoRA branch).

Training: the branch keeps float weights and fake-quantizes them on every forward with the
straight-through estimator (quant.fake_quantize). Inference: .pack() replaces the float weights
with packed sign words and fp32 α, μ (buffers; the state_dict then holds nothing else for the
branch; they stay fp32 through a dtype conversion of the module, .half() or .to(dtype), which
moves them to another device all the same) and forward runs binary_lora, one kernel for down,
activation and up.

The rank is ``r`` (argument and attribute); ``rank``, its old name, is still accepted with a
DeprecationWarning.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_scale, check_size
from ..formats import BinaryWeight
from ..ops.binary import ACTIVATIONS, binary_lora
from ..quant import METHODS, fake_quantize
from ._wrap import REQUIRED, adopt_linear, check_loadable, renamed_argument


# The packed form's α and μ buffers (BinaryWeight takes them in fp32 only).
_STATS = tuple(f"{part}_{stat}" for part in ("down", "up") for stat in ("alpha", "mu"))


def _linear_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear gives for x here: autocast's where it is on for x's device."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class BinaryAdapter(nn.Module):
    """y = scale · up(act(down(x))) with 1-bit down [r, in] and up [out, r].

    activation "relu" (AdaptFormer, the default) or None (LoRA). method: the quantizer,
    "petl" (per tensor, the paper's) or "row" (per output row).
    """

    def __init__(self, in_features: int, r: int = REQUIRED, out_features: int | None = None, *,
                 scale: float = 1.0, activation: str | None = "relu", method: str = "petl",
                 device=None, dtype=None, rank: int = REQUIRED):
        super().__init__()
        r, r_name = renamed_argument("BinaryAdapter", "r", r, "rank", rank)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        in_features, r = check_size(in_features, "in_features"), check_size(r, r_name)
        if out_features is not None:
            out_features = check_size(out_features, "out_features")
        self.in_features, self.r = in_features, r
        self.out_features = out_features or in_features
        self.scale, self.activation, self.method = check_scale(scale), activation, method
        self.packed = False
        # LoRA's initialisation: down random (Kaiming-uniform), up zero, so the branch starts at 0.
        self.down = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.up = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    @property
    def rank(self) -> int:
        """Deprecated (read-only): the rank, now ``r``."""
        warnings.warn("BinaryAdapter.rank is deprecated, use .r", DeprecationWarning,
                      stacklevel=2)
        return self.r

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        return torch.relu(h) if self.activation == "relu" else h

    def binary_weights(self) -> tuple[BinaryWeight, BinaryWeight]:
        """(down, up) as BinaryWeights: the packed buffers, or the float weights quantized."""
        if self.packed:
            return (BinaryWeight(self.down_packed, self.down_alpha, self.down_mu, self.in_features),
                    BinaryWeight(self.up_packed, self.up_alpha, self.up_mu, self.r))
        return (BinaryWeight.from_float(self.down, self.method),
                BinaryWeight.from_float(self.up, self.method))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            down, up = self.binary_weights()
            y = binary_lora(x, down, up, self.scale, self.activation)
            # The op keeps x's dtype; the float branch's F.linear gives autocast's. The packed
            # branch gives the same dtype (its fp32 sums rounded once).
            return y.to(_linear_dtype(x))
        down = fake_quantize(self.down, self.method).to(x.dtype)
        up = fake_quantize(self.up, self.method).to(x.dtype)
        return self.scale * F.linear(self._act(F.linear(x, down)), up)

    @torch.no_grad()
    def pack(self) -> "BinaryAdapter":
        """Switch to the packed inference form (irreversible: the float weights are dropped)."""
        if not self.packed:
            self._install_packed(self._packed_form())
        return self

    def _packed_form(self) -> tuple[BinaryWeight, BinaryWeight]:
        """pack()'s first step, the one that can fail: the packed (down, up), computed without
        changing anything (so a caller packing many branches can compute all before any is
        packed)."""
        # Normal tensors even under torch.inference_mode: inference-tensor buffers could not be
        # saved for a later backward (binary_lora is differentiable in x).
        with torch.inference_mode(False), torch.no_grad():
            return self.binary_weights()

    def _install_packed(self, form: tuple[BinaryWeight, BinaryWeight]) -> None:
        """pack()'s second step: ``form`` (from _packed_form) in place of the float weights."""
        del self.down, self.up
        for name, bw in zip(("down", "up"), form):
            self.register_buffer(f"{name}_packed", bw.packed)
            self.register_buffer(f"{name}_alpha", bw.alpha)
            self.register_buffer(f"{name}_mu", bw.mu)
        self.packed = True

    def _apply(self, fn, *args, **kwargs):
        # nn.Module.to(dtype), .half() and the like cast every float buffer, α and μ too: keep
        # them fp32 (the originals, bit for bit) on the device fn put them on.
        stats = {name: self._buffers[name] for name in _STATS if name in self._buffers}
        result = super()._apply(fn, *args, **kwargs)
        for name, before in stats.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return result

    def _check_loadable(self, state_dict, prefix: str, local_metadata) -> None:
        assign = local_metadata.get("assign_to_params_buffers", False)
        if self.packed:
            hint = (" (the state_dict holds the float weights: load them before pack())"
                    if prefix + "down" in state_dict else "")
            check_loadable(self, state_dict, prefix, _STATS, hint, assign=assign)
        else:
            hint = (" (the state_dict holds a packed adapter: pack() this one before loading it)"
                    if prefix + "down_packed" in state_dict else "")
            check_loadable(self, state_dict, prefix, (), hint, assign=assign)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checked before torch copies any of it: a refused load leaves the adapter as it was.
        self._check_loadable(state_dict, prefix, local_metadata)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, r={self.r}, out={self.out_features}, "
                f"scale={self.scale}, activation={self.activation}, method={self.method}"
                f"{', packed' if self.packed else ''}")


class BinaryLoRALinear(nn.Linear):
    """A frozen base nn.Linear plus a 1-bit LoRA branch: y = x·Wᵀ + b + scale·up(down(x)).
    The base Parameters are reused (not copied); .weight, .bias and their keys stay as they
    were. The branch lives in .lora (a BinaryAdapter without activation)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = REQUIRED, *, scale: float = 1.0,
                    method: str = "petl", rank: int = REQUIRED) -> "BinaryLoRALinear":
        """Wrap ``linear`` with a 1-bit LoRA branch of rank ``r`` (rank= is its deprecated old
        name)."""
        r, r_name = renamed_argument("BinaryLoRALinear.from_linear", "r", r, "rank", rank)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        r = check_size(r, r_name)  # here, so that a refusal names the argument the caller used
        # The adapter first: if its arguments are refused, linear is left as it was (not frozen).
        lora = BinaryAdapter(linear.in_features, r, linear.out_features, scale=scale,
                             activation=None, method=method, device=linear.weight.device)
        layer = adopt_linear(cls, linear)
        layer.lora = lora
        return layer

    @property
    def r(self) -> int:
        """The rank of the 1-bit LoRA branch (``lora.r``)."""
        return self.lora.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The branch's keys too are checked before torch copies the base's weight and bias (it
        # loads the branch after them): a refused load leaves the whole layer as it was.
        check_loadable(self, state_dict, prefix,
                       assign=local_metadata.get("assign_to_params_buffers", False))
        self.lora._check_loadable(state_dict, prefix + "lora.", local_metadata)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def pack(self) -> "BinaryLoRALinear":
        self.lora.pack()
        return self
