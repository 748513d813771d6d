// Host-side launchers for the shira_kernels CUDA kernels: shira::cuda::<op>, as
// the CPU entry points are shira::cpu::<op> (csrc/cpu/kernels.h).
//
// This header is deliberately free of torch/ATen/c10 includes: the .cu files
// must compile with a plain nvcc, and only bindings.cpp talks to torch.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "../dispatch.h"

namespace shira::cuda {

// Batched in-place swap between weight rows selected by an index and a dense
// value buffer, for many (weight, index, value) triples in one launch.
//
// tasks:  device int64 [T, 7], row t = (weight_addr, index_addr, value_addr,
//         n, elem_size, index_is_int64, weight_numel)
//         addresses are raw device pointers; elem_size is 2 or 4 (bytes;
//         tasks of another size are left alone); index_is_int64 is 0 (int32
//         indices) or 1 (int64 indices).
// blocks: device int64 [num_blocks, 2], row b = (task_id, start); CUDA block b
//         handles entries [start, min(start + block, n)) of task task_id.
// For each such entry j: k = index[j]; swap(weight[k], value[j]).
//
// Returns cudaSuccess without launching when num_blocks == 0,
// cudaErrorInvalidValue for bad sizes, otherwise cudaGetLastError().
// Entries whose index is outside [0, weight_numel) are skipped and counted in
// *skipped (one unsigned 64-bit counter in device memory, added to).
cudaError_t scatter_swap(const int64_t* tasks, const int64_t* blocks, int64_t num_blocks,
                         int64_t block, unsigned long long* skipped, cudaStream_t stream);

// ---------------------------------------------------------------------------
// SHiRA sparse-delta matmul (csrc/cuda/sparse_delta.cu).
//
// x / y / gy / values / weight are all of one dtype in a call (a shira::DType,
// stored as float, __half or __nv_bfloat16). Products and sums are accumulated
// in fp32 and rounded once when stored.

// spmm with a CSR matrix S [rows, in_features]:
//   y_out[t, r] = y_in[t, r]
//               + scale * sum_{j in [row_offsets[r], row_offsets[r+1])} values[j] * x[t, col_indices[j]]
// for t < num_tokens, r < rows. x is [num_tokens, in_features], y_in / y_out
// are [num_tokens, rows] (row-major, contiguous); y_in == y_out is allowed.
// row_offsets: int64 [rows + 1] with row_offsets[rows] == nnz.
// col_indices: [nnz], col_index_size bytes each: 2 (int16) or 4 (int32),
//              each in [0, in_features).
// values: [nnz] of dtype.
// Passing the CSC structure of S (the CSR of S^T) computes gx = gy * S.
// Returns cudaSuccess without launching when num_tokens == 0 or rows == 0,
// cudaErrorInvalidValue for bad sizes / codes, otherwise cudaGetLastError().
cudaError_t spmm(const void* y_in, void* y_out, const void* x, const int64_t* row_offsets,
                 const void* col_indices, int col_index_size, const void* values, DType dtype,
                 int64_t num_tokens, int64_t rows, int64_t in_features, int64_t nnz, float scale,
                 cudaStream_t stream);

// sddmm on the sparsity pattern (COO rows / cols):
//   g[j] = sum_{t < num_tokens} gy[t, rows[j]] * x[t, cols[j]]   for j < nnz
// gy is [num_tokens, out_features], x is [num_tokens, in_features], both of
// dtype; rows: int32 [nnz]; cols: [nnz] of col_index_size bytes (2 or 4);
// g: fp32 [nnz], fully written (zeros when num_tokens == 0). For small nnz and
// many tokens the token range is split and summed with fp32 atomics (g is
// zeroed on the stream first), so the summation order is not fixed then.
// Returns cudaSuccess without launching when nnz == 0,
// cudaErrorInvalidValue for bad sizes / codes, otherwise cudaGetLastError().
cudaError_t sddmm(const void* gy, const void* x, const int32_t* rows, const void* cols,
                  int col_index_size, float* g, DType dtype, int64_t num_tokens,
                  int64_t out_features, int64_t in_features, int64_t nnz, cudaStream_t stream);

// spmm for many adapters over their own rows of one batch, in one launch
// (multi_delta_linear; the tables are built by shira_kernels/_group_tables.py).
// Group g: the rows order[p] for p in [its first tile's start, group_end[g]),
// and a CSR S_g of `rows` rows whose row offsets are row_offsets[group_offsets[g]
// .. group_offsets[g] + rows], counted from entry group_entries[g] of
// col_indices / values (the adapters' buffers, read in place):
//   y[t, r] += scales[g] * sum_{j in row r of S_g} values[j] * x[t, col_indices[j]]
// in place. Tile i covers up to tile_rows (1..8) positions of order from
// tile_start[i], all of group tile_group[i]. order, tile_group, tile_start,
// group_end, group_offsets, group_entries and row_offsets are int64; scales
// fp32; y [*, rows] and x [*, in_features] of dtype. avg_row_nnz sizes the
// lanes per row as spmm's. Per row the sum is spmm's in the same order (the
// same bits for the same avg_row_nnz class). Returns cudaSuccess without
// launching when num_tiles == 0 or rows == 0, cudaErrorInvalidValue for bad
// sizes / codes, otherwise cudaGetLastError().
cudaError_t grouped_spmm(void* y, const void* x, const int64_t* order, const int64_t* tile_group,
                         const int64_t* tile_start, const int64_t* group_end,
                         const int64_t* group_offsets, const int64_t* group_entries,
                         const int64_t* row_offsets, const void* col_indices, int col_index_size,
                         const void* values, const float* scales, DType dtype, int64_t num_tiles,
                         int64_t tile_rows, int64_t rows, int64_t in_features,
                         int64_t avg_row_nnz, cudaStream_t stream);

// sddmm for many adapters over their own rows, in one launch:
//   g[j] = scales[k] * sum_{p in [group_rows[2k], group_rows[2k+1])}
//                        gy[order[p], rows[j]] * x[order[p], cols[j]]
// for the entries j of group k (positions in the adapters' buffers rows / cols,
// and g has the same positions). Tile i (one block) covers up to tile_entries
// (1..256) entries from tile_start[i], all of group tile_group[i] and below
// entry_end of that group. g: fp32, every entry of a tile written, no other.
// Returns cudaSuccess without launching when num_tiles == 0,
// cudaErrorInvalidValue for bad sizes / codes, otherwise cudaGetLastError().
cudaError_t grouped_sddmm(const void* gy, const void* x, const int64_t* order,
                          const int64_t* tile_group, const int64_t* tile_start,
                          const int64_t* entry_end, const int64_t* group_rows,
                          const float* scales, const int32_t* rows, const void* cols,
                          int col_index_size, float* g, DType dtype, int64_t num_tiles,
                          int64_t tile_entries, int64_t out_features, int64_t in_features,
                          cudaStream_t stream);

// The sparse values, scaled, added at their flat indices into a copy of a dense weight
// (each entry assigned once, not accumulated as torch's scatter_add would):
//   out[k] = round_to_dtype(float(weight[k]) + scale * float(values[j])),  k = flat_indices[j]
// for j < nnz. out / weight are flat buffers of dtype (out may equal weight);
// only the nnz indexed entries of out are written. flat_indices: [nnz] of
// index_size bytes, 4 (int32) or 8 (int64), unique. An index outside
// [0, numel) is skipped and counted in *skipped (device memory, added to).
// Returns cudaSuccess without launching when nnz == 0,
// cudaErrorInvalidValue for bad sizes / codes, otherwise cudaGetLastError().
cudaError_t add_at_indices(void* out, const void* weight, int64_t numel,
                           const void* flat_indices, int index_size, const void* values,
                           DType dtype, int64_t nnz, float scale, unsigned long long* skipped,
                           cudaStream_t stream);

// ---------------------------------------------------------------------------
// 1-bit (binary) weights (csrc/cuda/binary.cu).
//
// A binary weight W [rows, cols] is W[o, i] = mu_o + alpha_o * s[o, i], s = +-1.
// packed: int32 [rows, words], words = ceil(cols / 32), row-major; bit k of
// word j of row o (LSB first) is the sign of column 32 * j + k, 1 meaning +1.
// Each row is padded on its own; padding bits are ignored. alpha / mu are fp32
// with one value (*_per_row false) or one per row (*_per_row true).
// x / y / bias are of dtype, row-major and contiguous; sums are accumulated in
// fp32 and rounded once when y is stored.
struct BinaryWeight {
  const int32_t* packed;  // [rows, words]
  const float* alpha;
  bool alpha_per_row;
  const float* mu;
  bool mu_per_row;
};

// y[t, o] = alpha_o * sum_i x[t, i] s[o, i] + mu_o * sum_i x[t, i] + bias[o]
// for t < num_tokens, o < out_features. x: [num_tokens, in_features];
// w: [out_features, in_features]; bias: [out_features] of dtype, or nullptr
// for none; y: [num_tokens, out_features], fully written.
// Returns cudaSuccess without launching when num_tokens == 0 or
// out_features == 0, cudaErrorInvalidValue for bad sizes / codes, otherwise
// cudaGetLastError().
cudaError_t binary_linear(const void* x, const BinaryWeight& w, const void* bias, void* y,
                          DType dtype, int64_t num_tokens, int64_t in_features,
                          int64_t out_features, cudaStream_t stream);

// Binary LoRA: y = scale * up(act(down(x))), act = ReLU if relu else identity,
// with down a binary [rank, in_features] weight and up a binary
// [out_features, rank] weight (each with its own alpha / mu):
//   h[t, k] = act(down_alpha_k * sum_i x[t, i] s_down[k, i] + down_mu_k * sum_i x[t, i])
//   y[t, o] = scale * (up_alpha_o * sum_k h[t, k] s_up[o, k] + up_mu_o * sum_k h[t, k])
// h stays on chip (h is fp32, not rounded to dtype). x: [num_tokens, in_features];
// down: [rank, in_features]; up: [out_features, rank]; y: [num_tokens,
// out_features], fully written.
// rank must be in [1, 64]. Returns cudaSuccess without launching when
// num_tokens == 0 or out_features == 0, cudaErrorInvalidValue for bad sizes /
// codes, otherwise cudaGetLastError().
cudaError_t binary_lora(const void* x, const BinaryWeight& down, const BinaryWeight& up,
                        float scale, bool relu, void* y, DType dtype, int64_t num_tokens,
                        int64_t in_features, int64_t rank, int64_t out_features,
                        cudaStream_t stream);

}  // namespace shira::cuda
