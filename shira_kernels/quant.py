"""1-bit quantizers with a straight-through estimator (STE) for training.

Two methods, both W ≈ μ + α·s with s = ±1:
  "petl"  per tensor, as in "Revisiting the Parameter Efficiency of Adapters from the
          Perspective of Precision Redundancy": standardise w' = (w − mean)/(std + 1e-5), round
          to the 1-bit code of a standard normal (levels ±Φ⁻¹(0.75) ≈ ±0.6745, each level the
          median of its half), so W = mean + 0.6745·std·s. std is the unbiased sample std (0 for
          a single entry, which is then exact).
  "row"   per output row: μ_row = row mean, α_row = mean |w − μ_row| (the least-squares α for
          fixed signs), s = sign(w − μ_row).
s is the sign of w − μ, a zero counting as +1.

fake_quantize(w, method) returns the dequantized weight, bit for bit
BinaryWeight.from_float(w, method).dequantize(w.dtype) (the packed weight's); its gradient is
the STE: the rounding is treated as the identity on the standardised weight, so gradients reach
w directly and through the mean and the scale (std or α).
"""
from __future__ import annotations

import math

import torch

METHODS = ("petl", "row")
# Φ⁻¹(0.75): the median of the positive half of a standard normal.
PETL_LEVEL = math.sqrt(2.0) * 0.4769362762044699
EPS = 1e-5


def _stats(w: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(centre μ, scale used to standardise, level·scale = α), differentiable, fp32 math."""
    if method == "petl":
        mu = w.mean()
        # One entry (a [1, 1] up of a rank-1 LoRA on a 1-output layer): its spread is 0, so
        # W = μ is exact (the sample std would be NaN).
        std = w.std() if w.numel() > 1 else torch.zeros_like(mu)
        return mu, std + EPS, PETL_LEVEL * std
    if method == "row":
        mu = w.mean(dim=1, keepdim=True)
        alpha = (w - mu).abs().mean(dim=1, keepdim=True)
        return mu, alpha + EPS, alpha
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _check_weight(w) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"weight must be a 2-D floating-point tensor, got {type(w).__name__}")
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating-point tensor, got {w.dtype} of shape "
                         f"{tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"weight has no entries, got shape {tuple(w.shape)}")


def binarize(weight: torch.Tensor, method: str = "petl"):
    """(signs bool [out, in] with True = +1, α fp32 [1] or [out], μ fp32 [1] or [out])."""
    _check_weight(weight)
    w = weight.detach().float()
    mu, _, alpha = _stats(w, method)
    signs = (w - mu) >= 0
    return signs, alpha.reshape(-1), mu.reshape(-1)


def fake_quantize(weight: torch.Tensor, method: str = "petl") -> torch.Tensor:
    """The dequantized weight μ + α·s, bit for bit the packed weight's
    (BinaryWeight.from_float(weight, method).dequantize(weight.dtype)), with the
    straight-through gradient."""
    _check_weight(weight)
    w = weight.float()
    mu, spread, alpha = _stats(w, method)
    # binarize's sign rule: z below can round a tiny negative w − μ to −0, which is ≥ 0.
    positive = (w - mu) >= 0
    z = (w - mu) / spread
    level = alpha / spread  # ±level is the code; 0.6745·std/(std+ε) for "petl", ≈1 for "row"
    code = torch.where(positive, level, -level)
    z_q = z + (code - z).detach()  # forward: the code; backward: identity
    ste = mu + spread * z_q  # the gradient's path; its value rounds at |z|'s scale, not μ ± α
    dequantized = torch.where(positive, mu + alpha, mu - alpha).detach()  # as BinaryWeight's
    # dequantized's value (ste.detach() − ste is +0, which keeps a −0) with ste's gradient.
    return (dequantized - (ste.detach() - ste)).to(weight.dtype)
