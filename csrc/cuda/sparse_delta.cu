// SHiRA sparse-delta kernels: CSR spmm, sddmm (the gradient of the sparse
// values) and add_at_indices (the scaled sparse values added into a dense
// weight at their flat indices).
//
// Element types are float, __half and __nv_bfloat16; every product and sum is
// accumulated in fp32 and rounded once, when it is stored. No torch headers
// here on purpose: this file must build with plain nvcc.

#include "common.cuh"
#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

namespace {

// ---------------------------------------------------------------------------
// spmm: y_out[t, r] = y_in[t, r] + scale * sum_j values[j] * x[t, cols[j]],
// j over [row_offsets[r], row_offsets[r + 1]).
//
// A group of kGroup consecutive lanes (a power of two dividing the warp) owns
// one row r and one tile of kTokens tokens. The group walks the row's nonzeros
// kGroup at a time (coalesced loads of cols/values) and applies each loaded
// nonzero to all tokens of the tile, so a row is read once per tile rather
// than once per token. Partial sums are reduced with xor shuffles inside the
// group, and lane (k % kGroup) stores token k.
//
// Nothing here assumes rows vs in_features: called with the CSC structure of
// S (i.e. the CSR of S^T) it computes gx = gy * S.
//
// y_in and y_out may be the same buffer: each element is read and then written
// by the same thread, so they are deliberately not __restrict__.

// S's rows over x, as both spmm kernels read them (built by brace initialisation, as the
// structs holding it: the fields' order matters).
template <typename T, typename Col>
struct SparseRows {
  const T* x;
  const int64_t* offsets;  // CSR row offsets [rows + 1]
  const Col* cols;
  const T* values;
  int64_t rows;         // = y's row length (y is [tokens, rows])
  int64_t in_features;  // = x's row length (x is [tokens, in_features])
};

template <typename T, typename Col>
struct SpmmArgs {
  const T* y_in;
  T* y_out;
  SparseRows<T, Col> s;
  float scale;
  int64_t num_tokens;
};

// acc[k] += sum_j values[j] * x_rows[k][cols[j]] for k < ntok, over the entries j of one row
// that lane `sub` of its group owns (begin + sub, then every kGroup-th before end).
template <typename T, typename Col, int kGroup, int kTokens>
__device__ __forceinline__ void add_row_products(float (&acc)[kTokens],
                                                 const T* const (&x_rows)[kTokens], int64_t ntok,
                                                 const Col* __restrict__ cols,
                                                 const T* __restrict__ values, int64_t begin,
                                                 int64_t end, int sub) {
  for (int64_t j = begin + sub; j < end; j += kGroup) {
    const float v = to_float(values[j]);
    const int64_t c = static_cast<int64_t>(cols[j]);
#pragma unroll
    for (int k = 0; k < kTokens; ++k) {
      if (k < ntok) acc[k] = fmaf(v, to_float(x_rows[k][c]), acc[k]);
    }
  }
}

// The group's partial sums of each token added up (xor shuffles); every lane of the warp must
// call it.
template <int kGroup, int kTokens>
__device__ __forceinline__ void reduce_over_group(float (&acc)[kTokens]) {
#pragma unroll
  for (int k = 0; k < kTokens; ++k) {
#pragma unroll
    for (int offset = kGroup / 2; offset > 0; offset /= 2)
      acc[k] += __shfl_xor_sync(kFullMask, acc[k], offset);
  }
}

template <typename T, typename Col, int kGroup, int kTokens>
__global__ void __launch_bounds__(kThreads) spmm_kernel(const SpmmArgs<T, Col> a) {
  static_assert(kGroup >= 1 && kGroup <= kWarpSize && (kWarpSize % kGroup) == 0,
                "a group must tile the warp");
  static_assert(kThreads % kWarpSize == 0, "blocks must be whole warps");
  constexpr int kGroupsPerBlock = kThreads / kGroup;

  const T* __restrict__ x = a.s.x;
  const Col* __restrict__ cols = a.s.cols;
  const T* __restrict__ values = a.s.values;

  const int sub = static_cast<int>(threadIdx.x) % kGroup;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kGroupsPerBlock +
                    static_cast<int64_t>(threadIdx.x) / kGroup;
  const bool row_ok = r < a.s.rows;
  // Lanes past the last row keep an empty range instead of returning: every
  // lane of the warp must reach the full-mask shuffles below.
  int64_t begin = 0;
  int64_t end = 0;
  if (row_ok) {
    begin = a.s.offsets[r];
    end = a.s.offsets[r + 1];
  }

  const int64_t num_tiles = ceil_div(a.num_tokens, kTokens);
  // blockIdx.y / gridDim.y are uniform across the block, so every warp runs
  // the same number of iterations (and shuffles) here.
  for (int64_t tile = blockIdx.y; tile < num_tiles; tile += gridDim.y) {
    const int64_t t0 = tile * kTokens;
    const int64_t ntok = min64(kTokens, a.num_tokens - t0);
    const T* x_tile = x + t0 * a.s.in_features;

    float acc[kTokens];
    const T* x_rows[kTokens];
#pragma unroll
    for (int k = 0; k < kTokens; ++k) {
      acc[k] = 0.0f;
      x_rows[k] = x_tile + k * a.s.in_features;
    }
    add_row_products<T, Col, kGroup, kTokens>(acc, x_rows, ntok, cols, values, begin, end, sub);
    reduce_over_group<kGroup, kTokens>(acc);

    if (row_ok) {
#pragma unroll
      for (int k = 0; k < kTokens; ++k) {
        if (k % kGroup == sub && k < ntok) {
          const int64_t i = (t0 + k) * a.s.rows + r;
          a.y_out[i] = from_float<T>(fmaf(a.scale, acc[k], to_float(a.y_in[i])));
        }
      }
    }
  }
}

template <typename T, typename Col, int kGroup, int kTokens>
cudaError_t launch_spmm_shape(const SpmmArgs<T, Col>& a, cudaStream_t stream) {
  constexpr int64_t kGroupsPerBlock = kThreads / kGroup;
  const int64_t blocks_x = ceil_div(a.s.rows, kGroupsPerBlock);
  if (blocks_x > kMaxGridX) return cudaErrorInvalidValue;
  const int64_t blocks_y = min64(ceil_div(a.num_tokens, kTokens), kMaxGridY);
  const dim3 grid(static_cast<unsigned int>(blocks_x), static_cast<unsigned int>(blocks_y));
  spmm_kernel<T, Col, kGroup, kTokens><<<grid, dim3(kThreads), 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, typename Col, int kGroup>
cudaError_t launch_spmm_group(const SpmmArgs<T, Col>& a, cudaStream_t stream) {
  // One token (decode): keep registers low. Otherwise 8 tokens per tile.
  if (a.num_tokens == 1) return launch_spmm_shape<T, Col, kGroup, 1>(a, stream);
  return launch_spmm_shape<T, Col, kGroup, 8>(a, stream);
}

template <typename T, typename Col>
cudaError_t launch_spmm_typed(const void* y_in, void* y_out, const void* x,
                              const int64_t* row_offsets, const void* col_indices,
                              const void* values, int64_t num_tokens, int64_t rows,
                              int64_t in_features, int64_t nnz, float scale,
                              cudaStream_t stream) {
  const SpmmArgs<T, Col> a{static_cast<const T*>(y_in), static_cast<T*>(y_out),
                           {static_cast<const T*>(x), row_offsets,
                            static_cast<const Col*>(col_indices), static_cast<const T*>(values),
                            rows, in_features},
                           scale, num_tokens};

  // Size the lane group to the average row length, so short rows do not
  // leave most of a warp idle.
  const int64_t avg = ceil_div(nnz, rows);
  if (avg <= 8) return launch_spmm_group<T, Col, 4>(a, stream);
  if (avg <= 16) return launch_spmm_group<T, Col, 8>(a, stream);
  if (avg <= 32) return launch_spmm_group<T, Col, 16>(a, stream);
  return launch_spmm_group<T, Col, 32>(a, stream);
}

// ---------------------------------------------------------------------------
// sddmm: g[j] = sum_t gy[t, rows[j]] * x[t, cols[j]].
//
// One thread per nonzero, looping over tokens. In CSR order neighbouring
// nonzeros share a row (the gy load is a broadcast) and have ascending columns
// (the x loads of a warp fall in one token row). When there are too few
// nonzeros to fill the GPU, the token range is split over gridDim.y and the
// partial sums are atomically added into a zeroed g.

constexpr int64_t kSddmmTargetBlocks = 512;    // enough resident work for a large GPU
constexpr int64_t kSddmmMinTokensPerSplit = 64;

template <typename T, typename Col>
__global__ void __launch_bounds__(kThreads)
sddmm_kernel(const T* __restrict__ gy, const T* __restrict__ x,
             const int32_t* __restrict__ rows, const Col* __restrict__ cols,
             float* __restrict__ g, int64_t nnz, int64_t num_tokens, int64_t out_features,
             int64_t in_features, int64_t tokens_per_split, bool accumulate) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= nnz) return;  // no shuffles or barriers in this kernel
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tokens_per_split;
  const int64_t t_end = min64(t_begin + tokens_per_split, num_tokens);

  const T* gp = gy + static_cast<int64_t>(rows[j]);
  const T* xp = x + static_cast<int64_t>(cols[j]);
  // Four independent chains to keep several loads in flight.
  float acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f, acc3 = 0.0f;
  int64_t t = t_begin;
  for (; t + 4 <= t_end; t += 4) {
    acc0 = fmaf(to_float(gp[(t + 0) * out_features]), to_float(xp[(t + 0) * in_features]), acc0);
    acc1 = fmaf(to_float(gp[(t + 1) * out_features]), to_float(xp[(t + 1) * in_features]), acc1);
    acc2 = fmaf(to_float(gp[(t + 2) * out_features]), to_float(xp[(t + 2) * in_features]), acc2);
    acc3 = fmaf(to_float(gp[(t + 3) * out_features]), to_float(xp[(t + 3) * in_features]), acc3);
  }
  for (; t < t_end; ++t)
    acc0 = fmaf(to_float(gp[t * out_features]), to_float(xp[t * in_features]), acc0);
  const float sum = (acc0 + acc1) + (acc2 + acc3);

  if (accumulate)
    atomicAdd(g + j, sum);
  else
    g[j] = sum;
}

template <typename T, typename Col>
cudaError_t launch_sddmm_typed(const void* gy, const void* x, const int32_t* rows,
                               const void* cols, float* g, int64_t num_tokens,
                               int64_t out_features, int64_t in_features, int64_t nnz,
                               cudaStream_t stream) {
  const int64_t blocks_x = ceil_div(nnz, kThreads);
  if (blocks_x > kMaxGridX) return cudaErrorInvalidValue;

  int64_t splits = 1;
  if (blocks_x < kSddmmTargetBlocks && num_tokens >= 2 * kSddmmMinTokensPerSplit) {
    splits = min64(ceil_div(kSddmmTargetBlocks, blocks_x), num_tokens / kSddmmMinTokensPerSplit);
    splits = min64(splits, kMaxGridY);
  }
  // With num_tokens == 0 this is one split of no tokens: the kernel stores 0.
  const int64_t tokens_per_split = splits > 1 ? ceil_div(num_tokens, splits) : num_tokens;
  if (splits > 1) splits = ceil_div(num_tokens, tokens_per_split);  // drop empty splits
  const bool accumulate = splits > 1;
  if (accumulate) {
    const cudaError_t err =
        cudaMemsetAsync(g, 0, static_cast<size_t>(nnz) * sizeof(float), stream);
    if (err != cudaSuccess) return err;
  }

  const dim3 grid(static_cast<unsigned int>(blocks_x), static_cast<unsigned int>(splits));
  sddmm_kernel<T, Col><<<grid, dim3(kThreads), 0, stream>>>(static_cast<const T*>(gy), static_cast<const T*>(x), rows, static_cast<const Col*>(cols), g, nnz, num_tokens, out_features, in_features, tokens_per_split, accumulate);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------
// grouped_spmm: spmm for many adapters over their own rows of one batch, in one
// launch (multi_delta_linear). Group g has the rows order[p] of x and y for p in
// [tile_start of its first tile, group_end[g]) and its adapter's CSR row offsets
// at offsets[group_offsets[g] ...], counted from entry group_entries[g] of the
// adapters' cols / values (read where the set keeps them):
//   y[t, r] += scale[g] * sum_j values[j] * x[t, cols[j]]   (in place)
// gridDim.y walks the tiles (up to tile_rows <= kTokens rows of one group);
// gridDim.x the output features, kGroup lanes each, as spmm_kernel. Per row
// the sum is spmm_kernel's, in the same order, for the same kGroup.

constexpr int kGroupedTileRows = 8;  // the most rows of a tile (tile_rows <= this)

template <typename T, typename Col>
struct GroupedSpmmArgs {
  T* y;
  SparseRows<T, Col> s;  // offsets: every group's row offsets, one after another
  const int64_t* order;
  const int64_t* tile_group;
  const int64_t* tile_start;
  const int64_t* group_end;
  const int64_t* group_offsets;
  const int64_t* group_entries;
  const float* scales;
  int64_t num_tiles;
  int64_t tile_rows;
};

template <typename T, typename Col, int kGroup, int kTokens>
__global__ void __launch_bounds__(kThreads) grouped_spmm_kernel(const GroupedSpmmArgs<T, Col> a) {
  constexpr int kGroupsPerBlock = kThreads / kGroup;
  const int sub = static_cast<int>(threadIdx.x) % kGroup;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kGroupsPerBlock +
                    static_cast<int64_t>(threadIdx.x) / kGroup;
  const bool row_ok = r < a.s.rows;

  for (int64_t tile = blockIdx.y; tile < a.num_tiles; tile += gridDim.y) {
    const int64_t g = a.tile_group[tile];
    const int64_t p0 = a.tile_start[tile];
    const int64_t ntok = min64(min64(a.tile_rows, kTokens), a.group_end[g] - p0);
    int64_t begin = 0;
    int64_t end = 0;
    if (row_ok) {  // lanes past the last row keep an empty range (the shuffles need them)
      const int64_t* row_offsets = a.s.offsets + a.group_offsets[g];
      begin = a.group_entries[g] + row_offsets[r];
      end = a.group_entries[g] + row_offsets[r + 1];
    }
    int64_t t[kTokens];
    float acc[kTokens];
    const T* x_rows[kTokens];
#pragma unroll
    for (int k = 0; k < kTokens; ++k) {
      t[k] = k < ntok ? a.order[p0 + k] : 0;
      acc[k] = 0.0f;
      x_rows[k] = a.s.x + t[k] * a.s.in_features;
    }
    add_row_products<T, Col, kGroup, kTokens>(acc, x_rows, ntok, a.s.cols, a.s.values, begin,
                                              end, sub);
    reduce_over_group<kGroup, kTokens>(acc);
    if (row_ok) {
      const float scale = a.scales[g];
#pragma unroll
      for (int k = 0; k < kTokens; ++k) {
        if (k % kGroup == sub && k < ntok) {
          const int64_t i = t[k] * a.s.rows + r;
          a.y[i] = from_float<T>(fmaf(scale, acc[k], to_float(a.y[i])));
        }
      }
    }
  }
}

template <typename T, typename Col, int kGroup>
cudaError_t launch_grouped_spmm_group(const GroupedSpmmArgs<T, Col>& a, cudaStream_t stream) {
  constexpr int64_t kGroupsPerBlock = kThreads / kGroup;
  const int64_t blocks_x = ceil_div(a.s.rows, kGroupsPerBlock);
  if (blocks_x > kMaxGridX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(blocks_x),
                  static_cast<unsigned int>(min64(a.num_tiles, kMaxGridY)));
  grouped_spmm_kernel<T, Col, kGroup, kGroupedTileRows><<<grid, dim3(kThreads), 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, typename Col>
cudaError_t launch_grouped_spmm_typed(const GroupedSpmmArgs<T, Col>& a, int64_t avg_row_nnz,
                                      cudaStream_t stream) {
  // The lane group sized as spmm's for the same average row length.
  if (avg_row_nnz <= 8) return launch_grouped_spmm_group<T, Col, 4>(a, stream);
  if (avg_row_nnz <= 16) return launch_grouped_spmm_group<T, Col, 8>(a, stream);
  if (avg_row_nnz <= 32) return launch_grouped_spmm_group<T, Col, 16>(a, stream);
  return launch_grouped_spmm_group<T, Col, 32>(a, stream);
}

// ---------------------------------------------------------------------------
// grouped_sddmm: sddmm for many adapters over their own rows, in one launch.
// Block b is tile b: up to tile_entries <= kThreads entries of group
// tile_group[b] from tile_start[b] (never past entry_end of its group), one
// thread per entry, summing over the group's rows order[group_rows[2g] ..
// group_rows[2g + 1]) in four chains as sddmm_kernel does, times the group's
// scale.

template <typename T, typename Col>
__global__ void __launch_bounds__(kThreads)
grouped_sddmm_kernel(const T* __restrict__ gy, const T* __restrict__ x,
                     const int64_t* __restrict__ order, const int64_t* __restrict__ tile_group,
                     const int64_t* __restrict__ tile_start, const int64_t* __restrict__ entry_end,
                     const int64_t* __restrict__ group_rows, const float* __restrict__ scales,
                     const int32_t* __restrict__ rows, const Col* __restrict__ cols,
                     float* __restrict__ g, int64_t tile_entries,
                     int64_t out_features, int64_t in_features) {
  const int64_t grp = tile_group[blockIdx.x];
  const int64_t j = tile_start[blockIdx.x] + threadIdx.x;
  if (threadIdx.x >= tile_entries || j >= entry_end[grp]) return;  // no shuffles or barriers
  const int64_t b0 = group_rows[2 * grp];
  const int64_t b1 = group_rows[2 * grp + 1];
  const T* gp = gy + static_cast<int64_t>(rows[j]);
  const T* xp = x + static_cast<int64_t>(cols[j]);
  float acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f, acc3 = 0.0f;
  int64_t p = b0;
  for (; p + 4 <= b1; p += 4) {
    const int64_t t0 = order[p], t1 = order[p + 1], t2 = order[p + 2], t3 = order[p + 3];
    acc0 = fmaf(to_float(gp[t0 * out_features]), to_float(xp[t0 * in_features]), acc0);
    acc1 = fmaf(to_float(gp[t1 * out_features]), to_float(xp[t1 * in_features]), acc1);
    acc2 = fmaf(to_float(gp[t2 * out_features]), to_float(xp[t2 * in_features]), acc2);
    acc3 = fmaf(to_float(gp[t3 * out_features]), to_float(xp[t3 * in_features]), acc3);
  }
  for (; p < b1; ++p) {
    const int64_t t = order[p];
    acc0 = fmaf(to_float(gp[t * out_features]), to_float(xp[t * in_features]), acc0);
  }
  g[j] = scales[grp] * ((acc0 + acc1) + (acc2 + acc3));
}

// ---------------------------------------------------------------------------
// add_at_indices: out[idx[j]] = round(float(weight[idx[j]]) + scale * float(values[j])).
//
// The indices are assumed unique (duplicates would race). out and weight may
// be the same buffer (each element is read and written by one thread). The
// multiply and add are rounded separately (no fma contraction) so the result
// is exactly the fp32 expression above, rounded once to the storage type.

template <typename T, typename Index>
__global__ void __launch_bounds__(kThreads)
add_at_indices_kernel(T* out, const T* weight, int64_t numel, const Index* __restrict__ idx,
                      const T* __restrict__ values, float scale, int64_t nnz,
                      unsigned long long* __restrict__ skipped) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; j < nnz;
       j += stride) {
    const int64_t k = static_cast<int64_t>(idx[j]);
    if (static_cast<uint64_t>(k) >= static_cast<uint64_t>(numel)) {  // never written
      atomicAdd(skipped, 1ULL);
      continue;
    }
    const float delta = __fmul_rn(scale, to_float(values[j]));
    out[k] = from_float<T>(__fadd_rn(to_float(weight[k]), delta));
  }
}

constexpr int64_t kAddMaxBlocks = 1 << 16;  // grid-stride beyond this

template <typename T, typename Index>
cudaError_t launch_add_at_indices_typed(void* out, const void* weight, int64_t numel,
                                        const void* flat_indices, const void* values,
                                        int64_t nnz, float scale, unsigned long long* skipped,
                                        cudaStream_t stream) {
  const int64_t blocks = min64(ceil_div(nnz, kThreads), kAddMaxBlocks);
  add_at_indices_kernel<T, Index>
      <<<dim3(static_cast<unsigned int>(blocks)), dim3(kThreads), 0, stream>>>(
      static_cast<T*>(out), static_cast<const T*>(weight), numel,
      static_cast<const Index*>(flat_indices), static_cast<const T*>(values), scale, nnz, skipped);
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------------------
// Launchers (declared in kernels.h).

cudaError_t shira::cuda::spmm(const void* y_in, void* y_out, const void* x,
                              const int64_t* row_offsets, const void* col_indices,
                              int col_index_size, const void* values, DType dtype,
                              int64_t num_tokens, int64_t rows, int64_t in_features, int64_t nnz,
                              float scale, cudaStream_t stream) {
  if (num_tokens < 0 || rows < 0 || in_features < 0 || nnz < 0) return cudaErrorInvalidValue;
  if (num_tokens == 0 || rows == 0) return cudaSuccess;  // no output elements
  if (y_in == nullptr || y_out == nullptr || row_offsets == nullptr)
    return cudaErrorInvalidValue;
  if (nnz > 0 && (x == nullptr || col_indices == nullptr || values == nullptr))
    return cudaErrorInvalidValue;
  return dispatch_float<CudaFloat>(dtype, cudaErrorInvalidValue, [&](auto t) {
    return dispatch_index<int16_t, int32_t>(col_index_size, cudaErrorInvalidValue, [&](auto c) {
      return launch_spmm_typed<typename decltype(t)::type, typename decltype(c)::type>(
          y_in, y_out, x, row_offsets, col_indices, values, num_tokens, rows, in_features, nnz,
          scale, stream);
    });
  });
}

cudaError_t shira::cuda::sddmm(const void* gy, const void* x, const int32_t* rows,
                               const void* cols, int col_index_size, float* g, DType dtype,
                               int64_t num_tokens, int64_t out_features, int64_t in_features,
                               int64_t nnz, cudaStream_t stream) {
  if (num_tokens < 0 || out_features < 0 || in_features < 0 || nnz < 0)
    return cudaErrorInvalidValue;
  if (nnz == 0) return cudaSuccess;  // no output elements
  if (rows == nullptr || cols == nullptr || g == nullptr) return cudaErrorInvalidValue;
  if (num_tokens > 0 && (gy == nullptr || x == nullptr)) return cudaErrorInvalidValue;
  return dispatch_float<CudaFloat>(dtype, cudaErrorInvalidValue, [&](auto t) {
    return dispatch_index<int16_t, int32_t>(col_index_size, cudaErrorInvalidValue, [&](auto c) {
      return launch_sddmm_typed<typename decltype(t)::type, typename decltype(c)::type>(
          gy, x, rows, cols, g, num_tokens, out_features, in_features, nnz, stream);
    });
  });
}

cudaError_t shira::cuda::add_at_indices(void* out, const void* weight, int64_t numel,
                                        const void* flat_indices, int index_size,
                                        const void* values, DType dtype, int64_t nnz,
                                        float scale, unsigned long long* skipped,
                                        cudaStream_t stream) {
  if (nnz < 0 || numel < 0) return cudaErrorInvalidValue;
  if (nnz == 0) return cudaSuccess;
  if (out == nullptr || weight == nullptr || flat_indices == nullptr || values == nullptr ||
      skipped == nullptr)
    return cudaErrorInvalidValue;
  return dispatch_float<CudaFloat>(dtype, cudaErrorInvalidValue, [&](auto t) {
    return dispatch_index<int32_t, int64_t>(index_size, cudaErrorInvalidValue, [&](auto i) {
      return launch_add_at_indices_typed<typename decltype(t)::type, typename decltype(i)::type>(
          out, weight, numel, flat_indices, values, nnz, scale, skipped, stream);
    });
  });
}

cudaError_t shira::cuda::grouped_spmm(void* y, const void* x, const int64_t* order,
                                      const int64_t* tile_group, const int64_t* tile_start,
                                      const int64_t* group_end, const int64_t* group_offsets,
                                      const int64_t* group_entries, const int64_t* row_offsets,
                                      const void* col_indices, int col_index_size,
                                      const void* values, const float* scales, DType dtype,
                                      int64_t num_tiles, int64_t tile_rows, int64_t rows,
                                      int64_t in_features, int64_t avg_row_nnz,
                                      cudaStream_t stream) {
  if (num_tiles < 0 || rows < 0 || in_features < 0 || tile_rows < 1 ||
      tile_rows > kGroupedTileRows)
    return cudaErrorInvalidValue;
  if (num_tiles == 0 || rows == 0) return cudaSuccess;
  if (y == nullptr || x == nullptr || order == nullptr || tile_group == nullptr ||
      tile_start == nullptr || group_end == nullptr || group_offsets == nullptr ||
      group_entries == nullptr || row_offsets == nullptr || scales == nullptr)
    return cudaErrorInvalidValue;
  return dispatch_float<CudaFloat>(dtype, cudaErrorInvalidValue, [&](auto t) {
    using T = typename decltype(t)::type;
    return dispatch_index<int16_t, int32_t>(col_index_size, cudaErrorInvalidValue, [&](auto c) {
      using Col = typename decltype(c)::type;
      const GroupedSpmmArgs<T, Col> a{static_cast<T*>(y),
                                      {static_cast<const T*>(x), row_offsets,
                                       static_cast<const Col*>(col_indices),
                                       static_cast<const T*>(values), rows, in_features},
                                      order, tile_group, tile_start, group_end, group_offsets,
                                      group_entries, scales, num_tiles, tile_rows};
      return launch_grouped_spmm_typed<T, Col>(a, avg_row_nnz, stream);
    });
  });
}

cudaError_t shira::cuda::grouped_sddmm(const void* gy, const void* x, const int64_t* order,
                                       const int64_t* tile_group, const int64_t* tile_start,
                                       const int64_t* entry_end, const int64_t* group_rows,
                                       const float* scales, const int32_t* rows,
                                       const void* cols, int col_index_size, float* g,
                                       DType dtype,
                                       int64_t num_tiles, int64_t tile_entries,
                                       int64_t out_features, int64_t in_features,
                                       cudaStream_t stream) {
  if (num_tiles < 0 || out_features < 0 || in_features < 0 || tile_entries < 1 ||
      tile_entries > kThreads)
    return cudaErrorInvalidValue;
  if (num_tiles == 0) return cudaSuccess;
  if (num_tiles > kMaxGridX) return cudaErrorInvalidValue;
  if (gy == nullptr || x == nullptr || order == nullptr || tile_group == nullptr ||
      tile_start == nullptr || entry_end == nullptr || group_rows == nullptr ||
      scales == nullptr || rows == nullptr || cols == nullptr || g == nullptr)
    return cudaErrorInvalidValue;
  return dispatch_float<CudaFloat>(dtype, cudaErrorInvalidValue, [&](auto t) {
    using T = typename decltype(t)::type;
    return dispatch_index<int16_t, int32_t>(col_index_size, cudaErrorInvalidValue, [&](auto c) {
      using Col = typename decltype(c)::type;
      grouped_sddmm_kernel<T, Col><<<dim3(static_cast<unsigned int>(num_tiles)),
                                     dim3(kThreads), 0, stream>>>(
          static_cast<const T*>(gy), static_cast<const T*>(x), order, tile_group, tile_start,
          entry_end, group_rows, scales, rows, static_cast<const Col*>(cols), g, tile_entries,
          out_features, in_features);
      return cudaGetLastError();
    });
  });
}
