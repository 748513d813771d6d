#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace {

// The signs are expanded in registers, never in memory. A block of RB vectors of outputs and
// TT tokens keeps RB·TT accumulators; each step of the sum turns one bit per lane of the
// block's sign words into RB vectors of ±1.0 (a shift and a mask-xor each) and adds a[t, j]·(±1)
// to the accumulators (one FMA each, a broadcast from memory). With AVX-512 (RB = 4, TT = 6)
// that is 24 FMAs for 8 other vector operations, so the loop runs at about the FMA units' rate
// — faster than a dense fp32 matmul, which must also stream 32 times the weight bytes
// (docs/benchmarks/binary_cpu.md). With 16 AVX2 registers the block is 2 x 4.
//   y = x·sᵀ:  the sum runs over input features; a lane is an output, whose sign bytes come
//              transposed (bytes_t), one byte per lane holding 8 consecutive steps.
//   g·s:       (the gradient of x) the sum runs over outputs; a lane is an input feature, and
//              one step's bits are kLanes consecutive bits of an output's packed row.
#if defined(__AVX512F__)
constexpr int kMaxVectors = 4;  // 64 lanes per block
constexpr int kMaxTokens = 6;      // 24 accumulators + 4 sign words + sign + x < 32 registers
#else
constexpr int kMaxVectors = 2;  // 16 lanes per block
constexpr int kMaxTokens = 4;      // 8 accumulators + 2 sign words + sign + x < 16 registers
#endif
typedef uint8_t bvec __attribute__((vector_size(kLanes), aligned(1)));
constexpr int kBlockLanes = kLanes * kMaxVectors;
// Steps summed in registers before they join the block's total: the rounding error grows
// with kChunk + steps / kChunk, as in a blocked dense dot product, not with the step count.
constexpr int64_t kChunk = 256;

// ±1.0 per lane from bit i of w: the bit moved to the sign position, then xor-ed into the bits
// of -1.0 (a set bit gives +1.0). Integer shifts and logic vectorise on every x86 level.
inline fvec signs(ivec w, int i) {
  const ivec bits = ((w << (31 - i)) & static_cast<int32_t>(0x80000000u)) ^
                    static_cast<int32_t>(0xbf800000u);
  return reinterpret_cast<const fvec&>(bits);
}

// Where a block's signs come from: the rows of a byte matrix (stride bytes apart), read for the
// RB vectors of lanes from lane l0. load(j) fills w with steps j .. j + kSteps - 1: step j + i's
// sign of a lane is bit bit(i) of that lane.
//   kTransposed (x·sᵀ): a lane is an output and the matrix is bytes_t: one byte per lane holds
//     its 8 steps from j, step j + i at bit i (bytes_t's rows are padded to whole vectors).
//   kRows (g·s): a lane is an input feature and row j is output j's packed signs, each lane's
//     bit moved to bit 31. l0 is a multiple of kLanes, so a vector's bits are one aligned byte
//     (AVX2) or 16-bit half-word (AVX-512) of the row, within the row's words even where the
//     vector runs past in_features (those lanes are computed, not stored).
enum class SignLayout { kTransposed, kRows };

template <SignLayout L>
struct SignSource {
  static constexpr bool kTransposed = L == SignLayout::kTransposed;
  static constexpr int kSteps = kTransposed ? 8 : 1;
  const uint8_t* bytes;
  int64_t stride, l0;
  template <int RB>
  void load(int64_t j, ivec (&w)[RB]) const {
    if constexpr (kTransposed) {
      const uint8_t* b = bytes + (j / 8) * stride + l0;
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r)
        w[r] = __builtin_convertvector(*reinterpret_cast<const bvec*>(b + kLanes * r), ivec);
    } else {
      ivec up;  // lane l: 31 - l, so that bit l of the broadcast word lands on bit 31
      for (int l = 0; l < kLanes; ++l) up[l] = 31 - l;
      const uint8_t* row = bytes + j * stride + l0 / 8;
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        uint32_t v;
        if constexpr (kLanes == 16) {
          uint16_t h;
          std::memcpy(&h, row + 2 * r, 2);
          v = h;
        } else {
          v = row[r];
        }
        w[r] = (ivec{} + static_cast<int32_t>(v)) << up;
      }
    }
  }
  static int bit(int i) { return kTransposed ? i : 31; }
};

// total[t][l] = Σ_j a[t, j]·s(j, l) for TT rows of a (lda apart), `steps` steps and RB vectors
// of lanes whose signs come from `src`.
template <int RB, int TT, class Source>
void signed_sums(const float* a, int64_t lda, int64_t steps, const Source& src,
                 float (&total)[kMaxTokens][kBlockLanes]) {
  for (int t = 0; t < TT; ++t) std::fill(total[t], total[t] + kLanes * RB, 0.0f);
  for (int64_t j0 = 0; j0 < steps; j0 += kChunk) {
    const int64_t j1 = std::min(steps, j0 + kChunk);
    fvec acc[TT][RB] = {};
    ivec w[RB];
    for (int64_t j = j0; j < j1; j += Source::kSteps) {
      src.template load<RB>(j, w);
      const int n = static_cast<int>(std::min<int64_t>(Source::kSteps, j1 - j));
#pragma GCC unroll 8
      for (int i = 0; i < n; ++i) {
#pragma GCC unroll 4
        for (int r = 0; r < RB; ++r) {
          const fvec s = signs(w[r], Source::bit(i));
#pragma GCC unroll 6
          for (int t = 0; t < TT; ++t) acc[t][r] += a[t * lda + j + i] * s;
        }
      }
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

// y[t, l] = scale·(alpha[l]·P[t, l] + mu[l]·add[t] + bias[l]) (alpha, mu per lane or one value;
// bias may be null).
struct Epilogue {
  const float* alpha;
  bool alpha_per_lane;
  const float* mu;
  bool mu_per_lane;
  const float* bias;
  float scale;
  const float* add;
};

// y [tokens, lanes] = the epilogue of Σ_j a[t, j]·s(j, l) over `steps`; source(l0) gives the
// sign source of the lanes from l0. Blocks of lanes outside, of tokens inside: a block's signs
// stay in L1/L2 over all tokens. (A product of a few tens of thousands of terms is not worth
// waking the threads for.)
template <class MakeSource>
void binary_products(const float* a, int64_t tokens, int64_t steps, int64_t lanes,
                     MakeSource&& source, const Epilogue& e, float* y) {
  const int64_t lane_blocks = (lanes + kBlockLanes - 1) / kBlockLanes;
  const int64_t token_blocks = (tokens + kMaxTokens - 1) / kMaxTokens;
#pragma omp parallel for collapse(2) schedule(static) if (tokens * lanes * steps > (1 << 16))
  for (int64_t lb = 0; lb < lane_blocks; ++lb) {
    for (int64_t tb = 0; tb < token_blocks; ++tb) {
      const int64_t l0 = lb * kBlockLanes, t0 = tb * kMaxTokens;
      const int n = static_cast<int>(std::min<int64_t>(kBlockLanes, lanes - l0));
      const int tt = static_cast<int>(std::min<int64_t>(kMaxTokens, tokens - t0));
      const auto src = source(l0);
      with_constant<kMaxVectors>((n + kLanes - 1) / kLanes, [&](auto rb) {
        with_constant<kMaxTokens>(tt, [&](auto tc) {
          constexpr int RB = decltype(rb)::value, TT = decltype(tc)::value;
          float total[kMaxTokens][kBlockLanes];
          signed_sums<RB, TT>(a + t0 * steps, steps, steps, src, total);
          for (int t = 0; t < TT; ++t) {
            float* row = y + (t0 + t) * lanes + l0;
            for (int l = 0; l < n; ++l) {
              const float al = e.alpha[e.alpha_per_lane ? l0 + l : 0];
              const float m = e.mu[e.mu_per_lane ? l0 + l : 0];
              const float b = e.bias ? e.bias[l0 + l] : 0.0f;
              row[l] = e.scale * (al * total[t][l] + m * e.add[t0 + t] + b);
            }
          }
        });
      });
    }
  }
}

}  // namespace

void shira::cpu::binary_linear(const float* x, int64_t tokens, int64_t in,
                               const uint8_t* bytes_t, int64_t ld, int64_t out,
                               const float* alpha, bool alpha_per_row, const float* mu,
                               bool mu_per_row, const float* bias, float scale, float* y) {
  std::vector<float> xsum(tokens);
  for (int64_t t = 0; t < tokens; ++t) xsum[t] = row_sum(x + t * in, in);
  const Epilogue e{alpha, alpha_per_row, mu, mu_per_row, bias, scale, xsum.data()};
  binary_products(x, tokens, in, out, [&](int64_t o0) {
    return SignSource<SignLayout::kTransposed>{bytes_t, ld, o0};
  }, e, y);
}

void shira::cpu::binary_linear_grad_x(const float* g, int64_t tokens, int64_t out,
                                      const int32_t* packed, int64_t words, int64_t in,
                                      const float* add, float* gx) {
  const float one = 1.0f;
  const Epilogue e{&one, false, &one, false, nullptr, 1.0f, add};
  const auto* bytes = reinterpret_cast<const uint8_t*>(packed);
  binary_products(g, tokens, out, in, [&](int64_t k0) {
    return SignSource<SignLayout::kRows>{bytes, words * 4, k0};
  }, e, gx);
}
