#include "kernels.h"

#include <algorithm>

namespace {

// How far ahead to prefetch the weight entry: indices are sorted but sparse (a 1-2% SHiRA
// mask touches a new cache line almost every entry), so the hardware prefetcher cannot guess.
constexpr int64_t kPrefetchDistance = 16;

// Swap raw bit patterns (T = uint16_t or uint32_t): exact for every float dtype.
template <typename T, typename I>
void swap_range(T* weight, const I* index, T* value, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j) {
    if (j + kPrefetchDistance < end) __builtin_prefetch(weight + index[j + kPrefetchDistance], 1);
    const int64_t k = static_cast<int64_t>(index[j]);
    const T old = weight[k];
    weight[k] = value[j];
    value[j] = old;
  }
}

template <typename T>
void swap_range_any_index(const int64_t* task, int64_t begin, int64_t end) {
  T* weight = reinterpret_cast<T*>(task[0]);
  T* value = reinterpret_cast<T*>(task[2]);
  if (task[5]) {
    swap_range(weight, reinterpret_cast<const int64_t*>(task[1]), value, begin, end);
  } else {
    swap_range(weight, reinterpret_cast<const int32_t*>(task[1]), value, begin, end);
  }
}

}  // namespace

void shira_scatter_swap_cpu(const int64_t* tasks, const int64_t* blocks, int64_t num_blocks,
                            int64_t block) {
  // Every block holds `block` entries (a task's last one fewer), so a static schedule over the
  // blocks of all tasks balances the threads however unequal the tasks are.
#pragma omp parallel for schedule(static) if (num_blocks > 1)
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t* task = tasks + 6 * blocks[2 * b];
    const int64_t begin = blocks[2 * b + 1];
    const int64_t end = std::min(begin + block, task[3]);
    if (task[4] == 2) {
      swap_range_any_index<uint16_t>(task, begin, end);
    } else {
      swap_range_any_index<uint32_t>(task, begin, end);
    }
  }
}
