// The single pybind11 binding file for shira_kernels' CUDA ops.
//
// Only this file includes torch headers; the kernels in *.cu are plain CUDA
// and are reached through the launchers declared in kernels.h. To add an op:
// write its launcher in a .cu file, declare it in kernels.h, add one function
// below, and one m.def line in PYBIND11_MODULE. The ops shared with the CPU
// extension take the same arguments, by the same names, as its bindings.

#include <torch/extension.h>

// c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h: the latter pulls
// in cuSPARSE/cuBLAS/cuSOLVER headers that minimal CUDA toolkits lack, and
// at::cuda::getCurrentCUDAStream is this same c10 function anyway.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#include "../torch_dtype.h"
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

// The current stream of `device` (whose guard the caller holds), so that a
// launch is ordered with the surrounding torch work.
cudaStream_t current_stream(const torch::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

// launch(skipped, stream) for the launchers that count the entries they skip
// (an index outside its weight): skipped is a zeroed counter on `device`, the
// current device, and the count is returned (a device sync).
template <typename Launch>
int64_t launch_counting_skipped(const torch::Device& device, const char* op, Launch&& launch) {
  const torch::Tensor skipped =
      torch::zeros({1}, torch::TensorOptions().dtype(torch::kInt64).device(device));
  check_cuda(launch(reinterpret_cast<unsigned long long*>(skipped.data_ptr<int64_t>()),
                    current_stream(device)),
             op);
  return skipped.item<int64_t>();
}

// scatter_swap(tasks [T,7] int64, blocks [B,2] int64, block) -> int
// For every (task_id, start) row of blocks, swaps weight[index[j]] with
// value[j] for j in [start, min(start + block, n)) of that task. The tensors
// addressed by tasks must live on tasks' device. Entries whose index is
// outside the weight are skipped (never touched) and their count returned,
// as the CPU binding does (a device sync: switching is a state change).
int64_t scatter_swap(const torch::Tensor& tasks, const torch::Tensor& blocks, int64_t block) {
  check_int64_table(tasks, "tasks", 7);
  check_int64_table(blocks, "blocks", 2);
  TORCH_CHECK(blocks.device() == tasks.device(),
              "tasks and blocks must be on the same device, got ", tasks.device(),
              " and ", blocks.device());
  TORCH_CHECK(block > 0, "block must be positive, got ", block);

  const int64_t num_blocks = blocks.size(0);
  if (num_blocks == 0) return 0;
  TORCH_CHECK(tasks.size(0) > 0, "tasks is empty but blocks has ", num_blocks, " rows");

  // Launch on tasks' device.
  const c10::cuda::CUDAGuard device_guard(tasks.device());
  return launch_counting_skipped(tasks.device(), "scatter_swap",
                                 [&](unsigned long long* skipped, cudaStream_t stream) {
    return shira::cuda::scatter_swap(tasks.data_ptr<int64_t>(), blocks.data_ptr<int64_t>(),
                                     num_blocks, block, skipped, stream);
  });
}

// --- SHiRA sparse-delta ops ------------------------------------------------

// A CUDA, contiguous tensor on `device`.
void check_placed(const torch::Tensor& t, const std::string& name, const torch::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// A CUDA, contiguous tensor of the given rank on `device`.
void check_operand(const torch::Tensor& t, const std::string& name, int64_t dim,
                   const torch::Device& device) {
  check_placed(t, name, device);
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

struct Operand {
  const torch::Tensor& tensor;
  const char* name;
  int64_t dim;
};

// check_operand for each of an op's tensor arguments, in order.
void check_operands(const torch::Device& device, std::initializer_list<Operand> operands) {
  for (const Operand& o : operands) check_operand(o.tensor, o.name, o.dim, device);
}

void check_same_dtype(const torch::Tensor& t, const char* name, const torch::Tensor& ref,
                      const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
}

// The dtype of an spmm's operands: x's, which y and the values must share.
shira::DType spmm_dtype(const torch::Tensor& y, const torch::Tensor& x,
                        const torch::Tensor& values) {
  check_same_dtype(y, "y", x, "x");
  check_same_dtype(values, "values", x, "x");
  return dtype_of(x, "x");
}

// Byte width of an int16 / int32 column-index tensor.
int col_index_size(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kInt16 || t.scalar_type() == torch::kInt32, name,
              " must be int16 or int32, got ", t.scalar_type());
  return static_cast<int>(t.element_size());
}

// spmm(y [T,out], x [T,in], offsets int64 [out+1], cols int16/int32 [nnz],
//      values [nnz], scale, overwrite_y) -> [T,out]
// result[t, r] = y[t, r] + scale * sum_{j in row r} values[j] * x[t, cols[j]],
// for S's CSR row offsets and column indices. With overwrite_y (the caller no
// longer needs y) the result is y itself: the launcher allows y_in == y_out.
// With the CSC structure of S (the CSR of S^T) it computes gx = gy * S. Not
// checked (it would need a device sync): offsets is non-decreasing with
// offsets[0] == 0, offsets[out] == nnz, and cols are in [0, in).
torch::Tensor spmm(const torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& offsets,
                   const torch::Tensor& cols, const torch::Tensor& values, double scale,
                   bool overwrite_y) {
  const torch::Device device = x.device();
  check_operands(device, {{x, "x", 2}, {y, "y", 2}, {offsets, "offsets", 1}, {cols, "cols", 1},
                          {values, "values", 1}});
  const shira::DType dtype = spmm_dtype(y, x, values);
  TORCH_CHECK(offsets.scalar_type() == torch::kInt64, "offsets must be int64, got ",
              offsets.scalar_type());
  const int col_size = col_index_size(cols, "cols");
  TORCH_CHECK(offsets.size(0) >= 1, "offsets must have at least one entry");

  const int64_t num_tokens = x.size(0);
  const int64_t in_features = x.size(1);
  const int64_t out_features = offsets.size(0) - 1;
  const int64_t nnz = values.size(0);
  TORCH_CHECK(y.size(0) == num_tokens && y.size(1) == out_features, "y must have shape [",
              num_tokens, ", ", out_features, "] (x is ", x.sizes(), ", offsets has ",
              offsets.size(0), " entries), got ", y.sizes());
  TORCH_CHECK(cols.size(0) == nnz, "cols and values must have the same length, got ",
              cols.size(0), " and ", nnz);

  const c10::cuda::CUDAGuard device_guard(device);
  torch::Tensor y_out = overwrite_y ? y : torch::empty_like(y);
  if (y_out.numel() == 0) return y_out;
  check_cuda(shira::cuda::spmm(y.data_ptr(), y_out.data_ptr(), x.data_ptr(),
                               offsets.data_ptr<int64_t>(), cols.data_ptr(), col_size,
                               values.data_ptr(), dtype, num_tokens, out_features, in_features,
                               nnz, static_cast<float>(scale), current_stream(device)),
             "spmm");
  return y_out;
}

// sddmm(gy [T,out], x [T,in], rows int32 [nnz], cols int16/int32 [nnz], offsets)
//   -> fp32 [nnz]
// g[j] = sum_t gy[t, rows[j]] * x[t, cols[j]]. Not checked: rows in [0, out),
// cols in [0, in). offsets (S's CSR row offsets, or None) is a hint for
// kernels that walk S by rows, as the CPU one does; this kernel works per
// entry and does not read it.
torch::Tensor sddmm(const torch::Tensor& gy, const torch::Tensor& x, const torch::Tensor& rows,
                    const torch::Tensor& cols, const c10::optional<torch::Tensor>& /*offsets*/) {
  const torch::Device device = x.device();
  check_operands(device, {{gy, "gy", 2}, {x, "x", 2}, {rows, "rows", 1}, {cols, "cols", 1}});
  const shira::DType dtype = dtype_of(x, "x");
  check_same_dtype(gy, "gy", x, "x");
  TORCH_CHECK(rows.scalar_type() == torch::kInt32, "rows must be int32, got ", rows.scalar_type());
  const int col_size = col_index_size(cols, "cols");
  TORCH_CHECK(gy.size(0) == x.size(0), "gy and x must have the same number of rows (tokens), got ",
              gy.sizes(), " and ", x.sizes());
  const int64_t nnz = rows.size(0);
  TORCH_CHECK(cols.size(0) == nnz, "rows and cols must have the same length, got ", nnz, " and ",
              cols.size(0));

  const c10::cuda::CUDAGuard device_guard(device);
  torch::Tensor g = torch::empty({nnz}, x.options().dtype(torch::kFloat32));
  if (nnz == 0) return g;
  check_cuda(shira::cuda::sddmm(gy.data_ptr(), x.data_ptr(), rows.data_ptr<int32_t>(),
                                cols.data_ptr(), col_size, g.data_ptr<float>(), dtype, x.size(0),
                                gy.size(1), x.size(1), nnz, current_stream(device)),
             "sddmm");
  return g;
}

// int64 1-D tensors of one call's launch tables (shira_kernels/_group_tables.py).
void check_int64_vectors(const torch::Device& device, std::initializer_list<Operand> operands) {
  check_operands(device, operands);
  for (const Operand& o : operands)
    TORCH_CHECK(o.tensor.scalar_type() == torch::kInt64, o.name, " must be int64, got ",
                o.tensor.scalar_type());
}

// grouped_spmm(y [T,out], x [T,in], order, tile_group, tile_start, group_end,
//              group_offsets, group_entries, offsets int64, cols int16/int32 [nnz],
//              values [nnz], scales fp32 [groups], tile_rows, avg_row_nnz) -> y, in place
// For each group g: y[t, r] += scales[g] * sum_{j in row r of S_g} values[j] *
// x[t, cols[j]] over the group's rows t, S_g's row offsets at
// offsets[group_offsets[g] ..] counted from group_entries[g] (see kernels.h).
// Not checked (a device sync): the tables' entries, which
// shira_kernels/_group_tables.py builds.
torch::Tensor grouped_spmm(const torch::Tensor& y, const torch::Tensor& x,
                           const torch::Tensor& order, const torch::Tensor& tile_group,
                           const torch::Tensor& tile_start, const torch::Tensor& group_end,
                           const torch::Tensor& group_offsets,
                           const torch::Tensor& group_entries, const torch::Tensor& offsets,
                           const torch::Tensor& cols, const torch::Tensor& values,
                           const torch::Tensor& scales, int64_t tile_rows,
                           int64_t avg_row_nnz) {
  const torch::Device device = x.device();
  check_operands(device, {{x, "x", 2}, {y, "y", 2}, {cols, "cols", 1}, {values, "values", 1},
                          {scales, "scales", 1}});
  check_int64_vectors(device, {{order, "order", 1}, {tile_group, "tile_group", 1},
                               {tile_start, "tile_start", 1}, {group_end, "group_end", 1},
                               {group_offsets, "group_offsets", 1},
                               {group_entries, "group_entries", 1}, {offsets, "offsets", 1}});
  const shira::DType dtype = spmm_dtype(y, x, values);
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32, "scales must be float32, got ",
              scales.scalar_type());
  const int col_size = col_index_size(cols, "cols");
  const int64_t groups = group_end.size(0);
  const int64_t out_features = y.size(1);
  TORCH_CHECK(y.size(0) == x.size(0), "y and x must have the same rows, got ", y.sizes(),
              " and ", x.sizes());
  TORCH_CHECK(scales.size(0) == groups && group_offsets.size(0) == groups &&
                  group_entries.size(0) == groups,
              "scales, group_offsets and group_entries must have one entry per group (", groups,
              "), got ", scales.size(0), ", ", group_offsets.size(0), " and ",
              group_entries.size(0));
  TORCH_CHECK(tile_start.size(0) == tile_group.size(0),
              "tile_group and tile_start must have the same length");
  TORCH_CHECK(cols.size(0) == values.size(0), "cols and values must have the same length");
  const c10::cuda::CUDAGuard device_guard(device);
  if (groups == 0 || out_features == 0) return y;
  check_cuda(shira::cuda::grouped_spmm(y.data_ptr(), x.data_ptr(), order.data_ptr<int64_t>(),
                                       tile_group.data_ptr<int64_t>(),
                                       tile_start.data_ptr<int64_t>(),
                                       group_end.data_ptr<int64_t>(),
                                       group_offsets.data_ptr<int64_t>(),
                                       group_entries.data_ptr<int64_t>(),
                                       offsets.data_ptr<int64_t>(), cols.data_ptr(), col_size,
                                       values.data_ptr(), scales.data_ptr<float>(), dtype,
                                       tile_group.size(0), tile_rows, out_features, x.size(1),
                                       avg_row_nnz, current_stream(device)),
             "grouped_spmm");
  return y;
}

// grouped_sddmm(gy [T,out], x [T,in], order, tile_group, tile_start, entry_end,
//               group_rows int64 [2*groups], scales fp32 [groups], rows int32 [nnz],
//               cols int16/int32 [nnz], tile_entries) -> fp32 [nnz]
// For the entries j of each group g: out[j] = scales[g] * (sum over the group's rows t
// of gy[t, rows[j]] * x[t, cols[j]]); 0 at the entries of no group (see kernels.h).
// Not checked: the tables' entries.
torch::Tensor grouped_sddmm(const torch::Tensor& gy, const torch::Tensor& x,
                            const torch::Tensor& order, const torch::Tensor& tile_group,
                            const torch::Tensor& tile_start, const torch::Tensor& entry_end,
                            const torch::Tensor& group_rows, const torch::Tensor& scales,
                            const torch::Tensor& rows, const torch::Tensor& cols,
                            int64_t tile_entries) {
  const torch::Device device = x.device();
  check_operands(device, {{gy, "gy", 2}, {x, "x", 2}, {scales, "scales", 1}, {rows, "rows", 1},
                          {cols, "cols", 1}});
  check_int64_vectors(device, {{order, "order", 1}, {tile_group, "tile_group", 1},
                               {tile_start, "tile_start", 1}, {entry_end, "entry_end", 1},
                               {group_rows, "group_rows", 1}});
  const shira::DType dtype = dtype_of(x, "x");
  check_same_dtype(gy, "gy", x, "x");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32, "scales must be float32, got ",
              scales.scalar_type());
  TORCH_CHECK(rows.scalar_type() == torch::kInt32, "rows must be int32, got ", rows.scalar_type());
  const int col_size = col_index_size(cols, "cols");
  TORCH_CHECK(gy.size(0) == x.size(0), "gy and x must have the same rows, got ", gy.sizes(),
              " and ", x.sizes());
  TORCH_CHECK(rows.size(0) == cols.size(0), "rows and cols must have the same length");
  TORCH_CHECK(group_rows.size(0) == 2 * entry_end.size(0) &&
                  scales.size(0) == entry_end.size(0),
              "group_rows must hold two entries per group, scales one");
  TORCH_CHECK(tile_start.size(0) == tile_group.size(0),
              "tile_group and tile_start must have the same length");
  const c10::cuda::CUDAGuard device_guard(device);
  torch::Tensor g = torch::zeros({rows.size(0)}, x.options().dtype(torch::kFloat32));
  if (rows.size(0) == 0) return g;
  check_cuda(shira::cuda::grouped_sddmm(gy.data_ptr(), x.data_ptr(), order.data_ptr<int64_t>(),
                                        tile_group.data_ptr<int64_t>(),
                                        tile_start.data_ptr<int64_t>(),
                                        entry_end.data_ptr<int64_t>(),
                                        group_rows.data_ptr<int64_t>(),
                                        scales.data_ptr<float>(), rows.data_ptr<int32_t>(),
                                        cols.data_ptr(), col_size, g.data_ptr<float>(), dtype,
                                        tile_group.size(0), tile_entries, gy.size(1), x.size(1),
                                        current_stream(device)),
             "grouped_sddmm");
  return g;
}

// add_at_indices(out, weight, flat_indices int32/int64 [nnz], values [nnz], scale,
//                saved [nnz] or None) -> int
// out.view(-1)[k] = weight.view(-1)[k] + scale * values[j] for k = flat_indices[j]
// (out and weight: same dtype and numel, any contiguous shape)
// (fp32 math, one rounding); other entries of out are left as they are.
// saved, if given, first receives weight.view(-1)[k] (gathered with torch ops
// on the stream before the launch, so out may be weight: an in-place add that
// can be swapped back). An index outside [0, weight.numel()) is skipped (never
// read or written by the kernel) and the count of those returned (a device
// sync). Not checked: flat_indices are unique.
int64_t add_at_indices(const torch::Tensor& out, const torch::Tensor& weight,
                       const torch::Tensor& flat_indices, const torch::Tensor& values,
                       double scale, const c10::optional<torch::Tensor>& saved) {
  const torch::Device device = weight.device();
  check_operands(device, {{out, "out", out.dim()}, {weight, "weight", weight.dim()},
                          {flat_indices, "flat_indices", 1}, {values, "values", 1}});
  const shira::DType dtype = dtype_of(weight, "weight");
  check_same_dtype(out, "out", weight, "weight");
  check_same_dtype(values, "values", weight, "weight");
  // Both are contiguous, so equal numel means the same flat layout.
  TORCH_CHECK(out.numel() == weight.numel(), "out and weight must have the same numel, got ",
              out.sizes(), " and ", weight.sizes());
  TORCH_CHECK(flat_indices.scalar_type() == torch::kInt32 ||
                  flat_indices.scalar_type() == torch::kInt64,
              "flat_indices must be int32 or int64, got ", flat_indices.scalar_type());
  const int64_t nnz = flat_indices.size(0);
  TORCH_CHECK(values.size(0) == nnz, "flat_indices and values must have the same length, got ",
              nnz, " and ", values.size(0));
  if (saved.has_value() && saved->defined()) {
    check_operand(*saved, "saved", 1, device);
    check_same_dtype(*saved, "saved", weight, "weight");
    TORCH_CHECK(saved->size(0) == nnz, "saved must have one entry per index, got ",
                saved->size(0), " for ", nnz);
  }
  if (nnz == 0) return 0;

  const c10::cuda::CUDAGuard device_guard(device);
  if (saved.has_value() && saved->defined() && weight.numel() > 0) {
    // Clamped: an index outside the weight is skipped by the kernel and reported; its
    // saved entry is never used.
    saved->copy_(weight.reshape({-1}).index_select(
        0, flat_indices.to(torch::kInt64).clamp(0, weight.numel() - 1)));
  }
  return launch_counting_skipped(device, "add_at_indices",
                                 [&](unsigned long long* skipped, cudaStream_t stream) {
    return shira::cuda::add_at_indices(out.data_ptr(), weight.data_ptr(), weight.numel(),
                                       flat_indices.data_ptr(),
                                       static_cast<int>(flat_indices.element_size()),
                                       values.data_ptr(), dtype, nnz, static_cast<float>(scale),
                                       skipped, stream);
  });
}

// --- 1-bit (binary) weight ops ----------------------------------------------

// alpha / mu of a binary weight with `rows` rows: fp32, contiguous, numel 1
// (per tensor) or rows (per row). Returns whether per row.
bool check_binary_scale(const torch::Tensor& t, const std::string& name, int64_t rows,
                        const torch::Device& device) {
  check_placed(t, name, device);
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.numel() == 1 || t.numel() == rows, name, " must have 1 or ", rows,
              " elements (per tensor or per row), got shape ", t.sizes());
  return t.numel() == rows && rows != 1;
}

// Packed signs of a binary weight: int32, contiguous [rows, ceil(cols / 32)].
void check_binary_packed(const torch::Tensor& t, const std::string& name, int64_t cols,
                         const torch::Device& device) {
  check_operand(t, name, 2, device);
  TORCH_CHECK(t.scalar_type() == torch::kInt32, name, " must be int32, got ", t.scalar_type());
  const int64_t words = (cols + 31) / 32;
  TORCH_CHECK(t.size(1) == words, name, " must have ceil(", cols, " / 32) = ", words,
              " words per row, got shape ", t.sizes());
}

// The binary weight [packed.size(0), cols] of arguments <prefix>packed,
// <prefix>alpha and <prefix>mu, checked, as the launchers take it.
shira::cuda::BinaryWeight binary_weight(const std::string& prefix, const torch::Tensor& packed,
                                        const torch::Tensor& alpha, const torch::Tensor& mu,
                                        int64_t cols, const torch::Device& device) {
  check_binary_packed(packed, prefix + "packed", cols, device);
  const int64_t rows = packed.size(0);
  const bool alpha_per_row = check_binary_scale(alpha, prefix + "alpha", rows, device);
  const bool mu_per_row = check_binary_scale(mu, prefix + "mu", rows, device);
  return {packed.data_ptr<int32_t>(), alpha.data_ptr<float>(), alpha_per_row,
          mu.data_ptr<float>(), mu_per_row};
}

// binary_linear(x [T,in], packed int32 [out, ceil(in/32)], alpha, mu, bias?, in_features)
//   -> y [T,out] of x's dtype
// y[t, o] = alpha_o * sum_i x[t, i] s[o, i] + mu_o * sum_i x[t, i] + bias[o], with s[o, i] = +1
// where bit (i % 32) of packed[o, i / 32] is set and -1 otherwise.
// alpha / mu: fp32 with 1 or out elements; bias: [out] of x's dtype, or None.
torch::Tensor binary_linear(const torch::Tensor& x, const torch::Tensor& packed,
                            const torch::Tensor& alpha, const torch::Tensor& mu,
                            const c10::optional<torch::Tensor>& bias, int64_t in_features) {
  const torch::Device device = x.device();
  check_operand(x, "x", 2, device);
  const shira::DType dtype = dtype_of(x, "x");
  TORCH_CHECK(in_features >= 0, "in_features must be non-negative, got ", in_features);
  TORCH_CHECK(x.size(1) == in_features, "x must have shape [T, ", in_features, "], got ",
              x.sizes());
  const shira::cuda::BinaryWeight w = binary_weight("", packed, alpha, mu, in_features, device);
  const int64_t out_features = packed.size(0);
  const void* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    const torch::Tensor& b = *bias;
    check_operand(b, "bias", 1, device);
    check_same_dtype(b, "bias", x, "x");
    TORCH_CHECK(b.size(0) == out_features, "bias must have shape [", out_features, "], got ",
                b.sizes());
    bias_ptr = b.data_ptr();
  }

  const int64_t num_tokens = x.size(0);
  const c10::cuda::CUDAGuard device_guard(device);
  torch::Tensor y = torch::empty({num_tokens, out_features}, x.options());
  if (y.numel() == 0) return y;
  check_cuda(shira::cuda::binary_linear(x.data_ptr(), w, bias_ptr, y.data_ptr(), dtype,
                                        num_tokens, in_features, out_features,
                                        current_stream(device)),
             "binary_linear");
  return y;
}

// binary_lora(x [T,in], down_packed int32 [r, ceil(in/32)], down_alpha, down_mu,
//             up_packed int32 [out, ceil(r/32)], up_alpha, up_mu, scale, relu) -> y [T,out]
// y = scale * up(act(down(x))) with both factors binary (alpha / mu: fp32 with
// 1 element or one per row of that factor), act = ReLU if relu else identity,
// 1 <= r <= 64. The hidden activations stay on chip in fp32.
torch::Tensor binary_lora(const torch::Tensor& x, const torch::Tensor& down_packed,
                          const torch::Tensor& down_alpha, const torch::Tensor& down_mu,
                          const torch::Tensor& up_packed, const torch::Tensor& up_alpha,
                          const torch::Tensor& up_mu, double scale, bool relu) {
  const torch::Device device = x.device();
  check_operand(x, "x", 2, device);
  const shira::DType dtype = dtype_of(x, "x");
  const int64_t in_features = x.size(1);
  const shira::cuda::BinaryWeight down =
      binary_weight("down_", down_packed, down_alpha, down_mu, in_features, device);
  const int64_t rank = down_packed.size(0);
  TORCH_CHECK(rank >= 1 && rank <= 64,
              "binary_lora supports ranks 1..64 (down_packed.size(0)), got rank ", rank);
  const shira::cuda::BinaryWeight up =
      binary_weight("up_", up_packed, up_alpha, up_mu, rank, device);
  const int64_t out_features = up_packed.size(0);

  const int64_t num_tokens = x.size(0);
  const c10::cuda::CUDAGuard device_guard(device);
  torch::Tensor y = torch::empty({num_tokens, out_features}, x.options());
  if (y.numel() == 0) return y;
  check_cuda(shira::cuda::binary_lora(x.data_ptr(), down, up, static_cast<float>(scale), relu,
                                      y.data_ptr(), dtype, num_tokens, in_features, rank,
                                      out_features, current_stream(device)),
             "binary_lora");
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "shira_kernels CUDA ops";
  m.def("scatter_swap", &scatter_swap,
        "In-place batched swap weight[index[j]] <-> value[j] described by int64 "
        "task/block tables; returns the count of entries skipped for an index outside "
        "their weight",
        py::arg("tasks"), py::arg("blocks"), py::arg("block"));
  m.def("spmm", &spmm,
        "y + scale * x @ S^T for a CSR S (offsets, cols, values); "
        "a new tensor, or y itself with overwrite_y",
        py::arg("y"), py::arg("x"), py::arg("offsets"), py::arg("cols"), py::arg("values"),
        py::arg("scale"), py::arg("overwrite_y") = false);
  m.def("sddmm", &sddmm,
        "fp32 g[j] = sum_t gy[t, rows[j]] * x[t, cols[j]] on a COO sparsity pattern",
        py::arg("gy"), py::arg("x"), py::arg("rows"), py::arg("cols"),
        py::arg("offsets") = py::none());
  m.def("grouped_spmm", &grouped_spmm,
        "in place, for each group of a multi-adapter batch: y[rows] += scale * x[rows] @ S^T "
        "(one launch; the tables of shira_kernels/_group_tables.py)",
        py::arg("y"), py::arg("x"), py::arg("order"), py::arg("tile_group"),
        py::arg("tile_start"), py::arg("group_end"), py::arg("group_offsets"),
        py::arg("group_entries"), py::arg("offsets"), py::arg("cols"), py::arg("values"),
        py::arg("scales"), py::arg("tile_rows"), py::arg("avg_row_nnz"));
  m.def("grouped_sddmm", &grouped_sddmm,
        "fp32 per-group sddmm over each group's rows of a multi-adapter batch, times the "
        "group's scale, at the groups' entries (one launch)",
        py::arg("gy"), py::arg("x"), py::arg("order"), py::arg("tile_group"),
        py::arg("tile_start"), py::arg("entry_end"), py::arg("group_rows"), py::arg("scales"),
        py::arg("rows"), py::arg("cols"), py::arg("tile_entries"));
  m.def("add_at_indices", &add_at_indices,
        "out.view(-1)[flat_indices] = weight.view(-1)[flat_indices] + scale * values, in place "
        "(saved, if given, gets the weight's entries first); returns the count of indices "
        "outside the weight (skipped)",
        py::arg("out"), py::arg("weight"), py::arg("flat_indices"), py::arg("values"),
        py::arg("scale"), py::arg("saved") = py::none());
  m.def("binary_linear", &binary_linear,
        "y = alpha * (x @ S^T) + mu * x.sum(-1, keepdim=True) (+ bias) for packed 1-bit signs S "
        "[out, ceil(in/32)] int32; alpha / mu fp32 per tensor or per row",
        py::arg("x"), py::arg("packed"), py::arg("alpha"), py::arg("mu"), py::arg("bias"),
        py::arg("in_features"));
  m.def("binary_lora", &binary_lora,
        "y = scale * up(act(down(x))) with 1-bit down [r, in] and up [out, r] (r <= 64), "
        "act = ReLU if relu else identity",
        py::arg("x"), py::arg("down_packed"), py::arg("down_alpha"), py::arg("down_mu"),
        py::arg("up_packed"), py::arg("up_alpha"), py::arg("up_mu"), py::arg("scale"),
        py::arg("relu"));
}
