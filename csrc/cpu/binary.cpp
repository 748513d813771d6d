#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace {

// The signs are expanded in registers, never in memory: for a block of 16·RB outputs and TT
// tokens, each step over one input feature k turns bit k%8 of the outputs' sign bytes into RB
// vectors of ±1.0 (a test and a blend each) and adds x[t, k]·(±1) to RB·TT accumulators (one
// FMA each, x broadcast from memory). With RB = 4 and TT = 6 that is 24 FMAs for 8 other
// vector operations, so the loop runs at about the FMA units' rate — faster than a dense fp32
// matmul, which must also stream 32 times the weight bytes (docs/benchmarks/binary_cpu.md).
typedef float f32x16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t i32x16 __attribute__((vector_size(64), aligned(4)));
typedef uint8_t u8x16 __attribute__((vector_size(16), aligned(1)));
constexpr int kMaxRowVectors = 4;  // 64 outputs per block
constexpr int kMaxTokens = 6;      // 24 accumulators + 4 sign vectors + 4 byte vectors < 32
// Features summed in registers before they join the block's total: the rounding error grows
// with kChunk + in / kChunk, as in a blocked dense dot product, not with in.
constexpr int64_t kChunk = 256;

inline f32x16 load16(const float* p) { return *reinterpret_cast<const f32x16*>(p); }
inline void store16(float* p, f32x16 v) { *reinterpret_cast<f32x16*>(p) = v; }

// The bytes of 16·RB outputs for one group of 8 features, widened to one int per lane.
template <int RB>
inline void load_bytes(const uint8_t* b, i32x16 (&w)[RB]) {
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
    w[r] = __builtin_convertvector(*reinterpret_cast<const u8x16*>(b + 16 * r), i32x16);
}

// acc[t][r] += x[t, k]·s(k) for the features of one group whose bits are the first `bits` of w.
template <int RB, int TT, int Bits>
inline void add_group(const i32x16 (&w)[RB], const float* x, int64_t ldx, int64_t k,
                      f32x16 (&acc)[TT][RB], int bits) {
  const f32x16 plus = f32x16{} + 1.0f, minus = f32x16{} - 1.0f;
#pragma GCC unroll 8
  for (int i = 0; i < (Bits ? Bits : 8); ++i) {
    if (!Bits && i >= bits) break;
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      const f32x16 s = (w[r] & (1 << i)) != 0 ? plus : minus;
#pragma GCC unroll 6
      for (int t = 0; t < TT; ++t) acc[t][r] += x[t * ldx + k + i] * s;
    }
  }
}

// total[t][o] = Σ_k x[t, k]·s(o0 + o, k) for TT tokens (rows of x, ldx apart) and 16·RB outputs.
template <int RB, int TT>
void signed_sums(const float* x, int64_t ldx, int64_t in, const uint8_t* bytes_t, int64_t ld,
                 int64_t o0, float (&total)[kMaxTokens][16 * kMaxRowVectors]) {
  for (int t = 0; t < TT; ++t) std::fill(total[t], total[t] + 16 * RB, 0.0f);
  for (int64_t k0 = 0; k0 < in; k0 += kChunk) {
    const int64_t k1 = std::min(in, k0 + kChunk);
    f32x16 acc[TT][RB] = {};
    i32x16 w[RB];
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8) {
      load_bytes<RB>(bytes_t + (k / 8) * ld + o0, w);
      add_group<RB, TT, 8>(w, x, ldx, k, acc, 8);
    }
    if (k < k1) {  // the last features, fewer than 8 (only where in is not a multiple of 8)
      load_bytes<RB>(bytes_t + (k / 8) * ld + o0, w);
      add_group<RB, TT, 0>(w, x, ldx, k, acc, static_cast<int>(k1 - k));
    }
    for (int t = 0; t < TT; ++t)
      for (int r = 0; r < RB; ++r)
        store16(total[t] + 16 * r, load16(total[t] + 16 * r) + acc[t][r]);
  }
}

// Σ_k x[k] in 16 lane sums (like the products' accumulators), then pairwise across the lanes.
inline float row_sum(const float* x, int64_t in) {
  f32x16 acc = {};
  int64_t k = 0;
  for (; k + 16 <= in; k += 16) acc += load16(x + k);
  float lanes[16];
  store16(lanes, acc);
  for (; k < in; ++k) lanes[k % 16] += x[k];
  for (int width = 8; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  return lanes[0];
}

struct Epilogue {  // y[t, o] = scale·(alpha[o]·P[t, o] + mu[o]·xsum[t] + bias[o])
  const float* alpha;
  bool alpha_per_row;
  const float* mu;
  bool mu_per_row;
  const float* bias;  // may be null
  float scale;
  const float* xsum;
};

template <int RB, int TT>
void output_block(const float* x, int64_t in, const uint8_t* bytes_t, int64_t ld, int64_t out,
                  int64_t o0, int64_t t0, const Epilogue& e, float* y) {
  float total[kMaxTokens][16 * kMaxRowVectors];
  signed_sums<RB, TT>(x + t0 * in, in, in, bytes_t, ld, o0, total);
  const int64_t n = std::min<int64_t>(16 * RB, out - o0);
  for (int t = 0; t < TT; ++t) {
    const float sx = e.xsum[t0 + t];
    float* row = y + (t0 + t) * out + o0;
    for (int64_t o = 0; o < n; ++o) {
      const float a = e.alpha[e.alpha_per_row ? o0 + o : 0], m = e.mu[e.mu_per_row ? o0 + o : 0];
      const float b = e.bias ? e.bias[o0 + o] : 0.0f;
      row[o] = e.scale * (a * total[t][o] + m * sx + b);
    }
  }
}

// Dispatch to the instance for RB row vectors and TT tokens (constant trip counts keep the
// accumulators in registers).
template <int RB>
void output_block_tokens(int tt, const float* x, int64_t in, const uint8_t* bytes_t, int64_t ld,
                         int64_t out, int64_t o0, int64_t t0, const Epilogue& e, float* y) {
  switch (tt) {
    case 1: return output_block<RB, 1>(x, in, bytes_t, ld, out, o0, t0, e, y);
    case 2: return output_block<RB, 2>(x, in, bytes_t, ld, out, o0, t0, e, y);
    case 3: return output_block<RB, 3>(x, in, bytes_t, ld, out, o0, t0, e, y);
    case 4: return output_block<RB, 4>(x, in, bytes_t, ld, out, o0, t0, e, y);
    case 5: return output_block<RB, 5>(x, in, bytes_t, ld, out, o0, t0, e, y);
    default: return output_block<RB, 6>(x, in, bytes_t, ld, out, o0, t0, e, y);
  }
}

}  // namespace

void shira_binary_matmul_cpu(const float* x, int64_t tokens, int64_t in, const uint8_t* bytes_t,
                             int64_t ld, int64_t out, const float* alpha, bool alpha_per_row,
                             const float* mu, bool mu_per_row, const float* bias, float scale,
                             float* y) {
  std::vector<float> xsum(tokens);
  for (int64_t t = 0; t < tokens; ++t) xsum[t] = row_sum(x + t * in, in);
  const Epilogue e{alpha, alpha_per_row, mu, mu_per_row, bias, scale, xsum.data()};
  constexpr int64_t kBlockRows = 16 * kMaxRowVectors;
  const int64_t row_blocks = (out + kBlockRows - 1) / kBlockRows;
  const int64_t token_blocks = (tokens + kMaxTokens - 1) / kMaxTokens;
  // Row blocks outside: a block's sign bytes (in/8 · 64 bytes) stay in L1/L2 over all tokens.
  // (A product of a few tens of thousands of terms is not worth waking the threads for.)
#pragma omp parallel for collapse(2) schedule(static) if (tokens * out * in > (1 << 16))
  for (int64_t rb = 0; rb < row_blocks; ++rb) {
    for (int64_t tb = 0; tb < token_blocks; ++tb) {
      const int64_t o0 = rb * kBlockRows, t0 = tb * kMaxTokens;
      const int tt = static_cast<int>(std::min<int64_t>(kMaxTokens, tokens - t0));
      switch ((std::min(kBlockRows, out - o0) + 15) / 16) {  // the last block may be narrower
        case 1: output_block_tokens<1>(tt, x, in, bytes_t, ld, out, o0, t0, e, y); break;
        case 2: output_block_tokens<2>(tt, x, in, bytes_t, ld, out, o0, t0, e, y); break;
        case 3: output_block_tokens<3>(tt, x, in, bytes_t, ld, out, o0, t0, e, y); break;
        default: output_block_tokens<4>(tt, x, in, bytes_t, ld, out, o0, t0, e, y); break;
      }
    }
  }
}
