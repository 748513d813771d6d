#include "kernels.h"

#include <algorithm>

namespace {

// How far ahead to prefetch the weight entry: indices are sorted but sparse (a 1-2% SHiRA
// mask touches a new cache line almost every entry), so the hardware prefetcher cannot guess.
constexpr int64_t kPrefetchDistance = 16;

// Swap raw bit patterns (T = uint16_t or uint32_t): exact for every float dtype. An index
// outside [0, numel) is skipped and counted: the Python side checked the indices, but a check
// cached per tensor version can be stale (writes through .data or numpy do not bump it), and
// one compare per entry costs nothing next to the scattered access.
template <typename T, typename I>
int64_t swap_range(T* weight, int64_t numel, const I* index, T* value, int64_t begin,
                   int64_t end) {
  int64_t skipped = 0;
  for (int64_t j = begin; j < end; ++j) {
    const int64_t k = static_cast<int64_t>(index[j]);
    if (j + kPrefetchDistance < end) {
      const int64_t ahead = static_cast<int64_t>(index[j + kPrefetchDistance]);
      if (static_cast<uint64_t>(ahead) < static_cast<uint64_t>(numel))
        __builtin_prefetch(weight + ahead, 1);
    }
    if (static_cast<uint64_t>(k) >= static_cast<uint64_t>(numel)) {
      ++skipped;
      continue;
    }
    const T old = weight[k];
    weight[k] = value[j];
    value[j] = old;
  }
  return skipped;
}

}  // namespace

int64_t shira::cpu::scatter_swap(const int64_t* tasks, const int64_t* blocks, int64_t num_blocks,
                                 int64_t block) {
  // Every block holds `block` entries (a task's last one fewer), so a static schedule over the
  // blocks of all tasks balances the threads however unequal the tasks are.
  int64_t skipped = 0;
#pragma omp parallel for schedule(static) reduction(+ : skipped) if (num_blocks > 1)
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t* task = tasks + kSwapTaskColumns * blocks[2 * b];
    const int64_t begin = blocks[2 * b + 1];
    const int64_t end = std::min(begin + block, task[3]);
    // Elements move as the unsigned words of their size, 2 or 4 bytes (the Python side passes
    // no other; another is left alone, as on CUDA); indices are int32 or int64.
    skipped += dispatch_index<uint16_t, uint32_t>(task[4], int64_t{0}, [&](auto bits) {
      using T = typename decltype(bits)::type;
      return dispatch_index<int32_t, int64_t>(task[5] ? 8 : 4, int64_t{0}, [&](auto index) {
        return swap_range(reinterpret_cast<T*>(task[0]), task[6],
                          reinterpret_cast<const typename decltype(index)::type*>(task[1]),
                          reinterpret_cast<T*>(task[2]), begin, end);
      });
    });
  }
  return skipped;
}
