"""DyLoRALinear: a drop-in nn.Linear with a LoRA branch trained for every rank 1..r (DyLoRA).

    y = x·Wᵀ + bias + (alpha / b) · (x·A[:b]ᵀ)·B[:, :b]ᵀ,   A [r, in], B [out, r]

``r`` is the maximum rank (it sizes A and B); ``rank`` is the inference rank b ≤ r (set_rank).
``r_max``, r's old name, is still accepted (argument and attribute) with a DeprecationWarning.

The base weight and bias are the very Parameters of the wrapped layer (frozen); the adapter is
``lora_A`` (Kaiming-uniform, as in LoRA) and ``lora_B`` (zeros, so the layer starts equal to the
base). The state_dict holds weight, bias, lora_A and lora_B and nothing else.

Training: every forward in training mode draws b uniformly from 1..r with a torch.Generator
the layer owns (``seed`` makes the draws and the initialisation of A reproducible; the drawn rank
is kept in ``last_rank``). By default only component b (row b−1 of A, column b−1 of B) gets a
gradient and components 1..b−1 are used detached (``train_lower=False``, the DyLoRA update);
with ``train_lower=True`` all of the first b components train. The input still gets its
gradient through all b components either way.

Truncation is a multiplication of the rank-space activation x·Aᵀ [.., r] by a rank mask
(ones for the first b) and a scale alpha/b, never a slice: the computation, and so any graph
torch.compile makes of it, is the same for every b. At inference those are the buffers
``rank_mask`` (float32 [r]) and ``rank_scale`` (float32 []), written in place by
``set_rank``, so switching the rank copies nothing and recompiles nothing. The cost is that the
two small matmuls always run at r. In training the draw happens in a function that
torch.compile does not trace (one graph break per layer, so compile training with
fullgraph=False); it writes separate training buffers, so training never changes the inference
rank.

merge(rank) writes W + (alpha/b)·B[:, :b]·A[:b] into the weight (computed in fp32, rounded once
to W's dtype), after which forward is a plain linear. To make unmerge() restore W bit for bit,
merge keeps a full copy of the base weight (out·in elements of W's dtype, as much memory as W
itself) until unmerge: a LoRA update touches every entry, and subtracting it again would not
round back to the original bits in half precision. Save state_dicts unmerged: while merged the
weight holds the merged values and the copy is not saved.
"""
from __future__ import annotations

import math
import numbers
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_representable, check_size
from ._wrap import REQUIRED, adopt_linear, check_loadable, renamed_argument

__all__ = ["DyLoRALinear"]

# Orders set_rank, merge and unmerge between threads (one lock for every layer: they take
# microseconds, and a lock attribute would make the module impossible to deepcopy or pickle).
# Without it two set_rank calls could interleave their writes and leave rank_mask of one rank
# with rank_scale (or `rank`) of the other. An eager forward takes it only to read the rank's
# mask and scale (a forward during set_rank runs the old rank or the new one); a forward
# running while another thread merges the layer is still the caller's to avoid.
_state_lock = threading.RLock()


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class DyLoRALinear(nn.Linear):
    """nn.Linear plus a DyLoRA branch of maximum rank ``r`` (``rank``: the inference rank,
    1..r, set by set_rank); see the module docstring."""

    rank_mask: torch.Tensor
    rank_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int = REQUIRED,
                 alpha: float | None = None, seed: int | None = None, train_lower: bool = False,
                 device=None, dtype=None, r_max: int = REQUIRED):
        r, r_name = renamed_argument("DyLoRALinear", "r", r, "r_max", r_max)
        super().__init__(check_size(in_features, "in_features"),
                         check_size(out_features, "out_features"), bias, device=device, dtype=dtype)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._init_adapter(r, alpha, seed, train_lower, r_name)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = REQUIRED, *, alpha: float | None = None,
                    seed: int | None = None, train_lower: bool = False,
                    r_max: int = REQUIRED) -> "DyLoRALinear":
        """Wrap ``linear``: its weight and bias Parameters are reused (not copied) and frozen.

        r: the maximum rank (r_max= is its deprecated old name).
        alpha: the scale at rank b is alpha/b; None means alpha = r (scale 1 at full rank).
        seed: seeds the layer's generator (A's initialisation, then the rank draws); None draws
        a seed from torch's global RNG, so torch.manual_seed still makes the layer reproducible.
        """
        r, r_name = renamed_argument("DyLoRALinear.from_linear", "r", r, "r_max", r_max)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if type(linear).forward is not nn.Linear.forward:
            # An adapter layer (ShiraLinear, DyLoRALinear, ...) would lose its own forward.
            raise TypeError(f"linear must be a plain nn.Linear, but {type(linear).__name__} "
                            f"overrides forward")
        return adopt_linear(cls, linear,
                            lambda layer: layer._init_adapter(r, alpha, seed, train_lower, r_name))

    def _init_adapter(self, r, alpha, seed, train_lower, r_name: str = "r") -> None:
        r = _check_positive_int(r, r_name)
        if alpha is None:
            alpha = float(r)
        if (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
                or not math.isfinite(alpha) or alpha <= 0):
            raise ValueError(f"alpha must be a finite positive number, got {alpha!r}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        if not isinstance(train_lower, bool):
            raise ValueError(f"train_lower must be a bool, got {train_lower!r}")
        self.r, self.alpha, self.seed = r, float(alpha), int(seed)
        self.train_lower = train_lower
        self.merged = False
        self.merged_rank: int | None = None
        self.last_rank: int | None = None
        self.generator = torch.Generator().manual_seed(self.seed)

        device, dtype = self.weight.device, self.weight.dtype
        a = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=self.generator)
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device,
                                               dtype=dtype))

        # The rank state is a runtime setting, not part of the checkpoint.
        def buffer(name, shape, dtype=torch.float32):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device),
                                 persistent=False)

        buffer("rank_mask", (r,))
        buffer("rank_scale", ())
        buffer("_train_mask", (r,))
        buffer("_train_scale", ())
        buffer("_train_grad", (r,), torch.bool)
        self.register_buffer("_merge_backup", None, persistent=False)
        self._rank = r
        self._write_rank(self.rank_mask, self.rank_scale, r)

    # -- rank ------------------------------------------------------------------------------
    @property
    def r_max(self) -> int:
        """Deprecated (read-only): the maximum rank, now ``r``."""
        warnings.warn("DyLoRALinear.r_max is deprecated, use .r", DeprecationWarning,
                      stacklevel=2)
        return self.r

    @property
    def rank(self) -> int:
        """The inference rank (set_rank); r, the maximum rank, until changed."""
        return self._rank

    def _check_rank(self, rank, name: str = "rank") -> int:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise ValueError(f"{name} must be an int in 1..{self.r}, got {rank!r}")
        if not 1 <= rank <= self.r:
            raise ValueError(f"{name} must be in 1..{self.r} (r, the maximum rank), got {rank}")
        return int(rank)

    @torch.no_grad()
    def _write_rank(self, mask: torch.Tensor, scale: torch.Tensor, b: int) -> None:
        mask.zero_()
        mask[:b] = 1
        scale.fill_(self.alpha / b)

    def set_rank(self, rank: int) -> "DyLoRALinear":
        """Use the first ``rank`` components at inference (1 ≤ rank ≤ r). Only the rank_mask
        and rank_scale buffers change, in place: no copy of A or B, no recompilation."""
        b = self._check_rank(rank)
        with _state_lock:
            if self.merged and b != self.merged_rank:
                raise RuntimeError(f"the layer is merged at rank {self.merged_rank}; unmerge() "
                                   f"before set_rank({b})")
            self._write_rank(self.rank_mask, self.rank_scale, b)
            self._rank = b
        return self

    @torch.compiler.disable
    def _sample_rank(self) -> None:
        # Runs eagerly even inside torch.compile (a graph break): the generator is Python state.
        if self.last_rank is not None and torch._C._current_graph_task_id() != -1:
            # A forward inside a backward is activation checkpointing's recomputation: it must
            # run the rank the forward drew (checkpoint restores torch's RNG, not this
            # generator), which the buffers still hold.
            return
        b = int(torch.randint(1, self.r + 1, (1,), generator=self.generator))
        self._write_rank(self._train_mask, self._train_scale, b)
        with torch.no_grad():
            self._train_grad.copy_(self._train_mask.bool() if self.train_lower
                                   else torch.arange(self.r) == b - 1)
        self.last_rank = b

    def _rank_weights(self) -> torch.Tensor:
        # set_rank writes rank_mask, then rank_scale, holding _state_lock: an eager forward
        # reads the pair under it too, so it runs one rank or the other, never a mix (a traced
        # forward takes the buffers as graph inputs, without the lock).
        if torch.compiler.is_compiling():
            return self.rank_mask * self.rank_scale
        with _state_lock:
            return self.rank_mask * self.rank_scale

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if self.training:
                raise RuntimeError("the layer is merged; unmerge() before training")
            return F.linear(x, self.weight, self.bias)
        a, b = self.lora_A, self.lora_B
        if self.training:
            self._sample_rank()
            if not self.train_lower:
                # Only the sampled component trains; the ones below it are used detached.
                a = torch.where(self._train_grad[:, None], a, a.detach())
                b = torch.where(self._train_grad[None, :], b, b.detach())
            weights = self._train_mask * self._train_scale
        else:
            weights = self._rank_weights()
        h = F.linear(x, a)
        h = h * weights.to(h.dtype)
        return F.linear(x, self.weight, self.bias) + F.linear(h, b)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checked before torch copies any of it: a refused load leaves the layer as it was.
        if self.merged and any(prefix + name in state_dict for name in self._parameters):
            # W holds W + ΔW, and unmerge() would put the old base back over the loaded one.
            raise RuntimeError(f"{prefix or 'layer'}: unmerge() before load_state_dict (the "
                               "layer is merged)")
        check_loadable(self, state_dict, prefix,
                       assign=local_metadata.get("assign_to_params_buffers", False))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- merge -----------------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self, rank: int | None = None) -> torch.Tensor:
        """(alpha/b)·B[:, :b]·A[:b] in fp32 [out, in], b = rank or the current rank."""
        b = self._rank if rank is None else self._check_rank(rank)
        return (self.lora_B[:, :b].float() @ self.lora_A[:b].float()) * (self.alpha / b)

    @torch.no_grad()
    def merge(self, rank: int | None = None) -> "DyLoRALinear":
        """Write W + delta_weight(b) into the weight (one rounding to W's dtype), b = rank or the
        current rank; the layer's rank becomes b. Keeps a full copy of W for unmerge()."""
        with _state_lock:
            return self._merge(rank)

    def _merge(self, rank: int | None) -> "DyLoRALinear":
        b = self._rank if rank is None else self._check_rank(rank)
        if self.merged:
            if b != self.merged_rank:
                raise RuntimeError(f"the layer is already merged at rank {self.merged_rank}; "
                                   f"unmerge() before merging at rank {b}")
            return self
        merged = (self.weight.float() + self.delta_weight(b)).to(self.weight.dtype)
        # Refused before anything changes: W + ΔW must fit W's dtype.
        check_representable(merged, f"DyLoRALinear.merge(rank={b})", base=self.weight)
        self.set_rank(b)
        self._merge_backup = self.weight.detach().clone()
        self.weight.copy_(merged)
        self.merged, self.merged_rank = True, b
        return self

    @torch.no_grad()
    def unmerge(self) -> "DyLoRALinear":
        """Restore the base weight bit for bit (and free the copy)."""
        with _state_lock:
            if not self.merged:
                return self
            self.weight.copy_(self._merge_backup)
            self._merge_backup = None
            self.merged, self.merged_rank = False, None
        return self

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r={self.r}, rank={self._rank}, "
                f"alpha={self.alpha}, train_lower={self.train_lower}"
                f"{f', merged at rank {self.merged_rank}' if self.merged else ''}")
