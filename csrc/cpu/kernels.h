// CPU kernels of shira_kernels: plain C++ over raw pointers, no torch headers, so that each
// kernel can be read, tested and vectorised on its own. bindings.cpp adapts them to tensors.
// Entry points are shira::cpu::<op>, as the CUDA ones are shira::cuda::<op> (cuda/kernels.h).
#pragma once
#include <cstdint>

#include "../dispatch.h"

namespace shira::cpu {

// Batched scatter-swap. tasks: int64 [T, 7] rows (weight_addr, index_addr, value_addr, n,
// elem_size 2|4, index_is_int64 0|1, weight_numel); blocks: int64 [B, 2] rows (task, start),
// each covering entries [start, min(start + block, n)) of one task. For each entry j of a
// task: swap weight[index[j]] with value[j]. One parallel region over all blocks of all tasks.
// Entries whose index is outside [0, weight_numel) are skipped; returns how many were.
constexpr int64_t kSwapTaskColumns = 7;
int64_t scatter_swap(const int64_t* tasks, const int64_t* blocks, int64_t num_blocks,
                     int64_t block);

// Sparse-delta matmul parts. S is [rows, in] in CSR: offsets int64 [rows + 1], column indices
// cols of col_bytes bytes each (2: int16, 4: int32), values in the activations' dtype
// (values_in_dtype) or fp32. Activations are token-major as torch holds them, in the dtype of
// x, y and gy; sums are fp32.
//   spmm:  out[t, r] = y_in[t, r] + scale · Σ_{j in row r} values[j] · x[t, col[j]]
//          (x [T, in], y_in and out [T, rows]; out may be y_in)
//   sddmm: g[j] = Σ_t gy[t, row[j]] · x[t, col[j]]  (gy [T, out], x [T, in], S's CSR
//          offsets [out + 1] and columns, g fp32 [nnz], overwritten)
void spmm(DType dtype, const void* x, const void* y_in, void* out, int64_t tokens, int64_t in,
          int64_t rows, const int64_t* offsets, const void* cols, int col_bytes,
          const void* values, bool values_in_dtype, float scale);
void sddmm(DType dtype, const void* gy, const void* x, int64_t tokens, int64_t out, int64_t in,
           const int64_t* offsets, const void* cols, int col_bytes, float* g);

// The spmm strategy's backward in one pass, with S by columns: t_offsets int64 [in + 1] and
// trows [nnz] of row_bytes bytes each (S's transposed CSR), perm int64 [nnz] (CSC position ->
// CSR position), values in CSR order (as spmm's); gy [T, out], x [T, in], gx_in and gx_out [T, in]
// (gx_out may be gx_in):
//   gx_out[t, c] = gx_in[t, c] + scale · Σ_{j in column c} values[perm[j]] · gy[t, trows[j]]
//   g[perm[j]] = Σ_t gy[t, trows[j]] · x[t, c]   (fp32 [nnz] in CSR order, overwritten)
void spmm_t_sddmm(DType dtype, const void* gy, const void* x, const void* gx_in, void* gx_out,
                  int64_t tokens, int64_t out, int64_t in, const int64_t* t_offsets,
                  const void* trows, int row_bytes, const int64_t* perm, const void* values,
                  bool values_in_dtype, float scale, float* g);

// The dense matmul with S folded into W as W is loaded (folded_linear.cpp), W [out, in] in the
// dtype of the result, a contiguous, in fp32 (in bf16 for a bf16 W where
// folded_linear_takes_bf16()), idx of idx_bytes bytes each (2 or 4), sums fp32:
//   grad_x false: result[t, o] = Σ_k a[t, k]·(W[o, k] + scale·S[o, k]) + bias[o]   (a = x [T, in],
//                 S by rows: offsets [out + 1], idx = column per entry, perm null; bias fp32 or null)
//   grad_x true:  result[t, k] = Σ_o a[t, o]·(W[o, k] + scale·S[o, k])   (a = gy [T, out], S by
//                 columns: offsets [in + 1], idx = row per entry, values[perm[j]]; bias null)
// W + scale·S is summed in fp32, and rounded once to bf16 for a bf16 W where
// folded_linear_takes_bf16() (AVX512-BF16: the products are vdpbf16ps on bf16 pairs).
bool folded_linear_takes_bf16();
void folded_linear(DType dtype, const void* a, int64_t tokens, const void* weight, int64_t out,
                   int64_t in, bool grad_x, const int64_t* offsets, const void* idx,
                   int idx_bytes, const int64_t* perm, const float* values, float scale,
                   const float* bias, void* result);

// out[idx[j]] = round(float(weight[idx[j]]) + scale · float(values[j])) for j < nnz, in the
// weight's dtype, idx of idx_bytes bytes each (4: int32, 8: int64). If saved is not null,
// saved[j] receives weight[idx[j]]'s bits first: with out == weight this adds S into W in place
// in one pass and keeps the base entries to be swapped back. Entries whose index is outside
// [0, numel) (numel of weight and out) are skipped (saved[j] untouched); returns how many were
// (all of them for an idx_bytes other than 4 or 8).
int64_t add_at_indices(DType dtype, const void* weight, void* out, int64_t numel,
                       const void* idx, int idx_bytes, const void* values, float scale,
                       int64_t nnz, void* saved);

// 1-bit weights, W = mu + alpha * s with s = +-1 (signs packed LSB first, 1 = +1):
//   y[t, o] = scale * (alpha[o] * sum_k x[t, k] * s[o, k] + mu[o] * xsum[t] + bias[o])
// for x fp32 [T, in], xsum[t] = sum_k x[t, k], y fp32 [T, out]; alpha and mu fp32 per row or
// one value each, bias fp32 [out] or null. The signs come as sign panels of s: for a matrix
// of signs [lanes, steps], the bytes [ceil(lanes / kPanel), ceil(steps / 32) * 4, kPanel] of
// its packed rows transposed in panels of kPanel rows (byte [p, g, l] holds the signs of
// steps 8g .. 8g + 7 of row kPanel·p + l; rows past `lanes` are padding, read and not used),
// so that a block of lanes reads its signs as one stream. sign_panels makes them from the
// rows' bytes [lanes, nbytes] (byte g of a row: steps 8g .. 8g + 7, LSB first) into panels
// [ceil(lanes / kPanel), nbytes, kPanel].
constexpr int64_t kPanel = 64;
void sign_panels(const uint8_t* rows, int64_t lanes, int64_t nbytes, uint8_t* panels);
void binary_linear(const float* x, int64_t tokens, int64_t in, const uint8_t* panels,
                   int64_t out, const float* alpha, bool alpha_per_row, const float* mu,
                   bool mu_per_row, const float* bias, float scale, float* y);
// The gradient of x through such a weight, without the weight: gx[t, k] = sum_o g[t, o] *
// s[o, k] + add[t] for g fp32 [T, out] (gy with alpha folded in), the sign panels of s's
// transpose [in, out], and add[t] = sum_o gy[t, o] * mu[o]; gx fp32 [T, in].
void binary_linear_grad_x(const float* g, int64_t tokens, int64_t out,
                          const uint8_t* panels_t, int64_t in, const float* add, float* gx);
// The weight itself, for handing to a vendor GEMM a block of rows at a time: out[r, k] =
// s[r, k] ? hi[r] : lo[r] for r < rows, k < in, with hi = mu + alpha and lo = mu - alpha already
// rounded to the output dtype (elem_bytes 2 or 4: their bits are copied, not converted), the
// signs packed in words [rows, words].
void binary_dequantize(const int32_t* packed, int64_t rows, int64_t words, int64_t in,
                       const void* hi, const void* lo, int elem_bytes, void* out);

}  // namespace shira::cpu
