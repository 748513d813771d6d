// Device helpers shared by the CUDA kernels (no torch headers): launch limits, the dtypes'
// storage types, fp32 <-> storage-type conversions and small integer helpers, in an anonymous
// namespace so that each kernel file gets its own internal copies.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

#include "../dispatch.h"

namespace {

// The storage types of the dtypes (shira::DType) in the kernels.
using CudaFloat = shira::FloatTypes<float, __half, __nv_bfloat16>;

constexpr int kWarpSize = 32;
constexpr unsigned int kFullMask = 0xffffffffu;
constexpr int kThreads = 256;               // threads per block, all kernels
constexpr int64_t kMaxGridY = 65535;        // hardware limit of gridDim.y
constexpr int64_t kMaxGridX = INT_MAX;      // hardware limit of gridDim.x

// ---------------------------------------------------------------------------
// Element conversions (fp32 <-> storage type).

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace
