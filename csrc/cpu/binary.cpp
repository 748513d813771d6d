#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace {

// The signs are never expanded: y = x·sᵀ is summed by table lookup (as T-MAC does). For each
// token and each group of 4 input features, the 16 sums ±x[4g] ± x[4g+1] ± x[4g+2] ± x[4g+3]
// are built once; then a lane (an output) picks its sum with its nibble of sign bits, in
// registers, for a vector of outputs x 4 features at a time (figures: docs/ARCHITECTURE.md,
// "1-bit weights").
//   y = x·sᵀ:  the sum runs over input features; a lane is an output.
//   g·s:       (the gradient of x) the sum runs over outputs; a lane is an input feature, and
//              the signs are those of sᵀ, in the same layout.
// The sign bytes come in panels (kernels.h): a block of lanes reads its signs as one stream.
// AVX-512 (and builds without AVX2) look an entry up with one 16-entry permute of the table's
// floats. AVX2's permute across a register (vpermps) reads 8 entries and is slow on AMD's Zen
// cores, and there byte shuffles (vpshufb) share their two ports with float adds. So AVX2 sums
// in fixed point: x is rounded to a grid whose step is at most 2^-24 of the token's largest
// |x|, the tables hold the sums as 28-bit integers (offset to be ≥ 0) in 4 planes of 7 bits,
// and 32 lanes look a plane up with one byte shuffle per nibble; the two nibbles' bytes (< 128
// each) add in a byte, and bytes add up in 16 bits, exactly, for up to 128 rows before they
// join the block's fp32 total. A token holding inf or NaN gets meaningless sums there, but its
// outputs are still inf or NaN: the epilogue adds μ·Σx (or, for the gradient, Σ gy·μ), which
// is, and a non-finite term makes any sum non-finite.
#if defined(__AVX512F__)
constexpr int kMaxVectors = 4;  // 64 lanes per block
constexpr int kMaxTokens = 4;   // 16 accumulators + 8 index vectors + 2 lookups < 32 registers
#elif defined(__AVX2__)
#define SHIRA_FIXED_POINT 1
constexpr int kMaxVectors = 4;    // 32 lanes per block: one 32-byte row of a panel
constexpr int kMaxTokens = 1;     // 8 plane sums + 2 indices + lookups: the 16 registers
#else
constexpr int kMaxVectors = 2;
constexpr int kMaxTokens = 4;
#endif
constexpr int kBlockLanes = kLanes * kMaxVectors;
using shira::cpu::kPanel;
static_assert(kPanel % kBlockLanes == 0, "a block of lanes lies within one panel");

// Σ_k x[k] in per-lane sums (like the products' accumulators), then across the lanes.
inline float row_sum(const float* x, int64_t in) {
  fvec acc = {};
  int64_t k = 0;
  for (; k + kLanes <= in; k += kLanes) acc += loadv(x + k);
  float total = hsum(acc);
  for (; k < in; ++k) total += x[k];
  return total;
}

// The epilogue's arithmetic, in double: α·P and μ·Σx overflow fp32 where y fits (μ close to
// −α: W = μ + α·s small where s = +1), and in double both products are exact, so nothing
// overflows before y's own rounding to fp32 and no contraction into an FMA changes the result.
// Once per output element, against the sum's steps per element.
typedef double dvec __attribute__((vector_size(8 * kLanes), aligned(8)));
inline dvec widen(fvec v) { return __builtin_convertvector(v, dvec); }

// y[t, l] = scale·(alpha[l]·P[t, l] + mu[l]·add[t] + bias[l]) (alpha, mu per lane or one value;
// bias may be null), in double (above).
struct Epilogue {
  const float* alpha;
  bool alpha_per_lane;
  const float* mu;
  bool mu_per_lane;
  const float* bias;
  float scale;
  const float* add;

  // y's rows t0 .. t0 + TT - 1, lanes l0 .. l0 + n - 1, from their products P (total).
  template <int TT>
  void store(const float (&total)[kMaxTokens][kBlockLanes], int64_t t0, int64_t l0, int n,
             int64_t lanes, float* y) const {
    // Whole vectors of lanes first: where the sums are short (a narrow input) a scalar
    // epilogue cost as much as they did.
    int whole = 0;
    for (; whole + kLanes <= n; whole += kLanes) {
      const dvec al = widen(alpha_per_lane ? loadv(alpha + l0 + whole) : fvec{} + alpha[0]);
      const dvec m = widen(mu_per_lane ? loadv(mu + l0 + whole) : fvec{} + mu[0]);
      const dvec b = widen(bias ? loadv(bias + l0 + whole) : fvec{});
      for (int t = 0; t < TT; ++t) {
        const dvec v = double{scale} * (al * widen(loadv(total[t] + whole)) +
                                        m * double{add[t0 + t]} + b);
        storev(y + (t0 + t) * lanes + l0 + whole, __builtin_convertvector(v, fvec));
      }
    }
    for (int t = 0; t < TT; ++t) {
      float* row = y + (t0 + t) * lanes + l0;
      for (int l = whole; l < n; ++l) {
        const double al = alpha[alpha_per_lane ? l0 + l : 0];
        const double m = mu[mu_per_lane ? l0 + l : 0];
        const double b = bias ? bias[l0 + l] : 0.0;
        row[l] = static_cast<float>(scale * (al * total[t][l] + m * add[t0 + t] + b));
      }
    }
  }
};

#if defined(SHIRA_FIXED_POINT)
constexpr int kPlaneBits = 7, kPlanes = 4;        // 28-bit table entries
constexpr int64_t kEntryOffset = int64_t{1} << 27;  // entries are sums + offset, in [0, 2^28)
constexpr int64_t kRowTableBytes = 2 * kPlanes * 16;  // a byte row: groups 2j and 2j + 1
constexpr int64_t kFlushRows = 128;  // sums of bytes < 255 stay < 2^15 for 128 rows

// e such that 2^e puts the largest |x[k]| of a token in [2^24, 2^25): a sum of 4 of them
// rounded to integers then stays within ±2^27. (0 where x is all 0, inf or NaN.)
int fixed_point_exponent(const float* x, int64_t in) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 largest = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= in; k += 8)
    largest = _mm256_max_ps(largest, _mm256_and_ps(_mm256_loadu_ps(x + k), magnitude));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, largest);
  float top = 0.0f;
  for (int l = 0; l < 8; ++l) top = std::max(top, lanes[l]);
  for (; k < in; ++k) top = std::max(top, std::fabs(x[k]));
  return top > 0.0f && top <= FLT_MAX ? 24 - std::ilogb(top) : 0;
}

// 2^k as a float, for -126 <= k <= 127.
inline float pow2f(int k) {
  const uint32_t bits = static_cast<uint32_t>(k + 127) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The fixed-point tables of `tokens` rows of x [., in] (lda apart): byte row j of token t, at
// (t·rows + j)·kRowTableBytes, holds for plane k at 32k + 16h + e bits 7k .. 7k + 6 of
// kEntryOffset + Σ_i (bit i of e ? 1 : -1)·round(x[4g + i]·2^exp[t]), g = 2j + h (features past
// `in` count as 0). An orphaned omp for, as build_tables.
void build_fixed_tables(const float* x, int64_t lda, int64_t tokens, int64_t in, int64_t rows,
                        const int* exps, uint8_t* tables) {
  // Entry e's sign of q_i, for entries 0-7 and 8-15.
  const __m256i sign_lo[4] = {_mm256_setr_epi32(-1, 1, -1, 1, -1, 1, -1, 1),
                              _mm256_setr_epi32(-1, -1, 1, 1, -1, -1, 1, 1),
                              _mm256_setr_epi32(-1, -1, -1, -1, 1, 1, 1, 1),
                              _mm256_set1_epi32(-1)};
  // Bytes in order (entry, plane) -> (plane, entry) within each 128-bit half: 4 entries a half.
  const __m256i by_plane = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                            0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i quads = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i seven = _mm256_set1_epi32(0x7F), offset = _mm256_set1_epi32(kEntryOffset);
#pragma omp for collapse(2) schedule(static)
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < rows; ++j) {
      // x·2^e in float: exact where it lies in range (|x·2^e| < 2^25), rounded to the nearest
      // integer (even on ties) by the conversion; 2^e in two factors, each a finite float.
      const int e = exps[t];  // in [-103, 173]: 24 - ilogb of a finite float
      const __m256 half = _mm256_set1_ps(pow2f(e / 2)), rest = _mm256_set1_ps(pow2f(e - e / 2));
      const float* xs = x + t * lda + 8 * j;
      __m256 v;
      if (8 * j + 8 <= in) {
        v = _mm256_loadu_ps(xs);
      } else {
        alignas(32) float part[8] = {};
        for (int64_t i = 0; i < in - 8 * j; ++i) part[i] = xs[i];
        v = _mm256_load_ps(part);
      }
      alignas(32) int32_t q[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(q),
                         _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(v, half), rest)));
      uint8_t* row = tables + (t * rows + j) * kRowTableBytes;
      for (int h = 0; h < 2; ++h) {
        __m256i entries[2];  // entries 0-7 and 8-15 of group 2j + h, each offset
        for (int p = 0; p < 2; ++p) {
          __m256i sum = offset;
          for (int i = 0; i < 4; ++i) {
            // Bit 3 of the entry (q_3's sign) is -1 for entries 0-7 and +1 for 8-15.
            const __m256i sign = i == 3 ? _mm256_set1_epi32(p ? 1 : -1) : sign_lo[i];
            sum = _mm256_add_epi32(sum, _mm256_sign_epi32(_mm256_set1_epi32(q[4 * h + i]), sign));
          }
          // The 4 planes of 7 bits into the 4 bytes of each 32-bit lane.
          __m256i spread = _mm256_and_si256(sum, seven);
          for (int k = 1; k < kPlanes; ++k)  // (constant shifts once unrolled)
            spread = _mm256_or_si256(spread, _mm256_and_si256(_mm256_slli_epi32(sum, k),
                                                              _mm256_slli_epi32(seven, 8 * k)));
          // [P0 P1 P2 P3 of entries 8p..8p+3 | of 8p+4..8p+7], then [P0 P0 P1 P1 | P2 P2 P3 P3].
          entries[p] = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(spread, by_plane), quads);
        }
        const __m256i planes02 = _mm256_unpacklo_epi64(entries[0], entries[1]);
        const __m256i planes13 = _mm256_unpackhi_epi64(entries[0], entries[1]);
        const __m128i plane[4] = {
            _mm256_castsi256_si128(planes02), _mm256_castsi256_si128(planes13),
            _mm256_extracti128_si256(planes02, 1), _mm256_extracti128_si256(planes13, 1)};
        for (int k = 0; k < kPlanes; ++k)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 32 * k + 16 * h), plane[k]);
      }
    }
  }
}

// total[0][l] = Σ_j x[j]·s(j, l) over all byte rows of the 32 lanes from l0, for one token
// whose fixed-point tables (with exponent e) start at `tables`.
void fixed_sums(const uint8_t* tables, int e, const uint8_t* panels, int64_t l0, int64_t rows,
                float (&total)[kMaxTokens][kBlockLanes]) {
  static_assert(kBlockLanes == 32 && kMaxTokens == 1, "a block is one 32-byte load, one token");
  const uint8_t* panel = panels + (l0 / kPanel) * rows * kPanel + l0 % kPanel;
  const __m256i nibble = _mm256_set1_epi8(0x0F), low_byte = _mm256_set1_epi16(0x00FF);
  std::fill(total[0], total[0] + 32, 0.0f);
  // The grid's step 2^-e in two factors, each a finite float (e in [-103, 173]).
  const __m256 unit_half = _mm256_set1_ps(pow2f(-e / 2));
  const __m256 unit_rest = _mm256_set1_ps(pow2f(e / 2 - e));
  for (int64_t j0 = 0; j0 < rows; j0 += kFlushRows) {
    const int64_t j1 = std::min(rows, j0 + kFlushRows);
    // Plane k's sums of the even lanes (bytes 2i: word i) and of the odd ones.
    __m256i even[kPlanes], odd[kPlanes];
    for (int k = 0; k < kPlanes; ++k) even[k] = odd[k] = _mm256_setzero_si256();
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* b = panel + j * kPanel;
      __builtin_prefetch(b + 256 * kPanel);
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
      const __m256i lo = _mm256_and_si256(bytes, nibble);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
      const uint8_t* row = tables + j * kRowTableBytes;
      for (int k = 0; k < kPlanes; ++k) {
        const __m256i both = _mm256_add_epi8(
            _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(
                                    reinterpret_cast<const __m128i*>(row + 32 * k))), lo),
            _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(
                                    reinterpret_cast<const __m128i*>(row + 32 * k + 16))), hi));
        even[k] = _mm256_add_epi16(even[k], _mm256_and_si256(both, low_byte));
        odd[k] = _mm256_add_epi16(odd[k], _mm256_srli_epi16(both, 8));
      }
    }
    // Per lane, planes 0 + 1 and 2 + 3 joined in 32 bits (signed 16-bit products: the sums
    // are < 2^15): pairs[p][v] for the lanes [0-3|16-19], [4-7|20-23], [8-11|24-27], [12-15|28-31].
    const __m256i join = _mm256_set1_epi32(1 | (1 << (kPlaneBits + 16)));  // 16-bit (1, 128)
    __m256i pairs[2][4];
    for (int p = 0; p < 2; ++p) {
      const __m256i first[2] = {_mm256_unpacklo_epi16(even[2 * p], odd[2 * p]),
                                _mm256_unpacklo_epi16(even[2 * p + 1], odd[2 * p + 1])};
      const __m256i second[2] = {_mm256_unpackhi_epi16(even[2 * p], odd[2 * p]),
                                 _mm256_unpackhi_epi16(even[2 * p + 1], odd[2 * p + 1])};
      pairs[p][0] = _mm256_madd_epi16(_mm256_unpacklo_epi16(first[0], first[1]), join);
      pairs[p][1] = _mm256_madd_epi16(_mm256_unpackhi_epi16(first[0], first[1]), join);
      pairs[p][2] = _mm256_madd_epi16(_mm256_unpacklo_epi16(second[0], second[1]), join);
      pairs[p][3] = _mm256_madd_epi16(_mm256_unpackhi_epi16(second[0], second[1]), join);
    }
    // Each row added 2 entries, each 2^27 over its sum: 2^28 = 2^14 units of planes 2 + 3.
    // The block's sum low + high·2^14 is then one fp32 rounding (both parts exact, < 2^24),
    // times 2^-e (exact bar underflow), added to the total.
    const __m256i high_offset = _mm256_set1_epi32(static_cast<int>((j1 - j0) << 14));
    __m256 sums[4];
    for (int v = 0; v < 4; ++v)
      sums[v] = _mm256_mul_ps(
          _mm256_mul_ps(_mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(_mm256_sub_epi32(pairs[1][v], high_offset)),
                            _mm256_set1_ps(1 << 14), _mm256_cvtepi32_ps(pairs[0][v])),
                        unit_half),
          unit_rest);
    // Lanes back in order: [0-7], [8-15], [16-23], [24-31].
    const __m256 in_order[4] = {_mm256_permute2f128_ps(sums[0], sums[1], 0x20),
                                _mm256_permute2f128_ps(sums[2], sums[3], 0x20),
                                _mm256_permute2f128_ps(sums[0], sums[1], 0x31),
                                _mm256_permute2f128_ps(sums[2], sums[3], 0x31)};
    for (int q = 0; q < 4; ++q)
      _mm256_storeu_ps(total[0] + 8 * q,
                       _mm256_add_ps(_mm256_loadu_ps(total[0] + 8 * q), in_order[q]));
  }
}
#else
constexpr int kTableFloats = 16;
// Steps summed in registers before they join the block's total: the rounding error grows
// with kChunk + steps / kChunk, as in a blocked dense dot product, not with the step count.
constexpr int64_t kChunk = 256;

// Tables for `tokens` rows of x [., in] (lda apart), groups of 4 features from 0 to `groups`
// (features past `in` count as 0): table (t, g), at (t·groups + g)·kTableFloats, holds for each
// nibble e the sum Σ_i (bit i of e ? 1 : -1)·x[4g + i] as float e. Shared among the threads of
// an enclosing parallel region (an orphaned omp for).
void build_tables(const float* x, int64_t lda, int64_t tokens, int64_t in, int64_t groups,
                  float* table) {
#pragma omp for collapse(2) schedule(static)
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t g = 0; g < groups; ++g) {
      float v[4];
      for (int i = 0; i < 4; ++i) v[i] = 4 * g + i < in ? x[t * lda + 4 * g + i] : 0.0f;
      float sums[16];
      for (int e = 0; e < 16; ++e)
        sums[e] = ((e & 1 ? v[0] : -v[0]) + (e & 2 ? v[1] : -v[1])) +
                  ((e & 4 ? v[2] : -v[2]) + (e & 8 ? v[3] : -v[3]));
      std::memcpy(table + (t * groups + g) * kTableFloats, sums, sizeof sums);
    }
  }
}

// The entry for nibble idx[l] & 15 per lane l, from its table.
inline fvec lookup(const float* table, ivec idx) {
#if defined(__AVX512F__)
  return reinterpret_cast<fvec>(
      _mm512_permutexvar_ps(reinterpret_cast<__m512i>(idx), _mm512_loadu_ps(table)));
#else
  fvec v;
  for (int l = 0; l < kLanes; ++l) v[l] = table[idx[l] & 15];
  return v;
#endif
}

// total[t][l] = Σ_j x[t, j]·s(j, l) over all byte rows of the lanes from l0 (RB vectors of
// them), for TT tokens whose tables start at `tables` (t·groups tables apart).
template <int RB, int TT>
void lookup_sums(const float* tables, int64_t groups, const uint8_t* panels, int64_t l0,
                 int64_t rows, float (&total)[kMaxTokens][kBlockLanes]) {
  const uint8_t* panel = panels + (l0 / kPanel) * rows * kPanel + l0 % kPanel;
  for (int t = 0; t < TT; ++t) std::fill(total[t], total[t] + kLanes * RB, 0.0f);
  constexpr int64_t kChunkRows = kChunk / 8;
  for (int64_t j0 = 0; j0 < rows; j0 += kChunkRows) {
    const int64_t j1 = std::min(rows, j0 + kChunkRows);
    fvec acc[TT][RB] = {};
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* b = panel + j * kPanel;
      __builtin_prefetch(b + 256 * kPanel);
      ivec lo[RB], hi[RB];
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        lo[r] = load_bytes(b + kLanes * r);
        hi[r] = lo[r] >> 4;
      }
#pragma GCC unroll 4
      for (int t = 0; t < TT; ++t) {
        const float* tl = tables + (t * groups + 2 * j) * kTableFloats;
#pragma GCC unroll 4
        for (int r = 0; r < RB; ++r)
          acc[t][r] += lookup(tl, lo[r]) + lookup(tl + kTableFloats, hi[r]);
      }
    }
    for (int t = 0; t < TT; ++t)
      for (int r = 0; r < RB; ++r)
        storev(total[t] + kLanes * r, loadv(total[t] + kLanes * r) + acc[t][r]);
  }
}
#endif

// binary_linear's y by lookup, in passes over as many tokens as have their tables in about
// 512 KiB (L2): each thread takes blocks of lanes x tokens, a block's signs staying in L1.
void lookup_products(const float* x, int64_t tokens, int64_t steps, const uint8_t* panels,
                     int64_t lanes, const Epilogue& e, float* y) {
  const int64_t rows = (steps + 31) / 32 * 4;  // byte rows of the panels
#if defined(SHIRA_FIXED_POINT)
  const int64_t table_bytes = rows * kRowTableBytes;
#else
  const int64_t groups = 2 * rows, table_bytes = groups * kTableFloats * 4;
#endif
  const int64_t fit = std::max<int64_t>(1, (512 << 10) / table_bytes / kMaxTokens) * kMaxTokens;
  const int64_t per_pass = std::min(fit, tokens);
  // Kept per calling thread (vec.h's Scratch), as the sparse kernels keep their tiles: a fresh
  // buffer past malloc's mmap threshold (128 KiB: in ≥ 8192 at one token) is faulted in anew
  // on every call.
  thread_local Scratch table_scratch;
  float* tables = table_scratch.get(per_pass * table_bytes / 4);
  const int64_t lane_blocks = (lanes + kBlockLanes - 1) / kBlockLanes;
#if defined(SHIRA_FIXED_POINT)
  // Before the threads start: one pass over x, where an omp for would cost a barrier.
  std::vector<int> exps(tokens);
  for (int64_t t = 0; t < tokens; ++t) exps[t] = fixed_point_exponent(x + t * steps, steps);
  uint8_t* fixed_tables = reinterpret_cast<uint8_t*>(tables);
#endif
#pragma omp parallel if (tokens * lanes * steps > (1 << 16))
  for (int64_t s0 = 0; s0 < tokens; s0 += per_pass) {
    const int64_t st = std::min(per_pass, tokens - s0);
#if defined(SHIRA_FIXED_POINT)
    build_fixed_tables(x + s0 * steps, steps, st, steps, rows, exps.data() + s0,
                       fixed_tables);  // ends in a barrier
#pragma omp for collapse(2) schedule(static)
    for (int64_t lb = 0; lb < lane_blocks; ++lb) {
      for (int64_t t = 0; t < st; ++t) {
        const int64_t l0 = lb * kBlockLanes;
        const int n = static_cast<int>(std::min<int64_t>(kBlockLanes, lanes - l0));
        float total[kMaxTokens][kBlockLanes];
        fixed_sums(fixed_tables + t * table_bytes, exps[s0 + t], panels, l0, rows, total);
        e.store<1>(total, s0 + t, l0, n, lanes, y);
      }
    }  // the barrier here keeps the tables until every block has read them
#else
    build_tables(x + s0 * steps, steps, st, steps, groups, tables);  // ends in a barrier
    const int64_t token_blocks = (st + kMaxTokens - 1) / kMaxTokens;
#pragma omp for collapse(2) schedule(static)
    for (int64_t lb = 0; lb < lane_blocks; ++lb) {
      for (int64_t tb = 0; tb < token_blocks; ++tb) {
        const int64_t l0 = lb * kBlockLanes, t0 = tb * kMaxTokens;
        const int n = static_cast<int>(std::min<int64_t>(kBlockLanes, lanes - l0));
        const float* tl = tables + t0 * groups * kTableFloats;
        const int tt = static_cast<int>(std::min<int64_t>(kMaxTokens, st - t0));
        with_constant<kMaxVectors>((n + kLanes - 1) / kLanes, [&](auto rb) {
          with_constant<kMaxTokens>(tt, [&](auto tc) {
            constexpr int RB = decltype(rb)::value, TT = decltype(tc)::value;
            float total[kMaxTokens][kBlockLanes];
            lookup_sums<RB, TT>(tl, groups, panels, l0, rows, total);
            e.store<TT>(total, s0 + t0, l0, n, lanes, y);
          });
        });
      }
    }  // the barrier here keeps the tables until every block has read them
#endif
  }
}

}  // namespace

void shira::cpu::sign_panels(const uint8_t* rows, int64_t lanes, int64_t nbytes,
                             uint8_t* panels) {
  const int64_t count = (lanes + kPanel - 1) / kPanel;
#pragma omp parallel for schedule(static) if (lanes * nbytes >= (1 << 20))
  for (int64_t p = 0; p < count; ++p) {
    uint8_t* panel = panels + p * nbytes * kPanel;
    const int64_t n = std::min(kPanel, lanes - p * kPanel);
    std::memset(panel, 0, nbytes * kPanel);
    for (int64_t l = 0; l < n; ++l) {
      const uint8_t* row = rows + (p * kPanel + l) * nbytes;
      for (int64_t g = 0; g < nbytes; ++g) panel[g * kPanel + l] = row[g];
    }
  }
}

void shira::cpu::binary_linear(const float* x, int64_t tokens, int64_t in,
                               const uint8_t* panels, int64_t out, const float* alpha,
                               bool alpha_per_row, const float* mu, bool mu_per_row,
                               const float* bias, float scale, float* y) {
  std::vector<float> xsum(tokens);
  for (int64_t t = 0; t < tokens; ++t) xsum[t] = row_sum(x + t * in, in);
  const Epilogue e{alpha, alpha_per_row, mu, mu_per_row, bias, scale, xsum.data()};
  lookup_products(x, tokens, in, panels, out, e, y);
}

void shira::cpu::binary_linear_grad_x(const float* g, int64_t tokens, int64_t out,
                                      const uint8_t* panels_t, int64_t in, const float* add,
                                      float* gx) {
  const float one = 1.0f;
  const Epilogue e{&one, false, &one, false, nullptr, 1.0f, add};
  lookup_products(g, tokens, out, panels_t, in, e, gx);
}

namespace {

// One row of binary_dequantize: 32 columns per sign word, each a blend of lo and hi by the
// word's bits (AVX-512 BW: one masked blend and store per 32 bf16/fp16 or 16 fp32 columns;
// AVX2: the word's bits broadcast, each lane testing its own bit, then a byte blend per 16
// bf16/fp16 or 8 fp32 columns).
template <typename E>
void dequantize_row(const int32_t* words, int64_t in, E hi, E lo, E* out) {
  int64_t k = 0;
#if defined(__AVX512BW__)
  if constexpr (sizeof(E) == 2) {
    const __m512i h = _mm512_set1_epi16(static_cast<short>(hi));
    const __m512i l = _mm512_set1_epi16(static_cast<short>(lo));
    for (; k + 32 <= in; k += 32)
      _mm512_storeu_si512(out + k, _mm512_mask_blend_epi16(
                                       static_cast<__mmask32>(words[k / 32]), l, h));
  } else {
    const __m512i h = _mm512_set1_epi32(static_cast<int>(hi));
    const __m512i l = _mm512_set1_epi32(static_cast<int>(lo));
    for (; k + 32 <= in; k += 32) {
      const uint32_t w = static_cast<uint32_t>(words[k / 32]);
      _mm512_storeu_si512(out + k, _mm512_mask_blend_epi32(static_cast<__mmask16>(w), l, h));
      _mm512_storeu_si512(out + k + 16,
                          _mm512_mask_blend_epi32(static_cast<__mmask16>(w >> 16), l, h));
    }
  }
#elif defined(__AVX2__)
  if constexpr (sizeof(E) == 2) {
    const __m256i h = _mm256_set1_epi16(static_cast<short>(hi));
    const __m256i l = _mm256_set1_epi16(static_cast<short>(lo));
    const __m256i bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                          4096, 8192, 16384, static_cast<short>(0x8000));
    for (; k + 32 <= in; k += 32) {
      const uint32_t w = static_cast<uint32_t>(words[k / 32]);
      for (int half = 0; half < 2; ++half) {
        const __m256i b = _mm256_set1_epi16(static_cast<short>(w >> (16 * half)));
        const __m256i set = _mm256_cmpeq_epi16(_mm256_and_si256(b, bit), bit);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k + 16 * half),
                            _mm256_blendv_epi8(l, h, set));
      }
    }
  } else {
    const __m256i h = _mm256_set1_epi32(static_cast<int>(hi));
    const __m256i l = _mm256_set1_epi32(static_cast<int>(lo));
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (; k + 32 <= in; k += 32) {
      const uint32_t w = static_cast<uint32_t>(words[k / 32]);
      for (int q = 0; q < 4; ++q) {
        const __m256i b = _mm256_set1_epi32(static_cast<int>(w >> (8 * q)));
        const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(b, bit), bit);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k + 8 * q),
                            _mm256_blendv_epi8(l, h, set));
      }
    }
  }
#endif
  for (; k < in; ++k)
    out[k] = (static_cast<uint32_t>(words[k / 32]) >> (k % 32)) & 1u ? hi : lo;
}

}  // namespace

void shira::cpu::binary_dequantize(const int32_t* packed, int64_t rows, int64_t words,
                                   int64_t in, const void* hi, const void* lo, int elem_bytes,
                                   void* out) {
  auto run = [&](auto tag) {
    using E = decltype(tag);
    const E* h = static_cast<const E*>(hi);
    const E* l = static_cast<const E*>(lo);
    E* o = static_cast<E*>(out);
    // One thread for a LoRA-sized weight: a parallel region costs more than its blends.
#pragma omp parallel for schedule(static) if (rows * in >= (1 << 18))
    for (int64_t r = 0; r < rows; ++r) dequantize_row<E>(packed + r * words, in, h[r], l[r], o + r * in);
  };
  if (elem_bytes == 2) run(uint16_t{}); else run(uint32_t{});
}
