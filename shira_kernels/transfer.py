"""Turning other fine-tunes into sparse (SHiRA-style) adapters.

sparse_diff     a full fine-tune → one SparseDelta per weight: the largest |finetuned − base|
lora_to_sparse  a LoRA (scale·B·A) → the SparseDelta of its largest entries, row block by row
                block, so the dense update is never built whole; also the relative error
add_sparse      wa·a + wb·b of two SparseDeltas of one shape (union of their entries)
distill_adapter Trans-LoRA: a task adapter moved to another base model (and adapter type:
                SHiRA, 1-bit LoRA) by distillation on synthetic inputs that the source base
                generates from a few seed examples and a discriminator filters; no task data
                beyond the seeds (docs/methods/trans_lora.md)

The budget is the one of shira_kernels.masks.budget: r·(out+in) entries (the parameter count of
a rank-r LoRA) or round(density·out·in). Entries are ranked by |ΔW| in fp32 and ties at the cut
go to the lower flat index, as for the score-based masks, so the choice does not depend on how a
device orders equal values. Values are fp32.

distill_adapter needs no access to the source adapter's weights (only the source model's
outputs), so it also moves adapters between bases of different shapes, where the three
functions above cannot.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ._checks import check_representable
from .formats import SparseDelta, flat_index_dtype
from .masks import budget, check_seed
from .nn import BinaryAdapter, BinaryLoRALinear, ShiraLinear, replace_linear
from .ops.sparse_delta import STRATEGIES

__all__ = ["DistillReport", "adapter_parameters", "add_sparse", "distill_adapter",
           "lora_to_sparse", "sample_from_prompts", "sparse_diff"]


def _check_budget_args(r, density) -> None:
    if (r is None) == (density is None):
        got = "neither" if r is None else f"both r={r!r} and density={density!r}"
        raise ValueError(f"give exactly one of r= or density= (got {got})")


def _largest(scores: torch.Tensor, k: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the k largest of the 1-D ``scores`` (all of them when k ≥ their count).

    Ties at the cut go to the lower ``index`` (the entries' flat indices; None means the
    positions themselves are in flat-index order). The positions come in no particular order.
    """
    n = scores.numel()
    if k >= n:
        return torch.arange(n, device=scores.device)
    kth = torch.kthvalue(scores, n - k + 1).values  # the k-th largest
    above = torch.nonzero(scores > kth).view(-1)
    tied = torch.nonzero(scores == kth).view(-1)
    need = k - above.numel()
    if index is not None and need < tied.numel():
        tied = tied[torch.argsort(index[tied])]  # flat indices are unique: no ties left
    return torch.cat([above, tied[:need]])


# ---------------------------------------------------------------------------------------------
# Full fine-tune → sparse adapter.
# ---------------------------------------------------------------------------------------------
def _pick_keys(finetuned: Mapping, base: Mapping, keys) -> list[str]:
    if keys is None:
        chosen = [name for name, t in finetuned.items()
                  if isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_floating_point()
                  and isinstance(base.get(name), torch.Tensor) and base[name].dim() == 2
                  and base[name].is_floating_point()]
        if not chosen:
            raise ValueError("no 2-D floating-point tensor is present in both "
                             "finetuned_state_dict and base_state_dict")
        return chosen
    if isinstance(keys, str):
        keys = [keys]
    elif not isinstance(keys, Iterable):
        raise ValueError(f"keys must be an iterable of state_dict keys, got {type(keys).__name__}")
    keys = list(keys)
    if not keys:
        raise ValueError("keys is empty: name at least one weight, or pass keys=None for all")
    for name in keys:
        for what, sd in (("finetuned_state_dict", finetuned), ("base_state_dict", base)):
            if name not in sd:
                raise KeyError(f"keys names {name!r}, which {what} does not have")
            t = sd[name]
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                got = (f"a {t.dim()}-D {t.dtype} tensor" if isinstance(t, torch.Tensor)
                       else type(t).__name__)
                raise ValueError(f"{what}[{name!r}] must be a 2-D floating-point tensor, got {got}")
    return keys


def sparse_diff(finetuned_state_dict: Mapping[str, torch.Tensor],
                base_state_dict: Mapping[str, torch.Tensor], density: float | None = None,
                r: int | None = None, keys: Iterable[str] | None = None) -> dict[str, SparseDelta]:
    """A full fine-tune as sparse adapters: for each weight, the budget's entries of largest
    |ΔW|, ΔW = finetuned − base (rounded once to fp32: taken in fp32, or in fp64 for fp64
    weights), with ΔW's values there. A weight holding NaN or ±inf, or a ΔW past fp32's range,
    is refused with a ValueError naming the key.

    keys: the weights to convert (each must be a 2-D floating tensor in both dicts); None takes
    every 2-D floating tensor present in both. Give exactly one of density or r; every weight
    gets its full budget, even where it barely changed (pass keys to leave weights out).
    Returns {key: SparseDelta} on the fine-tuned tensors' devices.
    """
    _check_budget_args(r, density)
    for what, sd in (("finetuned_state_dict", finetuned_state_dict),
                     ("base_state_dict", base_state_dict)):
        if not isinstance(sd, Mapping):
            raise ValueError(f"{what} must be a mapping of names to tensors, got "
                             f"{type(sd).__name__}")
    result = {}
    for name in _pick_keys(finetuned_state_dict, base_state_dict, keys):
        tuned, base = finetuned_state_dict[name], base_state_dict[name]
        if tuned.shape != base.shape:
            raise ValueError(f"{name!r} has shape {tuple(tuned.shape)} in finetuned_state_dict but "
                             f"{tuple(base.shape)} in base_state_dict")
        try:
            k = budget(tuned.shape, r=r, density=density)
        except ValueError as e:
            raise ValueError(f"{name!r}: {e}") from None
        # The difference in fp32 (exact, then rounded once, for fp32/fp16/bf16 weights), or in
        # fp64 for an fp64 weight (rounding both to fp32 first would round twice, and turn two
        # equal weights past fp32's range into inf − inf); then rounded once to fp32.
        wide = torch.promote_types(torch.promote_types(tuned.dtype, base.dtype), torch.float32)
        delta = (tuned.detach().to(wide)
                 - base.detach().to(tuned.device, wide)).view(-1).to(torch.float32)
        if not bool(torch.isfinite(delta).all()):
            # NaN cannot be ranked; ±inf (an fp16 fine-tune that overflowed) would rank first,
            # with a value no weight can take.
            for what, t in (("finetuned_state_dict", tuned), ("base_state_dict", base)):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{name!r}: {what}[{name!r}] contains NaN or ±inf; cannot "
                                     "rank the entries of finetuned − base")
            # Finite weights whose difference is past fp32's range (the values' dtype).
            check_representable(delta, f"{name!r}: finetuned − base",
                                index=torch.arange(delta.numel(), device=delta.device))
        pos = _largest(delta.abs(), k)
        result[name] = SparseDelta.from_flat(pos, tuned.shape, delta[pos])
    return result


def add_sparse(a: SparseDelta, b: SparseDelta, wa: float = 1.0, wb: float = 1.0) -> SparseDelta:
    """wa·a + wb·b: the union of the two index sets, values summed. Entries that cancel stay as
    explicit zeros.

    The values come out in the promoted dtype of a's and b's. Each entry's wa·a + wb·b is
    computed in float64 and rounded once to that dtype, so an intermediate beyond the output's
    range (60000 + 60000 in float16 weighted by 0.5, or 10·3e38 − 10·3e38) does not overflow.
    Refused with ValueError: NaN or ±inf among a's or b's values, and a sum that does not fit
    the output dtype (the message names the first such entry by its flat index). Weights past
    about 1e269 can overflow the float64 products themselves; those sums are refused as well.
    """
    for name, d in (("a", a), ("b", b)):
        if not isinstance(d, SparseDelta):
            raise TypeError(f"{name} must be a SparseDelta, got {type(d).__name__}")
    for name, w in (("wa", wa), ("wb", wb)):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"{name} must be a finite number, got {w!r}")
    if a.shape != b.shape:
        raise ValueError(f"a has shape {a.shape} but b has shape {b.shape}")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}")
    for name, d in (("a", a), ("b", b)):
        bad = ~torch.isfinite(d.values)
        if bool(bad.any()):
            raise ValueError(f"{name} has {int(bad.sum())} NaN or infinite values (the first at "
                             f"flat index {int(d.flat_indices[bad][0])})")
    flat = torch.cat([a.flat_indices.long(), b.flat_indices.long()])
    values = torch.cat([a.values.double() * float(wa), b.values.double() * float(wb)])
    union, where = torch.unique(flat, sorted=True, return_inverse=True)
    summed = torch.zeros(union.numel(), dtype=torch.float64, device=values.device)
    summed.index_add_(0, where, values)
    # The inputs are finite: a NaN is inf − inf, two products past float64's range.
    result = summed.nan_to_num(nan=math.inf).to(torch.promote_types(a.dtype, b.dtype))
    check_representable(result, f"add_sparse(wa={float(wa)!r}, wb={float(wb)!r}): wa·a + wb·b",
                        index=union)
    return SparseDelta(a.shape, union.to(flat_index_dtype(a.shape)), result)


# ---------------------------------------------------------------------------------------------
# LoRA → sparse adapter, block-wise.
# ---------------------------------------------------------------------------------------------
def lora_to_sparse(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float = 1.0,
                   r: int | None = None, density: float | None = None,
                   block_rows: int = 256) -> tuple[SparseDelta, float]:
    """Project the LoRA update ΔW = scale·(B·A) (B [out, rank], A [rank, in]) onto its budget's
    largest-|ΔW| entries. Returns (S, ‖ΔW − S‖_F / ‖ΔW‖_F); the error is 0.0 when ΔW = 0.

    Budget: r·(out+in) entries or a density; with neither, r is the LoRA's own rank, so S has
    exactly as many parameters as the LoRA. ΔW is computed ``block_rows`` rows at a time, each
    entry summed in fp64 and rounded once to fp32 (so its value does not depend on the
    blocking), keeping a running top-k: a block's entries above the current k-th largest |ΔW|
    (at most k of them) are merged with the k best so far. Peak memory is a few block-sized
    tensors (the fp64 block, then the fp32 block, its |·| and its fp64 squares) plus O(k),
    never the whole [out, in] update. The ranking is a total order (|ΔW| descending, then
    flat index ascending), so the result equals ranking the dense ΔW at once. The error is
    accumulated from the fp64 squares of the entries dropped and kept (no cancellation, no
    underflow or overflow: it does not depend on the scale).
    """
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            got = (f"a {t.dim()}-D {t.dtype} tensor" if isinstance(t, torch.Tensor)
                   else type(t).__name__)
            raise ValueError(f"{name} must be a 2-D floating-point tensor, got {got}")
    rank, in_f = lora_A.shape
    out_f = lora_B.shape[0]
    if lora_B.shape[1] != rank:
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)} but lora_A has shape "
                         f"{tuple(lora_A.shape)}: lora_B must be [out, {rank}] (rank from lora_A)")
    if lora_A.device != lora_B.device:
        raise ValueError(f"lora_A is on {lora_A.device} but lora_B on {lora_B.device}")
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a number, got a tensor of shape {tuple(scale.shape)}")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if (isinstance(block_rows, bool) or not isinstance(block_rows, numbers.Integral)
            or block_rows < 1):
        raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
    if r is None and density is None:
        if rank == 0:
            raise ValueError(f"the LoRA has rank 0 (lora_A {tuple(lora_A.shape)}, lora_B "
                             f"{tuple(lora_B.shape)}), so its own rank gives no budget; pass r= "
                             "or density= to set one")
        r = rank
    _check_budget_args(r, density)
    k = budget((out_f, in_f), r=r, density=density)

    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} has NaN or infinite entries")
    # fp64 products and sums, rounded once to fp32: each entry of ΔW is (but for a
    # one-in-billions rounding tie) the correctly rounded value, whatever the row blocking.
    a = lora_A.detach().double()
    b = lora_B.detach().double()
    device = a.device
    top_flat = torch.empty(0, dtype=torch.int64, device=device)
    top_vals = torch.empty(0, dtype=torch.float32, device=device)
    threshold = None  # the k-th largest |ΔW| so far, once k entries have been seen
    dropped_sq = 0.0  # Σ ΔW² over the entries not (or no longer) among the candidates
    for row0 in range(0, out_f, int(block_rows)):
        block = torch.matmul(b[row0:row0 + block_rows], a).mul_(float(scale))
        block = block.to(torch.float32).view(-1)
        scores = block.abs()
        if threshold is None:
            pos = _largest(scores, k)
        else:
            # Every later entry has a higher flat index than all kept ones, so a tie with the
            # threshold loses: only strictly larger entries can enter.
            pos = torch.nonzero(scores > threshold).view(-1)
            if pos.numel() > k:
                pos = pos[_largest(scores[pos], k)]  # pos is ascending: flat-index order
        del scores
        cand_flat = pos + row0 * in_f
        cand_vals = block[pos]
        block[pos] = 0
        # fp64 squares: an fp32 entry's square can underflow to 0 or overflow to inf in fp32.
        dropped_sq += float(block.double().square_().sum())
        del block
        flat = torch.cat([top_flat, cand_flat])
        vals = torch.cat([top_vals, cand_vals])
        keep = _largest(vals.abs(), k, index=flat)
        if keep.numel() < vals.numel():
            evicted = torch.ones(vals.numel(), dtype=torch.bool, device=device)
            evicted[keep] = False
            dropped_sq += float(vals[evicted].double().square().sum())
        top_flat, top_vals = flat[keep], vals[keep]
        if top_vals.numel() == k:
            threshold = top_vals.abs().min()
    kept_sq = float(top_vals.double().square().sum())
    total_sq = kept_sq + dropped_sq
    # Finite fp32 entries' fp64 squares cannot sum to inf, so this is an entry that overflowed.
    if not math.isfinite(total_sq):
        raise ValueError("scale·lora_B·lora_A overflows float32")
    error = math.sqrt(dropped_sq / total_sq) if total_sq > 0 else 0.0
    return SparseDelta.from_flat(top_flat, (out_f, in_f), top_vals), error


# ---------------------------------------------------------------------------------------------
# Trans-LoRA: moving a task adapter to another base (and adapter type) with synthetic data.
# ---------------------------------------------------------------------------------------------
ADAPTER_KINDS = ("shira", "binary")
DISCRIMINATORS = ("hidden", "tokens")


@dataclass
class DistillReport:
    """What distill_adapter did.

    generated: synthetic samples drawn (all rounds); kept: those used for distillation (at
    most n_synthetic); rejected: those the discriminator scored below keep_threshold (generated
    = kept + rejected + the surplus of the last round beyond n_synthetic). discriminator_accuracy:
    its class-balanced accuracy on its own training samples (None without a filter). losses:
    the matching loss (KL) of every step. adapted_layers: the target layers distill_adapter
    wrapped (empty for an already adapted target); trainable_parameters: the adapter's entries
    trained. kept_inputs: the synthetic inputs the target was trained on.
    """

    generated: int
    kept: int
    rejected: int
    discriminator_accuracy: float | None
    losses: list[float]
    adapted_layers: list[str]
    trainable_parameters: int
    kept_inputs: torch.Tensor = field(repr=False)

    @property
    def surplus(self) -> int:
        """Samples accepted in the last round beyond n_synthetic (not used)."""
        return self.generated - self.kept - self.rejected


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_positive_float(value, name: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _logits(model, input_ids: torch.Tensor, name: str) -> torch.Tensor:
    """model(input_ids) as logits [B, T, V]: the output itself, its .logits or its first item."""
    out = model(input_ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)) and out:
        out = out[0]
    if (not isinstance(out, torch.Tensor) or out.dim() != 3
            or tuple(out.shape[:2]) != tuple(input_ids.shape)):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name}(input_ids [B, T]) must return logits [B, T, vocab] (a tensor, "
                         f"or an output with .logits); got {got} for input_ids of shape "
                         f"{tuple(input_ids.shape)}")
    return out.float()


class _AdapterDisabled:
    """Calls a PEFT model with its adapters disabled (its base model)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)


def _check_seed_examples(seed_examples) -> torch.Tensor:
    if (not isinstance(seed_examples, torch.Tensor) or seed_examples.dim() != 2
            or seed_examples.dtype not in (torch.int64, torch.int32)):
        got = (f"a {seed_examples.dim()}-D {seed_examples.dtype} tensor"
               if isinstance(seed_examples, torch.Tensor) else type(seed_examples).__name__)
        raise ValueError(f"seed_examples must be an integer tensor [N, T] of token ids, got {got}")
    if seed_examples.shape[0] < 1 or seed_examples.shape[1] < 2:
        raise ValueError(f"seed_examples needs sequences of at least 2 tokens, got shape "
                         f"{tuple(seed_examples.shape)}")
    return seed_examples.long()


def _check_prompt_tokens(prompt_tokens, length: int) -> int:
    if (isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, numbers.Integral)
            or not 1 <= prompt_tokens < length):
        raise ValueError(f"prompt_tokens must be an int in [1, {length - 1}] (the seed examples "
                         f"have {length} tokens), got {prompt_tokens!r}")
    return int(prompt_tokens)


def sample_from_prompts(model, seed_examples: torch.Tensor, n: int, *, prompt_tokens: int,
                        temperature: float = 1.0,
                        generator: torch.Generator | None = None,
                        batch_size: int = 256) -> torch.Tensor:
    """n synthetic sequences of the seed examples' length: each starts with the first
    ``prompt_tokens`` tokens of a seed example drawn at random and continues by sampling
    ``model`` (logits / temperature, no cache: fine for short sequences). ``generator``: the
    torch.Generator of the draws (CPU); the model runs on seed_examples' device."""
    if not callable(model):
        raise TypeError(f"model must be a callable model, got {type(model).__name__}")
    seed_examples = _check_seed_examples(seed_examples)
    n = _check_positive_int(n, "n")
    prompt_tokens = _check_prompt_tokens(prompt_tokens, seed_examples.shape[1])
    temperature = _check_positive_float(temperature, "temperature")
    batch_size = _check_positive_int(batch_size, "batch_size")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return _sample(model, seed_examples, n, prompt_tokens, temperature, generator, batch_size)


@torch.no_grad()
def _sample(model, seed_examples, n, prompt_tokens, temperature, generator, batch_size):
    count, length = seed_examples.shape
    picks = torch.randint(count, (n,), generator=generator, device=seed_examples.device)
    out = []
    for start in range(0, n, batch_size):
        ids = seed_examples[picks[start:start + batch_size], :prompt_tokens]
        while ids.shape[1] < length:
            logits = _logits(model, ids, "generator")[:, -1] / temperature
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(ids.device)
            ids = torch.cat([ids, nxt], dim=1)
        out.append(ids)
    return torch.cat(out)


def _token_features(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """One-hot tokens per position and the token histogram, as one float vector per row."""
    onehot = torch.nn.functional.one_hot(ids, vocab).float()
    return torch.cat([onehot.flatten(1), onehot.mean(1)], dim=1)


@torch.no_grad()
def _hidden_features(model, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    feats = []
    for start in range(0, ids.shape[0], batch_size):
        try:
            out = model(ids[start:start + batch_size], output_hidden_states=True)
            hidden = out.hidden_states[-1]
        except (TypeError, AttributeError, IndexError) as e:
            raise ValueError("discriminator='hidden' needs a model that returns hidden_states "
                             "when called with output_hidden_states=True (a transformers "
                             "model); pass discriminator='tokens', a callable, or None "
                             f"({type(e).__name__}: {e})") from None
        feats.append(hidden.float().mean(1))
    return torch.cat(feats)


class _Discriminator:
    """A small MLP on fixed features, trained real (1) vs synthetic (0) with class-balanced
    binary cross-entropy (full batch, Adam); scores are P(real)."""

    def __init__(self, featurize, real: torch.Tensor, fake: torch.Tensor, *, steps: int,
                 hidden: int, seed: int):
        self.featurize = featurize
        x_real, x_fake = featurize(real), featurize(fake)
        x = torch.cat([x_real, x_fake])
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-6)
        x = (x - self.mean) / self.std
        y = torch.cat([torch.ones(len(x_real)), torch.zeros(len(x_fake))]).to(x.device)
        weight = torch.where(y > 0, 0.5 / len(x_real), 0.5 / len(x_fake))
        with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left alone
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(),
                                     nn.Linear(hidden, 1)).to(x.device)
        opt = torch.optim.Adam(self.net.parameters(), lr=1e-2, weight_decay=1e-3)
        with torch.enable_grad():
            for _ in range(steps):
                loss = (torch.nn.functional.binary_cross_entropy_with_logits(
                    self.net(x).squeeze(1), y, reduction="none") * weight).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            right = ((self.net(x).squeeze(1) > 0).float() == y).float()
            self.accuracy = float(0.5 * right[y > 0].mean() + 0.5 * right[y == 0].mean())

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        x = (self.featurize(ids) - self.mean) / self.std
        return torch.sigmoid(self.net(x).squeeze(1))


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters of ``model``, by name: ShiraLinear's shira_values, the float
    weights of BinaryLoRALinear / BinaryAdapter branches, DyLoRALinear's lora_A / lora_B, and
    every parameter with a name part starting "lora_" (PEFT's LoRA, DoRA)."""
    found: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        prefix = module_name + "." if module_name else ""
        if isinstance(module, ShiraLinear):
            found[prefix + "shira_values"] = module.shira_values
        elif isinstance(module, BinaryAdapter) and not module.packed:
            found[prefix + "down"], found[prefix + "up"] = module.down, module.up
    for name, param in model.named_parameters():
        if any(part.startswith("lora_") for part in name.split(".")):
            found.setdefault(name, param)
    return found


def _default_target_filter(name: str, module: nn.Module) -> bool:
    return not (name == "lm_head" or name.endswith(".lm_head"))


def _chosen_layers(target: nn.Module, target_modules) -> dict[str, nn.Linear]:
    """The nn.Linear layers that replace_linear would wrap (checked before anything runs)."""
    if target_modules is None:
        pick = _default_target_filter
    else:
        if isinstance(target_modules, str):
            names = [target_modules]
        elif isinstance(target_modules, Iterable):
            names = list(target_modules)
        else:
            raise ValueError("target_modules must be a layer name or an iterable of names, got "
                             f"{type(target_modules).__name__}")
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"target_modules must name at least one layer, got {target_modules!r}")
        pick = lambda name, _: any(name == t or name.endswith("." + t) for t in names)  # noqa: E731
    chosen = {name: module for name, module in target.named_modules()
              if isinstance(module, nn.Linear) and not isinstance(module, ShiraLinear)
              and pick(name, module)}
    if not chosen:
        raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear layer of "
                         "target_model")
    return chosen


def _shira_kwargs(kwargs: Mapping, seed: int) -> tuple[dict, str | None]:
    kwargs = dict(kwargs)
    kwargs.setdefault("seed", seed)
    if ("r" not in kwargs and "density" not in kwargs
            and not isinstance(kwargs.get("mask"), torch.Tensor)):  # a mask tensor is its budget
        kwargs["density"] = 0.05
    return kwargs, kwargs.pop("strategy", None)


def _check_adapter_kwargs(kind: str, layers: Mapping[str, nn.Linear], kwargs: Mapping,
                          seed: int) -> None:
    """The budget or rank against every chosen layer, and the layers' seeds, before any work."""
    if kind == "shira":
        shira, strategy = _shira_kwargs(kwargs, seed)
        # _attach gives layer i the seed seed + i: the last one must fit torch's Generator too.
        check_seed(shira["seed"], "adapter_kwargs['seed']" if "seed" in kwargs else "seed",
                   count=len(layers))
        if strategy is not None and strategy not in STRATEGIES:
            raise ValueError(f"adapter_kwargs: strategy must be one of {STRATEGIES}, got "
                             f"{strategy!r}")
        for name, layer in layers.items():
            if "r" not in shira and "density" not in shira:
                break  # a mask tensor: from_linear checks it against each layer
            try:
                budget(tuple(layer.weight.shape), r=shira.get("r"), density=shira.get("density"))
            except ValueError as e:
                raise ValueError(f"adapter_kwargs for layer {name!r}: {e}") from None
    else:
        unknown = set(kwargs) - {"r", "scale", "method"}
        if unknown:
            raise ValueError(f"adapter_kwargs for adapter='binary' takes r, scale, method; got "
                             f"{sorted(unknown)}")
        _check_positive_int(kwargs.get("r", 4), "adapter_kwargs['r']")


def _attach(target: nn.Module, kind: str, layers: Mapping[str, nn.Linear], kwargs: Mapping,
            seed: int):
    """Wrap ``layers``; returns (names, an undo function). All or nothing: if a layer is
    refused, the ones wrapped before it are put back."""
    flags = {name: p.requires_grad for name, p in target.named_parameters()}
    wrapped: list[str] = []

    def undo():
        for name in wrapped:
            parent_name, _, child = name.rpartition(".")
            parent = target.get_submodule(parent_name) if parent_name else target
            setattr(parent, child, layers[name])
        for name, p in target.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])

    if kind == "shira":
        shira, strategy = _shira_kwargs(kwargs, seed)
        base_seed = shira.pop("seed")
        seeds = {name: base_seed + i for i, name in enumerate(layers)}  # as replace_linear does

        def factory(linear: nn.Linear) -> nn.Module:
            name = next(n for n, m in layers.items() if m is linear)
            try:
                layer = ShiraLinear.from_linear(linear, seed=seeds[name], **shira)
            except (TypeError, ValueError) as e:
                raise type(e)(f"adapter_kwargs for layer {name!r}: {e}") from None
            if strategy is not None:
                layer.strategy = strategy
            wrapped.append(name)
            return layer
    else:
        r = kwargs.get("r", 4)
        extra = {k: v for k, v in kwargs.items() if k != "r"}

        def factory(linear: nn.Linear) -> nn.Module:
            layer = BinaryLoRALinear.from_linear(linear, r, **extra)
            wrapped.append(next(n for n, m in layers.items() if m is linear))
            return layer
    chosen = set(layers)
    try:
        with torch.random.fork_rng(devices=[]):  # initialisations seeded, global RNG left alone
            torch.manual_seed(seed)
            replace_linear(target, filter=lambda name, _: name in chosen, factory=factory)
    except BaseException:  # a layer refused: put back the ones wrapped before it
        undo()
        raise
    return list(layers), undo


def distill_adapter(source_model, target_model: nn.Module, seed_examples: torch.Tensor, *,
                    adapter: str | None = "shira", adapter_kwargs: Mapping | None = None,
                    target_modules: str | Iterable[str] | None = None,
                    n_synthetic: int = 256, max_generated: int | None = None,
                    generator=None, generate_fn=None, prompt_tokens: int | None = None,
                    temperature: float = 1.0,
                    discriminator="hidden", discriminator_model=None,
                    discriminator_synthetic: int | None = None, discriminator_steps: int = 200,
                    discriminator_hidden: int = 64, keep_threshold: float = 0.5,
                    steps: int = 200, lr: float = 1e-3, batch_size: int = 32,
                    positions="all", kl_temperature: float = 1.0,
                    seed: int = 0) -> DistillReport:
    """Move a task adapter from ``source_model`` (a base with its adapter) to ``target_model``
    (another base) with synthetic data only (Trans-LoRA). See docs/methods/trans_lora.md.

    Models are called as ``model(input_ids)`` (LongTensor [B, T]) and must return logits
    [B, T, V] (or an output with .logits), with one vocabulary for both. seed_examples: a
    LongTensor [N, T] of a few real task sequences (N ≥ 2), on the device of the source and
    the generator (the target may be on another; its inputs are moved there).

    1. Synthetic inputs: ``generate_fn(seed_examples, n, torch_generator)`` → LongTensor [n, T']
       if given, else ``generator`` (default: the source; a PEFT source with its adapters
       disabled, i.e. its base) continues the first ``prompt_tokens`` (default T // 3, at least
       1) tokens of random seed examples to length T at ``temperature``.
    2. Filter: a discriminator (an MLP) is trained on the seed examples (real) against
       ``discriminator_synthetic`` separate synthetic samples (default max(64, 2N)), on the
       mean last hidden state of ``discriminator_model`` (default: the generator) for
       "hidden", on one-hot tokens and their histogram for "tokens"; a callable(ids) → P(real)
       [n] replaces it; None keeps every sample. A sample is kept if P(real) ≥
       ``keep_threshold``. Rounds of n_synthetic samples are drawn until n_synthetic are kept
       or ``max_generated`` (default 4·n_synthetic) are drawn.
    3. Adapter: ``adapter`` "shira" wraps the target's nn.Linear layers (``target_modules``,
       PEFT-style names or suffixes; default all but ``lm_head``) in ShiraLinear
       (``adapter_kwargs`` go to ShiraLinear.from_linear, default density=0.05 and mask
       "rand", except ``strategy``, which is set on each layer: e.g. "spmm" skips autotuning),
       "binary" in BinaryLoRALinear (``adapter_kwargs``: r (default 4), scale, method); None
       trains the adapter the target already has (adapter_parameters(target_model)). The
       target is changed in place; its other parameters are never trained.
    4. Distillation: ``steps`` Adam steps (``lr``) on minibatches of ``batch_size`` kept
       inputs, minimising KL(source ‖ target) of the next-token distributions at ``positions``
       ("all", or a list of position indices, negative from the end), both at
       ``kl_temperature`` (the loss is scaled by its square).

    Everything is checked, and the synthetic data drawn and filtered, before the target is
    touched. If training fails (a non-finite loss, an exception from a model, an interrupt)
    the target is left as it was: the wrapped layers are put back, every adapter parameter
    trained (the target's own with adapter=None) gets back its values and its .grad, every
    parameter its requires_grad flag, and the model its train/eval mode. The source is never
    changed.
    Random draws use a torch.Generator seeded with ``seed``; the global RNG is left alone.
    """
    # -- arguments ---------------------------------------------------------------------------
    if not callable(source_model):
        raise TypeError(f"source_model must be a callable model, got {type(source_model).__name__}")
    if not isinstance(target_model, nn.Module):
        raise TypeError(f"target_model must be an nn.Module, got {type(target_model).__name__}")
    if source_model is target_model:
        raise ValueError("source_model and target_model are the same object; the target must "
                         "be another base (copy it if you mean to re-fit the same one)")
    seed_examples = _check_seed_examples(seed_examples)
    n_seed, length = seed_examples.shape
    if n_seed < 2:
        raise ValueError(f"seed_examples needs at least 2 sequences, got shape "
                         f"{tuple(seed_examples.shape)}")
    if adapter is not None and adapter not in ADAPTER_KINDS:
        raise ValueError(f"adapter must be one of {ADAPTER_KINDS} or None (train the target's "
                         f"own adapter), got {adapter!r}")
    if adapter_kwargs is None:
        adapter_kwargs = {}
    elif not isinstance(adapter_kwargs, Mapping):
        raise ValueError(f"adapter_kwargs must be a mapping, got {type(adapter_kwargs).__name__}")
    elif adapter is None and adapter_kwargs:
        raise ValueError("adapter_kwargs is given but adapter=None (the target's own adapter is "
                         "trained as it is)")
    if adapter is None and target_modules is not None:
        raise ValueError("target_modules is given but adapter=None (nothing is wrapped)")
    seed = check_seed(seed)
    if adapter is not None:
        layers = _chosen_layers(target_model, target_modules)
        _check_adapter_kwargs(adapter, layers, adapter_kwargs, seed)
    n_synthetic = _check_positive_int(n_synthetic, "n_synthetic")
    if max_generated is None:
        max_generated = 4 * n_synthetic
    elif _check_positive_int(max_generated, "max_generated") < n_synthetic:
        raise ValueError(f"max_generated ({max_generated}) must be at least n_synthetic "
                         f"({n_synthetic})")
    if generate_fn is not None and not callable(generate_fn):
        raise TypeError(f"generate_fn must be callable, got {type(generate_fn).__name__}")
    if generator is not None and not callable(generator):
        raise TypeError(f"generator must be a callable model, got {type(generator).__name__}")
    if generate_fn is not None and (generator is not None or prompt_tokens is not None):
        raise ValueError("give generate_fn or generator / prompt_tokens, not both")
    prompt_tokens = (max(1, length // 3) if prompt_tokens is None
                     else _check_prompt_tokens(prompt_tokens, length))
    temperature = _check_positive_float(temperature, "temperature")
    if not (discriminator is None or callable(discriminator) or discriminator in DISCRIMINATORS):
        raise ValueError(f"discriminator must be one of {DISCRIMINATORS}, a callable(ids) → "
                         f"P(real), or None, got {discriminator!r}")
    if discriminator_model is not None and discriminator != "hidden":
        raise ValueError("discriminator_model is only used with discriminator='hidden'")
    if discriminator_model is not None and not callable(discriminator_model):
        raise TypeError("discriminator_model must be a callable model, got "
                        f"{type(discriminator_model).__name__}")
    if discriminator_synthetic is None:
        discriminator_synthetic = max(64, 2 * n_seed)
    discriminator_synthetic = _check_positive_int(discriminator_synthetic,
                                                  "discriminator_synthetic")
    discriminator_steps = _check_positive_int(discriminator_steps, "discriminator_steps")
    discriminator_hidden = _check_positive_int(discriminator_hidden, "discriminator_hidden")
    if (isinstance(keep_threshold, bool) or not isinstance(keep_threshold, numbers.Real)
            or not 0 <= keep_threshold <= 1):
        raise ValueError(f"keep_threshold must be a number in [0, 1], got {keep_threshold!r}")
    steps = _check_positive_int(steps, "steps")
    lr = _check_positive_float(lr, "lr")
    batch_size = _check_positive_int(batch_size, "batch_size")
    kl_temperature = _check_positive_float(kl_temperature, "kl_temperature")
    if isinstance(positions, str):
        if positions != "all":
            raise ValueError(f"positions must be 'all' or a list of position indices, got "
                             f"{positions!r}")
    else:
        try:
            positions = [int(p) for p in positions]
        except (TypeError, ValueError):
            raise ValueError(f"positions must be 'all' or a list of position indices, got "
                             f"{positions!r}") from None
        if not positions or any(not -length <= p < length for p in positions):
            raise ValueError(f"positions must be indices in [-{length}, {length}) (the seed "
                             f"examples' length), got {positions!r}")

    # -- the vocabulary, from one forward of each model ----------------------------------------
    was_training = target_model.training
    target_model.eval()
    try:
        with torch.no_grad():
            probe = torch.zeros_like(seed_examples[:1])  # token 0: in any vocabulary
            vocab = _logits(source_model, probe, "source_model").shape[-1]
            target_vocab = _logits(target_model, probe.to(_device_of(target_model)),
                                   "target_model").shape[-1]
        if vocab != target_vocab:
            raise ValueError(f"source_model has a vocabulary of {vocab} but target_model of "
                             f"{target_vocab}: they must share one tokenizer")
        if int(seed_examples.min()) < 0 or int(seed_examples.max()) >= vocab:
            raise ValueError(f"seed_examples holds token ids outside [0, {vocab})")
        if adapter is None:
            trainable = adapter_parameters(target_model)
            if not trainable:
                raise ValueError("adapter=None but target_model has no adapter parameters "
                                 "(ShiraLinear, BinaryLoRALinear, DyLoRALinear or PEFT LoRA); "
                                 "pass adapter='shira' or 'binary'")

        # -- synthetic data and the filter -----------------------------------------------------
        rng = torch.Generator().manual_seed(int(seed))
        if generator is None:
            generator = (_AdapterDisabled(source_model)
                         if callable(getattr(source_model, "disable_adapter", None))
                         else source_model)

        def draw(n: int) -> torch.Tensor:
            if generate_fn is not None:
                ids = generate_fn(seed_examples, n, rng)
                if (not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != n
                        or ids.shape[1] < 1 or ids.dtype not in (torch.int64, torch.int32)):
                    got = (f"a {ids.dim()}-D {ids.dtype} tensor of shape {tuple(ids.shape)}"
                           if isinstance(ids, torch.Tensor) else type(ids).__name__)
                    raise ValueError(f"generate_fn must return an integer tensor [{n}, T], "
                                     f"got {got}")
                ids = ids.long()
                if int(ids.min()) < 0 or int(ids.max()) >= vocab:
                    raise ValueError(f"generate_fn returned token ids outside [0, {vocab})")
                return ids.to(seed_examples.device)
            return _sample(generator, seed_examples, n, prompt_tokens, temperature, rng, 256)

        score = None
        accuracy = None
        if discriminator is not None:
            if callable(discriminator) and not isinstance(discriminator, str):
                score = discriminator
            else:
                if discriminator == "hidden":
                    feature_model = (generator if discriminator_model is None
                                     else discriminator_model)
                    featurize = lambda ids: _hidden_features(feature_model, ids, 256)  # noqa: E731
                else:
                    featurize = lambda ids: _token_features(ids, vocab)  # noqa: E731
                fake = draw(discriminator_synthetic)
                if fake.shape[1] != length and discriminator == "tokens":
                    raise ValueError("discriminator='tokens' needs synthetic samples of the seed "
                                     f"examples' length {length}; generate_fn gave "
                                     f"{fake.shape[1]}")
                score = _Discriminator(featurize, seed_examples, fake, steps=discriminator_steps,
                                       hidden=discriminator_hidden, seed=int(seed))
                accuracy = score.accuracy
        kept_parts, kept_count, generated, rejected = [], 0, 0, 0
        while kept_count < n_synthetic and generated < max_generated:
            ids = draw(min(n_synthetic, max_generated - generated))
            generated += ids.shape[0]
            if score is not None:
                p_real = torch.as_tensor(score(ids)).reshape(-1)
                if p_real.numel() != ids.shape[0]:
                    raise ValueError(f"discriminator returned {p_real.numel()} scores for "
                                     f"{ids.shape[0]} samples")
                keep = p_real.to(ids.device) >= keep_threshold
                rejected += int((~keep).sum())
                ids = ids[keep]
            kept_parts.append(ids)
            kept_count += ids.shape[0]
        kept_inputs = torch.cat(kept_parts)[:n_synthetic]
        if kept_inputs.shape[0] == 0:
            raise RuntimeError(f"the discriminator rejected all {generated} synthetic samples; "
                               "lower keep_threshold, raise max_generated, or pass "
                               "discriminator=None")
        if positions != "all":
            width = kept_inputs.shape[1]
            if any(not -width <= p < width for p in positions):
                raise ValueError(f"positions {positions} do not fit the synthetic inputs' "
                                 f"length {width}")
    except BaseException:
        target_model.train(was_training)
        raise

    # -- the adapter, then distillation --------------------------------------------------------
    undo = None
    adapted: list[str] = []
    flags = {name: p.requires_grad for name, p in target_model.named_parameters()}
    saved: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor | None]] = []
    try:
        if adapter is not None:
            adapted, undo = _attach(target_model, adapter, layers, adapter_kwargs, int(seed))
            target_model.eval()
        trainable = adapter_parameters(target_model)
        # What training writes in place (the values, by the optimizer) or replaces (.grad), kept
        # to put back if the call fails: an adapter the target already had (adapter=None, or
        # one outside the wrapped layers) must not be left part-trained. The copies are the
        # adapter's size, not the model's.
        saved = [(p, p.detach().clone(), p.grad) for p in trainable.values()]
        for p in target_model.parameters():
            p.requires_grad_(False)
        for p in trainable.values():
            p.requires_grad_(True)
        params = list(trainable.values())
        optimizer = torch.optim.Adam(params, lr=lr)
        device = _device_of(target_model)
        losses = []
        n = kept_inputs.shape[0]
        order = torch.randperm(n, generator=rng)
        cursor = 0
        for _ in range(steps):
            if cursor + min(batch_size, n) > n:
                order, cursor = torch.randperm(n, generator=rng), 0
            batch = kept_inputs[order[cursor:cursor + batch_size]]
            cursor += batch_size
            with torch.no_grad():
                teacher = _logits(source_model, batch, "source_model")
            student = _logits(target_model, batch.to(device), "target_model")
            if positions != "all":
                teacher, student = teacher[:, positions], student[:, positions]
            log_p = torch.log_softmax(teacher.to(student.device) / kl_temperature, dim=-1)
            log_q = torch.log_softmax(student / kl_temperature, dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * kl_temperature ** 2
            if not torch.isfinite(kl):
                raise RuntimeError(f"the matching loss became {float(kl)} at step "
                                   f"{len(losses)}; lower lr")
            optimizer.zero_grad()
            kl.backward()
            optimizer.step()
            losses.append(float(kl.detach()))
    except BaseException:
        with torch.no_grad():
            for p, value, grad in saved:
                p.copy_(value)
                p.grad = grad
        if undo is not None:
            undo()
        else:
            for name, p in target_model.named_parameters():
                if name in flags:
                    p.requires_grad_(flags[name])
        target_model.train(was_training)
        raise
    # The adapter stays trainable and the wrapped layers' bases frozen (as after
    # ShiraLinear.from_linear); every other parameter gets back the flag it had.
    wrapped = tuple(name + "." for name in adapted)
    for name, p in target_model.named_parameters():
        if name not in trainable and name in flags and not name.startswith(wrapped):
            p.requires_grad_(flags[name])
    target_model.train(was_training)
    return DistillReport(generated=generated, kept=int(kept_inputs.shape[0]), rejected=rejected,
                         discriminator_accuracy=accuracy, losses=losses, adapted_layers=adapted,
                         trainable_parameters=sum(p.numel() for p in params),
                         kept_inputs=kept_inputs)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
