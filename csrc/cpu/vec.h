// Vectors of fp32 lanes for the CPU kernels (GCC/Clang vector extensions; typedefs that allow
// unaligned addresses), and what the kernel files share: fp16/bf16 <-> fp32 loads and stores,
// per-thread scratch buffers, the in-register kLanes x kLanes transpose. A vector is one
// register: 16 lanes where the target has AVX-512, else 8 (one AVX2 register). The kernels
// size their register blocks in these vectors; 16-lane vectors on an AVX2 target take two
// registers each, spill, and their cross-lane shuffles split (spmm ran 6.3-6.6x and the 1-bit
// matmul 63x slower built that way: docs/ARCHITECTURE.md).
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../dispatch.h"
#if defined(__F16C__) || defined(__FMA__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

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

// a·b + c rounded once, spelled out: the kernels' running sums must not depend on what the
// compiler contracts. GCC's tuning for AMD Zen avoids chains of FMAs (avoid_fma_chains) and
// left some of a micro-kernel's instances (one vector per tile row) as a multiply and an add,
// so a token's sum had other bits at 2-8 tokens than at 9 and more.
inline fvec fmadd(fvec a, fvec b, fvec c) {
#if defined(__AVX512F__)
  return reinterpret_cast<fvec>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a),
                                                reinterpret_cast<__m512>(b),
                                                reinterpret_cast<__m512>(c)));
#elif defined(__FMA__)
  return reinterpret_cast<fvec>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a),
                                                reinterpret_cast<__m256>(b),
                                                reinterpret_cast<__m256>(c)));
#else
  return a * b + c;  // no FMA instruction: nothing to contract into
#endif
}
inline float fmadd(float a, float b, float c) {
#if defined(__FMA__) || defined(__AVX512F__)
  return __builtin_fmaf(a, b, c);  // one instruction where the target has FMA
#else
  return a * b + c;
#endif
}
inline fvec fmadd(float a, fvec b, fvec c) {
#if defined(__AVX512F__)
  return fmadd(reinterpret_cast<fvec>(_mm512_set1_ps(a)), b, c);
#elif defined(__AVX__)
  return fmadd(reinterpret_cast<fvec>(_mm256_set1_ps(a)), b, c);
#else
  return a * b + c;
#endif
}

// kLanes bytes from p, zero-extended to a lane each. The instruction spelled out: GCC compiled
// __builtin_convertvector of an unaligned byte vector to 16 scalar loads and inserts.
inline ivec load_bytes(const uint8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<ivec>(_mm512_cvtepu8_epi32(_mm_loadu_si128(
      reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return reinterpret_cast<ivec>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
      reinterpret_cast<const __m128i*>(p))));
#else
  ivec v;
  for (int l = 0; l < kLanes; ++l) v[l] = p[l];
  return v;
#endif
}

// base[idx[l]] for the kLanes lanes l: one gather instruction where the target has one.
// idx holds int16 or int32 (S's columns), signed as in the scalar loops.
template <typename C>
inline fvec gather_lanes(const float* base, const C* idx) {
#if defined(__AVX512F__)
  __m512i i;
  if constexpr (std::is_same_v<C, int16_t>)
    i = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)));
  else
    i = _mm512_loadu_si512(idx);
  return reinterpret_cast<fvec>(_mm512_i32gather_ps(i, base, 4));
#elif defined(__AVX2__)
  __m256i i;
  if constexpr (std::is_same_v<C, int16_t>)
    i = _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx)));
  else
    i = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx));
  return reinterpret_cast<fvec>(_mm256_i32gather_ps(base, i, 4));
#else
  fvec v;
  for (int l = 0; l < kLanes; ++l) v[l] = base[idx[l]];
  return v;
#endif
}

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

// hsum of a and of b together, the same sums in the same order as hsum's (the same bits): one
// pass of lane exchanges serves both.
inline void hsum2(fvec a, fvec b, float* sa, float* sb) {
#if defined(__AVX512F__)
  fvec w = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                   31);
  w += __builtin_shufflevector(w, w, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  w += __builtin_shufflevector(w, w, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  w += __builtin_shufflevector(w, w, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
#else
  fvec w = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  w += __builtin_shufflevector(w, w, 2, 3, 0, 1, 6, 7, 4, 5);
  w += __builtin_shufflevector(w, w, 1, 0, 3, 2, 5, 4, 7, 6);
#endif
  *sa = w[0];
  *sb = w[kLanes / 2];
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

// fp16 / bf16 <-> fp32 without torch headers. bf16 rounds to nearest even, as torch does.
inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// The storage types of the dtypes (shira::DType) in the kernels: bf16 as its bits.
using CpuFloat = shira::FloatTypes<float, _Float16, uint16_t>;

// f(TypeTag<T>{}, TypeTag<C>{}) for T, the storage type of dtype, and C, the type (int16 or
// int32) of S's indices, index_bytes wide; nothing runs for other codes (the bindings pass none).
template <typename F>
inline void dispatch_sparse(shira::DType dtype, int64_t index_bytes, F&& f) {
  shira::dispatch_float<CpuFloat>(dtype, [&](auto t) {
    shira::dispatch_index<int16_t, int32_t>(index_bytes, [&](auto c) { f(t, c); });
  });
}

template <typename T>
struct Float;  // load/store one element of the weight's dtype as fp32
template <>
struct Float<float> {
  static float load(const float* p) { return *p; }
  static void store(float* p, float v) { *p = v; }
};
template <>
struct Float<_Float16> {
  static float load(const _Float16* p) { return static_cast<float>(*p); }
  static void store(_Float16* p, float v) { *p = static_cast<_Float16>(v); }
};
template <>
struct Float<uint16_t> {  // bf16 bit patterns
  static float load(const uint16_t* p) { return bf16_to_float(*p); }
  static void store(uint16_t* p, float v) { *p = float_to_bf16(v); }
};

inline int64_t round_lanes(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// Grow-only, 64-byte aligned fp32 buffer. Kept per thread: tiles are reused across calls, so
// a call does not page-fault fresh memory in (torch's CPU allocator does not cache either).
class Scratch {
 public:
  ~Scratch() { std::free(data_); }
  template <typename D>
  D* get_as(int64_t n) {  // n elements of D (float or a 16-bit type)
    return reinterpret_cast<D*>(get((n * static_cast<int64_t>(sizeof(D)) + 3) / 4));
  }
  float* get(int64_t n) {
    if (n > size_) {
      std::free(data_);
      data_ = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(round_lanes(n)) * 4));
      size_ = n;
    }
    return data_;
  }

 private:
  float* data_ = nullptr;
  int64_t size_ = 0;
};

// kLanes elements of T as fp32 and back (the vector forms of Float<T>, same rounding).
typedef _Float16 hvec __attribute__((vector_size(2 * kLanes), aligned(2)));
typedef uint16_t u16vec __attribute__((vector_size(2 * kLanes), aligned(2)));
template <typename T>
inline fvec loadv_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return loadv(p);
  } else if constexpr (std::is_same_v<T, _Float16>) {
    // F16C's conversion explicitly: without AVX512-FP16, GCC's generic conversion of
    // _Float16 vectors compiled to a slower sequence than this one instruction.
#if defined(__AVX512F__)
    return reinterpret_cast<fvec>(_mm512_cvtph_ps(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__)
    return reinterpret_cast<fvec>(_mm256_cvtph_ps(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(p))));
#else
    return __builtin_convertvector(*reinterpret_cast<const hvec*>(p), fvec);
#endif
  } else {  // bf16: the bits in the upper half of a lane. Spelled out: GCC widened the generic
            // conversion in two halves joined by an insert, 1.5x the time of a gather loop.
#if defined(__AVX512F__)
    return reinterpret_cast<fvec>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(p))), 16));
#elif defined(__AVX2__)
    return reinterpret_cast<fvec>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(p))), 16));
#else
    const uvec bits = __builtin_convertvector(*reinterpret_cast<const u16vec*>(p), uvec) << 16;
    return reinterpret_cast<const fvec&>(bits);
#endif
  }
}
template <typename T>
inline void storev_from_float(T* p, fvec v) {
  if constexpr (std::is_same_v<T, float>) {
    storev(p, v);
  } else if constexpr (std::is_same_v<T, _Float16>) {
    *reinterpret_cast<hvec*>(p) = __builtin_convertvector(v, hvec);
  } else {  // round to nearest even; NaN stays a quiet NaN (float_to_bf16)
    const uvec bits = reinterpret_cast<const uvec&>(v);
    const ivec nan = (bits & 0x7fffffffu) > 0x7f800000u;
    const uvec rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const uvec result = nan ? uvec{} + 0x7fc0u : rounded;
    *reinterpret_cast<u16vec*>(p) = __builtin_convertvector(result, u16vec);
  }
}

// v stored in T where every lane is a value of T already (it was loaded from one): copied, no
// rounding to do.
template <typename T>
inline void storev_exact(T* p, fvec v) {
  if constexpr (std::is_same_v<T, float>) {
    storev(p, v);
  } else if constexpr (std::is_same_v<T, _Float16>) {
    *reinterpret_cast<hvec*>(p) = __builtin_convertvector(v, hvec);
  } else {
    *reinterpret_cast<u16vec*>(p) =
        __builtin_convertvector(reinterpret_cast<const uvec&>(v) >> 16, u16vec);
  }
}

// A kLanes x kLanes transpose in registers: log2(kLanes) rounds, each exchanging the
// off-diagonal K x K blocks of every 2K x 2K block (rows i and i + K trade their lanes that
// have bit K set / clear).
template <int K, int... P>
inline fvec exchange_low(fvec a, fvec b, std::integer_sequence<int, P...>) {
  return __builtin_shufflevector(a, b, ((P & K) == 0 ? P : kLanes + P - K)...);
}
template <int K, int... P>
inline fvec exchange_high(fvec a, fvec b, std::integer_sequence<int, P...>) {
  return __builtin_shufflevector(a, b, ((P & K) == 0 ? P + K : kLanes + P)...);
}
template <int K>
inline void exchange_blocks(fvec (&v)[kLanes]) {
  constexpr auto lanes = std::make_integer_sequence<int, kLanes>();
#pragma GCC unroll 16
  for (int i = 0; i < kLanes; ++i) {
    if (i & K) continue;
    const fvec a = v[i], b = v[i + K];
    v[i] = exchange_low<K>(a, b, lanes);
    v[i + K] = exchange_high<K>(a, b, lanes);
  }
}
template <int K = kLanes / 2>
inline void transpose_block(fvec (&v)[kLanes]) {
  exchange_blocks<K>(v);
  if constexpr (K > 1) transpose_block<K / 2>(v);
}

