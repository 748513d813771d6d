// Adapts the CPU kernels (kernels.h) to tensors. Arguments were validated by the Python entry
// points; these checks only guard the raw-pointer contract.
#include <torch/extension.h>

#include <vector>

#include "../torch_dtype.h"
#include "kernels.h"
#include "vec.h"

namespace {

void check_table(const torch::Tensor& t, int64_t cols, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kInt64 && t.is_contiguous() &&
                  t.dim() == 2 && t.size(1) == cols,
              name, " must be a contiguous CPU int64 tensor of shape [N, ", cols, "]");
}

// Returns the number of entries skipped for an index outside their weight (nothing written
// for them): the caller undoes the swap and raises.
int64_t scatter_swap(const torch::Tensor& tasks, const torch::Tensor& blocks, int64_t block) {
  check_table(tasks, shira::cpu::kSwapTaskColumns, "tasks");
  check_table(blocks, 2, "blocks");
  TORCH_CHECK(block > 0, "block must be positive");
  return shira::cpu::scatter_swap(tasks.data_ptr<int64_t>(), blocks.data_ptr<int64_t>(),
                                  blocks.size(0), block);
}

void check_sparse(const torch::Tensor& offsets, const torch::Tensor& cols,
                  const torch::Tensor& values) {
  TORCH_CHECK(offsets.scalar_type() == torch::kInt64 && offsets.is_contiguous(),
              "row offsets must be contiguous int64");
  TORCH_CHECK(cols.scalar_type() == torch::kInt16 || cols.scalar_type() == torch::kInt32,
              "column indices must be int16 or int32");
  TORCH_CHECK(cols.is_contiguous() && values.numel() == cols.numel(),
              "column indices and values must be contiguous and of one length");
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 1 &&
                  offsets.data_ptr<int64_t>()[offsets.numel() - 1] == cols.numel(),
              "row offsets must end at the number of entries");
}

// S's values as the kernels read them: as they are where they share the activations' dtype
// (no fp32 copy per call, two per bf16 training step), else converted to fp32.
torch::Tensor kernel_values(const torch::Tensor& values, bool in_dtype) {
  return in_dtype ? values.contiguous() : values.to(torch::kFloat).contiguous();
}

// y_in + scale * x @ S^T, S [rows, x.size(1)] in CSR; the result has y_in's dtype. With
// overwrite_y it is written into y_in (whose caller no longer needs it): no second [T, rows].
torch::Tensor spmm(const torch::Tensor& y_in, const torch::Tensor& x,
                   const torch::Tensor& offsets, const torch::Tensor& cols,
                   const torch::Tensor& values, double scale, bool overwrite_y) {
  check_sparse(offsets, cols, values);
  const int64_t tokens = x.size(0), rows = offsets.size(0) - 1;
  TORCH_CHECK(x.dim() == 2 && y_in.dim() == 2 && y_in.size(0) == tokens && y_in.size(1) == rows,
              "spmm: x [T, in] and y [T, out] expected");
  TORCH_CHECK(x.scalar_type() == y_in.scalar_type() && x.is_contiguous() && y_in.is_contiguous(),
              "spmm: x and y must be contiguous and of one dtype");
  const shira::DType dtype = dtype_of(x, "spmm: x");
  const bool in_dtype = values.scalar_type() == x.scalar_type();
  const torch::Tensor vals = kernel_values(values, in_dtype);
  torch::Tensor out = overwrite_y ? y_in : torch::empty_like(y_in);
  shira::cpu::spmm(dtype, x.data_ptr(), y_in.data_ptr(), out.data_ptr(), tokens, x.size(1), rows,
                   offsets.data_ptr<int64_t>(), cols.data_ptr(), cols.element_size(),
                   vals.data_ptr(), in_dtype, static_cast<float>(scale));
  return out;
}

// g[j] = sum_t gy[t, rows[j]] * x[t, cols[j]], fp32 [nnz]; rows sorted ascending. The kernel
// walks S by rows: pass S's CSR offsets if the caller has them, else they are found here from
// the rows in one pass.
torch::Tensor sddmm(const torch::Tensor& gy, const torch::Tensor& x, const torch::Tensor& rows,
                    const torch::Tensor& cols, const c10::optional<torch::Tensor>& offsets) {
  TORCH_CHECK(rows.scalar_type() == torch::kInt32 && rows.is_contiguous(), "rows must be int32");
  TORCH_CHECK((cols.scalar_type() == torch::kInt16 || cols.scalar_type() == torch::kInt32) &&
                  cols.is_contiguous() && cols.numel() == rows.numel(),
              "cols must be int16/int32 and as long as rows");
  TORCH_CHECK(gy.dim() == 2 && x.dim() == 2 && gy.size(0) == x.size(0), "sddmm: gy [T, out] and x [T, in]");
  TORCH_CHECK(gy.scalar_type() == x.scalar_type() && gy.is_contiguous() && x.is_contiguous(),
              "sddmm: gy and x must be contiguous and of one dtype");
  const shira::DType dtype = dtype_of(x, "sddmm: x");
  const int64_t out = gy.size(1), nnz = rows.numel();
  torch::Tensor row_offsets;
  if (offsets.has_value()) {
    row_offsets = *offsets;
    TORCH_CHECK(row_offsets.scalar_type() == torch::kInt64 && row_offsets.is_contiguous() &&
                    row_offsets.numel() == out + 1 &&
                    row_offsets.data_ptr<int64_t>()[out] == nnz,
                "offsets must be contiguous int64 [out + 1] ending at the number of entries");
  } else {
    row_offsets = torch::empty({out + 1}, rows.options().dtype(torch::kInt64));
    const int32_t* r = rows.data_ptr<int32_t>();
    int64_t* o = row_offsets.data_ptr<int64_t>();
    int64_t j = 0;
    for (int64_t row = 0; row <= out; ++row) {
      while (j < nnz && r[j] < row) ++j;
      o[row] = j;
    }
    o[out] = nnz;
  }
  torch::Tensor g = torch::empty({nnz}, gy.options().dtype(torch::kFloat));
  shira::cpu::sddmm(dtype, gy.data_ptr(), x.data_ptr(), x.size(0), out, x.size(1),
                    row_offsets.data_ptr<int64_t>(), cols.data_ptr(), cols.element_size(),
                    g.data_ptr<float>());
  return g;
}

// The spmm strategy's backward in one pass (kernels.h): returns (gx_in + scale * gy @ S, the
// fp32 gradient of S's values in CSR order). S by columns: t_offsets, trows (its transposed
// CSR) and perm (values[perm] are in that order). With overwrite_gx the first is gx_in itself.
std::tuple<torch::Tensor, torch::Tensor> spmm_t_sddmm(
    const torch::Tensor& gx_in, const torch::Tensor& gy, const torch::Tensor& x,
    const torch::Tensor& t_offsets, const torch::Tensor& trows, const torch::Tensor& perm,
    const torch::Tensor& values, double scale, bool overwrite_gx) {
  check_sparse(t_offsets, trows, values);
  TORCH_CHECK(perm.scalar_type() == torch::kInt64 && perm.is_contiguous() &&
                  perm.numel() == trows.numel(), "perm must be contiguous int64 of length nnz");
  const int64_t tokens = x.size(0), in = t_offsets.size(0) - 1;
  TORCH_CHECK(x.dim() == 2 && gy.dim() == 2 && gx_in.dim() == 2 && gy.size(0) == tokens &&
                  gx_in.size(0) == tokens && x.size(1) == in && gx_in.size(1) == in,
              "spmm_t_sddmm: gy [T, out], x [T, in] and gx [T, in] expected");
  TORCH_CHECK(gy.scalar_type() == x.scalar_type() && gx_in.scalar_type() == x.scalar_type() &&
                  gy.is_contiguous() && x.is_contiguous() && gx_in.is_contiguous(),
              "spmm_t_sddmm: gy, x and gx must be contiguous and of one dtype");
  const shira::DType dtype = dtype_of(x, "spmm_t_sddmm: x");
  const bool in_dtype = values.scalar_type() == x.scalar_type();
  const torch::Tensor vals = kernel_values(values, in_dtype);
  torch::Tensor gx = overwrite_gx ? gx_in : torch::empty_like(gx_in);
  torch::Tensor g = torch::empty({trows.numel()}, x.options().dtype(torch::kFloat));
  shira::cpu::spmm_t_sddmm(dtype, gy.data_ptr(), x.data_ptr(), gx_in.data_ptr(), gx.data_ptr(),
                           tokens, gy.size(1), in, t_offsets.data_ptr<int64_t>(), trows.data_ptr(),
                           trows.element_size(), perm.data_ptr<int64_t>(), vals.data_ptr(),
                           in_dtype, static_cast<float>(scale), g.data_ptr<float>());
  return {gx, g};
}

// a @ (W + scale * S)^T + bias (grad_x false: a = x [T, in], S in CSR) or a @ (W + scale * S)
// (grad_x true: a = gy [T, out], S by columns with perm), in W's dtype, W + scale * S formed
// panel by panel as W is read (kernels.h).
torch::Tensor folded_linear(const torch::Tensor& a, const torch::Tensor& weight,
                           const c10::optional<torch::Tensor>& bias, const torch::Tensor& offsets,
                           const torch::Tensor& idx, const c10::optional<torch::Tensor>& perm,
                           const torch::Tensor& values, double scale, bool grad_x) {
  check_sparse(offsets, idx, values);
  TORCH_CHECK(a.dim() == 2 && weight.dim() == 2 && weight.is_contiguous(),
              "folded_linear: a [T, steps] and a contiguous weight [out, in] expected");
  const int64_t tokens = a.size(0), out = weight.size(0), in = weight.size(1);
  const int64_t lines = grad_x ? in : out, steps = grad_x ? out : in;
  TORCH_CHECK(a.size(1) == steps && offsets.numel() == lines + 1,
              "folded_linear: a's last dim and S's offsets do not match the weight");
  TORCH_CHECK(a.scalar_type() == weight.scalar_type(), "folded_linear: a and weight must share a dtype");
  const shira::DType dtype = dtype_of(weight, "folded_linear: weight");
  const int64_t* perm_ptr = nullptr;
  if (perm.has_value()) {
    TORCH_CHECK(perm->scalar_type() == torch::kInt64 && perm->is_contiguous() &&
                    perm->numel() == idx.numel(), "perm must be contiguous int64 of length nnz");
    perm_ptr = perm->data_ptr<int64_t>();
  }
  torch::Tensor b;
  if (bias.has_value()) {
    b = bias->to(torch::kFloat).contiguous();
    TORCH_CHECK(!grad_x && b.numel() == out, "bias must have out entries (forward only)");
  }
  const torch::Tensor af = dtype == shira::DType::kBFloat16 && shira::cpu::folded_linear_takes_bf16()
                               ? a.contiguous() : a.to(torch::kFloat).contiguous();
  const torch::Tensor vals = values.to(torch::kFloat).contiguous();
  torch::Tensor result = torch::empty({tokens, lines}, weight.options());
  const float* bias_ptr = b.defined() ? b.data_ptr<float>() : nullptr;
  shira::cpu::folded_linear(dtype, af.data_ptr(), tokens, weight.data_ptr(), out, in,
                            grad_x, offsets.data_ptr<int64_t>(), idx.data_ptr(),
                            idx.element_size(), perm_ptr, vals.data_ptr<float>(),
                            static_cast<float>(scale), bias_ptr, result.data_ptr());
  return result;
}

// out[idx] = weight[idx] + scale * values (fp32 arithmetic, rounded once); other entries of
// out are left as they are (the caller copied the weight there). saved, if given, receives the
// weight's entries first (out may be weight: an in-place add that can be swapped back).
// Returns the number of entries skipped for an index outside the weight (nothing written).
int64_t add_at_indices(torch::Tensor& out, const torch::Tensor& weight,
                       const torch::Tensor& idx, const torch::Tensor& values, double scale,
                       c10::optional<torch::Tensor> saved) {
  TORCH_CHECK(out.is_contiguous() && weight.is_contiguous() && values.is_contiguous() &&
                  idx.is_contiguous(), "add_at_indices: contiguous tensors expected");
  TORCH_CHECK(idx.scalar_type() == torch::kInt32 || idx.scalar_type() == torch::kInt64,
              "add_at_indices: flat_indices must be int32 or int64");
  TORCH_CHECK(out.scalar_type() == weight.scalar_type() &&
                  values.scalar_type() == weight.scalar_type(),
              "add_at_indices: out, weight and values must share a dtype");
  TORCH_CHECK(out.numel() == weight.numel() && values.numel() == idx.numel(),
              "add_at_indices: out and weight must have the same size, values one entry per "
              "index");
  const auto st = weight.scalar_type();
  const shira::DType dtype = dtype_of(weight, "add_at_indices: weight");
  void* saved_ptr = nullptr;
  if (saved.has_value()) {
    TORCH_CHECK(saved->is_contiguous() && saved->scalar_type() == st &&
                    saved->numel() == idx.numel(),
                "add_at_indices: saved must be contiguous, of the weight's dtype, one entry per "
                "index");
    saved_ptr = saved->data_ptr();
  }
  return shira::cpu::add_at_indices(dtype, weight.data_ptr(), out.data_ptr(), weight.numel(),
                                    idx.data_ptr(), idx.element_size(), values.data_ptr(),
                                    static_cast<float>(scale), idx.numel(), saved_ptr);
}

// packed: contiguous int32 [rows, ceil(in / 32)], the sign words of a [rows, in] 1-bit weight.
void check_packed(const torch::Tensor& packed, int64_t in, const char* what) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == torch::kInt32 && packed.is_contiguous(),
              what, ": packed must be contiguous int32 [rows, words]");
  const int64_t words = packed.size(1);
  TORCH_CHECK((words - 1) * 32 < in && in <= words * 32, what,
              ": packed words do not match in_features");
}

// alpha and mu: contiguous fp32, one value or one per row of a weight of `rows` rows.
void check_scales(const torch::Tensor& alpha, const torch::Tensor& mu, int64_t rows,
                  const char* what) {
  TORCH_CHECK(alpha.scalar_type() == torch::kFloat && mu.scalar_type() == torch::kFloat &&
                  alpha.is_contiguous() && mu.is_contiguous() &&
                  (alpha.numel() == 1 || alpha.numel() == rows) &&
                  (mu.numel() == 1 || mu.numel() == rows),
              what, ": alpha and mu must be contiguous fp32, one value or one per row");
}

// The 1-bit weight's rows as a dense tensor of hi's dtype: out[r, k] = s[r, k] ? hi[r] : lo[r]
// (hi = mu + alpha, lo = mu - alpha, rounded by the caller), for packed int32 [rows, words].
torch::Tensor binary_dequantize(const torch::Tensor& packed, const torch::Tensor& hi,
                                const torch::Tensor& lo, int64_t in) {
  check_packed(packed, in, "binary_dequantize");
  const int64_t rows = packed.size(0), words = packed.size(1);
  TORCH_CHECK(hi.dim() == 1 && hi.numel() == rows && hi.is_contiguous() && lo.sizes() == hi.sizes() &&
                  lo.scalar_type() == hi.scalar_type() && lo.is_contiguous(),
              "binary_dequantize: hi and lo must be contiguous, one value per row, one dtype");
  dtype_of(hi, "binary_dequantize: hi");  // a float dtype the kernels take
  torch::Tensor out = torch::empty({rows, in}, hi.options());
  if (rows == 0 || in == 0) return out;
  shira::cpu::binary_dequantize(packed.data_ptr<int32_t>(), rows, words, in, hi.data_ptr(),
                                lo.data_ptr(), static_cast<int>(hi.element_size()),
                                out.data_ptr());
  return out;
}

// A 1-bit weight [rows, in] dense in dtype: hi = mu + alpha and lo = mu - alpha per row (alpha,
// mu fp32, one value or one per row) summed in fp32 and rounded once, as
// BinaryWeight.dequantize forms them, then copied by each sign bit (binary_dequantize).
torch::Tensor binary_dequantized_weight(const torch::Tensor& packed,
                                        const torch::Tensor& alpha, const torch::Tensor& mu,
                                        int64_t in, torch::ScalarType dtype) {
  check_packed(packed, in, "binary_dequantized_weight");
  const int64_t rows = packed.size(0), words = packed.size(1);
  check_scales(alpha, mu, rows, "binary_dequantized_weight");
  torch::Tensor out = torch::empty({rows, in}, torch::TensorOptions().dtype(dtype));
  const float *a = alpha.data_ptr<float>(), *m = mu.data_ptr<float>();
  const bool a_rows = alpha.numel() > 1, m_rows = mu.numel() > 1;
  shira::dispatch_float<CpuFloat>(dtype_of(out, "binary_dequantized_weight: dtype"), [&](auto t) {
    using T = typename decltype(t)::type;
    // hi and lo per row in plain memory: two torch tensors for them cost more than the work at
    // LoRA sizes (binary_lora's dequantize strategy forms two such weights per call).
    std::vector<T> hi(rows), lo(rows);
    for (int64_t r = 0; r < rows; ++r) {
      const float av = a[a_rows ? r : 0], mv = m[m_rows ? r : 0];
      Float<T>::store(&hi[r], mv + av);
      Float<T>::store(&lo[r], mv - av);
    }
    if (rows > 0 && in > 0)
      shira::cpu::binary_dequantize(packed.data_ptr<int32_t>(), rows, words, in, hi.data(),
                                    lo.data(), static_cast<int>(sizeof(T)), out.data_ptr());
  });
  return out;
}

// binary_lora's "dequantize" strategy in one call, both weights dequantized whole to x's
// dtype: scale * linear(act(linear(x, down)), up). One call from Python instead of a dozen
// small torch calls, which at ViT-B shapes (768, r = 32, a few hundred tokens) had cost as much
// as the two matmuls.
torch::Tensor binary_lora_dequantized(const torch::Tensor& x, const torch::Tensor& down_packed,
                                      const torch::Tensor& down_alpha,
                                      const torch::Tensor& down_mu, int64_t down_in,
                                      const torch::Tensor& up_packed,
                                      const torch::Tensor& up_alpha, const torch::Tensor& up_mu,
                                      int64_t up_in, double scale, bool relu) {
  TORCH_CHECK(x.dim() == 2, "binary_lora_dequantized: x must be [T, in]");
  const auto dtype = x.scalar_type();
  torch::Tensor h =
      at::linear(x, binary_dequantized_weight(down_packed, down_alpha, down_mu, down_in, dtype));
  if (relu) h.relu_();
  torch::Tensor y =
      at::linear(h, binary_dequantized_weight(up_packed, up_alpha, up_mu, up_in, dtype));
  if (scale != 1.0) y.mul_(scale);  // as scale * y: one rounding of the product
  return y;
}

// Checks that `panels` are the sign panels (kernels.h) of a [lanes, steps] sign matrix.
void check_panels(const torch::Tensor& panels, int64_t lanes, int64_t steps, const char* what) {
  TORCH_CHECK(panels.scalar_type() == torch::kUInt8 && panels.is_contiguous() &&
                  panels.dim() == 3 && panels.size(0) * shira::cpu::kPanel >= lanes &&
                  panels.size(1) == (steps + 31) / 32 * 4 && panels.size(2) == shira::cpu::kPanel,
              what, " must be contiguous uint8 [ceil(", lanes, " / 64), ", (steps + 31) / 32 * 4,
              ", 64], got ", panels.sizes());
}

// The sign panels (kernels.h) of the rows of signs given as bytes [lanes, nbytes], uint8.
torch::Tensor sign_panels(const torch::Tensor& row_bytes) {
  TORCH_CHECK(row_bytes.scalar_type() == torch::kUInt8 && row_bytes.dim() == 2,
              "sign_panels: row_bytes must be uint8 [lanes, nbytes], got ",
              row_bytes.scalar_type(), " ", row_bytes.sizes());
  const torch::Tensor rows = row_bytes.contiguous();
  const int64_t lanes = rows.size(0), nbytes = rows.size(1);
  const int64_t count = (lanes + shira::cpu::kPanel - 1) / shira::cpu::kPanel;
  torch::Tensor panels = torch::empty({count, nbytes, shira::cpu::kPanel}, rows.options());
  if (panels.numel() > 0)
    shira::cpu::sign_panels(rows.data_ptr<uint8_t>(), lanes, nbytes, panels.data_ptr<uint8_t>());
  return panels;
}

// y = scale * (x @ (mu + alpha * s)^T + bias) in fp32 for 1-bit signs packed in int32
// [out, words] and alpha, mu fp32 of numel 1 or out; panels are s's sign panels
// [ceil(out / 64), words * 4, 64] (kernels.h), made once per weight by the caller.
torch::Tensor binary_linear(const torch::Tensor& x, const torch::Tensor& packed,
                            const torch::Tensor& panels, const torch::Tensor& alpha,
                            const torch::Tensor& mu, const c10::optional<torch::Tensor>& bias,
                            double scale) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 2 && packed.scalar_type() == torch::kInt32,
              "binary_linear: x [T, in] and packed int32 [out, words]");
  const int64_t tokens = x.size(0), in = x.size(1), out = packed.size(0), words = packed.size(1);
  TORCH_CHECK((words - 1) * 32 < in && in <= words * 32, "packed words do not match in_features");
  check_panels(panels, out, in, "binary_linear: panels");
  check_scales(alpha, mu, out, "binary_linear");
  torch::Tensor b;
  if (bias.has_value()) {
    b = bias->to(torch::kFloat).contiguous();
    TORCH_CHECK(b.numel() == out, "bias must have out entries");
  }
  torch::Tensor xf = x.to(torch::kFloat).contiguous();
  torch::Tensor y = torch::empty({tokens, out}, xf.options());
  if (tokens == 0 || out == 0) return y;
  shira::cpu::binary_linear(xf.data_ptr<float>(), tokens, in, panels.data_ptr<uint8_t>(), out,
                            alpha.data_ptr<float>(), alpha.numel() > 1, mu.data_ptr<float>(),
                            mu.numel() > 1, b.defined() ? b.data_ptr<float>() : nullptr,
                            static_cast<float>(scale), y.data_ptr<float>());
  return y;
}

// gx = gy @ (mu + alpha * s) in fp32 without forming the weight: (gy * alpha) @ s + gy @ mu,
// from panels_t, the sign panels of s's transpose [in, out]: [ceil(in / 64), ceil(out / 32) * 4,
// 64] (made once per weight by the caller).
torch::Tensor binary_linear_grad_x(const torch::Tensor& gy, const torch::Tensor& panels_t,
                                   const torch::Tensor& alpha, const torch::Tensor& mu,
                                   int64_t in) {
  TORCH_CHECK(gy.dim() == 2, "binary_linear_grad_x: gy [T, out]");
  const int64_t tokens = gy.size(0), out = gy.size(1);
  check_panels(panels_t, in, out, "binary_linear_grad_x: panels_t");
  TORCH_CHECK(alpha.scalar_type() == torch::kFloat && mu.scalar_type() == torch::kFloat &&
                  (alpha.numel() == 1 || alpha.numel() == out) && (mu.numel() == 1 || mu.numel() == out),
              "alpha and mu must be fp32 of numel 1 or out");
  torch::Tensor g = gy.to(torch::kFloat);
  torch::Tensor add = (g * mu.reshape(-1)).sum(1);
  g = (g * alpha.reshape(-1)).contiguous();
  torch::Tensor gx = torch::empty({tokens, in}, g.options());
  if (tokens == 0 || in == 0) return gx;
  shira::cpu::binary_linear_grad_x(g.data_ptr<float>(), tokens, out, panels_t.data_ptr<uint8_t>(),
                                   in, add.data_ptr<float>(), gx.data_ptr<float>());
  return gx;
}

// y = scale * up(act(down(x))) for 1-bit down [r, in] and up [out, r] (alpha/mu fp32 [1] or
// per row): the r intermediate values per token stay inside this call (in cache).
torch::Tensor binary_lora(const torch::Tensor& x, const torch::Tensor& down_packed,
                          const torch::Tensor& down_panels, const torch::Tensor& down_alpha,
                          const torch::Tensor& down_mu, const torch::Tensor& up_packed,
                          const torch::Tensor& up_panels, const torch::Tensor& up_alpha,
                          const torch::Tensor& up_mu, double scale, bool relu) {
  torch::Tensor h = binary_linear(x, down_packed, down_panels, down_alpha, down_mu, c10::nullopt,
                                  1.0);
  if (relu) h.relu_();
  return binary_linear(h, up_packed, up_panels, up_alpha, up_mu, c10::nullopt, scale)
      .to(x.scalar_type());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vector_lanes", []() { return kLanes; },
        "fp32 lanes per vector the kernels were built with (16: AVX-512, 8: otherwise)");
  m.def("bf16_dot_products", []() {
#if defined(__AVX512BF16__)
    return true;
#else
    return false;
#endif
  }, "whether the sparse kernels multiply bf16 rows by AVX512-BF16's vdpbf16ps");
  m.def("scatter_swap", &scatter_swap, "batched scatter-swap over a task table (CPU)",
        pybind11::arg("tasks"), pybind11::arg("blocks"), pybind11::arg("block"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("spmm", &spmm, "y + scale * x @ S^T with S in CSR (CPU)", pybind11::arg("y"),
        pybind11::arg("x"), pybind11::arg("offsets"), pybind11::arg("cols"),
        pybind11::arg("values"), pybind11::arg("scale"), pybind11::arg("overwrite_y") = false,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("sddmm", &sddmm, "gradient of S's values: sum over tokens of gy[:, row] * x[:, col]",
        pybind11::arg("gy"), pybind11::arg("x"), pybind11::arg("rows"), pybind11::arg("cols"),
        pybind11::arg("offsets") = pybind11::none(),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("spmm_t_sddmm", &spmm_t_sddmm,
        "(gx + scale * gy @ S, gradient of S's values): the spmm strategy's backward in one pass",
        pybind11::arg("gx"), pybind11::arg("gy"), pybind11::arg("x"), pybind11::arg("t_offsets"),
        pybind11::arg("trows"), pybind11::arg("perm"), pybind11::arg("values"),
        pybind11::arg("scale"), pybind11::arg("overwrite_gx") = false,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("folded_linear", &folded_linear,
        "x @ (W + scale * S)^T + bias, or with grad_x gy @ (W + scale * S), S folded in as W is read",
        pybind11::arg("a"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("offsets"),
        pybind11::arg("idx"), pybind11::arg("perm"), pybind11::arg("values"),
        pybind11::arg("scale"), pybind11::arg("grad_x"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("sign_panels", &sign_panels, "the 1-bit kernels' sign panels of rows of sign bytes",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("binary_linear", &binary_linear, "scale * (x @ (mu + alpha * s)^T + bias), fp32, for packed 1-bit signs s",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("binary_linear_grad_x", &binary_linear_grad_x,
        "gy @ (mu + alpha * s) in fp32 for packed 1-bit signs s, without forming the weight",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("binary_dequantize", &binary_dequantize,
        "the rows of a 1-bit weight as a dense tensor: s ? hi : lo per row",
        pybind11::arg("packed"), pybind11::arg("hi"), pybind11::arg("lo"), pybind11::arg("in"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("binary_lora", &binary_lora, "scale * up(act(down(x))) for 1-bit down and up",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("binary_dequantized_weight", &binary_dequantized_weight,
        "a 1-bit weight dense in dtype: mu + alpha or mu - alpha per sign",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("binary_lora_dequantized", &binary_lora_dequantized,
        "scale * up(act(down(x))) on both 1-bit weights dequantized to x's dtype",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("add_at_indices", &add_at_indices, "out[idx] = weight[idx] + scale * values",
        pybind11::arg("out"), pybind11::arg("weight"), pybind11::arg("flat_indices"),
        pybind11::arg("values"), pybind11::arg("scale"), pybind11::arg("saved") = pybind11::none(),
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
