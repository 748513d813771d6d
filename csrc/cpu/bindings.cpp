// Adapts the CPU kernels (kernels.h) to tensors. Arguments were validated by the Python entry
// points; these checks only guard the raw-pointer contract.
#include <torch/extension.h>

#include "kernels.h"

namespace {

void check_table(const torch::Tensor& t, int64_t cols, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kInt64 && t.is_contiguous() &&
                  t.dim() == 2 && t.size(1) == cols,
              name, " must be a contiguous CPU int64 tensor of shape [N, ", cols, "]");
}

void scatter_swap(const torch::Tensor& tasks, const torch::Tensor& blocks, int64_t block) {
  check_table(tasks, 6, "tasks");
  check_table(blocks, 2, "blocks");
  TORCH_CHECK(block > 0, "block must be positive");
  shira_scatter_swap_cpu(tasks.data_ptr<int64_t>(), blocks.data_ptr<int64_t>(), blocks.size(0),
                         block);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scatter_swap", &scatter_swap, "batched scatter-swap over a task table (CPU)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
