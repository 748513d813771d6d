// The dense matmul with the sparse delta folded in (the "fold" strategy of
// sparse_delta_linear):
//   y  = x·(W + scale·S)ᵀ + bias     (forward)
//   gx = gy·(W + scale·S)            (gradient of x)
// W + scale·S is formed one register-friendly panel at a time as W is loaded, never in memory
// as a whole, so the sparse part costs O(nnz) adds instead of a pass of gathers per token.
//
// Both products have the same shape: a [T, steps] (x or gy) times a weight whose "lines" are
// the outputs (W's rows for y, its columns for gx) and whose "steps" are the sum's index. A
// panel is kStepBlock steps x kPanelLanes lines of W + scale·S in fp32, laid out step-major so
// that each step is kPanelVectors whole vectors; a block of kPanelTokens tokens keeps
// kPanelTokens x kPanelVectors accumulators in registers and meets each step with one
// broadcast of a[t, s] per token and one FMA per accumulator (AVX-512: 24 FMAs for 4 loads and
// 6 broadcasts). This is the shape of a BLAS micro-kernel; on the CPUs measured here it runs at
// about twice the rate of torch's fp32 matmul (docs/benchmarks/shira_linear_cpu.md). Up to
// kRowTokens tokens the forward reads W row by row instead (row_products, below).
//
// bf16 weights on AVX512-BF16 take pair panels instead (pack_pair_panel): W + scale·S rounded
// once to bf16, as "swap" writes it into W, with two steps per 32-bit word, met by a token's
// two bf16 activations in one vdpbf16ps per 16 lines: twice the products per instruction of
// the fp32 panel and half its bytes (torch's bf16 matmul runs vdpbf16ps too; with fp32 panels
// fold took about twice its time: docs/benchmarks/fold_bf16_zen4.md).
#include <omp.h>

#include <algorithm>

#include "kernels.h"
#include "vec.h"

namespace {

// Registers: kPanelTokens x kPanelVectors accumulators + kPanelVectors panel vectors + one
// broadcast: 6 x 4 + 4 + 1 < 32 with AVX-512 (64 lanes), 6 x 2 + 2 + 1 < 16 with AVX2.
#if defined(__AVX512F__)
constexpr int kPanelVectors = 4;
#else
constexpr int kPanelVectors = 2;
#endif
constexpr int kPanelTokens = 6;
constexpr int64_t kPanelLanes = kPanelVectors * kLanes;
// Steps per panel: 256 x 64 lanes x 4 bytes = 64 KB, read once per block of tokens from L1/L2.
// The sums restart from zero each block (then join the token chunk's totals): the rounding
// error grows with kStepBlock + steps / kStepBlock, as in a blocked dense dot product.
constexpr int64_t kStepBlock = 256;
// Tokens per chunk: a panel is packed once per chunk and serves all its blocks of tokens; the
// chunk's fp32 totals (192 x 64 x 4 bytes = 48 KB) stay in cache.
constexpr int64_t kTokenChunk = 32 * kPanelTokens;
// Up to 576 tokens (147 KB of totals, in L2) one chunk packs W once, where chunks of 192 packed
// and read it up to three times. Above, bf16 pair panels keep chunks of 576; fp32 ones go back
// to 192, whose fp32 rows of x (a step block's: 192 KB) stay in L2 beside the totals (at 2048
// tokens chunks of 576 took 1.05-1.10x their time: docs/benchmarks/fold_bf16_zen4.md).
constexpr int64_t kOneChunkTokens = 96 * kPanelTokens;
constexpr int64_t kPairStepBlock = 512;

thread_local Scratch panel_tile, sums_tile;

// W and S as lines and steps. S lists each line's entries in step order: CSR for y (per row,
// column per entry, values in order), CSC for gx (per column, row per entry, values[perm[j]]).
template <typename T, typename C>
struct Operand {
  const T* weight;
  int64_t in;            // W's row length
  bool lines_are_rows;   // y: lines are W's rows; gx: lines are W's columns
  int64_t lines, steps;
  const int64_t* offsets;  // [lines + 1]
  const C* step_of;        // the step (column for y, row for gx) of each entry
  const int64_t* perm;     // null: values in entry order
  const float* values;
  float scale;
};

// add(l, s, v) for each entry of S in lines l0 + l (l < nl) and steps s0 + s (s < sc), v its
// value (unscaled); cursor[l] moves past them (a line's entries are in step order).
template <typename T, typename C, typename Add>
inline void each_entry(const Operand<T, C>& op, int64_t l0, int64_t nl, int64_t s0, int64_t sc,
                       int64_t* cursor, Add&& add) {
  for (int64_t l = 0; l < nl; ++l) {
    const int64_t end = op.offsets[l0 + l + 1];
    int64_t j = cursor[l];
    for (; j < end && static_cast<int64_t>(op.step_of[j]) < s0 + sc; ++j)
      add(l, static_cast<int64_t>(op.step_of[j]) - s0, op.values[op.perm ? op.perm[j] : j]);
    cursor[l] = j;
  }
}

// P[s][l] = W + scale·S at (line l0 + l, step s0 + s) in fp32, for s < sc and l < kPanelLanes
// (zeros past the last line). cursor[l]: line l0 + l's first entry of S not yet added.
template <typename T, typename C>
void pack_panel(const Operand<T, C>& op, int64_t l0, int64_t s0, int64_t sc, int64_t* cursor,
                float* P) {
  const int64_t nl = std::min<int64_t>(kPanelLanes, op.lines - l0);
  if (op.lines_are_rows) {  // kLanes rows of W become kLanes steps: in-register transposes
    const int64_t whole = sc / kLanes * kLanes;
    for (int64_t lb = 0; lb < kPanelLanes; lb += kLanes) {
      for (int64_t sb = 0; sb < whole; sb += kLanes) {
        fvec v[kLanes];
#pragma GCC unroll 16
        for (int i = 0; i < kLanes; ++i)
          v[i] = lb + i < nl ? loadv_as_float(op.weight + (l0 + lb + i) * op.in + s0 + sb) : fvec{};
        transpose_block(v);
#pragma GCC unroll 16
        for (int k = 0; k < kLanes; ++k) storev(P + (sb + k) * kPanelLanes + lb, v[k]);
      }
    }
    for (int64_t s = whole; s < sc; ++s)
      for (int64_t l = 0; l < kPanelLanes; ++l)
        P[s * kPanelLanes + l] =
            l < nl ? Float<T>::load(op.weight + (l0 + l) * op.in + s0 + s) : 0.0f;
  } else {  // each step is a piece of one row of W
    const int64_t whole = nl / kLanes * kLanes;
    for (int64_t s = 0; s < sc; ++s) {
      const T* w = op.weight + (s0 + s) * op.in + l0;
      float* p = P + s * kPanelLanes;
      for (int64_t l = 0; l < whole; l += kLanes) storev(p + l, loadv_as_float(w + l));
      for (int64_t l = whole; l < kPanelLanes; ++l) p[l] = l < nl ? Float<T>::load(w + l) : 0.0f;
    }
  }
  each_entry(op, l0, nl, s0, sc, cursor, [&](int64_t l, int64_t s, float v) {
    P[s * kPanelLanes + l] += op.scale * v;
  });
}

// c[t][l] += Σ_s a[t, s]·P[s][l] for TT tokens (rows of a, lda apart) and sc steps.
template <int TT>
inline void panel_products(const float* a, int64_t lda, const float* P, int64_t sc, float* c) {
  fvec acc[TT][kPanelVectors] = {};
  for (int64_t s = 0; s < sc; ++s) {
    fvec p[kPanelVectors];
#pragma GCC unroll 4
    for (int v = 0; v < kPanelVectors; ++v) p[v] = loadv(P + s * kPanelLanes + v * kLanes);
#pragma GCC unroll 6
    for (int t = 0; t < TT; ++t) {
      const float x = a[t * lda + s];
#pragma GCC unroll 4
      for (int v = 0; v < kPanelVectors; ++v) acc[t][v] = fmadd(x, p[v], acc[t][v]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int v = 0; v < kPanelVectors; ++v) {
      float* ct = c + t * kPanelLanes + v * kLanes;
      storev(ct, loadv(ct) + acc[t][v]);
    }
}

#if defined(__AVX512BF16__)
constexpr bool kPairPanels = true;

// Word s2·kPanelLanes + l of P: W + scale·S at line l0 + l and steps s0 + 2·s2 (low half),
// s0 + 2·s2 + 1 (high half), in bf16, for 2·s2 < sc (zeros past the last line or step). The
// entries of W are copied; an entry of S rounds w + scale·v (fp32) once to bf16. cursor as
// pack_panel's.
template <typename C>
void pack_pair_panel(const Operand<uint16_t, C>& op, int64_t l0, int64_t s0, int64_t sc,
                     int64_t* cursor, uint32_t* P) {
  const int64_t nl = std::min<int64_t>(kPanelLanes, op.lines - l0), pairs = (sc + 1) / 2;
  auto at = [&](int64_t l, int64_t s) -> uint32_t {  // W's bits at (line l0 + l, step s0 + s)
    if (l >= nl || s >= sc) return 0;
    return op.lines_are_rows ? op.weight[(l0 + l) * op.in + s0 + s]
                             : op.weight[(s0 + s) * op.in + l0 + l];
  };
  int64_t done = 0;  // pairs packed for every line by the vector loops
  if (op.lines_are_rows) {  // a row's pair is one 32-bit word: kLanes rows x kLanes words
    done = sc / (2 * kLanes) * kLanes;  // transpose as 32-bit lanes (bits moved, not read)
    for (int64_t lb = 0; lb < kPanelLanes; lb += kLanes) {
      for (int64_t sb = 0; sb < done; sb += kLanes) {
        fvec v[kLanes];  // (the intrinsics' loads and stores may alias bf16 and uint32_t)
#pragma GCC unroll 16
        for (int i = 0; i < kLanes; ++i)
          v[i] = lb + i < nl ? reinterpret_cast<fvec>(_mm512_loadu_ps(
                                   op.weight + (l0 + lb + i) * op.in + s0 + 2 * sb))
                             : fvec{};
        transpose_block(v);
#pragma GCC unroll 16
        for (int k = 0; k < kLanes; ++k)
          _mm512_storeu_ps(P + (sb + k) * kPanelLanes + lb, reinterpret_cast<__m512>(v[k]));
      }
    }
  } else if (nl == kPanelLanes) {  // a pair is two rows of W: their lines interleaved
    done = sc / 2;
    alignas(64) uint16_t order[32];  // word i of lines 0-15: (row 0's i, row 1's i)
    for (int i = 0; i < 16; ++i) order[2 * i] = i, order[2 * i + 1] = 32 + i;
    const __m512i low = _mm512_load_si512(order);
    const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));  // lines 16-31
    for (int64_t s2 = 0; s2 < done; ++s2) {
      const uint16_t* r0 = op.weight + (s0 + 2 * s2) * op.in + l0;
      uint32_t* p = P + s2 * kPanelLanes;
      for (int64_t l = 0; l < kPanelLanes; l += 32) {
        const __m512i a = _mm512_loadu_si512(r0 + l), b = _mm512_loadu_si512(r0 + op.in + l);
        _mm512_storeu_si512(p + l, _mm512_permutex2var_epi16(a, low, b));
        _mm512_storeu_si512(p + l + 16, _mm512_permutex2var_epi16(a, high, b));
      }
    }
  }
  for (int64_t s2 = done; s2 < pairs; ++s2)
    for (int64_t l = 0; l < kPanelLanes; ++l)
      P[s2 * kPanelLanes + l] = at(l, 2 * s2) | at(l, 2 * s2 + 1) << 16;
  each_entry(op, l0, nl, s0, sc, cursor, [&](int64_t l, int64_t s, float v) {
    char* half = reinterpret_cast<char*>(P + (s / 2) * kPanelLanes + l) + 2 * (s % 2);
    uint16_t w;
    std::memcpy(&w, half, 2);  // (a bf16 inside a uint32_t word: memcpy, not a cast)
    w = float_to_bf16(bf16_to_float(w) + op.scale * v);
    std::memcpy(half, &w, 2);
  });
}

// c[t][l] += Σ_s a[t, s]·P[s][l] for TT tokens (bf16 rows of a, lda apart) and sc steps of a
// pair panel: per pair of steps, a token's two activations are one 32-bit broadcast.
template <int TT>
inline void pair_panel_products(const uint16_t* a, int64_t lda, const uint32_t* P, int64_t sc,
                                float* c) {
  __m512 acc[TT][kPanelVectors];
#pragma GCC unroll 6
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < kPanelVectors; ++v) acc[t][v] = _mm512_setzero_ps();
  const int64_t pairs = (sc + 1) / 2;
  for (int64_t s2 = 0; s2 < pairs; ++s2) {
    __m512bh p[kPanelVectors];
#pragma GCC unroll 4
    for (int v = 0; v < kPanelVectors; ++v)
      p[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(P + s2 * kPanelLanes + v * kLanes));
    const bool whole = 2 * s2 + 1 < sc;  // the last of an odd count has no step after it
#pragma GCC unroll 6
    for (int t = 0; t < TT; ++t) {
      uint32_t both;
      if (whole) {
        std::memcpy(&both, a + t * lda + 2 * s2, 4);
      } else {
        both = a[t * lda + 2 * s2];
      }
      const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(both)));
#pragma GCC unroll 4
      for (int v = 0; v < kPanelVectors; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], p[v], x);
    }
  }
#pragma GCC unroll 6
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < kPanelVectors; ++v) {
      float* ct = c + t * kPanelLanes + v * kLanes;
      _mm512_storeu_ps(ct, _mm512_add_ps(_mm512_loadu_ps(ct), acc[t][v]));
    }
}
#else
constexpr bool kPairPanels = false;
template <typename C>  // never called: kPairPanels is false
void pack_pair_panel(const Operand<uint16_t, C>& op, int64_t l0, int64_t s0, int64_t sc,
                     int64_t* cursor, uint32_t* P);
template <int TT>
void pair_panel_products(const uint16_t* a, int64_t lda, const uint32_t* P, int64_t sc, float* c);
#endif

// out [tokens, lines] = a·(W + scale·S) over the steps, + bias (fp32 [lines] or null), in T.
// Work items are (token chunk, panel of lines) pairs, split evenly between the threads.
// A: float, or uint16_t (bf16) for pair panels (T is bf16 then).
template <typename A, typename T, typename C>
void folded_products(const A* a, int64_t tokens, const Operand<T, C>& op, const float* bias,
                    T* out) {
  const int64_t chunk =
      std::is_same_v<A, float> && tokens > kOneChunkTokens ? kTokenChunk : kOneChunkTokens;
  constexpr int64_t kSteps = std::is_same_v<A, float> ? kStepBlock : kPairStepBlock;
  const int64_t panels = (op.lines + kPanelLanes - 1) / kPanelLanes;
  const int64_t chunks = (tokens + chunk - 1) / chunk;
#pragma omp parallel for collapse(2) schedule(static) if (tokens * op.lines * op.steps > (1 << 18))
  for (int64_t ch = 0; ch < chunks; ++ch) {
    for (int64_t pn = 0; pn < panels; ++pn) {
      const int64_t t0 = ch * chunk, tc = std::min(chunk, tokens - t0);
      const int64_t l0 = pn * kPanelLanes, nl = std::min(kPanelLanes, op.lines - l0);
      float* P = panel_tile.get(kSteps * kPanelLanes);
      float* c = sums_tile.get(chunk * kPanelLanes);
      int64_t cursor[kPanelLanes];
      for (int64_t l = 0; l < nl; ++l) cursor[l] = op.offsets[l0 + l];
      std::fill(c, c + tc * kPanelLanes, 0.0f);
      for (int64_t s0 = 0; s0 < op.steps; s0 += kSteps) {
        const int64_t sc = std::min(kSteps, op.steps - s0);
        if constexpr (std::is_same_v<A, float>) {
          pack_panel(op, l0, s0, sc, cursor, P);
        } else {
          pack_pair_panel(op, l0, s0, sc, cursor, reinterpret_cast<uint32_t*>(P));
        }
        for (int64_t tb = 0; tb < tc; tb += kPanelTokens) {
          with_constant<kPanelTokens>(static_cast<int>(std::min<int64_t>(kPanelTokens, tc - tb)),
                                      [&](auto tt) {
            constexpr int TT = decltype(tt)::value;
            const A* at = a + (t0 + tb) * op.steps + s0;
            if constexpr (std::is_same_v<A, float>) {
              panel_products<TT>(at, op.steps, P, sc, c + tb * kPanelLanes);
            } else {
              pair_panel_products<TT>(at, op.steps, reinterpret_cast<const uint32_t*>(P), sc,
                                      c + tb * kPanelLanes);
            }
          });
        }
      }
      for (int64_t t = 0; t < tc; ++t) {
        const float* ct = c + t * kPanelLanes;
        T* row = out + (t0 + t) * op.lines + l0;
        int64_t l = 0;
        for (; l + kLanes <= nl; l += kLanes)
          storev_from_float(row + l, bias ? loadv(ct + l) + loadv(bias + l0 + l) : loadv(ct + l));
        for (; l < nl; ++l) Float<T>::store(row + l, ct[l] + (bias ? bias[l0 + l] : 0.0f));
      }
    }
  }
}

// The forward for a few tokens (decoding): packing a panel costs more than the one or two
// FMAs per weight it would then serve, so each row of W meets the tokens straight from memory
// (kRowVectors independent sums per token hide the FMA latency) and S's entries of the row
// make a sum of their own: (Σ W·x) + (Σ (scale·v)·x).
#if defined(__AVX512F__)
constexpr int kRowVectors = 4;
#else
constexpr int kRowVectors = 2;
#endif
constexpr int64_t kRowTokens = 4;  // at most this many tokens take this path (measured: 4096², fp32)

template <int TT, typename A, typename T, typename C>
void row_products(const A* a, const Operand<T, C>& op, const float* bias, T* out) {
  const int64_t steps = op.steps, whole = steps / (kRowVectors * kLanes) * (kRowVectors * kLanes);
#pragma omp parallel for schedule(static) if (op.lines * steps > (1 << 18))
  for (int64_t l = 0; l < op.lines; ++l) {
    const T* w = op.weight + l * op.in;
    fvec acc[TT][kRowVectors] = {};
    for (int64_t s = 0; s < whole; s += kRowVectors * kLanes) {
#pragma GCC unroll 4
      for (int v = 0; v < kRowVectors; ++v) {
        const fvec wv = loadv_as_float(w + s + v * kLanes);
#pragma GCC unroll 4
        for (int t = 0; t < TT; ++t)
          acc[t][v] = fmadd(wv, loadv_as_float(a + t * steps + s + v * kLanes), acc[t][v]);
      }
    }
    float sum[TT];
    for (int t = 0; t < TT; ++t) {
      fvec total = acc[t][0];
      for (int v = 1; v < kRowVectors; ++v) total += acc[t][v];
      sum[t] = hsum(total);
    }
    for (int64_t s = whole; s < steps; ++s) {
      const float wv = Float<T>::load(w + s);
      for (int t = 0; t < TT; ++t) sum[t] = fmadd(wv, Float<A>::load(a + t * steps + s), sum[t]);
    }
    // S's part sums on its own (small terms, small rounding) and joins the dense sum once:
    // added one by one to the dense sum, each entry would round at the sum's magnitude.
    float sparse[TT] = {};
    for (int64_t j = op.offsets[l]; j < op.offsets[l + 1]; ++j) {
      const float d = op.scale * op.values[j];
      const int64_t s = static_cast<int64_t>(op.step_of[j]);
      for (int t = 0; t < TT; ++t) sparse[t] = fmadd(d, Float<A>::load(a + t * steps + s), sparse[t]);
    }
    for (int t = 0; t < TT; ++t)
      Float<T>::store(out + t * op.lines + l, (sum[t] + sparse[t]) + (bias ? bias[l] : 0.0f));
  }
}

template <typename T, typename C>
void folded_typed(const void* a_in, int64_t tokens, const void* weight, int64_t out, int64_t in,
                 bool grad_x, const int64_t* offsets, const C* step_of, const int64_t* perm,
                 const float* values, float scale, const float* bias, void* result) {
  const Operand<T, C> op{static_cast<const T*>(weight), in, !grad_x, grad_x ? in : out,
                         grad_x ? out : in, offsets, step_of, perm, values, scale};
  using A = std::conditional_t<kPairPanels && std::is_same_v<T, uint16_t>, uint16_t, float>;
  const A* a = static_cast<const A*>(a_in);
  if (!grad_x && tokens <= kRowTokens) {
    with_constant<kRowTokens>(static_cast<int>(tokens), [&](auto tt) {
      row_products<decltype(tt)::value>(a, op, bias, static_cast<T*>(result));
    });
    return;
  }
  folded_products(a, tokens, op, bias, static_cast<T*>(result));
}

}  // namespace

bool shira::cpu::folded_linear_takes_bf16() { return kPairPanels; }

void shira::cpu::folded_linear(DType dtype, const void* a, int64_t tokens, const void* weight,
                               int64_t out, int64_t in, bool grad_x, const int64_t* offsets,
                               const void* idx, int idx_bytes, const int64_t* perm,
                               const float* values, float scale, const float* bias,
                               void* result) {
  if (tokens == 0 || (grad_x ? in : out) == 0) return;
  dispatch_sparse(dtype, idx_bytes, [&](auto t, auto c) {
    folded_typed<typename decltype(t)::type>(a, tokens, weight, out, in, grad_x, offsets,
                                             static_cast<const typename decltype(c)::type*>(idx),
                                             perm, values, scale, bias, result);
  });
}
