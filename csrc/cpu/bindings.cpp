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

// Activations as fp32 [features, tokens] in one pass (transpose and cast together).
torch::Tensor transposed_float(const torch::Tensor& x) {
  return torch::empty({x.size(1), x.size(0)}, x.options().dtype(torch::kFloat)).copy_(x.t());
}

void check_sparse(const torch::Tensor& offsets, const torch::Tensor& cols,
                  const torch::Tensor& values) {
  TORCH_CHECK(offsets.scalar_type() == torch::kInt64 && offsets.is_contiguous(),
              "row offsets must be contiguous int64");
  TORCH_CHECK(cols.scalar_type() == torch::kInt16 || cols.scalar_type() == torch::kInt32,
              "column indices must be int16 or int32");
  TORCH_CHECK(cols.is_contiguous() && values.numel() == cols.numel(),
              "column indices and values must be contiguous and of one length");
}

// y_in + scale * x @ S^T, S [rows, x.size(1)] in CSR; the result has y_in's dtype.
torch::Tensor spmm(const torch::Tensor& y_in, const torch::Tensor& x,
                   const torch::Tensor& offsets, const torch::Tensor& cols,
                   const torch::Tensor& values, double scale) {
  check_sparse(offsets, cols, values);
  const int64_t tokens = x.size(0), rows = offsets.size(0) - 1;
  TORCH_CHECK(x.dim() == 2 && y_in.dim() == 2 && y_in.size(0) == tokens && y_in.size(1) == rows,
              "spmm: x [T, in] and y [T, out] expected");
  if (tokens == 0) return y_in.clone();
  const torch::Tensor xT = transposed_float(x);
  const torch::Tensor vals = values.to(torch::kFloat).contiguous();
  torch::Tensor accT = torch::empty({rows, tokens}, xT.options());
  if (cols.scalar_type() == torch::kInt16) {
    shira_spmm_cpu(xT.data_ptr<float>(), tokens, offsets.data_ptr<int64_t>(),
                   cols.data_ptr<int16_t>(), vals.data_ptr<float>(), rows, accT.data_ptr<float>());
  } else {
    shira_spmm_cpu(xT.data_ptr<float>(), tokens, offsets.data_ptr<int64_t>(),
                   cols.data_ptr<int32_t>(), vals.data_ptr<float>(), rows, accT.data_ptr<float>());
  }
  return torch::add(y_in, accT.t(), scale).to(y_in.scalar_type());
}

// g[j] = sum_t gy[t, rows[j]] * x[t, cols[j]], fp32 [nnz].
torch::Tensor sddmm(const torch::Tensor& gy, const torch::Tensor& x, const torch::Tensor& rows,
                    const torch::Tensor& cols) {
  TORCH_CHECK(rows.scalar_type() == torch::kInt32 && rows.is_contiguous(), "rows must be int32");
  TORCH_CHECK((cols.scalar_type() == torch::kInt16 || cols.scalar_type() == torch::kInt32) &&
                  cols.is_contiguous() && cols.numel() == rows.numel(),
              "cols must be int16/int32 and as long as rows");
  TORCH_CHECK(gy.dim() == 2 && x.dim() == 2 && gy.size(0) == x.size(0), "sddmm: gy [T, out] and x [T, in]");
  torch::Tensor g = torch::zeros({rows.numel()}, gy.options().dtype(torch::kFloat));
  const int64_t tokens = x.size(0);
  if (tokens == 0 || rows.numel() == 0) return g;
  const torch::Tensor gyT = transposed_float(gy), xT = transposed_float(x);
  if (cols.scalar_type() == torch::kInt16) {
    shira_sddmm_cpu(gyT.data_ptr<float>(), xT.data_ptr<float>(), tokens, rows.data_ptr<int32_t>(),
                    cols.data_ptr<int16_t>(), rows.numel(), g.data_ptr<float>());
  } else {
    shira_sddmm_cpu(gyT.data_ptr<float>(), xT.data_ptr<float>(), tokens, rows.data_ptr<int32_t>(),
                    cols.data_ptr<int32_t>(), rows.numel(), g.data_ptr<float>());
  }
  return g;
}

// out[idx] = weight[idx] + scale * values (fp32 arithmetic, rounded once); other entries of
// out are left as they are (the caller copied the weight there).
void scatter_add(torch::Tensor& out, const torch::Tensor& weight, const torch::Tensor& idx,
                 const torch::Tensor& values, double scale) {
  TORCH_CHECK(out.is_contiguous() && weight.is_contiguous() && values.is_contiguous() &&
                  idx.is_contiguous(), "scatter_add: contiguous tensors expected");
  TORCH_CHECK(out.scalar_type() == weight.scalar_type() && values.scalar_type() == weight.scalar_type(),
              "scatter_add: out, weight and values must share a dtype");
  const auto st = weight.scalar_type();
  const int dtype = st == torch::kFloat ? 0 : st == torch::kHalf ? 1 : 2;
  TORCH_CHECK(st == torch::kFloat || st == torch::kHalf || st == torch::kBFloat16,
              "scatter_add: float32, float16 or bfloat16 expected");
  if (idx.scalar_type() == torch::kInt64) {
    shira_scatter_add_cpu(dtype, weight.data_ptr(), out.data_ptr(), idx.data_ptr<int64_t>(),
                          values.data_ptr(), static_cast<float>(scale), idx.numel());
  } else {
    shira_scatter_add_cpu(dtype, weight.data_ptr(), out.data_ptr(), idx.data_ptr<int32_t>(),
                          values.data_ptr(), static_cast<float>(scale), idx.numel());
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scatter_swap", &scatter_swap, "batched scatter-swap over a task table (CPU)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("spmm", &spmm, "y + scale * x @ S^T with S in CSR (CPU)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("sddmm", &sddmm, "gradient of S's values: sum over tokens of gy[:, row] * x[:, col]",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("scatter_add", &scatter_add, "out[idx] = weight[idx] + scale * values",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
