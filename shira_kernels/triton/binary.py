"""1-bit matmuls in Triton: signs are unpacked in registers, tile by tile, never stored as a
dense weight. binary_lora keeps the r intermediate values of a token block in registers."""
import torch
import triton
import triton.language as tl


@triton.jit
def _signs(packed, rows, row_mask, n_words, w0, BW: tl.constexpr):
    """±1 tile [rows, BW·32] of the words w0 … w0+BW of the given rows (fp32)."""
    wi = w0 + tl.arange(0, BW)
    words = tl.load(packed + rows[:, None] * n_words + wi[None, :],
                    mask=row_mask[:, None] & (wi < n_words)[None, :], other=0)
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits, (rows.shape[0], BW * 32)).to(tl.float32) * 2.0 - 1.0


@triton.jit
def _x_tile(x, t, t_mask, n_in, w0, BW: tl.constexpr):
    cols = w0 * 32 + tl.arange(0, BW * 32)
    return tl.load(x + t[:, None] * n_in + cols[None, :],
                   mask=t_mask[:, None] & (cols < n_in)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _dot_signs(x, t, t_mask, n_in, packed, rows, row_mask, n_words, acc, xsum,
               BW: tl.constexpr):
    # acc += x·sᵀ over all words (fp32, exact products with ±1); xsum += Σx.
    for w0 in range(0, n_words, BW):
        xt = _x_tile(x, t, t_mask, n_in, w0, BW)
        acc += tl.dot(xt, tl.trans(_signs(packed, rows, row_mask, n_words, w0, BW)),
                      input_precision="ieee")
        xsum += tl.sum(xt, axis=1)
    return acc, xsum


@triton.jit
def _affine(acc, xsum, alpha, mu, rows, row_mask, PER_ROW: tl.constexpr):
    # α·(x·sᵀ) + μ·Σx, with α, μ per row or per tensor.
    idx = rows if PER_ROW else rows * 0
    a = tl.load(alpha + idx, mask=row_mask, other=0.0)
    m = tl.load(mu + idx, mask=row_mask, other=0.0)
    return acc * a[None, :] + xsum[:, None] * m[None, :]


@triton.jit
def _binary_linear_kernel(x, packed, alpha, mu, bias, y, tokens, n_in, n_out, n_words,
                          PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr,
                          BO: tl.constexpr, BW: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    o = tl.program_id(1) * BO + tl.arange(0, BO)
    t_mask, o_mask = t < tokens, o < n_out
    acc, xsum = _dot_signs(x, t, t_mask, n_in, packed, o, o_mask, n_words,
                           tl.zeros((BT, BO), tl.float32), tl.zeros((BT,), tl.float32), BW)
    out = _affine(acc, xsum, alpha, mu, o, o_mask, PER_ROW)
    if HAS_BIAS:
        out += tl.load(bias + o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y + t[:, None] * n_out + o[None, :], out.to(y.dtype.element_ty),
             mask=t_mask[:, None] & o_mask[None, :])


@triton.jit
def _binary_lora_kernel(x, d_packed, d_alpha, d_mu, u_packed, u_alpha, u_mu, y, scale, tokens,
                        n_in, rank, n_out, d_words, u_words, D_PER_ROW: tl.constexpr,
                        U_PER_ROW: tl.constexpr, RELU: tl.constexpr, BT: tl.constexpr,
                        R: tl.constexpr, BO: tl.constexpr, BW: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    t_mask = t < tokens
    r = tl.arange(0, R)
    r_mask = r < rank
    h, xsum = _dot_signs(x, t, t_mask, n_in, d_packed, r, r_mask, d_words,
                         tl.zeros((BT, R), tl.float32), tl.zeros((BT,), tl.float32), BW)
    h = _affine(h, xsum, d_alpha, d_mu, r, r_mask, D_PER_ROW)
    if RELU:
        h = tl.maximum(h, 0.0)
    h = tl.where(r_mask[None, :], h, 0.0)  # padded ranks contribute nothing to up
    hsum = tl.sum(h, axis=1)
    for o0 in range(0, n_out, BO):
        o = o0 + tl.arange(0, BO)
        o_mask = o < n_out
        s = _signs(u_packed, o, o_mask, u_words, 0, R // 32)
        out = _affine(tl.dot(h, tl.trans(s), input_precision="ieee"), hsum, u_alpha, u_mu, o,
                      o_mask, U_PER_ROW)
        tl.store(y + t[:, None] * n_out + o[None, :], (scale * out).to(y.dtype.element_ty),
                 mask=t_mask[:, None] & o_mask[None, :])


def binary_linear(x, packed, alpha, mu, bias, in_features):
    tokens, n_out = x.shape[0], packed.shape[0]
    y = torch.empty(tokens, n_out, dtype=x.dtype, device=x.device)
    if tokens and n_out:
        bt, bo = 16, 32
        grid = (triton.cdiv(tokens, bt), triton.cdiv(n_out, bo))
        _binary_linear_kernel[grid](x, packed, alpha, mu, bias if bias is not None else y, y,
                                    tokens, in_features, n_out, packed.shape[1],
                                    PER_ROW=alpha.numel() > 1, HAS_BIAS=bias is not None,
                                    BT=bt, BO=bo, BW=2)
    return y


def binary_lora(x, down, up, scale, relu):
    (d_packed, d_alpha, d_mu), (u_packed, u_alpha, u_mu) = down, up
    tokens, rank, n_out = x.shape[0], d_packed.shape[0], u_packed.shape[0]
    y = torch.empty(tokens, n_out, dtype=x.dtype, device=x.device)
    if tokens and n_out:
        r_pad = max(32, triton.next_power_of_2(rank))
        bt = 16
        _binary_lora_kernel[(triton.cdiv(tokens, bt),)](
            x, d_packed, d_alpha, d_mu, u_packed, u_alpha, u_mu, y, float(scale), tokens,
            x.shape[1], rank, n_out, d_packed.shape[1], u_packed.shape[1],
            D_PER_ROW=d_alpha.numel() > 1, U_PER_ROW=u_alpha.numel() > 1, RELU=relu, BT=bt,
            R=r_pad, BO=32, BW=2)
    return y
