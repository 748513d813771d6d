"""The one error bound every kernel-vs-float64 comparison of the tests uses.

A result is checked against the float64 (exact, for our purposes) result of the same formula
on the same, already rounded, inputs. The limit is a forward-error bound, not a measurement of
whatever error torch happens to make on the machine at hand (which can be zero).

Derivation. A dot product of length K summed in fp32 (any order, with or without FMA) obeys
the classic bound |fl(Σ x_i·y_i) − Σ x_i·y_i| ≤ γ_K·Σ|x_i|·|y_i|, γ_K = K·u/(1 − K·u),
u = 2⁻²⁴ (fp32's unit roundoff): every term is perturbed by at most K factors (1 + δ),
|δ| ≤ u. A composition (a product of products, W + scale·S then a matmul, the gradient
through two matmuls, a stored intermediate) multiplies such factors along each term:
(1 + γ_a)(1 + γ_b) ≤ 1 + γ_{a+b}, so its K is the sum of its stages' lengths (each extra
fp32 rounding — a scale, a bias add, a stored fp32 intermediate — counts 1), and the
magnitude M is the chain of absolute values, e.g. |up|·(|down|·|x|), which is what the same
formula gives on the absolute values of its inputs (ReLU is 1-Lipschitz and the identity on
them). An intermediate rounded to the working dtype (fp16/bf16: a merged weight, a stored
matmul output) is one more factor with that dtype's unit roundoff u_w; with θ = K·u +
n·u_w, Π(1 + δ_i) − 1 ≤ θ/(1 − θ). Finally the result is rounded once to the output dtype:
|fl(ŷ) − ŷ| ≤ u_out·|ŷ| ≤ u_out·(|exact| + bound).

Applied elementwise: element i must satisfy
    |ours_i − exact_i| ≤ max(2·max_j|torch_j − exact_j|, γ·M_i) + u_out·(|exact_i| + γ·M_i)
where the torch term (only when a torch result is given) keeps the old yardstick where torch's
own formulation (extra roundings of its own) is the looser one.
"""
from __future__ import annotations

import copy

import torch

U = 2.0 ** -24  # unit roundoff of fp32 accumulation


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def gamma(k: int, roundings: int = 0, dtype: torch.dtype = torch.float32) -> float:
    """θ/(1 − θ) for θ = k·u (fp32 steps) + roundings·u_dtype (intermediates in `dtype`)."""
    theta = k * U + roundings * unit_roundoff(dtype)
    assert 0 <= theta < 1, f"no bound for k={k}, roundings={roundings}"
    return theta / (1 - theta)


def abs64(t):
    """|t| in float64 (None stays None): the inputs of a magnitude."""
    return None if t is None else t.detach().double().abs()


def exact_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of a module: its output is the exact result for its (rounded) weights."""
    return copy.deepcopy(module).double()


def absolute_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy with every floating parameter and buffer replaced by its absolute value:
    for a chain of linear maps, scales and ReLUs, its output on |x| (and its gradients for |gy|)
    is the magnitude M of the bound."""
    module = exact_copy(module)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.abs_()
    return module


def assert_within_error_bound(ours, exact, magnitude, k: int, what: str = "",
                              torch_result=None, roundings: int = 0):
    """|ours − exact| ≤ max(2·|torch − exact|_max, γ·M) + u_out·(|exact| + γ·M), elementwise.

    exact: the float64 result; magnitude: M ≥ 0, the same formula on absolute values (same
    shape as exact, or broadcastable); k: the fp32 steps of the longest chain (the sum of the
    reduction lengths of its stages, plus one per extra fp32 rounding); roundings: the
    intermediates rounded to the working dtype (ours' dtype) along that chain; torch_result:
    torch's own result of the formula in the same dtype, if there is one. See the module
    docstring for the derivation.
    """
    exact = exact.detach().double()
    assert ours.shape == exact.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    if exact.numel() == 0:
        return
    magnitude = torch.as_tensor(magnitude, dtype=torch.float64, device=exact.device).detach()
    assert (magnitude >= 0).all(), f"{what}: a magnitude must be ≥ 0"
    floor = gamma(k, roundings, ours.dtype if ours.dtype.is_floating_point else torch.float32) \
        * magnitude.expand_as(exact)
    limit = floor
    err_torch = None
    if torch_result is not None:
        err_torch = (torch_result.detach().double() - exact).abs().max().item()
        limit = torch.clamp(limit, min=2 * err_torch)
    limit = limit + unit_roundoff(ours.dtype) * (exact.abs() + floor)
    err = (ours.detach().double() - exact).abs()
    ok = err <= limit  # NaN fails
    if not bool(ok.all()):
        worst = torch.where(ok, torch.zeros_like(err), (err / limit).nan_to_num(float("inf")))
        i = int(worst.reshape(-1).argmax())
        theirs = "" if err_torch is None else f", torch's max {err_torch:.3g}"
        raise AssertionError(
            f"{what}: error {err.reshape(-1)[i].item():.3g} > limit {limit.reshape(-1)[i].item():.3g} "
            f"at element {i} (k={k}, roundings={roundings}, |exact| "
            f"{exact.abs().reshape(-1)[i].item():.3g}, M {magnitude.expand_as(exact).reshape(-1)[i].item():.3g}"
            f"{theirs})")
