"""1-bit adapter matmuls: W = μ + α·s with s = ±1 packed 32 to an int32 word.

  binary_linear(x, bw, bias)  y = x·(μ + α·s)ᵀ + b, computed as α·(x·sᵀ) + μ·Σx + b
  binary_lora(x, down, up, scale, activation)
                              y = scale·up(act(down(x))) for 1-bit down [r, in] and up [out, r]
                              (Bi-LoRA: activation None; Bi-AdaptFormer: "relu")

The signs are never expanded to a dense weight in memory. On the CPU they are summed by table
lookup (csrc/cpu/binary.cpp): per token and group of 4 input features the 16 signed sums are
built once, and each output's 4 sign bits pick one with an in-register permute, fp32 throughout;
the sign bytes are read in panels of 64 outputs (_sign_panels). The gradient of x is provided
(gy·W; on the CPU by the same kernel on the transposed signs, elsewhere from the dequantized
weight); training the 1-bit weights goes through
quant.fake_quantize instead. Each backend's kernels are registered in ops/registry.py, in the
references' signatures.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from .. import _native, backends, tuning
from .._checks import TensorCache, check_float_tensor, check_scale
from ..formats import BinaryWeight, unpack_signs
from . import registry
from ._eager import autocast_off, eager_function, looped_under_vmap, via_op

ACTIVATIONS = (None, "relu")
# On CUDA tensors the CUDA kernel's warp-per-row path wins up to "gemv_max_tokens" tokens
# (tuning.py); above, Triton's tensor-core tiles, so Triton is tried first there.
GEMV_MAX_TOKENS = tuning.view("gemv_max_tokens")["cuda"]


# ---------------------------------------------------------------------------------------------
# Reference: the specification.
# ---------------------------------------------------------------------------------------------
def _dequantized(packed, alpha, mu, in_features) -> torch.Tensor:
    return BinaryWeight(packed, alpha, mu, in_features).dequantize()


def binary_linear_reference(x, packed, alpha, mu, bias, in_features) -> torch.Tensor:
    y = x.float() @ _dequantized(packed, alpha, mu, in_features).T
    return (y if bias is None else y + bias.float()).to(x.dtype)


def binary_linear_dequantized_reference(x, packed, alpha, mu, bias, in_features) -> torch.Tensor:
    """The "dequantize" strategy: the weight rounded once to x's dtype, then torch's matmul."""
    return F.linear(x, _dequantized(packed, alpha, mu, in_features).to(x.dtype), bias)


def binary_linear_grad_x_reference(gy, packed, alpha, mu, in_features) -> torch.Tensor:
    return (gy.float() @ _dequantized(packed, alpha, mu, in_features)).to(gy.dtype)


def binary_lora_reference(x, down, up, scale: float, relu: bool) -> torch.Tensor:
    h = x.float() @ _dequantized(*down).T
    if relu:
        h = h.relu()
    return (scale * (h @ _dequantized(*up).T)).to(x.dtype)


def binary_lora_dequantized_reference(x, down, up, scale: float, relu: bool) -> torch.Tensor:
    """binary_lora's "dequantize" strategy: the dense adapter in x's dtype on both weights
    rounded once to it (the intermediate, a matmul's output, in x's dtype too)."""
    h = F.linear(x, _dequantized(*down).to(x.dtype))
    if relu:
        h = h.relu()
    return scale * F.linear(h, _dequantized(*up).to(x.dtype))


# ---------------------------------------------------------------------------------------------
# Kernels per backend.
# ---------------------------------------------------------------------------------------------
_PANELS, _PANELS_T = TensorCache(), TensorCache()


def _panels_of(row_bytes: torch.Tensor) -> torch.Tensor:
    """The CPU kernels' sign panels (csrc/cpu/kernels.h) of the packed sign rows given as bytes
    [lanes, nbytes]: [ceil(lanes / 64), nbytes, 64], each panel's 64 rows side by side, so that
    a block of lanes reads its signs as one stream (rows past lanes are zero padding)."""
    return _native.module("cpu").sign_panels(row_bytes)


def _sign_panels(packed: torch.Tensor) -> torch.Tensor:
    """The sign panels of packed's rows (little-endian words: byte b of word j holds columns
    32·j + 8·b … + 7), for y = x·Wᵀ; derived once per packed tensor (again if written to)."""
    cached = _PANELS.get(packed)
    if cached is None:
        cached = _PANELS.put(packed, _panels_of(packed.contiguous().view(torch.uint8)))
    return cached


def _sign_rows_t(packed: torch.Tensor) -> torch.Tensor:
    """The rows of the signs' transpose [words·32, out] as bytes [words·32, ceil(out / 32)·4]
    (byte b of a row: outputs 8b … 8b + 7, LSB first; the rows past in_features are padding)."""
    out, words = packed.shape
    bits = unpack_signs(packed, words * 32).t().to(torch.uint8)  # [in, out]
    padded = bits.new_zeros((words * 32, -(-out // 32) * 32))
    padded[:, :out] = bits
    shifts = torch.arange(8, dtype=torch.uint8)
    return (padded.view(words * 32, -1, 8) << shifts).sum(-1, dtype=torch.uint8)


def _sign_panels_t(packed: torch.Tensor) -> torch.Tensor:
    """The sign panels of the signs' transpose, for the gradient of x gy·W (the columns past
    in_features are padding, read and not used); derived once per packed tensor."""
    cached = _PANELS_T.get(packed)
    if cached is None:
        cached = _PANELS_T.put(packed, _panels_of(_sign_rows_t(packed)))
    return cached


def _triton_kernels():
    from ..triton import binary
    return binary


# Kernels per backend (registry.py), each in its reference's signature (down and up of
# binary_lora: (packed, alpha, mu, in_features)). The gradient of x is the dequantized weight's
# matmul (cuBLAS / torch's) except on the CPU, whose kernel expands the signs in registers.

# reference: the specification.
registry.register("binary_linear", "reference", binary_linear_reference)
# The dequantize strategy is torch's matmul after the weight: on GPUs the reference is it.
for _backend in ("reference", "triton", "cuda"):
    registry.register("binary_linear_dequantized", _backend, binary_linear_dequantized_reference)
    registry.register("binary_lora_dequantized", _backend, binary_lora_dequantized_reference)
registry.register("binary_linear_grad_x", "reference", binary_linear_grad_x_reference)
registry.register("binary_lora", "reference", binary_lora_reference)

# triton (shira_kernels/triton/binary.py).
registry.register_module("triton", _triton_kernels, "binary_linear", "binary_lora")
registry.register("binary_linear_grad_x", "triton", binary_linear_grad_x_reference)

# cuda (csrc/cuda/bindings.cpp): binary_lora's binding takes the factors' tensors flat.
registry.register_module("cuda", functools.partial(_native.module, "cuda"), "binary_linear")
registry.register("binary_linear_grad_x", "cuda", binary_linear_grad_x_reference)


@functools.partial(registry.register_lazy, "binary_lora", "cuda")
def _cuda_binary_lora():
    lora = _native.module("cuda").binary_lora
    return lambda x, down, up, scale, relu: lora(x, *down[:3], *up[:3], scale, relu)


# cpu (csrc/cpu/bindings.cpp): the kernels take sign panels (_sign_panels, _sign_panels_t, cached
# per weight) and return fp32.
@functools.partial(registry.register_lazy, "binary_linear", "cpu")
def _cpu_binary_linear():
    mod = _native.module("cpu")

    def binary_linear(x, packed, alpha, mu, bias, in_features):
        return mod.binary_linear(x, packed, _sign_panels(packed), alpha, mu, bias, 1.0).to(x.dtype)
    return binary_linear


# The "dequantize" strategy on the CPU: the weight a block of rows at a time (about
# _DEQUANTIZE_BLOCK_BYTES, so that it is still in cache when the matmul reads it) in x's dtype,
# each block handed to torch's matmul (oneDNN or MKL; AMX tiles where the CPU has them). 4 MiB
# measured faster than 1 MiB (more matmul calls) and than the whole weight (written to memory
# and read back) on the AMD EPYC, at 768x768 and 4096x4096, 128 and 2048 tokens.
_DEQUANTIZE_BLOCK_BYTES = 4 << 20


@functools.partial(registry.register_lazy, "binary_linear_dequantized", "cpu")
def _cpu_binary_linear_dequantized():
    mod = _native.module("cpu")

    def binary_linear_dequantized(x, packed, alpha, mu, bias, in_features):
        out = packed.shape[0]
        block = max(16, _DEQUANTIZE_BLOCK_BYTES // (in_features * x.element_size()))
        if block >= out:
            return F.linear(x, mod.binary_dequantized_weight(packed, alpha, mu, in_features,
                                                             x.dtype), bias)
        y = x.new_empty((x.shape[0], out))
        for r0 in range(0, out, block):
            r1 = min(out, r0 + block)
            rows = slice(r0, r1)
            w = mod.binary_dequantized_weight(packed[rows], alpha if alpha.numel() == 1 else
                                              alpha[rows], mu if mu.numel() == 1 else mu[rows],
                                              in_features, x.dtype)
            y[:, rows] = F.linear(x, w, None if bias is None else bias[rows])
        return y
    return binary_linear_dequantized


@functools.partial(registry.register_lazy, "binary_lora_dequantized", "cpu")
def _cpu_binary_lora_dequantized():
    mod = _native.module("cpu")

    def binary_lora_dequantized(x, down, up, scale, relu):  # both weights are small: whole
        return mod.binary_lora_dequantized(x, *down, *up, scale, relu)
    return binary_lora_dequantized


@functools.partial(registry.register_lazy, "binary_linear_grad_x", "cpu")
def _cpu_binary_linear_grad_x():
    mod = _native.module("cpu")

    def binary_linear_grad_x(gy, packed, alpha, mu, in_features):
        return mod.binary_linear_grad_x(gy, _sign_panels_t(packed), alpha, mu,
                                        in_features).to(gy.dtype)
    return binary_linear_grad_x


@functools.partial(registry.register_lazy, "binary_lora", "cpu")
def _cpu_binary_lora():
    mod = _native.module("cpu")

    def binary_lora(x, down, up, scale, relu):
        return mod.binary_lora(x, down[0], _sign_panels(down[0]), down[1], down[2], up[0],
                               _sign_panels(up[0]), up[1], up[2], scale, relu)
    return binary_lora


# ---------------------------------------------------------------------------------------------
# torch.library ops (fake kernels; the gradient of x), and their eager Functions (_eager.py).
# ---------------------------------------------------------------------------------------------
def _binary_linear(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor,
                   mu: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                   strategy: str = "lut") -> torch.Tensor:
    if strategy == "dequantize":
        kernel = registry.kernel("binary_linear_dequantized", x.device)
        if torch.is_autocast_enabled(x.device.type):  # torch's matmul on the dequantized weight
            with autocast_off(x.device.type):         # in x's dtype
                return kernel(x.contiguous(), packed, alpha, mu, bias, in_features)
        return kernel(x.contiguous(), packed, alpha, mu, bias, in_features)
    order = backends.TRITON_FIRST if x.shape[0] > GEMV_MAX_TOKENS else None
    return registry.kernel("binary_linear", x.device, order)(x.contiguous(), packed, alpha, mu,
                                                             bias, in_features)


_binary_linear_op = torch.library.custom_op("shira::binary_linear", mutates_args=())(_binary_linear)


@_binary_linear_op.register_fake
def _(x, packed, alpha, mu, bias, in_features, strategy="lut"):
    return x.new_empty((x.shape[0], packed.shape[0]))


def _linear_setup(ctx, inputs, output):
    x, packed, alpha, mu, bias, in_features = inputs[:6]
    ctx.save_for_backward(packed, alpha, mu)
    ctx.in_features, ctx.has_bias = in_features, bias is not None
    ctx.backend = backends.requested()  # the backward runs where use_backend() is not seen


def _grad_x(gy: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
            in_features: int) -> torch.Tensor:
    return registry.kernel("binary_linear_grad_x", gy.device)(gy.contiguous(), packed, alpha,
                                                               mu, in_features)


# An op of its own, so that the registered backward stays traceable (fake kernel below).
_grad_x_op = torch.library.custom_op("shira::binary_linear_grad_x", mutates_args=())(_grad_x)


@_grad_x_op.register_fake
def _(gy, packed, alpha, mu, in_features):
    return gy.new_empty((gy.shape[0], in_features))


def _linear_backward(ctx, gy, grad_x=_grad_x_op):
    packed, alpha, mu = ctx.saved_tensors
    with backends.use_backend(ctx.backend):
        gx = grad_x(gy, packed, alpha, mu, ctx.in_features)
    gb = gy.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
    return gx, None, None, None, gb, None, None


_binary_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)
# The backwards' kernels as torch.func's vmap takes them (vmap(grad(...)): per-sample gradients).
_looped_grad_x = looped_under_vmap("_BinaryGradX", _grad_x)
_eager_binary_linear = eager_function("_EagerBinaryLinear", _binary_linear, _linear_setup,
                                     functools.partial(_linear_backward, grad_x=_looped_grad_x))


def _binary_lora(x: torch.Tensor, down_packed: torch.Tensor, down_alpha: torch.Tensor,
                 down_mu: torch.Tensor, down_in: int, up_packed: torch.Tensor,
                 up_alpha: torch.Tensor, up_mu: torch.Tensor, up_in: int, scale: float,
                 relu: bool, strategy: str = "lut") -> torch.Tensor:
    down = (down_packed, down_alpha, down_mu, down_in)
    up = (up_packed, up_alpha, up_mu, up_in)
    kernel = lora_kernel(strategy, x.device)
    if strategy == "dequantize" and torch.is_autocast_enabled(x.device.type):
        with autocast_off(x.device.type):
            return kernel(x.contiguous(), down, up, scale, relu)
    return kernel(x.contiguous(), down, up, scale, relu)


def in_x_dtype(strategy: str, device: torch.device):
    """Around a kernel of ``strategy``: autocast off for "dequantize" (torch's matmuls on the
    dequantized weight, which must stay in x's dtype as the ops' fake kernels say); nothing
    for the 1-bit kernels, which run no torch op autocast would recast."""
    return autocast_off(device.type) if strategy == "dequantize" else contextlib.nullcontext()


def lora_kernel(strategy: str, device):
    """The backend's binary_lora kernel for ``strategy`` ("lut" or "dequantize")."""
    return registry.kernel("binary_lora_dequantized" if strategy == "dequantize"
                           else "binary_lora", device)


_binary_lora_op = torch.library.custom_op("shira::binary_lora", mutates_args=())(_binary_lora)


@_binary_lora_op.register_fake
def _(x, down_packed, down_alpha, down_mu, down_in, up_packed, up_alpha, up_mu, up_in, scale,
      relu, strategy="lut"):
    return x.new_empty((x.shape[0], up_packed.shape[0]))


def _lora_setup(ctx, inputs, output):
    x, dp, da, dm, din, up, ua, um, uin, scale, relu = inputs[:11]
    ctx.save_for_backward(x, dp, da, dm, up, ua, um)
    ctx.down_in, ctx.up_in, ctx.scale, ctx.relu = din, uin, scale, relu
    ctx.backend = backends.requested()


def _lora_backward(ctx, gy, grad_x=_grad_x_op, linear=_binary_linear_op):
    # gx = scale·(gy·up ⊙ [down(x) > 0])·down with both products through the 1-bit weights
    # (on the CPU neither weight is dequantized), the intermediate in fp32.
    x, dp, da, dm, up, ua, um = ctx.saved_tensors
    with backends.use_backend(ctx.backend):
        gh = ctx.scale * grad_x(gy.float(), up, ua, um, ctx.up_in)
        if ctx.relu:  # the forward's down(x), recomputed in fp32
            gh = gh * (linear(x.float(), dp, da, dm, None, ctx.down_in, "lut") > 0)
        gx = grad_x(gh, dp, da, dm, ctx.down_in)
    return gx.to(gy.dtype), *([None] * 11)


_binary_lora_op.register_autograd(_lora_backward, setup_context=_lora_setup)
_eager_binary_lora = eager_function(
    "_EagerBinaryLora", _binary_lora, _lora_setup,
    functools.partial(_lora_backward, grad_x=_looped_grad_x,
                      linear=looped_under_vmap("_BinaryLinearOfX", _binary_linear)),
    differentiable=(0,))


# ---------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------
def _check_x(x, in_features: int, what: str) -> None:
    check_float_tensor("x", x)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dim must be {what}'s "
                         f"in_features = {in_features}")


def _check_binary(name: str, bw, device) -> None:
    if not isinstance(bw, BinaryWeight):
        raise TypeError(f"{name} must be a BinaryWeight, got {type(bw).__name__}")
    if device is not None and bw.device != device:  # (a non-tensor x is named by _check_x)
        raise ValueError(f"{name} is on {bw.device} but x is on {device}")


STRATEGIES = ("auto", "lut", "dequantize")
STRATEGY_DECISION = "binary_linear.strategy"


def binary_linear(x: torch.Tensor, bw: BinaryWeight, bias: torch.Tensor | None = None, *,
                  strategy: str = "auto"):
    """x·(μ + α·s)ᵀ + b for x [..., in] and a BinaryWeight bw [out, in]; the result has x's
    dtype (fp32 accumulation).

    strategy: "lut" sums the packed signs directly (the backend's 1-bit kernel: table lookup on
    the CPU), the weight never formed; "dequantize" forms the weight in x's dtype (on the CPU a
    block of rows at a time, in cache) and runs torch's matmul on it, so W is rounded once to
    x's dtype as in F.linear(x, bw.dequantize(x.dtype), bias); "auto" picks between them on the
    CPU by measuring both on this machine (tuning.decide; "lut" with tuning off, at one token,
    and on other devices). The gradient of x always goes through the 1-bit kernel.

    Non-finite inputs (an inf or NaN in x, or in the gradient) give non-finite outputs on
    their token, but not always the dense product's: the 1-bit kernels sum α·(x·sᵀ) and μ·Σx
    apart, which gives NaN where they meet inf − inf or 0·inf and x·Wᵀ is ±inf."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    _check_binary("bw", bw, getattr(x, "device", None))
    _check_x(x, bw.shape[1], "bw")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (bw.shape[0],):
            raise ValueError(f"bias must be a tensor of shape ({bw.shape[0]},)")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"bias has dtype {bias.dtype} on {bias.device}; x has {x.dtype} on {x.device}")
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # small calls count at few tokens
    if strategy == "auto":
        strategy = auto_strategy(x2.device, x2.dtype, x2.shape[0], bw.shape)
    run = _binary_linear_op if via_op(x) else _eager_binary_linear
    y = run(x2, bw.packed, bw.alpha, bw.mu, bias, bw.shape[1], strategy)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], bw.shape[0])


def auto_strategy(device: torch.device | str, dtype: torch.dtype, tokens: int,
                  shape: tuple[int, int]) -> str:
    """The strategy binary_linear's "auto" runs: on the CPU, from 2 tokens, the faster of "lut"
    and "dequantize" for this dtype, layer shape and token class as measured on this machine
    (tuning.decide; "lut" with tuning off); "lut" elsewhere."""
    if not _measures(device, tokens):
        return "lut"
    return _tuned_strategy(dtype, int(shape[0]), int(shape[1]), tuning.token_class(tokens))


def _measures(device, tokens: int) -> bool:
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return kind == "cpu" and tokens >= 2 and tuning.mode() != "off"


_decided = tuning.memo()


def _measured_choice(decision: str, args: tuple, key_of, make, rows: int) -> str:
    """decision's value (a candidate of STRATEGIES) for the raw ``args`` and the backend asked
    for: this process's, the machine's cache file's at key_of(*args), or measured now by
    make(rows) calls (tuning.measure_extrapolated)."""
    return tuning.remembered(
        _decided, (decision, *args, backends.requested()), lambda: tuning.decide(
            decision, key_of(*args), "lut", lambda: tuning.measure_extrapolated(make, rows),
            candidates=STRATEGIES[1:]))


@torch.compiler.assume_constant_result  # decided at trace time: no graph break, no recompile
def _tuned_strategy(dtype: torch.dtype, out_f: int, in_f: int, tokens: int) -> str:
    return _measured_choice(STRATEGY_DECISION, (dtype, out_f, in_f, tokens), strategy_key,
                            functools.partial(_strategy_calls, dtype, in_f, tokens), out_f)


def strategy_key(dtype: torch.dtype, out_f: int, in_f: int, tokens: int) -> tuple:
    """The decision's key: the CPU threads torch uses, the backend asked for (its kernels are
    what was timed), the dtype, the layer's shape and the token class of ``tokens`` (a count
    tuning.token_class gives)."""
    return (f"cpu {torch.get_num_threads()} threads", backends.requested() or "auto",
            str(dtype).removeprefix("torch."), f"{out_f}x{in_f}", tuning.token_label(tokens))


def lora_auto_strategy(device: torch.device | str, dtype: torch.dtype, tokens: int, rank: int,
                       in_f: int, out_f: int) -> str:
    """The strategy binary_lora's "auto" runs, chosen as binary_linear's (auto_strategy) for a
    1-bit LoRA of this rank and shape."""
    if not _measures(device, tokens):
        return "lut"
    return _tuned_lora_strategy(dtype, int(rank), int(in_f), int(out_f),
                                tuning.token_class(tokens))


LORA_STRATEGY_DECISION = "binary_lora.strategy"


@torch.compiler.assume_constant_result
def _tuned_lora_strategy(dtype: torch.dtype, rank: int, in_f: int, out_f: int,
                         tokens: int) -> str:
    return _measured_choice(LORA_STRATEGY_DECISION, (dtype, rank, in_f, out_f, tokens),
                            lora_strategy_key,
                            functools.partial(_lora_strategy_calls, dtype, rank, in_f, tokens),
                            out_f)


def lora_strategy_key(dtype: torch.dtype, rank: int, in_f: int, out_f: int, tokens: int) -> tuple:
    """binary_lora's decision key: as binary_linear's, the shape being in -> rank -> out."""
    return (f"cpu {torch.get_num_threads()} threads", backends.requested() or "auto",
            str(dtype).removeprefix("torch."), f"{in_f}->{rank}->{out_f}",
            tuning.token_label(tokens))


def _lora_strategy_calls(dtype: torch.dtype, rank: int, in_f: int, tokens: int,
                         rows: int) -> dict:
    """{strategy: a call running it} for a 1-bit LoRA of ``rows`` outputs (no activation)."""
    gen = torch.Generator().manual_seed(rows)
    down = BinaryWeight.from_signs(torch.rand(rank, in_f, generator=gen) < 0.5, 0.1, 0.0)
    up = BinaryWeight.from_signs(torch.rand(rows, rank, generator=gen) < 0.5, 0.1, 0.0)
    x = torch.empty(tokens, in_f, dtype=dtype).uniform_(-1, 1, generator=gen)
    return {name: functools.partial(_binary_lora, x, down.packed, down.alpha, down.mu, in_f,
                                    up.packed, up.alpha, up.mu, rank, 1.0, False, name)
            for name in STRATEGIES[1:]}


def _strategy_calls(dtype: torch.dtype, in_f: int, tokens: int, rows: int) -> dict:
    """{strategy: a call running it} on ``rows`` output rows of a 1-bit layer of width in_f."""
    gen = torch.Generator().manual_seed(rows)
    signs = torch.rand(rows, in_f, generator=gen) < 0.5
    bw = BinaryWeight.from_signs(signs, torch.rand(rows, generator=gen), 0.0)
    x = torch.empty(tokens, in_f, dtype=dtype).uniform_(-1, 1, generator=gen)
    return {name: functools.partial(_binary_linear, x, bw.packed, bw.alpha, bw.mu, None, in_f,
                                    name) for name in STRATEGIES[1:]}


def binary_lora(x: torch.Tensor, down: BinaryWeight, up: BinaryWeight, scale: float = 1.0,
                activation: str | None = None, *, strategy: str = "auto") -> torch.Tensor:
    """scale·up(act(down(x))) with 1-bit down [r, in] and up [out, r]. strategy "lut": in one
    kernel per block of tokens (the r intermediate values stay in registers or cache, fp32);
    "dequantize": the dense adapter in x's dtype on both weights dequantized to it (the
    intermediate in x's dtype); "auto": the faster on this machine, as binary_linear's. The
    gradient of x goes through the 1-bit kernels either way."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    device = getattr(x, "device", None)
    _check_binary("down", down, device)
    _check_binary("up", up, device)
    _check_x(x, down.shape[1], "down")
    if up.shape[1] != down.shape[0]:
        raise ValueError(f"up has in_features {up.shape[1]} but down has {down.shape[0]} outputs")
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # small calls count at few tokens
    if strategy == "auto":
        strategy = lora_auto_strategy(x2.device, x2.dtype, x2.shape[0], down.shape[0],
                                      down.shape[1], up.shape[0])
    run = _binary_lora_op if via_op(x) else _eager_binary_lora
    y = run(x2, down.packed, down.alpha, down.mu, down.shape[1], up.packed, up.alpha, up.mu,
            up.shape[1], check_scale(scale), activation == "relu", strategy)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], up.shape[0])
