"""1-bit matmuls in Triton: signs are unpacked in registers, tile by tile, never stored as a
dense weight. binary_lora keeps the r intermediate values of a token block in registers."""

import torch
import triton
import triton.language as tl

from ._rounding import INTERPRETED, to_element

# Triton's interpreter (how CPU tests run these kernels) multiplies bf16 dot operands wrongly;
# there the ±1 products go through fp32 instead, the same exact products, only slower.
HALF_DOT = not INTERPRETED


@triton.jit
def _sign_bits(packed, rows, row_mask, n_words, w0, BW: tl.constexpr):
    """0/1 tile [rows, BW·32]: the sign bits of words w0 … w0+BW of the given rows."""
    wi = w0 + tl.arange(0, BW)
    words = tl.load(packed + rows[:, None] * n_words + wi[None, :],
                    mask=row_mask[:, None] & (wi < n_words)[None, :], other=0)
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits, (rows.shape[0], BW * 32))


@triton.jit
def _row_stats(alpha, mu, rows, row_mask, PER_ROW: tl.constexpr):
    idx = rows if PER_ROW else rows * 0
    return (tl.load(alpha + idx, mask=row_mask, other=0.0),
            tl.load(mu + idx, mask=row_mask, other=0.0))


@triton.jit
def _dequantized(bits, a, m):
    # μ ± α rounded once in fp32, exactly as BinaryWeight.dequantize() (the reference) does.
    return tl.where(bits != 0, (m + a)[:, None], (m - a)[:, None])


@triton.jit
def _x_tile(x, t, t_mask, n_in, w0, BW: tl.constexpr):
    """x[t, 32·w0 … 32·(w0+BW)) in x's dtype, zero past the tokens and the columns."""
    cols = w0 * 32 + tl.arange(0, BW * 32)
    return tl.load(x + t[:, None] * n_in + cols[None, :],
                   mask=t_mask[:, None] & (cols < n_in)[None, :], other=0.0)


@triton.jit
def _x_dot_wt(x, t, t_mask, n_in, packed, rows, row_mask, n_words, alpha, mu,
              PER_ROW: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr, HALF: tl.constexpr):
    """[BT, rows]: x[t]·Wᵀ for the 1-bit W = μ + α·s of the given rows; fp64 for fp32 x, else
    fp32."""
    a, m = _row_stats(alpha, mu, rows, row_mask, PER_ROW)
    if x.dtype.element_ty == tl.float32:
        # fp32: the dequantized W (μ ± α rounded to fp32 once, as the reference) times x in
        # fp64: exact products, sums with 29 spare bits, so the caller's one rounding to fp32
        # makes the result at least as accurate as cuBLAS's fp32 (whose error an fp32 chain
        # of FMAs could exceed even with compensated tiles).
        acc64 = tl.zeros((BT, rows.shape[0]), tl.float64)
        for w0 in range(0, n_words, BW):
            xt = _x_tile(x, t, t_mask, n_in, w0, BW).to(tl.float64)
            wt = _dequantized(_sign_bits(packed, rows, row_mask, n_words, w0, BW), a, m)
            acc64 = tl.dot(xt, tl.trans(wt.to(tl.float64)), acc64, out_dtype=tl.float64)
        return acc64
    else:
        # fp16/bf16: ±1 is exact in x's dtype, so tensor cores form x·sᵀ exactly (fp32 sums);
        # then W·x = α·(x·sᵀ) + μ·Σx.
        acc = tl.zeros((BT, rows.shape[0]), tl.float32)
        xsum = tl.zeros((BT,), tl.float32)
        for w0 in range(0, n_words, BW):
            xt = _x_tile(x, t, t_mask, n_in, w0, BW)
            signs = tl.where(_sign_bits(packed, rows, row_mask, n_words, w0, BW) != 0, 1.0, -1.0)
            if HALF:
                acc = tl.dot(xt, tl.trans(signs.to(xt.dtype)), acc)
            else:
                acc = tl.dot(xt.to(tl.float32), tl.trans(signs), acc, input_precision="ieee")
            xsum += tl.sum(xt.to(tl.float32), axis=1)
        return acc * a[None, :] + xsum[:, None] * m[None, :]


@triton.jit
def _binary_linear_kernel(x, packed, alpha, mu, bias, y, tokens, n_in, n_out, n_words,
                          PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr,
                          BO: tl.constexpr, BW: tl.constexpr, HALF: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    o = tl.program_id(1) * BO + tl.arange(0, BO)
    t_mask, o_mask = t < tokens, o < n_out
    out = _x_dot_wt(x, t, t_mask, n_in, packed, o, o_mask, n_words, alpha, mu, PER_ROW, BT, BW,
                    HALF)
    if HAS_BIAS:
        out += tl.load(bias + o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y + t[:, None] * n_out + o[None, :], to_element(out, y.dtype.element_ty),
             mask=t_mask[:, None] & o_mask[None, :])


@triton.jit
def _binary_lora_kernel(x, d_packed, d_alpha, d_mu, u_packed, u_alpha, u_mu, y, scale, tokens,
                        n_in, rank, n_out, d_words, u_words, D_PER_ROW: tl.constexpr,
                        U_PER_ROW: tl.constexpr, RELU: tl.constexpr, BT: tl.constexpr,
                        R: tl.constexpr, BO: tl.constexpr, BW: tl.constexpr,
                        HALF: tl.constexpr):
    # The r hidden values of a token block stay in registers between down and up, in fp32
    # (as the reference computes them).
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    t_mask = t < tokens
    r = tl.arange(0, R)
    r_mask = r < rank
    h = _x_dot_wt(x, t, t_mask, n_in, d_packed, r, r_mask, d_words, d_alpha, d_mu, D_PER_ROW,
                  BT, BW, HALF)
    h = h.to(tl.float32)
    if RELU:
        h = tl.maximum(h, 0.0)
    h = tl.where(r_mask[None, :], h, 0.0)  # padded ranks contribute nothing to up
    for o0 in range(0, n_out, BO):
        o = o0 + tl.arange(0, BO)
        o_mask = o < n_out
        a, m = _row_stats(u_alpha, u_mu, o, o_mask, U_PER_ROW)
        wt = _dequantized(_sign_bits(u_packed, o, o_mask, u_words, 0, R // 32), a, m)
        out = tl.dot(h, tl.trans(wt), input_precision="ieee")
        tl.store(y + t[:, None] * n_out + o[None, :],
                 to_element(scale * out, y.dtype.element_ty),
                 mask=t_mask[:, None] & o_mask[None, :])


def binary_linear(x, packed, alpha, mu, bias, in_features):
    tokens, n_out = x.shape[0], packed.shape[0]
    y = torch.empty(tokens, n_out, dtype=x.dtype, device=x.device)
    if tokens and n_out:
        # Decoding (few tokens) is bound by the sign words: small token tiles; many tokens,
        # 64x64 tiles for the tensor cores.
        bt, bo = (16, 32) if tokens <= 16 else (64, 64)
        grid = (triton.cdiv(tokens, bt), triton.cdiv(n_out, bo))
        _binary_linear_kernel[grid](x, packed, alpha, mu, bias if bias is not None else y, y,
                                    tokens, in_features, n_out, packed.shape[1],
                                    PER_ROW=alpha.numel() > 1, HAS_BIAS=bias is not None,
                                    BT=bt, BO=bo, BW=2, HALF=HALF_DOT)
    return y


def binary_lora(x, down, up, scale, relu):
    # down, up: (packed, alpha, mu, in_features), as the reference takes them.
    (d_packed, d_alpha, d_mu), (u_packed, u_alpha, u_mu) = down[:3], up[:3]
    tokens, rank, n_out = x.shape[0], d_packed.shape[0], u_packed.shape[0]
    y = torch.empty(tokens, n_out, dtype=x.dtype, device=x.device)
    if tokens and n_out:
        r_pad = max(32, triton.next_power_of_2(rank))
        bt = 16
        _binary_lora_kernel[(triton.cdiv(tokens, bt),)](
            x, d_packed, d_alpha, d_mu, u_packed, u_alpha, u_mu, y, float(scale), tokens,
            x.shape[1], rank, n_out, d_packed.shape[1], u_packed.shape[1],
            D_PER_ROW=d_alpha.numel() > 1, U_PER_ROW=u_alpha.numel() > 1, RELU=relu, BT=bt,
            R=r_pad, BO=32, BW=2, HALF=HALF_DOT)
    return y
