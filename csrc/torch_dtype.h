// A tensor's dtype as the kernels' shira::DType, for the binding files of both sides. It needs
// torch headers, so kernel sources include dispatch.h alone.
#pragma once

#include <torch/extension.h>

#include "dispatch.h"

inline shira::DType dtype_of(const torch::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == torch::kFloat32 || st == torch::kFloat16 || st == torch::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", st);
  return st == torch::kFloat32   ? shira::DType::kFloat32
         : st == torch::kFloat16 ? shira::DType::kFloat16
                                 : shira::DType::kBFloat16;
}
