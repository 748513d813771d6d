#include <algorithm>
#include <vector>

#include "kernels.h"

namespace {

// Outputs per block: the accumulators (and the strip of sign bytes they read per group) stay
// in L1 while the group loop walks the tables.
constexpr int64_t kOutBlock = 512;

// Groups summed into a partial result before it joins the total: a two-level sum keeps the
// rounding error close to a blocked dense dot product's.
constexpr int64_t kGroupChunk = 16;

// Signed sums of the 8 features of one group for all 256 sign patterns: entry b is
// sum_k x[k] * (bit k of b ? +1 : -1), built from the entry without b's lowest bit by adding
// 2 x[low] (one add each). Signed entries avoid the cancellation of 2 * sum(+) - sum(x).
inline void build_table(const float* x8, float* table) {
  float all = 0.0f;
  for (int k = 0; k < 8; ++k) all += x8[k];
  table[0] = -all;
  for (int b = 1; b < 256; ++b) {
    const int low = __builtin_ctz(b);
    table[b] = table[b & (b - 1)] + 2.0f * x8[low];
  }
}

}  // namespace

void shira_binary_lut_cpu(const float* x, int64_t tokens, int64_t groups, const uint8_t* bytes_t,
                          int64_t out, float* P) {
  std::vector<float> tables(static_cast<size_t>(groups) * 256);
  const int64_t out_blocks = (out + kOutBlock - 1) / kOutBlock;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xt = x + t * groups * 8;
    float* tab = tables.data();
#pragma omp parallel
    {
#pragma omp for schedule(static)
      for (int64_t g = 0; g < groups; ++g) build_table(xt + g * 8, tab + g * 256);
      // (implicit barrier: every table is ready before any lookup)
#pragma omp for schedule(static)
      for (int64_t ob = 0; ob < out_blocks; ++ob) {
        const int64_t o0 = ob * kOutBlock, n = std::min(kOutBlock, out - o0);
        float acc[kOutBlock] = {}, part[kOutBlock];
        for (int64_t g0 = 0; g0 < groups; g0 += kGroupChunk) {
          std::fill(part, part + n, 0.0f);
          for (int64_t g = g0; g < std::min(g0 + kGroupChunk, groups); ++g) {
            const float* tg = tab + g * 256;
            const uint8_t* bytes = bytes_t + g * out + o0;
#pragma omp simd
            for (int64_t o = 0; o < n; ++o) part[o] += tg[bytes[o]];
          }
#pragma omp simd
          for (int64_t o = 0; o < n; ++o) acc[o] += part[o];
        }
        std::copy(acc, acc + n, P + t * out + o0);
      }
    }
  }
}

namespace {

// The 8 signs of every byte value as floats: dequantizing a sign byte is then 8 independent
// multiply-adds that vectorise, not 8 bit tests.
struct ByteSigns {
  float v[256][8];
  ByteSigns() {
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < 8; ++k) v[b][k] = ((b >> k) & 1) ? 1.0f : -1.0f;
  }
};
const ByteSigns kByteSigns;

}  // namespace

void shira_dequantize_rows_cpu(const int32_t* packed, int64_t words, int64_t in, int64_t row0,
                               int64_t rows, const float* alpha, bool alpha_per_row,
                               const float* mu, bool mu_per_row, float scale, float* out) {
  const int64_t full_bytes = in / 8;
#pragma omp parallel for schedule(static) if (rows * in > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = row0 + r;
    const float a = scale * alpha[alpha_per_row ? row : 0], m = scale * mu[mu_per_row ? row : 0];
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(packed + row * words);
    float* dst = out + r * in;
    for (int64_t b = 0; b < full_bytes; ++b) {
      const float* s = kByteSigns.v[bytes[b]];
#pragma omp simd
      for (int k = 0; k < 8; ++k) dst[8 * b + k] = m + a * s[k];
    }
    for (int64_t i = full_bytes * 8; i < in; ++i) dst[i] = m + a * kByteSigns.v[bytes[i >> 3]][i & 7];
  }
}
