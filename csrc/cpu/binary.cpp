#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace {

// The signs are expanded in registers, never in memory: for a block of RB vectors of outputs
// and TT tokens, each step over one input feature k turns bit k%8 of the outputs' sign bytes
// into RB vectors of ±1.0 (a shift and a mask-xor each) and adds x[t, k]·(±1) to RB·TT
// accumulators (one FMA each, x broadcast from memory). With AVX-512 (RB = 4, TT = 6) that is
// 24 FMAs for 8 other vector operations, so the loop runs at about the FMA units' rate —
// faster than a dense fp32 matmul, which must also stream 32 times the weight bytes
// (docs/benchmarks/binary_cpu.md). With 16 AVX2 registers the block is 2 x 4.
#if defined(__AVX512F__)
constexpr int kMaxRowVectors = 4;  // 64 outputs per block
constexpr int kMaxTokens = 6;      // 24 accumulators + 4 byte vectors + sign + x < 32 registers
#else
constexpr int kMaxRowVectors = 2;  // 16 outputs per block
constexpr int kMaxTokens = 4;      // 8 accumulators + 2 byte vectors + sign + x < 16 registers
#endif
typedef uint8_t bvec __attribute__((vector_size(kLanes), aligned(1)));
constexpr int kBlockRows = kLanes * kMaxRowVectors;
// Features summed in registers before they join the block's total: the rounding error grows
// with kChunk + in / kChunk, as in a blocked dense dot product, not with in.
constexpr int64_t kChunk = 256;

// The bytes of RB vectors of outputs for one group of 8 features, widened to one int per lane.
template <int RB>
inline void load_bytes(const uint8_t* b, ivec (&w)[RB]) {
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
    w[r] = __builtin_convertvector(*reinterpret_cast<const bvec*>(b + kLanes * r), ivec);
}

// ±1.0 per lane from bit i of w: the bit moved to the sign position, then xor-ed into the bits
// of -1.0 (a set bit gives +1.0). Integer shifts and logic vectorise on every x86 level.
inline fvec signs(ivec w, int i) {
  const ivec bits = ((w << (31 - i)) & static_cast<int32_t>(0x80000000u)) ^
                    static_cast<int32_t>(0xbf800000u);
  return reinterpret_cast<const fvec&>(bits);
}

// acc[t][r] += x[t, k + i]·s(k + i) for the first `bits` features of a group (8 but at the end
// of a row whose length is not a multiple of 8).
template <int RB, int TT>
inline void add_group(const ivec (&w)[RB], const float* x, int64_t ldx, int64_t k,
                      fvec (&acc)[TT][RB], int bits) {
#pragma GCC unroll 8
  for (int i = 0; i < bits; ++i) {
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      const fvec s = signs(w[r], i);
#pragma GCC unroll 6
      for (int t = 0; t < TT; ++t) acc[t][r] += x[t * ldx + k + i] * s;
    }
  }
}

// total[t][o] = Σ_k x[t, k]·s(o0 + o, k) for TT tokens (rows of x, ldx apart) and RB vectors of
// outputs.
template <int RB, int TT>
void signed_sums(const float* x, int64_t ldx, int64_t in, const uint8_t* bytes_t, int64_t ld,
                 int64_t o0, float (&total)[kMaxTokens][kBlockRows]) {
  for (int t = 0; t < TT; ++t) std::fill(total[t], total[t] + kLanes * RB, 0.0f);
  for (int64_t k0 = 0; k0 < in; k0 += kChunk) {
    const int64_t k1 = std::min(in, k0 + kChunk);
    fvec acc[TT][RB] = {};
    ivec w[RB];
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8) {
      load_bytes<RB>(bytes_t + (k / 8) * ld + o0, w);
      add_group<RB, TT>(w, x, ldx, k, acc, 8);
    }
    if (k < k1) {  // the last features, fewer than 8 (only where in is not a multiple of 8)
      load_bytes<RB>(bytes_t + (k / 8) * ld + o0, w);
      add_group<RB, TT>(w, x, ldx, k, acc, static_cast<int>(k1 - k));
    }
    for (int t = 0; t < TT; ++t)
      for (int r = 0; r < RB; ++r)
        storev(total[t] + kLanes * r, loadv(total[t] + kLanes * r) + acc[t][r]);
  }
}

// Σ_k x[k] in per-lane sums (like the products' accumulators), then across the lanes.
inline float row_sum(const float* x, int64_t in) {
  fvec acc = {};
  int64_t k = 0;
  for (; k + kLanes <= in; k += kLanes) acc += loadv(x + k);
  float total = hsum(acc);
  for (; k < in; ++k) total += x[k];
  return total;
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
  float total[kMaxTokens][kBlockRows];
  signed_sums<RB, TT>(x + t0 * in, in, in, bytes_t, ld, o0, total);
  const int64_t n = std::min<int64_t>(kLanes * RB, out - o0);
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

// f(std::integral_constant<int, min(v, N)>()) for v >= 1: the instance for a block's row
// vectors or tokens (constant trip counts keep the accumulators in registers).
template <int N, typename F>
inline void with_constant(int v, F&& f) {
  if constexpr (N > 1) {
    if (v < N) return with_constant<N - 1>(v, f);
  }
  f(std::integral_constant<int, N>());
}

}  // namespace

void shira_binary_matmul_cpu(const float* x, int64_t tokens, int64_t in, const uint8_t* bytes_t,
                             int64_t ld, int64_t out, const float* alpha, bool alpha_per_row,
                             const float* mu, bool mu_per_row, const float* bias, float scale,
                             float* y) {
  std::vector<float> xsum(tokens);
  for (int64_t t = 0; t < tokens; ++t) xsum[t] = row_sum(x + t * in, in);
  const Epilogue e{alpha, alpha_per_row, mu, mu_per_row, bias, scale, xsum.data()};
  const int64_t row_blocks = (out + kBlockRows - 1) / kBlockRows;
  const int64_t token_blocks = (tokens + kMaxTokens - 1) / kMaxTokens;
  // Row blocks outside: a block's sign bytes (in/8 rows of kBlockRows bytes) stay in L1/L2
  // over all tokens. (A product of a few tens of thousands of terms is not worth waking the
  // threads for.)
#pragma omp parallel for collapse(2) schedule(static) if (tokens * out * in > (1 << 16))
  for (int64_t rb = 0; rb < row_blocks; ++rb) {
    for (int64_t tb = 0; tb < token_blocks; ++tb) {
      const int64_t o0 = rb * kBlockRows, t0 = tb * kMaxTokens;
      const int rows = static_cast<int>(std::min<int64_t>(kBlockRows, out - o0));
      const int tt = static_cast<int>(std::min<int64_t>(kMaxTokens, tokens - t0));
      with_constant<kMaxRowVectors>((rows + kLanes - 1) / kLanes, [&](auto rb_) {
        with_constant<kMaxTokens>(tt, [&](auto tt_) {
          output_block<decltype(rb_)::value, decltype(tt_)::value>(x, in, bytes_t, ld, out, o0,
                                                                   t0, e, y);
        });
      });
    }
  }
}
