"""The 1-bit adapter checkpoints (.bin) of the PETL-ViT release ("Revisiting the Parameter
Efficiency of Adapters from the Perspective of Precision Redundancy"), for ViT-B/16.

File format: the adapter matrices follow one another in module order (petl_vit_layout). Each
[out, in] matrix is
  * its out·in signs, row-major, as ONE bit stream: 8 bits a byte, least significant bit first,
    1 = the level +Φ⁻¹(0.75) ≈ +0.6745, 0 = −0.6745; rows are not padded, only the end of the
    matrix is padded with 0 bits to a whole byte;
  * two little-endian float32 values, mean and std.
The dequantized weight is mean + std·level, so as a BinaryWeight (W = μ + α·s): μ = mean and
α = Φ⁻¹(0.75)·std, rounded once to float32. Nothing else is in the file (no header, no names):
its size follows from the config, and any other size is an error.

For ViT-B every out·in is a multiple of 768, hence of 8, so no matrix has padding bits; for
other shapes, padding bits are ignored when reading and written as 0.

The format has no checksum, so a flipped sign bit cannot be detected. What is checked, when
reading and (so that no file is written that could not be read back) when writing: the size,
and for every matrix that mean is finite, that std is finite and > 0, and that the two levels
mean ± α are finite in float32. Any failure is a ValueError naming the file (when reading) and
the module.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ..formats import BinaryWeight
from ..quant import PETL_LEVEL
from .._files import write_atomically

__all__ = ["PetlVitCheckpoint", "load_petl_vit", "petl_vit_layout", "save_petl_vit"]

VIT_B_DEPTH = 12
VIT_B_HIDDEN = 768
BASE_METHODS = ("lora", "adaptformer")
METHODS = BASE_METHODS + tuple(m + "-bihead" for m in BASE_METHODS)
_STATS = struct.Struct("<2f")  # mean, std


# -- config and layout ---------------------------------------------------------------------------
def _positive_int(config: Mapping, key: str) -> int:
    if key not in config:
        raise ValueError(f"config has no {key!r} field")
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config field {key!r} must be a positive integer, got {value!r}")
    return value


def _check_config(config) -> tuple[str, int, int | None]:
    """(base method, dim, num_class or None when there is no 1-bit head)."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (the yaml's fields), got {type(config).__name__}")
    method = config.get("method")
    if method not in METHODS:
        raise ValueError(f"config field 'method' must be one of {METHODS}, got {method!r}")
    bit = config.get("bit", None)
    if isinstance(bit, bool) or bit != 1:
        raise ValueError(f"config field 'bit' must be 1 (only 1-bit checkpoints are supported), "
                         f"got {bit!r}")
    backbone = config.get("backbone")
    if backbone is not None and not str(backbone).startswith("vit_base"):
        raise ValueError(f"config field 'backbone' must be a ViT-B (vit_base_*): the layout "
                         f"assumes {VIT_B_DEPTH} blocks of width {VIT_B_HIDDEN}, got {backbone!r}")
    dim = _positive_int(config, "dim")
    bihead = method.endswith("-bihead")
    num_class = _positive_int(config, "num_class") if bihead else None
    return method.removesuffix("-bihead"), dim, num_class


def petl_vit_layout(config) -> list[tuple[str, tuple[int, int]]]:
    """[(module name, (out, in))] in file order for a PETL-ViT config (a dict of the yaml's
    fields: method, dim, num_class, bit, ...). Raises ValueError naming a bad field."""
    base, dim, num_class = _check_config(config)
    hidden = VIT_B_HIDDEN
    layout: list[tuple[str, tuple[int, int]]] = []
    for block in range(VIT_B_DEPTH):
        adapters = ("attn.q", "attn.v") if base == "lora" else ("adapter",)
        for adapter in adapters:
            layout.append((f"blocks.{block}.{adapter}.down", (dim, hidden)))
            layout.append((f"blocks.{block}.{adapter}.up", (hidden, dim)))
    if num_class is not None:
        layout.append(("head", (num_class, hidden)))
    return layout


def _matrix_nbytes(shape: tuple[int, int]) -> int:
    return (shape[0] * shape[1] + 7) // 8 + _STATS.size


def _describe(config: Mapping) -> str:
    fields = ", ".join(f"{k}={config[k]!r}" for k in ("method", "dim", "num_class", "bit")
                       if k in config)
    return "{" + fields + "}"


# -- the checkpoint ------------------------------------------------------------------------------
@dataclass
class PetlVitCheckpoint:
    """A PETL-ViT checkpoint.

    weights: module name → BinaryWeight (per tensor α, μ), in file order
    stats:   module name → (mean, std) exactly as stored (float32 values as Python floats)
    config:  the config the layout was computed from
    """
    weights: dict[str, BinaryWeight]
    stats: dict[str, tuple[float, float]]
    config: dict = field(default_factory=dict)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {name: w.dequantize(dtype) for name, w in self.weights.items()}

    def __repr__(self) -> str:
        return (f"PetlVitCheckpoint({_describe(self.config)}, {len(self.weights)} modules)")


def _alpha_of(std: float) -> float:
    """α = Φ⁻¹(0.75)·std, rounded once to float32."""
    return float(torch.tensor(PETL_LEVEL * std, dtype=torch.float64).float())


def _check_stats(where: str, name: str, mean: float, std: float) -> float:
    """α for a matrix's (mean, std) (float32 values), or ValueError naming the module when they
    cannot describe a 1-bit matrix: mean not finite, std not finite or not > 0, or the levels
    mean ± α not finite in float32."""
    if not math.isfinite(mean):
        raise ValueError(f"{where}module {name!r}: mean is {mean!r}; it must be finite")
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"{where}module {name!r}: std is {std!r}; it must be finite and > 0")
    alpha = _alpha_of(std)
    levels = torch.tensor([mean], dtype=torch.float32) + torch.tensor([alpha, -alpha],
                                                                      dtype=torch.float32)
    if not bool(torch.isfinite(levels).all()):
        raise ValueError(f"{where}module {name!r}: the levels mean ± α ({mean!r} ± {alpha!r}) "
                         "overflow float32")
    return alpha


def load_petl_vit(path, config) -> PetlVitCheckpoint:
    """Read a PETL-ViT .bin written for `config` (see petl_vit_layout). Any problem with the
    file (size, or a module's mean/std: see the module docstring) is a ValueError naming the
    file and, for the stats, the module; nothing is returned then."""
    layout = petl_vit_layout(config)
    expected = sum(_matrix_nbytes(shape) for _, shape in layout)
    path = Path(path)
    data = path.read_bytes()
    if len(data) != expected:
        how = ("truncated" if len(data) < expected
               else f"{len(data) - expected} bytes too many")
        raise ValueError(f"{path}: expected {expected} bytes for config {_describe(config)} "
                         f"({len(layout)} modules), but the file has {len(data)} bytes ({how})")
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8)
    weights: dict[str, BinaryWeight] = {}
    stats: dict[str, tuple[float, float]] = {}
    offset = 0
    for name, (rows, cols) in layout:
        nbits = rows * cols
        nbytes = (nbits + 7) // 8
        mean, std = _STATS.unpack_from(data, offset + nbytes)
        alpha = _check_stats(f"{path}: ", name, mean, std)
        chunk = raw[offset:offset + nbytes]
        # Byte b, bit k (LSB first) is stream position 8·b + k.
        bits = ((chunk.unsqueeze(-1) >> shifts) & 1).reshape(-1)[:nbits]
        signs = bits.bool().reshape(rows, cols)
        offset += nbytes + _STATS.size
        weights[name] = BinaryWeight.from_signs(signs, alpha, mean)
        stats[name] = (mean, std)
    return PetlVitCheckpoint(weights=weights, stats=stats, config=dict(config))


# -- writing -------------------------------------------------------------------------------------
def _std_of(alpha: float) -> float:
    """A float32 std for α: α / Φ⁻¹(0.75) in float32, nudged by one ulp if needed so that
    reading the file back gives exactly α again (when such a std exists)."""
    a = torch.tensor([alpha], dtype=torch.float32)
    std = a / torch.tensor([PETL_LEVEL], dtype=torch.float32)
    up = torch.nextafter(std, torch.tensor([math.inf]))
    down = torch.nextafter(std, torch.tensor([-math.inf]))
    for candidate in (std, up, down):
        if _alpha_of(float(candidate)) == alpha:
            return float(candidate)
    return float(std)


def _float32_pair(name: str, what: str, pair) -> tuple[float, float]:
    """(mean, std) rounded to float32, or TypeError naming the module."""
    try:
        mean, std = pair
        return float(torch.tensor(float(mean), dtype=torch.float32)), \
            float(torch.tensor(float(std), dtype=torch.float32))
    except (TypeError, ValueError, OverflowError, RuntimeError):
        raise TypeError(f"module {name!r}: {what} must be a pair of numbers (mean, std), got "
                        f"{pair!r:.80}") from None


def _stats_match(weight_stats: tuple[float, float], stats: tuple[float, float]) -> bool:
    mu, alpha = weight_stats
    mean, std = stats
    return mean == mu and _alpha_of(std) == alpha


def _matrix_bytes(signs: torch.Tensor) -> bytes:
    bits = signs.reshape(-1).to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int32))
    packed = (bits.view(-1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)
    return packed.numpy().tobytes()


def save_petl_vit(path, checkpoint_or_weights, config=None, stats=None) -> None:
    """Write a PETL-ViT .bin.

    checkpoint_or_weights: a PetlVitCheckpoint (config defaults to its own) or a mapping of
    module name → BinaryWeight with exactly the modules of petl_vit_layout(config); α and μ must
    be per tensor. The (mean, std) written for a module are, in order of preference:
      * stats[name] when given (it must agree with the weight: μ == mean and
        float32(Φ⁻¹(0.75)·std) == α, else ValueError);
      * the checkpoint's stored stats, when they still agree with its weight: a loaded
        checkpoint is written back byte for byte;
      * otherwise mean = μ and std = α / Φ⁻¹(0.75) computed in float32 (nudged by one ulp when
        that hits α exactly). Reading the file back gives the same μ, and the same α whenever
        some float32 std maps onto it (an α read from a file always does); for other α
        (about one in six arbitrary float32 values) the α read back is a neighbouring float32,
        one step away. std may differ from the one originally stored in the last bit (several
        float32 std round to the same α).
    Every weight must have a finite μ and a finite α > 0, and the (mean, std) written must be
    ones load_petl_vit accepts (ValueError naming the module otherwise). Everything is checked
    before anything is written; the file is written to a temporary file in the same folder and
    renamed over `path`, so a failure leaves `path` untouched. The weights are not modified.
    """
    stored: Mapping[str, tuple[float, float]] = {}
    if isinstance(checkpoint_or_weights, PetlVitCheckpoint):
        weights = checkpoint_or_weights.weights
        stored = checkpoint_or_weights.stats
        if config is None:
            config = checkpoint_or_weights.config
    elif isinstance(checkpoint_or_weights, Mapping):
        weights = checkpoint_or_weights
        if config is None:
            raise ValueError("config is required when saving a mapping of BinaryWeights")
    else:
        raise TypeError("expected a PetlVitCheckpoint or a mapping of name → BinaryWeight, got "
                        f"{type(checkpoint_or_weights).__name__}")
    stats = {} if stats is None else stats
    layout = petl_vit_layout(config)
    names = [name for name, _ in layout]
    missing = [n for n in names if n not in weights]
    extra = [n for n in weights if n not in set(names)]
    if missing or extra:
        raise ValueError(f"the weights do not match the layout of config {_describe(config)}: "
                         f"missing {missing[:4]}{'…' if len(missing) > 4 else ''}, "
                         f"unexpected {extra[:4]}{'…' if len(extra) > 4 else ''}")
    unknown = [n for n in stats if n not in set(names)]
    if unknown:
        raise ValueError(f"stats has modules that are not in the layout: {unknown[:4]}")

    chunks: list[bytes] = []
    for name, shape in layout:
        weight = weights[name]
        if not isinstance(weight, BinaryWeight):
            raise TypeError(f"module {name!r}: expected a BinaryWeight, got "
                            f"{type(weight).__name__}")
        if tuple(weight.shape) != shape:
            raise ValueError(f"module {name!r}: shape {tuple(weight.shape)} does not match the "
                             f"layout's {shape} for config {_describe(config)}")
        if weight.alpha.numel() != 1 or weight.mu.numel() != 1:
            raise ValueError(f"module {name!r}: α and μ are per row; the PETL-ViT format stores "
                             "one (mean, std) per matrix, so only per-tensor BinaryWeights can be "
                             "written")
        mu, alpha = float(weight.mu.cpu()), float(weight.alpha.cpu())
        if not (math.isfinite(mu) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"module {name!r}: the weight has μ={mu!r}, α={alpha!r}; the "
                             "PETL-ViT format needs a finite μ and a finite α > 0")
        if name in stats:
            given = _float32_pair(name, "stats", stats[name])
            if not _stats_match((mu, alpha), given):
                raise ValueError(f"module {name!r}: stats {tuple(stats[name])} do not agree with "
                                 f"the weight (μ={mu!r}, α={alpha!r}); expected μ == mean and "
                                 "α == float32(Φ⁻¹(0.75)·std)")
            mean, std = given
        elif (name in stored
              and _stats_match((mu, alpha), kept := _float32_pair(name, "the stored stats",
                                                                   stored[name]))):
            mean, std = kept
        else:
            mean, std = mu, _std_of(alpha)
        _check_stats("", name, mean, std)  # never write what load_petl_vit would refuse
        chunks.append(_matrix_bytes(weight.signs().cpu()))
        chunks.append(_STATS.pack(mean, std))
    write_atomically(Path(path), b"".join(chunks))
