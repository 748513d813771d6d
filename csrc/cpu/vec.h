// Vectors of fp32 lanes for the CPU kernels (GCC/Clang vector extensions; typedefs that allow
// unaligned addresses). A vector is one register: 16 lanes where the target has AVX-512, else
// 8 (one AVX2 register). The kernels size their register blocks in these vectors; 16-lane
// vectors on an AVX2 target take two registers each, spill, and their cross-lane shuffles
// split (spmm ran 6.3-6.6x and the 1-bit matmul 63x slower built that way: docs/ARCHITECTURE.md).
#pragma once
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float fvec __attribute__((vector_size(4 * kLanes), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(4 * kLanes), aligned(4)));
typedef uint32_t uvec __attribute__((vector_size(4 * kLanes), aligned(4)));

inline fvec loadv(const float* p) { return *reinterpret_cast<const fvec*>(p); }
inline void storev(float* p, fvec v) { *reinterpret_cast<fvec*>(p) = v; }

// The sum of the lanes, pairwise (as accurate as a tree).
inline float hsum(fvec v) {
  typedef float f32x4 __attribute__((vector_size(16), aligned(4)));
  f32x4 b;
  if constexpr (kLanes == 16) {
    typedef float f32x8 __attribute__((vector_size(32), aligned(4)));
    const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  } else {
    b = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  }
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// f(std::integral_constant<int, min(v, N)>()) for v >= 1: the instance of a micro-kernel for a
// register block of v vectors (or tokens), whose constant trip counts keep it in registers.
template <int N, typename F>
inline void with_constant(int v, F&& f) {
  if constexpr (N > 1) {
    if (v < N) return with_constant<N - 1>(v, f);
  }
  f(std::integral_constant<int, N>());
}
