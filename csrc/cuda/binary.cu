// 1-bit (binary) weight kernels: a binary linear layer and a binary LoRA.
//
// A binary weight W [rows, cols] is W[o, i] = mu_o + alpha_o * s[o, i] with
// s = +1 / -1. The signs are packed in int32 words, row-major [rows, words],
// words = ceil(cols / 32): bit k of word j of row o is the sign of column
// 32 * j + k (LSB first, 1 means +1); every row is padded on its own, and the
// padding bits may hold anything. alpha and mu are fp32, one value for the
// whole tensor or one per row.
//
// x / y / bias are float, __half or __nv_bfloat16; everything is accumulated
// in fp32 and rounded once, when stored. The signs are only ever unpacked in
// registers or in small shared-memory tiles, never into a dense global weight.
// No torch headers here on purpose: this file must build with plain nvcc.

#include "common.cuh"
#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <type_traits>

namespace {

constexpr int kWarps = kThreads / kWarpSize;
constexpr uint32_t kSignBit = 0x80000000u;

// v * s for a sign s carried in the top bit of `neg_mask` (set = -1, clear = +1):
// flipping the fp32 sign bit is exact, so this is a multiply by +-1 in one op.
__device__ __forceinline__ float apply_sign(float v, uint32_t neg_mask) {
  return __int_as_float(__float_as_int(v) ^ static_cast<int>(neg_mask & kSignBit));
}

// The dequantized weight mu + alpha or mu - alpha (rounded once in fp32, as the reference's
// BinaryWeight.dequantize does) for the sign in the top bit of `neg_mask` (set = -1).
__device__ __forceinline__ float pick_weight(uint32_t neg_mask, float w_pos, float w_neg) {
  return (neg_mask & kSignBit) ? w_neg : w_pos;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// f(std::integral_constant<int, NT>()) for NT, the tokens per block of the few-token kernels:
// the least of 1, 2, 4 and 8 that holds num_tokens (8 beyond that: blocks of 8). Those
// kernels keep NT sums per row in registers, unrolled.
template <typename F>
cudaError_t with_token_tile(int64_t num_tokens, F&& f) {
  if (num_tokens == 1) return f(std::integral_constant<int, 1>());
  if (num_tokens == 2) return f(std::integral_constant<int, 2>());
  if (num_tokens <= 4) return f(std::integral_constant<int, 4>());
  return f(std::integral_constant<int, 8>());
}

// ---------------------------------------------------------------------------
// Staging a chunk of x in shared memory, for the warp-per-row kernels.
//
// A chunk is kChunkWords sign words (kChunkCols columns) of up to NT tokens,
// stored as fp32. In those kernels lane l of a warp owns word l of the chunk,
// i.e. columns [32 l, 32 l + 32), and reads them one per step, all lanes at
// the same step k. Column c is therefore stored at c + c / 32 (one pad float
// per 32 columns): lane l's column 32 l + k then lands in bank (l + k) % 32,
// so the 32 lanes hit 32 different banks.

constexpr int kChunkWords = 32;
constexpr int kChunkCols = kChunkWords * 32;                 // 1024
constexpr int kChunkStride = kChunkCols + kChunkCols / 32;   // 1056 floats per token

// Fills xs[t * kChunkStride + c + c / 32] with x[t0 + t, c0 + c] for t < NT and
// c < round_up(min(kChunkCols, in - c0), 32), writing 0 for tokens >= ntok and
// columns >= in (so the padding bits of the last word multiply zeros).
// All threads of the block must call it.
template <typename T, int NT>
__device__ __forceinline__ void stage_x_chunk(float* xs, const T* __restrict__ x, int64_t t0,
                                              int ntok, int64_t in_features, int64_t c0) {
  const int cols = static_cast<int>(min64(kChunkCols, ceil_div(in_features - c0, 32) * 32));
  const int total = NT * cols;
  for (int idx = static_cast<int>(threadIdx.x); idx < total; idx += kThreads) {
    const int t = idx / cols;
    const int c = idx - t * cols;
    float v = 0.0f;
    if (t < ntok && c0 + c < in_features) v = to_float(x[(t0 + t) * in_features + c0 + c]);
    xs[t * kChunkStride + c + c / 32] = v;
  }
}

// ---------------------------------------------------------------------------
// One binary weight as the kernels read it: row o's signs at packed + o * words,
// its alpha at alpha[o * alpha_stride] and its mu at mu[o * mu_stride] (stride
// 0: one value for the whole tensor, 1: one per row).

struct BinaryRows {
  const int32_t* packed;  // [rows, words]
  const float* alpha;     // [1] or [rows]
  const float* mu;        // [1] or [rows]
  int64_t alpha_stride;
  int64_t mu_stride;
};

BinaryRows binary_rows(const shira::cuda::BinaryWeight& w) {
  return {w.packed, w.alpha, w.mu, w.alpha_per_row ? 1 : 0, w.mu_per_row ? 1 : 0};
}

// ---------------------------------------------------------------------------
// binary_linear: y[t, o] = alpha_o * sum_i x[t, i] s[o, i] + mu_o * sum_i x[t, i] + bias[o].

template <typename T>
struct BinaryLinearArgs {
  const T* x;             // [num_tokens, in_features]
  BinaryRows w;           // [out_features, in_features]
  const T* bias;          // [out_features] or nullptr
  T* y;                   // [num_tokens, out_features]
  int64_t num_tokens;
  int64_t in_features;
  int64_t out_features;
  int64_t words;          // ceil(in_features / 32)
};

// Few tokens (decoding): all NT >= num_tokens tokens in one block. Each warp
// owns kRows consecutive output rows; the block walks the columns one chunk at
// a time (x staged in shared memory), lane l unpacks word l of the chunk of
// each of its rows in registers and accumulates x * s for every token. Warp 0
// also accumulates sum_i x[t, i], which every row needs for the mu term.
constexpr int kGemvRows = 2;                                // rows per warp
constexpr int kGemvRowsPerBlock = kWarps * kGemvRows;       // 16

template <typename T, int NT>
__global__ void __launch_bounds__(kThreads) binary_gemv_kernel(const BinaryLinearArgs<T> a) {
  __shared__ float xs[NT * kChunkStride];
  __shared__ float xsum_s[NT];

  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t row0 =
      (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * static_cast<int64_t>(kGemvRows);
  const int ntok = static_cast<int>(a.num_tokens);  // <= NT, checked by the launcher

  float acc[kGemvRows][NT];
  float xsum[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    xsum[t] = 0.0f;
#pragma unroll
    for (int j = 0; j < kGemvRows; ++j) acc[j][t] = 0.0f;
  }

  for (int64_t c0 = 0; c0 < a.in_features; c0 += kChunkCols) {
    __syncthreads();  // the previous chunk is no longer read
    stage_x_chunk<T, NT>(xs, a.x, 0, ntok, a.in_features, c0);
    __syncthreads();

    const int64_t w0 = c0 / 32;
    const int wc = static_cast<int>(min64(kChunkWords, a.words - w0));
    if (lane < wc) {
      // Inverted words: a set bit now means -1, which is what apply_sign wants.
      uint32_t nw[kGemvRows];
#pragma unroll
      for (int j = 0; j < kGemvRows; ++j) {
        const int64_t row = row0 + j;
        nw[j] = row < a.out_features
                    ? ~static_cast<uint32_t>(a.w.packed[row * a.words + w0 + lane])
                    : 0u;
      }
      const float* xl = xs + lane * 33;
      const bool do_sum = warp == 0;
#pragma unroll
      for (int k = 0; k < 32; ++k) {
        float xv[NT];
#pragma unroll
        for (int t = 0; t < NT; ++t) xv[t] = xl[t * kChunkStride + k];
        if (do_sum) {
#pragma unroll
          for (int t = 0; t < NT; ++t) xsum[t] += xv[t];
        }
#pragma unroll
        for (int j = 0; j < kGemvRows; ++j) {
          const uint32_t m = nw[j] << (31 - k);  // bit k -> sign bit
#pragma unroll
          for (int t = 0; t < NT; ++t) acc[j][t] += apply_sign(xv[t], m);
        }
      }
    }
  }

  // Every warp runs the same shuffles (the loop above is block-uniform).
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    xsum[t] = warp_sum(xsum[t]);
#pragma unroll
    for (int j = 0; j < kGemvRows; ++j) acc[j][t] = warp_sum(acc[j][t]);
  }
  if (warp == 0 && lane == 0) {
#pragma unroll
    for (int t = 0; t < NT; ++t) xsum_s[t] = xsum[t];
  }
  __syncthreads();

  // Lane t stores token t of each row.
#pragma unroll
  for (int j = 0; j < kGemvRows; ++j) {
    const int64_t row = row0 + j;
    if (row >= a.out_features) break;
    const float al = a.w.alpha[row * a.w.alpha_stride];
    const float mu = a.w.mu[row * a.w.mu_stride];
    const float b = a.bias != nullptr ? to_float(a.bias[row]) : 0.0f;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (lane == t && t < ntok) {
        const float v = fmaf(al, acc[j][t], mu * xsum_s[t]) + b;
        a.y[static_cast<int64_t>(t) * a.out_features + row] = from_float<T>(v);
      }
    }
  }
}

// Many tokens: a block computes a [kTileT x kTileO] tile of y, 4 x 4 per
// thread. Per 32-column chunk it stages x [kTileT x 32] in shared memory and
// unpacks its kTileO rows' sign words into a fp32 tile of the dequantized
// weight w[k][o] = mu_o + alpha_o * s[o, k] (so no sum of x is needed), then
// runs a plain fp32 FMA loop over the chunk.
constexpr int kTileT = 64;
constexpr int kTileO = 64;
constexpr int kTileK = 32;
constexpr int kTileThreadsO = kTileO / 4;  // 16 threads across outputs
static_assert(kTileThreadsO * (kTileT / 4) == kThreads, "4 x 4 outputs per thread");
static_assert(kThreads % kTileO == 0, "weight loader: whole rows of threads per k");
static_assert(kThreads % kTileK == 0, "x loader: whole rows of threads per token");

template <typename T>
__global__ void __launch_bounds__(kThreads) binary_gemm_kernel(const BinaryLinearArgs<T> a) {
  __shared__ float xs[kTileT][kTileK + 1];         // token-major, padded
  __shared__ __align__(16) float ws[kTileK][kTileO];  // k-major, float4 reads

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % kTileThreadsO;  // outputs 4 tx .. 4 tx + 3
  const int ty = tid / kTileThreadsO;  // tokens 4 ty .. 4 ty + 3
  const int64_t o_base = static_cast<int64_t>(blockIdx.x) * kTileO;

  // Weight loader role: one output row, every (kThreads / kTileO)-th column.
  const int lo = tid % kTileO;
  const int lk = tid / kTileO;
  const int64_t lrow = o_base + lo;
  const bool lrow_ok = lrow < a.out_features;
  float w_pos = 0.0f, w_neg = 0.0f;  // mu + alpha and mu - alpha for that row
  if (lrow_ok) {
    const float al = a.w.alpha[lrow * a.w.alpha_stride];
    const float mu = a.w.mu[lrow * a.w.mu_stride];
    w_pos = mu + al;
    w_neg = mu - al;
  }
  const int32_t* lrow_words = a.w.packed + (lrow_ok ? lrow * a.words : 0);

  const int64_t num_tiles = ceil_div(a.num_tokens, kTileT);
  // blockIdx.y / gridDim.y are block-uniform, so all threads reach the barriers.
  for (int64_t tile = blockIdx.y; tile < num_tiles; tile += gridDim.y) {
    const int64_t t0 = tile * kTileT;

    // Each word's 32 products go to a fresh partial sum, which is added to acc with
    // compensation: one FMA chain over 4096+ columns is 10x less accurate than cuBLAS.
    float acc[4][4], comp[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = comp[i][j] = 0.0f;
    }

    for (int64_t kw = 0; kw < a.words; ++kw) {
      const int64_t c0 = kw * kTileK;
      __syncthreads();  // the previous chunk is no longer read

      const uint32_t word = lrow_ok ? static_cast<uint32_t>(lrow_words[kw]) : 0u;
#pragma unroll
      for (int k = lk; k < kTileK; k += kThreads / kTileO)
        ws[k][lo] = ((word >> k) & 1u) ? w_pos : w_neg;

#pragma unroll
      for (int idx = tid; idx < kTileT * kTileK; idx += kThreads) {
        const int t = idx / kTileK;
        const int c = idx % kTileK;
        const int64_t tok = t0 + t;
        const int64_t col = c0 + c;
        float v = 0.0f;
        if (tok < a.num_tokens && col < a.in_features) v = to_float(a.x[tok * a.in_features + col]);
        xs[t][c] = v;
      }
      __syncthreads();

      float part[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) part[i][j] = 0.0f;
      }
#pragma unroll 8
      for (int k = 0; k < kTileK; ++k) {
        const float4 w4 = *reinterpret_cast<const float4*>(&ws[k][4 * tx]);
        const float wv[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float xv = xs[4 * ty + i][k];
#pragma unroll
          for (int j = 0; j < 4; ++j) part[i][j] = fmaf(xv, wv[j], part[i][j]);
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float y = __fsub_rn(part[i][j], comp[i][j]);
          const float t = __fadd_rn(acc[i][j], y);
          comp[i][j] = __fsub_rn(__fsub_rn(t, acc[i][j]), y);
          acc[i][j] = t;
        }
      }
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t tok = t0 + 4 * ty + i;
      if (tok >= a.num_tokens) break;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t o = o_base + 4 * tx + j;
        if (o < a.out_features) {
          const float b = a.bias != nullptr ? to_float(a.bias[o]) : 0.0f;
          a.y[tok * a.out_features + o] = from_float<T>(acc[i][j] + b);
        }
      }
    }
  }
}

constexpr int64_t kGemvMaxTokens = 8;

template <typename T, int NT>
cudaError_t launch_gemv(const BinaryLinearArgs<T>& a, cudaStream_t stream) {
  const int64_t blocks = ceil_div(a.out_features, kGemvRowsPerBlock);
  if (blocks > kMaxGridX) return cudaErrorInvalidValue;
  binary_gemv_kernel<T, NT><<<dim3(static_cast<unsigned int>(blocks)), dim3(kThreads), 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_binary_linear_typed(const BinaryLinearArgs<T>& a, cudaStream_t stream) {
  if (a.num_tokens <= kGemvMaxTokens) {
    return with_token_tile(a.num_tokens, [&](auto nt) {
      return launch_gemv<T, decltype(nt)::value>(a, stream);
    });
  }

  const int64_t blocks_x = ceil_div(a.out_features, kTileO);
  if (blocks_x > kMaxGridX) return cudaErrorInvalidValue;
  const int64_t blocks_y = min64(ceil_div(a.num_tokens, kTileT), kMaxGridY);
  const dim3 grid(static_cast<unsigned int>(blocks_x), static_cast<unsigned int>(blocks_y));
  binary_gemm_kernel<T><<<grid, dim3(kThreads), 0, stream>>>(a);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------
// binary_lora: y = scale * up(act(down(x))), down [rank, in] and up [out, rank]
// both binary, rank <= kLoraMaxRank.
//
// A block owns NT tokens and a slice of the outputs. Phase 1 computes
// h = act(down(x)) [NT x rank] exactly like binary_gemv_kernel (warp w owns
// down rows w, w + 8, ...; x staged chunk by chunk) and keeps h in shared
// memory. Phase 2 gives each thread one output at a time: it unpacks the
// output's (at most two) up words in registers and dots them with h, which
// every thread reads at the same address (a shared-memory broadcast). When
// there are few token blocks the outputs are split over gridDim.y, and each
// of those blocks recomputes the (small) phase 1 for its tokens.

constexpr int kLoraMaxRank = 64;
constexpr int kLoraRowsPerWarp = kLoraMaxRank / kWarps;  // 8
constexpr int kLoraUpWords = kLoraMaxRank / 32;          // 2
constexpr int64_t kLoraTargetBlocks = 256;               // enough resident blocks
constexpr int64_t kLoraMinOutputsPerSplit = 256;

template <typename T>
struct BinaryLoraArgs {
  const T* x;                  // [num_tokens, in_features]
  BinaryRows down;             // [rank, in_features], down_words per row
  BinaryRows up;               // [out_features, rank], up_words per row
  T* y;                        // [num_tokens, out_features]
  float scale;
  int relu;
  int rank;                    // 1 .. kLoraMaxRank
  int up_words;                // ceil(rank / 32)
  int64_t num_tokens;
  int64_t in_features;
  int64_t out_features;
  int64_t down_words;          // ceil(in_features / 32)
  int64_t outputs_per_split;   // outputs of one gridDim.y slice
};

template <typename T, int NT>
__global__ void __launch_bounds__(kThreads) binary_lora_kernel(const BinaryLoraArgs<T> a) {
  __shared__ float xs[NT * kChunkStride];
  __shared__ __align__(16) float hs[NT][kLoraMaxRank];  // h, zero past rank

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * NT;
  const int ntok = static_cast<int>(min64(NT, a.num_tokens - t0));
  const int rank = a.rank;

  // ---- Phase 1: h[t][k] = sum_i x[t, i] W_down[k, i], k = warp + 8 j, with W_down's
  // entries dequantized as the reference does (mu_k +- alpha_k, rounded once).
  float acc[kLoraRowsPerWarp][NT];
  float wp[kLoraRowsPerWarp], wn[kLoraRowsPerWarp];
#pragma unroll
  for (int j = 0; j < kLoraRowsPerWarp; ++j) {
    const int k = warp + kWarps * j;
    const float al = k < rank ? a.down.alpha[k * a.down.alpha_stride] : 0.0f;
    const float mu = k < rank ? a.down.mu[k * a.down.mu_stride] : 0.0f;
    wp[j] = mu + al;
    wn[j] = mu - al;
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[j][t] = 0.0f;
  }

  for (int64_t c0 = 0; c0 < a.in_features; c0 += kChunkCols) {
    __syncthreads();
    stage_x_chunk<T, NT>(xs, a.x, t0, ntok, a.in_features, c0);
    __syncthreads();

    const int64_t w0 = c0 / 32;
    const int wc = static_cast<int>(min64(kChunkWords, a.down_words - w0));
    if (lane < wc && warp < rank) {
      uint32_t nw[kLoraRowsPerWarp];  // inverted: set bit = -1
#pragma unroll
      for (int j = 0; j < kLoraRowsPerWarp; ++j) {
        const int k = warp + kWarps * j;
        nw[j] = k < rank
                    ? ~static_cast<uint32_t>(a.down.packed[k * a.down_words + w0 + lane])
                    : 0u;
      }
      const float* xl = xs + lane * 33;
      // Columns from 31 down to 0, shifting each word left so that the
      // current column's bit is always the sign bit.
#pragma unroll 4
      for (int c = 31; c >= 0; --c) {
        float xv[NT];
#pragma unroll
        for (int t = 0; t < NT; ++t) xv[t] = xl[t * kChunkStride + c];
#pragma unroll
        for (int j = 0; j < kLoraRowsPerWarp; ++j) {
          if (warp + kWarps * j < rank) {  // warp-uniform
            const float w = pick_weight(nw[j], wp[j], wn[j]);
#pragma unroll
            for (int t = 0; t < NT; ++t) acc[j][t] = fmaf(xv[t], w, acc[j][t]);
          }
          nw[j] <<= 1;
        }
      }
    }
  }

#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int j = 0; j < kLoraRowsPerWarp; ++j) acc[j][t] = warp_sum(acc[j][t]);
  }
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < kLoraRowsPerWarp; ++j) {
      const int k = warp + kWarps * j;  // k < kLoraMaxRank always; 0 past rank
#pragma unroll
      for (int t = 0; t < NT; ++t)
        hs[t][k] = k < rank ? (a.relu ? fmaxf(acc[j][t], 0.0f) : acc[j][t]) : 0.0f;
    }
  }
  __syncthreads();

  // ---- Phase 2: y[t, o] = scale * sum_k h[t][k] W_up[o, k] (W_up dequantized as above).
  const int64_t o_begin = static_cast<int64_t>(blockIdx.y) * a.outputs_per_split;
  const int64_t o_end = min64(o_begin + a.outputs_per_split, a.out_features);
  for (int64_t o = o_begin + tid; o < o_end; o += kThreads) {
    // Compiler-only fence: without it the h loads below are hoisted out of
    // this loop into (far too many) registers and spill.
    asm volatile("" ::: "memory");
    float out_acc[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) out_acc[t] = 0.0f;
    const float al = a.up.alpha[o * a.up.alpha_stride];
    const float mu = a.up.mu[o * a.up.mu_stride];
    const float up_pos = mu + al, up_neg = mu - al;
    const int32_t* words = a.up.packed + o * a.up_words;
#pragma unroll
    for (int q = 0; q < kLoraUpWords; ++q) {
      if (q < a.up_words) {
        const uint32_t nw = ~static_cast<uint32_t>(words[q]);
#pragma unroll
        for (int k4 = 0; k4 < 32; k4 += 4) {
#pragma unroll
          for (int t = 0; t < NT; ++t) {
            const float4 h4 = *reinterpret_cast<const float4*>(&hs[t][32 * q + k4]);
            out_acc[t] = fmaf(h4.x, pick_weight(nw << (31 - k4), up_pos, up_neg), out_acc[t]);
            out_acc[t] = fmaf(h4.y, pick_weight(nw << (30 - k4), up_pos, up_neg), out_acc[t]);
            out_acc[t] = fmaf(h4.z, pick_weight(nw << (29 - k4), up_pos, up_neg), out_acc[t]);
            out_acc[t] = fmaf(h4.w, pick_weight(nw << (28 - k4), up_pos, up_neg), out_acc[t]);
          }
        }
      }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (t < ntok) {
        const float v = a.scale * out_acc[t];
        a.y[(t0 + t) * a.out_features + o] = from_float<T>(v);
      }
    }
  }
}

template <typename T, int NT>
cudaError_t launch_lora(BinaryLoraArgs<T> a, cudaStream_t stream) {
  const int64_t blocks_x = ceil_div(a.num_tokens, NT);
  if (blocks_x > kMaxGridX) return cudaErrorInvalidValue;
  int64_t splits = 1;
  if (blocks_x < kLoraTargetBlocks) {
    splits = min64(ceil_div(kLoraTargetBlocks, blocks_x),
                   ceil_div(a.out_features, kLoraMinOutputsPerSplit));
  }
  splits = min64(splits, kMaxGridY);
  a.outputs_per_split = ceil_div(a.out_features, splits);
  splits = ceil_div(a.out_features, a.outputs_per_split);  // drop empty slices
  const dim3 grid(static_cast<unsigned int>(blocks_x), static_cast<unsigned int>(splits));
  binary_lora_kernel<T, NT><<<grid, dim3(kThreads), 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------------------
// Launchers (declared in kernels.h).

cudaError_t shira::cuda::binary_linear(const void* x, const BinaryWeight& w, const void* bias,
                                       void* y, DType dtype, int64_t num_tokens,
                                       int64_t in_features, int64_t out_features,
                                       cudaStream_t stream) {
  if (num_tokens < 0 || in_features < 0 || out_features < 0) return cudaErrorInvalidValue;
  if (num_tokens == 0 || out_features == 0) return cudaSuccess;  // no output elements
  if (y == nullptr || w.alpha == nullptr || w.mu == nullptr) return cudaErrorInvalidValue;
  if (in_features > 0 && (x == nullptr || w.packed == nullptr)) return cudaErrorInvalidValue;
  return dispatch_float<CudaFloat>(dtype, cudaErrorInvalidValue, [&](auto t) {
    using T = typename decltype(t)::type;
    BinaryLinearArgs<T> a;
    a.x = static_cast<const T*>(x);
    a.w = binary_rows(w);
    a.bias = static_cast<const T*>(bias);
    a.y = static_cast<T*>(y);
    a.num_tokens = num_tokens;
    a.in_features = in_features;
    a.out_features = out_features;
    a.words = ceil_div(in_features, 32);
    return launch_binary_linear_typed<T>(a, stream);
  });
}

cudaError_t shira::cuda::binary_lora(const void* x, const BinaryWeight& down,
                                     const BinaryWeight& up, float scale, bool relu, void* y,
                                     DType dtype, int64_t num_tokens, int64_t in_features,
                                     int64_t rank, int64_t out_features, cudaStream_t stream) {
  if (num_tokens < 0 || in_features < 0 || out_features < 0) return cudaErrorInvalidValue;
  if (rank < 1 || rank > kLoraMaxRank) return cudaErrorInvalidValue;
  if (num_tokens == 0 || out_features == 0) return cudaSuccess;  // no output elements
  if (y == nullptr || down.alpha == nullptr || down.mu == nullptr || up.packed == nullptr ||
      up.alpha == nullptr || up.mu == nullptr)
    return cudaErrorInvalidValue;
  if (in_features > 0 && (x == nullptr || down.packed == nullptr)) return cudaErrorInvalidValue;
  return dispatch_float<CudaFloat>(dtype, cudaErrorInvalidValue, [&](auto t) {
    using T = typename decltype(t)::type;
    BinaryLoraArgs<T> a;
    a.x = static_cast<const T*>(x);
    a.down = binary_rows(down);
    a.up = binary_rows(up);
    a.y = static_cast<T*>(y);
    a.scale = scale;
    a.relu = relu ? 1 : 0;
    a.rank = static_cast<int>(rank);
    a.up_words = static_cast<int>(ceil_div(rank, 32));
    a.num_tokens = num_tokens;
    a.in_features = in_features;
    a.out_features = out_features;
    a.down_words = ceil_div(in_features, 32);
    a.outputs_per_split = out_features;
    return with_token_tile(num_tokens, [&](auto nt) {
      return launch_lora<T, decltype(nt)::value>(a, stream);
    });
  });
}
