// The single pybind11 binding file for shira_kernels' CUDA ops.
//
// Only this file includes torch headers; the kernels in *.cu are plain CUDA
// and are reached through the launchers declared in kernels.h. To add an op:
// write its launcher in a .cu file, declare it in kernels.h, add one function
// below, and one m.def line in PYBIND11_MODULE.

#include <torch/extension.h>

// c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h: the latter pulls
// in cuSPARSE/cuBLAS/cuSOLVER headers that minimal CUDA toolkits lack, and
// at::cuda::getCurrentCUDAStream is this same c10 function anyway.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "kernels.h"

namespace {

// Validates an int64 "table" tensor of shape [rows, cols] built by the Python
// side (its raw data pointer is handed straight to a kernel).
void check_int64_table(const torch::Tensor& t, const char* name, int64_t cols) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == torch::kInt64, name, " must be int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(1) == cols, name, " must have shape [N, ", cols,
              "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " failed: ", cudaGetErrorString(err));
}

// scatter_swap(tasks [T,6] int64, blocks [B,2] int64, block) -> None
// For every (task_id, start) row of blocks, swaps weight[index[j]] with
// value[j] for j in [start, min(start + block, n)) of that task. The tensors
// addressed by tasks must live on tasks' device.
void scatter_swap(const torch::Tensor& tasks, const torch::Tensor& blocks, int64_t block) {
  check_int64_table(tasks, "tasks", 6);
  check_int64_table(blocks, "blocks", 2);
  TORCH_CHECK(blocks.device() == tasks.device(),
              "tasks and blocks must be on the same device, got ", tasks.device(),
              " and ", blocks.device());
  TORCH_CHECK(block > 0, "block must be positive, got ", block);

  const int64_t num_blocks = blocks.size(0);
  if (num_blocks == 0) return;
  TORCH_CHECK(tasks.size(0) > 0, "tasks is empty but blocks has ", num_blocks, " rows");

  // Launch on tasks' device and that device's current stream, so the op is
  // ordered with the surrounding torch work.
  const c10::cuda::CUDAGuard device_guard(tasks.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(tasks.device().index()).stream();

  check_cuda(shira_launch_scatter_swap(tasks.data_ptr<int64_t>(), blocks.data_ptr<int64_t>(),
                                       num_blocks, block, stream),
             "scatter_swap");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "shira_kernels CUDA ops";
  m.def("scatter_swap", &scatter_swap,
        "In-place batched swap weight[index[j]] <-> value[j] described by int64 "
        "task/block tables",
        py::arg("tasks"), py::arg("blocks"), py::arg("block"));
}
