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
  kWeightNumel = 6,
  kTaskCols = 7,
};
enum BlockCol : int { kTaskId = 0, kStart = 1, kBlockCols = 2 };

// Elements are moved as raw bit patterns (uint16 for fp16/bf16, uint32 for
// fp32) so the swap is bit-exact and independent of the floating-point type.
// An index outside [0, numel) is skipped and counted in *skipped: the Python
// side's index check is cached per tensor version and can be stale, and one
// compare per entry is free in a scattered access.
template <typename Bits, typename Index>
__device__ __forceinline__ void swap_range(uintptr_t weight_addr,
                                           uintptr_t index_addr,
                                           uintptr_t value_addr, int64_t numel,
                                           int64_t begin, int64_t end,
                                           unsigned long long* skipped) {
  Bits* weight = reinterpret_cast<Bits*>(weight_addr);
  const Index* index = reinterpret_cast<const Index*>(index_addr);
  Bits* value = reinterpret_cast<Bits*>(value_addr);
  // Consecutive threads take consecutive j, so index/value accesses are
  // coalesced; weight accesses are a gather/scatter by nature.
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const int64_t k = static_cast<int64_t>(index[j]);  // widen int32 safely
    if (static_cast<uint64_t>(k) >= static_cast<uint64_t>(numel)) {
      atomicAdd(skipped, 1ULL);
      continue;
    }
    const Bits tmp = weight[k];
    weight[k] = value[j];
    value[j] = tmp;
  }
}

__global__ void __launch_bounds__(kThreads)
scatter_swap_kernel(const int64_t* __restrict__ tasks,
                    const int64_t* __restrict__ blocks, int64_t block,
                    unsigned long long* __restrict__ skipped) {
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
  const int64_t numel = task[kWeightNumel];

  const int64_t end = (start + block < n) ? start + block : n;
  if (start >= end) return;

  // Elements move as the unsigned words of their size. Unsupported element
  // sizes are skipped (the Python side validates them); trapping here would
  // poison the whole CUDA context.
  shira::dispatch_index<uint16_t, uint32_t>(elem_size, [&](auto bits) {
    shira::dispatch_index<int32_t, int64_t>(index_is_int64 ? 8 : 4, [&](auto index) {
      swap_range<typename decltype(bits)::type, typename decltype(index)::type>(
          weight_addr, index_addr, value_addr, numel, start, end, skipped);
    });
  });
}

}  // namespace

cudaError_t shira::cuda::scatter_swap(const int64_t* tasks, const int64_t* blocks,
                                      int64_t num_blocks, int64_t block,
                                      unsigned long long* skipped, cudaStream_t stream) {
  if (num_blocks == 0) return cudaSuccess;  // nothing to do; launching 0 blocks is an error
  // gridDim.x allows up to 2^31-1 blocks (1-D grid), which we use directly.
  if (num_blocks < 0 || num_blocks > static_cast<int64_t>(INT_MAX) || block <= 0)
    return cudaErrorInvalidValue;
  if (tasks == nullptr || blocks == nullptr || skipped == nullptr) return cudaErrorInvalidValue;

  const dim3 grid(static_cast<unsigned int>(num_blocks));
  const dim3 threads(kThreads);
  scatter_swap_kernel<<<grid, threads, 0, stream>>>(tasks, blocks, block, skipped);
  return cudaGetLastError();
}
