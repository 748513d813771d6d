// Host-side launchers for the shira_kernels CUDA kernels.
//
// This header is deliberately free of torch/ATen/c10 includes: the .cu files
// must compile with a plain nvcc, and only bindings.cpp talks to torch.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

// Batched in-place swap between weight rows selected by an index and a dense
// value buffer, for many (weight, index, value) triples in one launch.
//
// tasks:  device int64 [T, 6], row t =
//         (weight_addr, index_addr, value_addr, n, elem_size, index_is_int64)
//         addresses are raw device pointers; elem_size is 2 or 4 (bytes);
//         index_is_int64 is 0 (int32 indices) or 1 (int64 indices).
// blocks: device int64 [num_blocks, 2], row b = (task_id, start); CUDA block b
//         handles entries [start, min(start + block, n)) of task task_id.
// For each such entry j: k = index[j]; swap(weight[k], value[j]).
//
// Returns cudaSuccess without launching when num_blocks == 0,
// cudaErrorInvalidValue for bad sizes, otherwise cudaGetLastError().
cudaError_t shira_launch_scatter_swap(const int64_t* tasks,
                                      const int64_t* blocks,
                                      int64_t num_blocks,
                                      int64_t block,
                                      cudaStream_t stream);

// ---------------------------------------------------------------------------
// SHiRA sparse-delta matmul (csrc/cuda/sparse_delta.cu).
//
// Element types of x / y / gy / values / weight, all the same in one call.
// Products and sums are accumulated in fp32 and rounded once when stored.
enum ShiraDType : int {
  kShiraFloat32 = 0,
  kShiraFloat16 = 1,
  kShiraBFloat16 = 2,
};

// spmm with a CSR matrix S [rows, in_features]:
//   y_out[t, r] = y_in[t, r]
//               + scale * sum_{j in [row_offsets[r], row_offsets[r+1])} values[j] * x[t, col_indices[j]]
// for t < num_tokens, r < rows. x is [num_tokens, in_features], y_in / y_out
// are [num_tokens, rows] (row-major, contiguous); y_in == y_out is allowed.
// row_offsets: int64 [rows + 1] with row_offsets[rows] == nnz.
// col_indices: [nnz], col_index_size bytes each: 2 (int16) or 4 (int32),
//              each in [0, in_features).
// values: [nnz] of dtype (a ShiraDType code).
// Passing the CSC structure of S (the CSR of S^T) computes gx = gy * S.
// Returns cudaSuccess without launching when num_tokens == 0 or rows == 0,
// cudaErrorInvalidValue for bad sizes / codes, otherwise cudaGetLastError().
cudaError_t shira_launch_spmm(const void* y_in, void* y_out, const void* x,
                              const int64_t* row_offsets, const void* col_indices,
                              int col_index_size, const void* values, int dtype,
                              int64_t num_tokens, int64_t rows, int64_t in_features,
                              int64_t nnz, float scale, cudaStream_t stream);

// sddmm on the sparsity pattern (COO rows / cols):
//   g[j] = sum_{t < num_tokens} gy[t, rows[j]] * x[t, cols[j]]   for j < nnz
// gy is [num_tokens, out_features], x is [num_tokens, in_features], both of
// dtype; rows: int32 [nnz]; cols: [nnz] of col_index_size bytes (2 or 4);
// g: fp32 [nnz], fully written (zeros when num_tokens == 0). For small nnz and
// many tokens the token range is split and summed with fp32 atomics (g is
// zeroed on the stream first), so the summation order is not fixed then.
// Returns cudaSuccess without launching when nnz == 0,
// cudaErrorInvalidValue for bad sizes / codes, otherwise cudaGetLastError().
cudaError_t shira_launch_sddmm(const void* gy, const void* x, const int32_t* rows,
                               const void* cols, int col_index_size, float* g, int dtype,
                               int64_t num_tokens, int64_t out_features, int64_t in_features,
                               int64_t nnz, cudaStream_t stream);

// Scaled scatter-add of sparse values into a copy of a dense weight:
//   out[k] = round_to_dtype(float(weight[k]) + scale * float(values[j])),  k = flat_indices[j]
// for j < nnz. out / weight are flat buffers of dtype (out may equal weight);
// only the nnz indexed entries of out are written. flat_indices: [nnz] of
// index_size bytes, 4 (int32) or 8 (int64), unique, in range.
// Returns cudaSuccess without launching when nnz == 0,
// cudaErrorInvalidValue for bad sizes / codes, otherwise cudaGetLastError().
cudaError_t shira_launch_scatter_add(void* out, const void* weight, const void* flat_indices,
                                     int index_size, const void* values, int dtype, int64_t nnz,
                                     float scale, cudaStream_t stream);
