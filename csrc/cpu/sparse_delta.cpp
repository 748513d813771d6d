#include <algorithm>
#include <cstring>

#include "kernels.h"

namespace {

// Tokens per chunk: 256 fp32 per gathered feature row, so the rows one output row gathers
// (~64-100 for a SHiRA r=32 mask) stay in L1/L2 while they are reused.
constexpr int64_t kTokenChunk = 256;
// A row's entries are summed in blocks, then the block sums: the rounding error grows with
// kEntryBlock + entries/kEntryBlock rather than with the entry count (rows of thousands of
// entries stay as accurate as a dense matmul; a SHiRA row of ~100 entries costs 2 extra adds).
constexpr int64_t kEntryBlock = 64;

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

inline void prefetch_span(const float* p, int64_t n) {
  for (int64_t k = 0; k < n; k += 16) __builtin_prefetch(p + k);
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

template <typename T, typename I>
void scatter_add(const T* weight, T* out, const I* idx, const T* values, float scale,
                 int64_t nnz, T* saved) {
#pragma omp parallel for schedule(static) if (nnz > 4096)
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t k = static_cast<int64_t>(idx[j]);
    const T old = weight[k];
    if (saved) saved[j] = old;  // the exact bits, so they can be swapped back
    Float<T>::store(out + k, Float<T>::load(&old) + scale * Float<T>::load(values + j));
  }
}

}  // namespace

template <typename C>
void shira_spmm_cpu(const float* xT, int64_t tokens, const int64_t* offsets, const C* cols,
                    const float* values, int64_t rows, float* accT) {
  if (tokens == 1) {
    // One token (decoding): a gathered dot product per row; no token loop to amortise.
#pragma omp parallel for schedule(static, 64)
    for (int64_t r = 0; r < rows; ++r) {
      float total = 0.0f;
      const int64_t end = offsets[r + 1];
      for (int64_t j0 = offsets[r]; j0 < end; j0 += kEntryBlock) {
        const int64_t j1 = std::min(j0 + kEntryBlock, end);
        float acc = 0.0f;
        // simd: several partial sums per block (and vectorised).
#pragma omp simd reduction(+ : acc)
        for (int64_t j = j0; j < j1; ++j) acc += values[j] * xT[cols[j]];
        total += acc;
      }
      accT[r] = total;
    }
    return;
  }
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokenChunk) {
    const int64_t tc = std::min(kTokenChunk, tokens - t0);
    // Rows hold different numbers of entries: dynamic chunks keep the threads busy.
#pragma omp parallel for schedule(dynamic, 16)
    for (int64_t r = 0; r < rows; ++r) {
      float* acc = accT + r * tokens + t0;
      std::fill(acc, acc + tc, 0.0f);
      float part[kTokenChunk];
      const int64_t end = offsets[r + 1];
      for (int64_t j0 = offsets[r]; j0 < end; j0 += kEntryBlock) {
        const int64_t j1 = std::min(j0 + kEntryBlock, end);
        std::fill(part, part + tc, 0.0f);
        for (int64_t j = j0; j < j1; ++j) {
          // The gathered rows are random: fetch the one after next while this one is used.
          if (j + 2 < end) prefetch_span(xT + static_cast<int64_t>(cols[j + 2]) * tokens + t0, tc);
          const float v = values[j];
          const float* xs = xT + static_cast<int64_t>(cols[j]) * tokens + t0;
#pragma omp simd
          for (int64_t t = 0; t < tc; ++t) part[t] += v * xs[t];
        }
#pragma omp simd
        for (int64_t t = 0; t < tc; ++t) acc[t] += part[t];
      }
    }
  }
}

template <typename C>
void shira_sddmm_cpu(const float* gyT, const float* xT, int64_t tokens, const int32_t* rows,
                     const C* cols, int64_t nnz, float* g) {
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokenChunk) {
    const int64_t tc = std::min(kTokenChunk, tokens - t0);
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < nnz; ++j) {
      if (j + 2 < nnz) prefetch_span(xT + static_cast<int64_t>(cols[j + 2]) * tokens + t0, tc);
      const float* a = gyT + static_cast<int64_t>(rows[j]) * tokens + t0;
      const float* b = xT + static_cast<int64_t>(cols[j]) * tokens + t0;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < tc; ++t) sum += a[t] * b[t];
      g[j] += sum;
    }
  }
}

template <typename I>
void shira_scatter_add_cpu(int dtype, const void* weight, void* out, const I* idx,
                           const void* values, float scale, int64_t nnz, void* saved) {
  switch (dtype) {
    case 0:
      scatter_add(static_cast<const float*>(weight), static_cast<float*>(out), idx,
                  static_cast<const float*>(values), scale, nnz, static_cast<float*>(saved));
      break;
    case 1:
      scatter_add(static_cast<const _Float16*>(weight), static_cast<_Float16*>(out), idx,
                  static_cast<const _Float16*>(values), scale, nnz, static_cast<_Float16*>(saved));
      break;
    default:
      scatter_add(static_cast<const uint16_t*>(weight), static_cast<uint16_t*>(out), idx,
                  static_cast<const uint16_t*>(values), scale, nnz, static_cast<uint16_t*>(saved));
  }
}

template void shira_spmm_cpu<int16_t>(const float*, int64_t, const int64_t*, const int16_t*,
                                      const float*, int64_t, float*);
template void shira_spmm_cpu<int32_t>(const float*, int64_t, const int64_t*, const int32_t*,
                                      const float*, int64_t, float*);
template void shira_sddmm_cpu<int16_t>(const float*, const float*, int64_t, const int32_t*,
                                       const int16_t*, int64_t, float*);
template void shira_sddmm_cpu<int32_t>(const float*, const float*, int64_t, const int32_t*,
                                       const int32_t*, int64_t, float*);
template void shira_scatter_add_cpu<int32_t>(int, const void*, void*, const int32_t*,
                                             const void*, float, int64_t, void*);
template void shira_scatter_add_cpu<int64_t>(int, const void*, void*, const int64_t*,
                                             const void*, float, int64_t, void*);
