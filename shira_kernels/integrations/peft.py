"""Hugging Face PEFT's SHiRA adapters at run time: PEFT's own ShiRA layers on this package's
kernels, and the bridge between PEFT checkpoints and an AdapterBank.

``accelerate(peft_model)`` swaps the class of every ``peft.tuners.shira.Linear`` in a model for
a subclass whose unfused forward is one sparse_delta_linear (no copy of W, no dense delta, no
dense gradient) and whose merge / unmerge swap entries with scatter_swap_ (unmerge restores W
bit for bit). Parameters, buffers, state_dict and PEFT's bookkeeping stay as they are; what it
does not accelerate goes to PEFT's own code. ``restore`` undoes it.

The checkpoint format itself (adapter_config.json + adapter_model.safetensors, read, checked
against layer shapes and written) is shira_kernels.io.peft_format; its names are importable
from here too. ``load_peft_into_bank`` / ``save_bank_as_peft`` are AdapterBank.add_peft /
save_peft as functions.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import warnings

import torch
from torch import nn

from .._checks import FLOAT_DTYPES, tensor_stamp, unchanged
from ..formats import SparseDelta, SparseDeltaSet, flat_index_dtype
from ..io.peft_format import BIN_NAME  # noqa: F401  (importable from here, as before)
from ..io.peft_format import (CONFIG_NAME, PEFT_PREFIX, SAFETENSORS_NAME, peft_adapter_deltas,
                              read_peft_adapter, write_peft_adapter)
from ..nn.quantized import merge_error, quantized_format
from ..ops.multi_delta import multi_delta_linear
from ..ops.scatter_swap import adapted_entries, merge_by_swap, swap_transaction
from ..ops.sparse_delta import (STRATEGIES, sparse_delta_linear_unpacked,
                                sparse_product_add_unpacked)

__all__ = ["CONFIG_NAME", "PEFT_PREFIX", "SAFETENSORS_NAME", "accelerate", "accelerated_layers",
           "load_peft_into_bank", "peft_adapter_deltas", "read_peft_adapter", "restore",
           "save_bank_as_peft", "write_peft_adapter"]

log = logging.getLogger(__name__)


# =============================================================================================
# Checkpoints and an AdapterBank
# =============================================================================================
def load_peft_into_bank(bank, name: str, path, *, scale: float = 1.0) -> None:
    """``bank.add_peft(name, path, scale=scale)``: add the PEFT SHiRA checkpoint in directory
    ``path`` to an AdapterBank as ``name`` (see AdapterBank.add_peft)."""
    bank.add_peft(name, path, scale=scale)


def save_bank_as_peft(bank, name: str, path, *, base_model_name_or_path: str | None = None,
                      task_type: str | None = None) -> int:
    """``bank.save_peft(name, path, ...)``: write adapter ``name`` of an AdapterBank as a PEFT
    SHiRA checkpoint directory (see write_peft_adapter); returns its r."""
    return bank.save_peft(name, path, base_model_name_or_path=base_model_name_or_path,
                          task_type=task_type)


# =============================================================================================
# accelerate: PEFT's ShiRA layers on this package's kernels
# =============================================================================================
class _Plan:
    """An adapter's index pattern in this package's form, derived once per index tensor:
    sorted flat indices, the permutation from PEFT's order to it (None when PEFT's order is
    already sorted, as its masks give) and the kernels' structure. ``ok`` is False when the
    indices cannot be accelerated (PEFT's forward then runs and reports any error itself).

    Built outside torch.inference_mode even when called inside it: the plan outlives the call,
    and its tensors must serve later calls outside inference mode too (autograd refuses to
    save inference tensors). ``stamp`` tells whether the source was written since: its version,
    or for an inference tensor (no version counter) a copy of its contents. ``kept`` holds the
    last delta mixed_delta made, with what it was made from."""

    __slots__ = ("source", "stamp", "device", "shape", "flat", "perm", "structure", "ok", "kept")

    def __init__(self, source: torch.Tensor, shape: tuple[int, int], device: torch.device):
        self.source, self.stamp, self.device = source, tensor_stamp(source), device
        self.shape = shape
        self.flat = self.perm = self.structure = self.kept = None
        self.ok = False
        with torch.inference_mode(False):
            self._derive(source, shape, device)

    def _derive(self, source: torch.Tensor, shape: tuple[int, int], device: torch.device):
        if source.dim() != 2 or source.shape[0] != 2 or source.dtype.is_floating_point:
            return
        if source.is_meta or device.type == "meta":
            return  # no data yet (a weight not loaded, or offloaded): derived once it has some
        idx = source.to(device).long()
        rows, cols = idx[0], idx[1]
        if rows.numel():
            if int(rows.min()) < 0 or int(rows.max()) >= shape[0]:
                return
            if int(cols.min()) < 0 or int(cols.max()) >= shape[1]:
                return
        flat = rows * shape[1] + cols
        order = torch.argsort(flat)
        flat = flat[order]
        if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
            return  # repeated entries: PEFT sums them, the kernels do not
        if not bool((order == torch.arange(order.numel(), device=device)).all()):
            self.perm = order
        self.flat = flat.to(flat_index_dtype(shape))
        zeros = torch.zeros(self.flat.numel(), device=device)
        self.structure = SparseDelta(shape, self.flat, zeros).structure
        self.ok = True

    def fresh(self, source: torch.Tensor, device: torch.device) -> bool:
        return self.source is source and self.device == device and unchanged(source, self.stamp)

    def mixed_delta(self, values: torch.Tensor, dtype: torch.dtype) -> SparseDelta:
        """The adapter's delta as a mixed batch's SparseDeltaSet takes it (a copy, without
        autograd: PEFT serves ``adapter_names`` in eval mode only): ``values`` (PEFT's order)
        in this plan's order and in ``dtype``. Kept until ``values`` is written or another
        dtype is asked for: generate() asks every layer for it at every step, and making it (a
        gather, a cast, a SparseDelta's checks) cost more than the product."""
        def made():
            return SparseDelta(self.shape, self.flat, self.ordered(values.detach()).to(dtype),
                               structure=self.structure)

        kept = self.kept
        if (kept is not None and kept[0] is values and kept[2] == dtype
                and unchanged(values, kept[1])):
            return kept[3]
        with torch.inference_mode(False), torch.no_grad():  # kept: serves calls outside too
            delta = made()
        self.kept = (values, tensor_stamp(values), dtype, delta)
        return delta

    def ordered(self, values: torch.Tensor) -> torch.Tensor:
        """An adapter's values (PEFT's order) in this plan's (sorted) order."""
        return values if self.perm is None else values[self.perm]


def _warn_hooks(layer) -> None:
    try:
        from peft.tuners.shira.layer import _warn_once_about_module_hooks
    except ImportError:
        return
    _warn_once_about_module_hooks(layer)


class _AcceleratedShira:
    """Mixed in before peft.tuners.shira.Linear (see _accelerated_class). State, set by
    accelerate() as plain attributes (not parameters or buffers, so state_dict is unchanged):
    _sk_strategy (sparse_delta_linear's strategy), _sk_plans {adapter: _Plan} and _sk_held
    {adapter: (flat indices, W's entries before that adapter's merge)}."""

    # -- planning ---------------------------------------------------------------------------------
    def _sk_plan(self, adapter: str) -> _Plan | None:
        source = self.shira_indices.get(adapter)
        weight = self.get_base_layer().weight
        if not isinstance(source, torch.Tensor):
            return None
        plan = self._sk_plans.get(adapter)
        if torch.compiler.is_compiling():
            # Traced: the plan made in eager mode (accelerate() makes one per adapter), taken as
            # it is; checking or deriving it reads versions and values (graph breaks). Without
            # one, PEFT's own forward runs.
            return plan if plan is not None and plan.ok else None
        if plan is None or not plan.fresh(source, weight.device):
            # (out, in), not weight.shape: a 4-bit base's weight is its packed codes.
            shape = (self.out_features, self.in_features)
            plan = self._sk_plans[adapter] = _Plan(source, shape, weight.device)
        return plan if plan.ok else None

    def _sk_values(self, adapter: str, plan: _Plan) -> torch.Tensor:
        return plan.ordered(self.shira_weight[adapter])

    def _sk_plain_weight(self) -> torch.Tensor | None:
        if self.quantization_backend is not None:
            return None
        weight = getattr(self.get_base_layer(), "weight", None)
        if (not isinstance(weight, torch.Tensor) or weight.dim() != 2
                or weight.dtype not in FLOAT_DTYPES or not weight.is_contiguous()):
            return None
        return weight

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = kwargs.pop("adapter_names", None)  # injected by _mixed_batch_hooks
        if names is not None:
            return self._sk_mixed(x, names)
        if self.disable_adapters or self.merged or not isinstance(x, torch.Tensor):
            return super().forward(x, *args, **kwargs)
        if self.quantization_backend is not None:
            return self._sk_quantized(x, *args, **kwargs)
        weight = self._sk_plain_weight()
        adapters = [a for a in self.active_adapters if a in self.shira_weight.keys()]
        if weight is None or len(adapters) > 1:  # several adapters: PEFT sums them densely
            return super().forward(x, *args, **kwargs)
        bias = self.get_base_layer().bias
        autocast = torch.is_autocast_enabled(x.device.type)
        if (x.device != weight.device or x.dim() == 0 or x.shape[-1] != weight.shape[1]
                or (not autocast and (x.dtype != weight.dtype
                                      or (bias is not None and bias.dtype != weight.dtype)))):
            return super().forward(x, *args, **kwargs)
        if not adapters:  # as PEFT: the base weight alone (it ignores the base layer's hooks)
            _warn_hooks(self)
            return torch.nn.functional.linear(x, weight, bias)
        adapter = adapters[0]
        plan = self._sk_plan(adapter)
        if plan is None:
            return super().forward(x, *args, **kwargs)
        _warn_hooks(self)
        values = self._sk_values(adapter, plan)
        if values.dtype != weight.dtype and not autocast:
            # The ops take values in W's dtype: each rounded once to it here, where PEFT rounds
            # W + scaling·Δ to it instead (16-bit outputs differ from PEFT's by that rounding).
            values = values.to(weight.dtype)
        return sparse_delta_linear_unpacked(x, weight, bias, weight.shape, values, plan.flat,
                                            plan.structure, float(self.scaling[adapter]),
                                            self._sk_strategy)

    def _sk_quant_format(self) -> str | None:
        """The base's quantized format if the kernels serve it (nn/quantized.py), else None (a
        kind not quantized yet, or one they do not know: PEFT's own path)."""
        try:
            return quantized_format(self.get_base_layer())
        except ValueError:
            return None

    def _sk_quantized(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """A quantized base (bitsandbytes, torchao): its own forward plus the sparse product
        (sparse_product_add), where PEFT dequantizes W and adds a dense delta on every call."""
        base = self.get_base_layer()
        adapters = [a for a in self.active_adapters if a in self.shira_weight.keys()]
        if (self._sk_quant_format() is None or len(adapters) != 1 or x.dim() == 0
                or x.shape[-1] != self.in_features):
            return super().forward(x, *args, **kwargs)
        plan = self._sk_plan(adapters[0])
        if plan is None:
            return super().forward(x, *args, **kwargs)
        y = base(x, *args, **kwargs)
        return sparse_product_add_unpacked(y, x, (self.out_features, self.in_features),
                                           self._sk_values(adapters[0], plan), plan.structure,
                                           float(self.scaling[adapters[0]]))

    def _sk_mixed(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Each row of the batch (x's first dim) through its adapter ("__base__", or an adapter
        this layer does not have: the base), by multi_delta_linear; as PEFT does for LoRA."""
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` while an adapter is merged; unmerge "
                             "first")
        weight, bias = self._sk_plain_weight(), self.get_base_layer().bias
        if weight is None or not isinstance(x, torch.Tensor):
            raise ValueError("`adapter_names` with SHiRA needs a plain float weight and a "
                             "tensor input")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"`adapter_names` with SHiRA: the layer's input is {x.dtype} but "
                             f"its weight {weight.dtype} (under autocast both run in its dtype)")
        if x.dim() < 2 or x.shape[0] != len(names):
            raise ValueError(f"adapter_names has {len(names)} entries but the layer's input has "
                             f"shape {tuple(x.shape)} (one name per batch row)")
        if self.disable_adapters:
            return torch.nn.functional.linear(x, weight, bias)
        adapters = {}
        for adapter in dict.fromkeys(names):
            if adapter not in self.shira_weight.keys():
                continue  # "__base__", or an adapter on other layers only: the base here
            plan = self._sk_plan(adapter)
            if plan is None:
                raise ValueError(f"adapter {adapter!r}: its indices cannot run on the kernels "
                                 "(out of range or repeated)")
            adapters[adapter] = (plan.mixed_delta(self.shira_weight[adapter], weight.dtype),
                                 float(self.scaling[adapter]))
        # The set copies its adapters in: kept for the next call with the same deltas (the
        # plans keep a delta until its values are written), as generate() makes at every step.
        key = tuple((name, id(delta), scale) for name, (delta, scale) in adapters.items())
        kept = getattr(self, "_sk_mixed_set", None)
        if kept is not None and kept[0] == key:
            delta_set = kept[2]
        else:
            delta_set = SparseDeltaSet(tuple(weight.shape))
            for name, (delta, scale) in adapters.items():
                delta_set.add(name, delta, scale)
            # The deltas are held with the key: an id is only unique while its object lives.
            self._sk_mixed_set = (key, list(adapters.values()), delta_set)
        slots = torch.tensor([delta_set.index(n) if n in delta_set else -1 for n in names],
                             device=x.device)  # one per batch row: multi_delta_linear broadcasts
        trained = None  # with autograd on, the values that require it take their gradient
        if torch.is_grad_enabled():
            trained = {a: self._sk_plan(a).ordered(self.shira_weight[a]).to(weight.dtype)
                       for a in adapters if self.shira_weight[a].requires_grad} or None
        return multi_delta_linear(x, weight, bias, delta_set, slots, values=trained)

    # -- merge / unmerge --------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge

        weight = self._sk_plain_weight()
        if weight is None and self.quantization_backend is not None:
            fmt = self._sk_quant_format()
            if fmt is not None:  # PEFT would dequantize, add and requantize: lossy, and for good
                raise merge_error(fmt)
        if weight is None:
            return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        before = len(self.merged_adapters)
        try:
            self._sk_merge(weight, check_adapters_to_merge(self, adapter_names), safe_merge)
        except BaseException:
            # One adapter refused (safe_merge's NaN check, an overflow): the ones this call
            # merged before it are undone, so that W and the books are as they were.
            self._sk_unmerge(len(self.merged_adapters) - before)
            raise

    def _sk_merge(self, weight: torch.Tensor, adapters: list[str], safe_merge: bool) -> None:
        for adapter in adapters:
            if adapter not in self.shira_weight.keys():
                continue
            plan = self._sk_plan(adapter)
            if plan is None:
                super().merge(safe_merge=safe_merge, adapter_names=[adapter])
                continue
            values = self._sk_values(adapter, plan).detach()
            scale = float(self.scaling[adapter])
            if safe_merge:  # PEFT's own check and message, before anything is written
                with torch.no_grad():
                    base = weight.detach().view(-1).index_select(0, plan.flat)
                    if not bool(torch.isfinite(adapted_entries(base, values, scale)).all()):
                        raise ValueError(f"NaNs detected in the merged weights. The adapter "
                                         f"{adapter} seems to be broken")

            def commit(held, adapter=adapter, flat=plan.flat):  # held: the entries before
                self._sk_held[adapter] = (flat, held)
                self.merged_adapters.append(adapter)
            merge_by_swap(weight, plan.flat, values, scale, commit, f"adapter {adapter!r}")

    def unmerge(self) -> None:
        if not self.merged:
            return super().unmerge()  # PEFT's "Already unmerged" warning
        self._sk_unmerge(len(self.merged_adapters))

    def _sk_unmerge(self, count: int) -> None:
        """Unmerge the last ``count`` merged adapters, the last merged first."""
        stop = len(self.merged_adapters) - count
        while len(self.merged_adapters) > stop:
            adapter = self.merged_adapters[-1]
            held = self._sk_held.get(adapter)
            if held is not None:
                weight = self.get_base_layer().weight
                flat, entries = held

                def commit(adapter=adapter):  # the books change with the swap, or not at all
                    self._sk_held.pop(adapter)
                    self.merged_adapters.pop()
                swap_transaction([weight], [flat.to(weight.device)],
                                 [entries.to(device=weight.device, dtype=weight.dtype)], commit)
                continue
            self.merged_adapters.pop()
            if adapter in self.shira_weight.keys():
                # Merged by PEFT's own code (before accelerate): undone its way.
                with torch.no_grad():
                    weight = self.get_base_weight()
                    weight -= self.get_delta_weight(adapter)
                    self.set_base_weight(weight)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._sk_plans.pop(adapter_name, None)


_CLASS = None


def _peft_linear():
    try:
        from peft.tuners.shira.layer import Linear
    except ImportError as e:
        raise ImportError("accelerating PEFT's SHiRA layers needs the peft package with SHiRA "
                          "support: pip install -U peft") from e
    return Linear


def _accelerated_class():
    global _CLASS
    if _CLASS is None:
        cls = type("AcceleratedShiraLinear", (_AcceleratedShira, _peft_linear()), {
            "__module__": __name__,
            "__doc__": "peft.tuners.shira.Linear running on shira_kernels (see accelerate()).",
        })
        _CLASS = cls
    return _CLASS


def __getattr__(name: str):
    # The class exists once peft is importable; built on first use so that importing this module
    # does not import peft (and pickles of accelerated models find it by name).
    if name == "AcceleratedShiraLinear":
        return _accelerated_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def accelerate(peft_model: nn.Module, *, strategy: str = "auto") -> nn.Module:
    """Run every PEFT SHiRA layer (``peft.tuners.shira.Linear``) of ``peft_model`` on this
    package's kernels, in place; returns the model (``accelerated_layers`` lists the layers).

    - Unfused forward with one active adapter: sparse_delta_linear(x, W, b, S, scaling,
      strategy) instead of PEFT's clone of W plus a dense sum of a sparse COO tensor; the
      gradient of ``shira_weight`` comes from the sampled product (no dense m×n gradient).
      ``strategy``: "auto" (sparse_delta.auto_strategy: the strategy measured fastest on
      this machine for the layer, dtype and token count; README, autotuning), "fold" (S added to
      W's panels inside one matmul), "spmm", "swap" (W briefly holds W + scaling·S during the
      call: no other thread may read W meanwhile) or "merge" (a scratch copy of W).
    - merge() / unmerge(): scatter_swap_ of the adapted entries; unmerge restores W bit for bit
      (PEFT's subtracts the delta again, which rounds in 16-bit weights).
    - ``model(x, adapter_names=[...])`` and ``generate(..., adapter_names=[...])``: each batch
      row through its adapter ("__base__": the base), with PEFT LoRA's semantics and checks
      (inference only, names must exist, beams expanded except for an encoder-decoder's
      encoder), by multi_delta_linear on every accelerated layer (refused while a SHiRA
      layer is not accelerated); PEFT itself offers this for LoRA only.
    - A quantized base (bitsandbytes int8/4-bit, torchao; nn/quantized.py): the base's own
      forward plus the sparse product (sparse_product_add), no dense delta; merge() is refused
      (merge_error: W + scaling·S is not on the quantized grid, so PEFT's requantizing merge
      would be lossy and could not be undone).
    - ``merge_adapter`` and ``merge_and_unload`` of the model change every layer or none: a
      layer that refuses (an overflow, safe_merge's NaN check, a quantized base) has the
      layers merged before it in the same call unmerged, exactly, before the error goes on
      (PEFT's own loop leaves them merged).
    - Everything else runs PEFT's own code: disabled adapters, merged layers, several active
      adapters, non-contiguous weights, inputs of another dtype, indices the kernels cannot
      take (out of range or repeated), layers merged by PEFT before accelerate().
    The parameters stay the same objects (``shira_weight`` is still what PEFT trains and saves),
    so state_dict, save_pretrained, loading and optimizers are unaffected. Layers added later
    (a new adapter on new target modules) need another call. Calling it again only updates
    the strategy.
    """
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model must be an nn.Module, got {type(peft_model).__name__}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    base_cls, cls = _peft_linear(), _accelerated_class()
    count = 0
    for name, module in peft_model.named_modules():
        if isinstance(module, cls):
            module._sk_strategy = strategy
            count += 1
        elif type(module) is base_cls:
            module.__class__ = cls
            module._sk_strategy = strategy
            module._sk_plans = {}
            module._sk_held = {}
            module._sk_mixed_set = None
            count += 1
        if isinstance(module, cls):  # the plans now, so that a compiled forward finds them
            for adapter in module.shira_indices.keys():
                module._sk_plan(adapter)
        elif isinstance(module, base_cls):
            log.info("layer %r is a %s, a subclass of PEFT's SHiRA Linear: left as it is",
                     name, type(module).__name__)
    if count == 0:
        raise ValueError("the model has no PEFT SHiRA layer (peft.tuners.shira.Linear); build "
                         "it with get_peft_model(model, ShiraConfig(...)) or "
                         "PeftModel.from_pretrained")
    for tuner in _tuners(peft_model):
        # adapter_names= in forward and generate (PEFT: LoRA only); model-wide merges that
        # change every layer or none.
        tuner._enable_peft_forward_hooks = functools.partial(_mixed_batch_hooks, tuner)
        tuner.merge_adapter = functools.partial(_merge_adapter, tuner)
        tuner.merge_and_unload = functools.partial(_merge_and_unload, tuner)
    log.info("accelerated %d PEFT SHiRA layers (strategy %r)", count, strategy)
    return peft_model


@contextlib.contextmanager
def _mixed_batch_hooks(tuner, *args, **kwargs):
    """PeftModel's forward and generate enter this (the tuner's _enable_peft_forward_hooks, set
    by accelerate()) with their arguments: with ``adapter_names`` it hands the names to every
    accelerated layer for the call, with PEFT LoRA's checks and beam-search expansion."""
    names = kwargs.pop("adapter_names", None)
    if names is None:
        yield
        return
    if tuner.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    if isinstance(names, (str, bytes)):  # list("default") would be seven one-letter names
        raise TypeError(f"adapter_names must be a list of adapter names, one per batch row, got "
                        f"the string {names!r}")
    names = list(names)
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise TypeError(f"adapter_names[{i}] must be an adapter name (str), got "
                            f"{type(n).__name__} {n!r:.60}")
    unknown = sorted({n for n in names
                      if n != SparseDeltaSet.BASE and n not in tuner.peft_config})
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
    # A SHiRA layer accelerate() has not switched (added later, or a subclass it leaves alone)
    # would ignore the names and run the active adapter on every row: refused rather than wrong.
    base_cls = _peft_linear()
    accelerated, plain = [], []
    for name, module in tuner.named_modules():
        if isinstance(module, _CLASS):
            accelerated.append(module)
        elif isinstance(module, base_cls):
            plain.append(name)
    if plain:
        raise ValueError(f"adapter_names: the SHiRA layers {plain[:4]} are not accelerated "
                         "(added after accelerate()?) and would ignore the names; call "
                         "accelerate(model) again")
    per_row = names
    beams = kwargs.get("num_beams")
    if isinstance(beams, int) and beams > 1:
        names = [n for n in names for _ in range(beams)]
    # As PEFT LoRA: an encoder-decoder's encoder sees the inputs before beam expansion.
    encoder = _encoder(tuner.model) if names is not per_row else None
    in_encoder = set() if encoder is None else {id(m) for m in encoder.modules()}

    def inject(module, args, layer_kwargs):
        layer_kwargs["adapter_names"] = per_row if id(module) in in_encoder else names
        return args, layer_kwargs
    handles = [module.register_forward_pre_hook(inject, with_kwargs=True)
               for module in accelerated]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _merge_adapter(tuner, adapter_names: list[str] | None = None, safe_merge: bool = False
                   ) -> None:
    """The tuner's merge_adapter (set by accelerate()): PEFT's loop over the layers, undone
    (the layers merged in this call unmerged, the last first) if a layer raises."""
    from peft.tuners.tuners_utils import BaseTunerLayer, onload_layer

    tuner._check_merge_allowed()
    merged = []  # (layer, its merged adapters before this call)
    try:
        for module in tuner.model.modules():
            if isinstance(module, BaseTunerLayer):
                before = len(module.merged_adapters)
                with onload_layer(module):
                    module.merge(adapter_names=adapter_names, safe_merge=safe_merge)
                merged.append((module, before))
    except BaseException:
        for module, before in reversed(merged):
            if isinstance(module, _CLASS):
                module._sk_unmerge(len(module.merged_adapters) - before)
            elif before == 0:  # PEFT's unmerge undoes every merged adapter of a layer
                module.unmerge()
            else:
                log.warning("layer %s (not accelerated) stays merged with %s: PEFT's unmerge "
                            "cannot undo only this call's adapters", type(module).__name__,
                            module.merged_adapters)
        raise


def _merge_and_unload(tuner, progressbar: bool = False, safe_merge: bool = False,
                      adapter_names: list[str] | None = None) -> nn.Module:
    """The tuner's merge_and_unload (set by accelerate()): every layer merged first, all or
    none (_merge_adapter), and only then PEFT's unload, which finds them merged."""
    _merge_adapter(tuner, adapter_names, safe_merge)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="All adapters are already merged")
        return type(tuner).merge_and_unload(tuner, progressbar=progressbar,
                                            safe_merge=safe_merge, adapter_names=adapter_names)


def _encoder(model: nn.Module) -> nn.Module | None:
    """The encoder of an encoder-decoder model (transformers' get_encoder), else None."""
    get = getattr(model, "get_encoder", None)
    encoder = get() if callable(get) else None
    # transformers 5 returns the model itself when it has no encoder
    return encoder if isinstance(encoder, nn.Module) and encoder is not model else None


def _tuners(model: nn.Module) -> list:
    """The PEFT SHiRA tuners (ShiraModel) in ``model``: PeftModel.base_model and the like."""
    try:
        from peft.tuners.shira import ShiraModel
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, ShiraModel)]


def accelerated_layers(model: nn.Module) -> list[str]:
    """Names of the layers of ``model`` that accelerate() has switched."""
    if _CLASS is None:
        return []
    return [name for name, module in model.named_modules() if isinstance(module, _CLASS)]


def restore(model: nn.Module) -> nn.Module:
    """Undo accelerate(): the layers become plain PEFT SHiRA layers again. A layer merged by
    accelerate's merge is unmerged exactly and merged again by PEFT's code (so PEFT's unmerge
    can undo it later)."""
    if _CLASS is None:
        return model
    base_cls = _peft_linear()
    for module in model.modules():
        if not isinstance(module, _CLASS):
            continue
        remerge = list(module.merged_adapters) if module._sk_held else []
        if remerge:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module.unmerge()
        module.__class__ = base_cls
        for attr in ("_sk_strategy", "_sk_plans", "_sk_held"):
            module.__dict__.pop(attr, None)
        for adapter in remerge:
            module.merge(adapter_names=[adapter])
    for tuner in _tuners(model):
        for attr in ("_enable_peft_forward_hooks", "merge_adapter", "merge_and_unload"):
            tuner.__dict__.pop(attr, None)
    return model
