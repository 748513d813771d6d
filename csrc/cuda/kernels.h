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
