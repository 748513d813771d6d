// Batched scatter-swap: weight[index[j]] <-> value[j] for many tasks at once.
//
// One launch covers every task so that applying/removing a sparse adapter on
// many weight tensors costs a single kernel launch instead of one per tensor.
// No torch headers here on purpose: this file must build with plain nvcc.

#include "kernels.h"

#include <climits>
#include <cstdint>

namespace {

constexpr int kThreads = 256;

// Column layout of the int64 tables built by the Python side.
enum TaskCol : int {
  kWeightAddr = 0,
  kIndexAddr = 1,
  kValueAddr = 2,
  kNumel = 3,
  kElemSize = 4,
  kIndexIsInt64 = 5,
  kTaskCols = 6,
};
enum BlockCol : int { kTaskId = 0, kStart = 1, kBlockCols = 2 };

// Elements are moved as raw bit patterns (uint16 for fp16/bf16, uint32 for
// fp32) so the swap is bit-exact and independent of the floating-point type.
template <typename Bits, typename Index>
__device__ __forceinline__ void swap_range(uintptr_t weight_addr,
                                           uintptr_t index_addr,
                                           uintptr_t value_addr,
                                           int64_t begin, int64_t end) {
  Bits* weight = reinterpret_cast<Bits*>(weight_addr);
  const Index* index = reinterpret_cast<const Index*>(index_addr);
  Bits* value = reinterpret_cast<Bits*>(value_addr);
  // Consecutive threads take consecutive j, so index/value accesses are
  // coalesced; weight accesses are a gather/scatter by nature.
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const int64_t k = static_cast<int64_t>(index[j]);  // widen int32 safely
    const Bits tmp = weight[k];
    weight[k] = value[j];
    value[j] = tmp;
  }
}

__global__ void __launch_bounds__(kThreads)
scatter_swap_kernel(const int64_t* __restrict__ tasks,
                    const int64_t* __restrict__ blocks, int64_t block) {
  // blockIdx.x is unsigned; widen before multiplying to avoid 32-bit overflow.
  const int64_t b = static_cast<int64_t>(blockIdx.x);
  const int64_t task_id = blocks[b * kBlockCols + kTaskId];
  const int64_t start = blocks[b * kBlockCols + kStart];

  // Every thread reads the same row: the loads are broadcast, and all the
  // values below are uniform across the block, so the dispatch below never
  // diverges within a warp.
  const int64_t* task = tasks + task_id * kTaskCols;
  const uintptr_t weight_addr = static_cast<uintptr_t>(task[kWeightAddr]);
  const uintptr_t index_addr = static_cast<uintptr_t>(task[kIndexAddr]);
  const uintptr_t value_addr = static_cast<uintptr_t>(task[kValueAddr]);
  const int64_t n = task[kNumel];
  const int64_t elem_size = task[kElemSize];
  const bool index_is_int64 = task[kIndexIsInt64] != 0;

  const int64_t end = (start + block < n) ? start + block : n;
  if (start >= end) return;

  // Unsupported element sizes are skipped (the Python side validates them);
  // trapping here would poison the whole CUDA context.
  if (elem_size == 2) {
    if (index_is_int64)
      swap_range<uint16_t, int64_t>(weight_addr, index_addr, value_addr, start, end);
    else
      swap_range<uint16_t, int32_t>(weight_addr, index_addr, value_addr, start, end);
  } else if (elem_size == 4) {
    if (index_is_int64)
      swap_range<uint32_t, int64_t>(weight_addr, index_addr, value_addr, start, end);
    else
      swap_range<uint32_t, int32_t>(weight_addr, index_addr, value_addr, start, end);
  }
}

}  // namespace

cudaError_t shira_launch_scatter_swap(const int64_t* tasks,
                                      const int64_t* blocks,
                                      int64_t num_blocks,
                                      int64_t block,
                                      cudaStream_t stream) {
  if (num_blocks == 0) return cudaSuccess;  // nothing to do; launching 0 blocks is an error
  // gridDim.x allows up to 2^31-1 blocks (1-D grid), which we use directly.
  if (num_blocks < 0 || num_blocks > static_cast<int64_t>(INT_MAX) || block <= 0)
    return cudaErrorInvalidValue;
  if (tasks == nullptr || blocks == nullptr) return cudaErrorInvalidValue;

  const dim3 grid(static_cast<unsigned int>(num_blocks));
  const dim3 threads(kThreads);
  scatter_swap_kernel<<<grid, threads, 0, stream>>>(tasks, blocks, block);
  return cudaGetLastError();
}
