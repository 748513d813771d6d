// What the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels share: the code of a floating dtype, and
// the switches from such a code or an integer's width to a type that a generic lambda is
// instantiated with. Plain C++ (no torch; CUDA keywords only under __CUDACC__), so that g++ and
// a bare nvcc both take it, and device code can dispatch too.
//
//   return shira::dispatch_float<CudaFloat>(dtype, cudaErrorInvalidValue, [&](auto t) {
//     using T = typename decltype(t)::type;
//     ...
//   });
#pragma once

#include <cstdint>

// The dispatchers run on the side of their caller (host launchers, device kernels), and so
// does the f they are given: nvcc is told not to check f's side against both of theirs.
#if defined(__CUDACC__)
#define SHIRA_HOST_DEVICE __host__ __device__
#define SHIRA_ANY_SIDE_CALLEE _Pragma("nv_exec_check_disable")
#else
#define SHIRA_HOST_DEVICE
#define SHIRA_ANY_SIDE_CALLEE
#endif

namespace shira {

// The dtype of activations, weights and values: torch's float32, float16 and bfloat16.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One side's storage type for each DType (CPU: float, _Float16 and bf16 bits as uint16_t;
// CUDA: float, __half, __nv_bfloat16).
template <class F32, class F16, class BF16>
struct FloatTypes {
  using f32 = F32;
  using f16 = F16;
  using bf16 = BF16;
};

// A type passed as a value to a generic lambda: `using T = typename decltype(tag)::type;`.
template <class T>
struct TypeTag {
  using type = T;
};

namespace detail {

SHIRA_ANY_SIDE_CALLEE
template <class Types, class F, class Otherwise>
SHIRA_HOST_DEVICE auto float_switch(DType dtype, F& f, Otherwise&& otherwise) {
  switch (dtype) {
    case DType::kFloat32: return f(TypeTag<typename Types::f32>{});
    case DType::kFloat16: return f(TypeTag<typename Types::f16>{});
    case DType::kBFloat16: return f(TypeTag<typename Types::bf16>{});
  }
  return otherwise();
}

SHIRA_ANY_SIDE_CALLEE
template <class I, class... Rest, class F, class Otherwise>
SHIRA_HOST_DEVICE auto width_switch(int64_t bytes, F& f, Otherwise&& otherwise) {
  if (bytes == static_cast<int64_t>(sizeof(I))) return f(TypeTag<I>{});
  if constexpr (sizeof...(Rest) > 0) {
    return width_switch<Rest...>(bytes, f, otherwise);
  } else {
    return otherwise();
  }
}

}  // namespace detail

// f(TypeTag<T>{}) for T, Types' storage type of dtype; `otherwise` for a value outside DType
// (a code cast from an unchecked int).
SHIRA_ANY_SIDE_CALLEE
template <class Types, class R, class F>
SHIRA_HOST_DEVICE R dispatch_float(DType dtype, R otherwise, F&& f) {
  return detail::float_switch<Types>(dtype, f, [&] { return otherwise; });
}

// The same for an f that returns nothing: for a value outside DType nothing runs.
SHIRA_ANY_SIDE_CALLEE
template <class Types, class F>
SHIRA_HOST_DEVICE void dispatch_float(DType dtype, F&& f) {
  detail::float_switch<Types>(dtype, f, [] {});
}

// f(TypeTag<I>{}) for the first I of Is that is `bytes` wide (index types, or the unsigned
// words that carry a float's bits); `otherwise` when none of them is.
SHIRA_ANY_SIDE_CALLEE
template <class... Is, class R, class F>
SHIRA_HOST_DEVICE R dispatch_index(int64_t bytes, R otherwise, F&& f) {
  return detail::width_switch<Is...>(bytes, f, [&] { return otherwise; });
}

// The same for an f that returns nothing: for another width nothing runs.
SHIRA_ANY_SIDE_CALLEE
template <class... Is, class F>
SHIRA_HOST_DEVICE void dispatch_index(int64_t bytes, F&& f) {
  detail::width_switch<Is...>(bytes, f, [] {});
}

}  // namespace shira
