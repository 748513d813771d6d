// CPU kernels of shira_kernels: plain C++ over raw pointers, no torch headers, so that each
// kernel can be read, tested and vectorised on its own. bindings.cpp adapts them to tensors.
#pragma once
#include <cstdint>

// Batched scatter-swap. tasks: int64 [T, 6] rows (weight_addr, index_addr, value_addr, n,
// elem_size 2|4, index_is_int64 0|1); blocks: int64 [B, 2] rows (task, start), each covering
// entries [start, min(start + block, n)) of one task. For each entry j of a task:
// swap weight[index[j]] with value[j]. One parallel region over all blocks of all tasks.
void shira_scatter_swap_cpu(const int64_t* tasks, const int64_t* blocks, int64_t num_blocks,
                            int64_t block);
