#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace {

// The token-major kernels (spmm, sddmm, spmm_t_sddmm) work on chunks of tokens: each thread
// first transposes its share of the chunk into feature-major fp32 tiles (one pass over the
// activations, no full-size copy), then every product is a run of whole vectors (vec.h) over
// the chunk. Chunk lengths: spmm keeps one output row's chunk in registers (8 vectors), sddmm
// one gy row plus four running dot products, spmm_t_sddmm one x row, gx's partial sums and
// two dot products (18 vectors: of AVX-512's 32 registers; AVX2's 16 spill a few, and its
// 32-token chunks measured slower than 64). spmm_t_sddmm shares sddmm's.
constexpr int64_t kSpmmTokenChunk = 8 * kLanes;
constexpr int64_t kSddmmTokenChunk = 8 * kLanes;
// The entries of a row are visited one block of columns at a time, for all rows, so the x tile
// rows a block gathers (columns x chunk fp32) stay in L2 while every row uses them.
constexpr int64_t kColumnBlockBytes = 512 * 1024;
// Or the chunk is sized for the whole tile to stay in L2 (tile_chunk).
constexpr int64_t kGatherTileBytes = kColumnBlockBytes;
// A row's entries are summed in blocks, then the block sums: the rounding error grows with
// kEntryBlock + entries/kEntryBlock rather than with the entry count (rows of thousands of
// entries stay as accurate as a dense matmul; a SHiRA row of ~100 entries costs 2 extra adds).
constexpr int64_t kEntryBlock = 64;

template <typename T, typename I>
int64_t add_at_indices_typed(const T* weight, T* out, int64_t numel, const I* idx,
                             const T* values, float scale, int64_t nnz, T* saved) {
  int64_t skipped = 0;  // out-of-range indices (see scatter_swap.cpp): never written
#pragma omp parallel for schedule(static) reduction(+ : skipped) if (nnz > 4096)
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t k = static_cast<int64_t>(idx[j]);
    if (static_cast<uint64_t>(k) >= static_cast<uint64_t>(numel)) {
      ++skipped;
      continue;
    }
    const T old = weight[k];
    if (saved) saved[j] = old;  // the exact bits, so they can be swapped back
    Float<T>::store(out + k, Float<T>::load(&old) + scale * Float<T>::load(values + j));
  }
  return skipped;
}

// Per-thread buffers. shared_tile: the calling thread's, which every thread of its parallel
// region reads (or writes its part of); own_tile: a thread's fp32 sums; gather_tile: a thread's
// own copy of the tile rows its entries gather (kOwnTiles).
thread_local Scratch shared_tile, own_tile, gather_tile;

// The tiles the kernels gather rows from are in the activations' own type: half the bytes of
// fp32 per gathered row for fp16 and bf16. bf16 rows hold their tokens in pairs: in each block
// of 2·kLanes tokens, the 32-bit word l holds token l in its low half and token kLanes + l in
// its high half, so that a row's vector k is one shift (k even) or one mask (k odd) of a plain
// load, no widening shuffle (a widened bf16 tile measured slower than the fp32 one).
template <typename D>
constexpr int64_t kTileTokens = std::is_same_v<D, uint16_t> ? 2 * kLanes : kLanes;

// Whether each thread transposes the whole chunk into its own gather tile (16-bit
// activations) rather than its share of the columns into one tile all threads gather from: an
// entry whose row the other core transposed is read out of that core's cache, which cost more
// than transposing the chunk twice (bf16 at 16-2048 tokens: spmm and sddmm took 0.65-0.96x
// the time with their own tiles; fp32, whose tiles are twice the bytes: 0.85-1.07x, kept
// shared). spmm_t_sddmm's tile of gy is not blocked by columns: its own copy gained at most 4%
// where it fit L2 (4096 rows of 128 tokens) and lost where it did not (11008): kept shared.
template <typename D>
constexpr bool kOwnTiles = sizeof(D) == 2;

// Token count t padded to a whole number of a tile's token blocks.
template <typename D>
inline int64_t round_tokens(int64_t t) {
  return (t + kTileTokens<D> - 1) / kTileTokens<D> * kTileTokens<D>;
}

// Entries two at a time, each with its own set of sums (axpy_entries, column_entries), where
// the tile rows are 16-bit: the FMA chains then no longer wait on each other. fp32 rows take
// twice the registers per entry, and the pairs spilled them (measured slower).
template <typename D>
constexpr bool kPairEntries = sizeof(D) == 2;

// Vector k (tokens k·kLanes .. k·kLanes + kLanes - 1) of a tile row, in fp32.
template <typename D>
inline fvec tile_vector(const D* row, int k) {
  if constexpr (std::is_same_v<D, uint16_t>) {
    const uvec pairs = *reinterpret_cast<const uvec*>(row + (k & ~1) * kLanes);
    const uvec bits = k & 1 ? pairs & 0xffff0000u : pairs << 16;
    return reinterpret_cast<const fvec&>(bits);
  } else {
    return loadv_as_float(row + k * kLanes);
  }
}

// dst[(c - c0) * ld + t] = src[(t0 + t) * src_ld + c] for t < tc, c in [c0, c1), and zeros
// for t in [tc, ld): a feature-major tile of a token chunk, padded to whole token blocks, in
// fp32 (D = float) or in T (D = T, the values copied, not rounded; bf16 in pairs, above).
// Whole kLanes x kLanes blocks go through registers (a row load per lane in flight, as many
// vector stores); a last partial block of columns element by element.
template <typename T, typename D>
void transpose_chunk(const T* src, int64_t src_ld, int64_t t0, int64_t tc, int64_t c0,
                     int64_t c1, D* dst, int64_t ld) {
  static_assert(std::is_same_v<D, float> || std::is_same_v<D, T>);
  constexpr bool pairs = std::is_same_v<D, uint16_t>;
  // Token blocks outside, column blocks inside: each of the kLanes source rows is read front
  // to back, which the hardware prefetchers follow (a block of 64 bytes from each of 128 rows,
  // the other order, is 128 cold misses on data that another kernel left in DRAM).
  const int64_t whole = c0 + (c1 - c0) / kLanes * kLanes;
  for (int64_t tb = 0; tb < ld; tb += kLanes) {
    for (int64_t cb = c0; cb < whole; cb += kLanes) {
      fvec v[kLanes];
#pragma GCC unroll 16
      for (int i = 0; i < kLanes; ++i)
        v[i] = tb + i < tc ? loadv_as_float(src + (t0 + tb + i) * src_ld + cb) : fvec{};
      transpose_block(v);
#pragma GCC unroll 16
      for (int k = 0; k < kLanes; ++k) {
        if constexpr (pairs) {  // the first block of a pair the low halves, the second the high
          const int64_t second = (tb / kLanes) & 1;
          uvec* word = reinterpret_cast<uvec*>(dst + (cb - c0 + k) * ld + tb - second * kLanes);
          const uvec bits = reinterpret_cast<const uvec&>(v[k]);
          *word = second ? (*word | (bits & 0xffff0000u)) : bits >> 16;
        } else {
          storev_exact(dst + (cb - c0 + k) * ld + tb, v[k]);
        }
      }
    }
  }
  for (int64_t c = whole; c < c1; ++c) {
    D* d = dst + (c - c0) * ld;
    for (int64_t t = 0; t < ld; ++t) {
      const int64_t at = pairs ? t / (2 * kLanes) * (2 * kLanes) + 2 * (t % kLanes) +
                                     (t / kLanes) % 2 : t;
      const T* from = src + (t0 + t) * src_ld + c;
      if (t >= tc) d[at] = D{};
      else if constexpr (std::is_same_v<D, float>) d[at] = Float<T>::load(from);
      else d[at] = *from;
    }
  }
}

// The way back, added to an input: out[(t0 + t) * n + c] = in[..same..] + scale ·
// tile[(c - c0) * ld + t] for t < tc, c in [c0, c1) (out may be in).
template <typename T>
void add_transposed(const float* tile, int64_t ld, int64_t t0, int64_t tc, int64_t c0,
                    int64_t c1, const T* in, T* out, int64_t n, float scale) {
  const int64_t whole = c0 + (c1 - c0) / kLanes * kLanes;
  for (int64_t tb = 0; tb < tc; tb += kLanes) {  // rows of in and out front to back, as above
    const int64_t rows = std::min<int64_t>(kLanes, tc - tb);
    for (int64_t cb = c0; cb < whole; cb += kLanes) {
      fvec v[kLanes];
#pragma GCC unroll 16
      for (int k = 0; k < kLanes; ++k) v[k] = loadv(tile + (cb - c0 + k) * ld + tb);
      transpose_block(v);
      for (int i = 0; i < rows; ++i) {
        const int64_t at = (t0 + tb + i) * n + cb;
        storev_from_float(out + at, loadv_as_float(in + at) + scale * v[i]);
      }
    }
  }
  for (int64_t t = 0; t < tc; ++t) {
    const int64_t at = (t0 + t) * n;
    for (int64_t c = whole; c < c1; ++c)
      Float<T>::store(out + at + c, Float<T>::load(in + at + c) + scale * tile[(c - c0) * ld + t]);
  }
}

// This thread's rows: a contiguous range holding about its share of entries + rows (a row
// costs a little on its own: its output chunk is written even without entries).
inline void my_rows(const int64_t* offsets, int64_t rows, int64_t* r0, int64_t* r1) {
  const int64_t nth = omp_get_num_threads(), me = omp_get_thread_num();
  const int64_t total = offsets[rows] + rows;
  auto first_row_from = [&](int64_t k) {
    const int64_t target = total * k / nth;
    int64_t lo = 0, hi = rows;  // first r with offsets[r] + r >= target
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (offsets[mid] + mid < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  *r0 = first_row_from(me);
  *r1 = me + 1 == nth ? rows : first_row_from(me + 1);
}

// The end of row r's entries in column block [.., block_end), from cursor on.
template <typename C>
inline int64_t block_end(const C* cols, int64_t cursor, int64_t row_end, int64_t limit) {
  while (cursor < row_end && static_cast<int64_t>(cols[cursor]) < limit) ++cursor;
  return cursor;
}

// Columns per block: the block's rows of the x tile (ld elements of D each) fill
// kColumnBlockBytes.
template <typename D>
inline int64_t column_block(int64_t ld) {
  return std::max<int64_t>(kLanes, kColumnBlockBytes / (static_cast<int64_t>(sizeof(D)) * ld));
}

// Rows r0..r1 of a CSR matrix over a chunk's tile, one column block at a time: calls
// visit(r, j0, j1) with row r's entries [j0, j1) in each block (a row's entries are sorted by
// column, so a block's entries are the next contiguous run of the row).
template <typename D, typename C, typename Visit>
inline void by_column_blocks(const int64_t* offsets, const C* cols, int64_t r0, int64_t r1,
                             int64_t in, int64_t ld, Visit&& visit) {
  // Where each row's next block starts. Kept per thread: a fresh vector per chunk cost 20-40%
  // at 2048 tokens (the allocator hands the memory back and it is faulted in again).
  thread_local std::vector<int64_t> cursor;
  cursor.assign(offsets + r0, offsets + r1);
  const int64_t cb = column_block<D>(ld);
  for (int64_t b = cb; b - cb < in; b += cb) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t j0 = cursor[r - r0], j1 = block_end(cols, j0, offsets[r + 1], b);
      if (j1 > j0) visit(r, j0, j1);
      cursor[r - r0] = j1;
    }
  }
}

// Products of bf16 tile rows by AVX512-BF16's vdpbf16ps, where the target has it: one
// instruction multiplies 32 bf16 pairs exactly and adds each pair's two products into one of 16
// fp32 lanes, where widening both rows and two FMAs took five. Dot products (dot_pairs): both
// rows in the pair layout (tile_vector), so a lane sums tokens l and kLanes + l. Sums of rows
// times values (axpy_pair): two entries' rows interleaved against their two values. Like any
// AVX512-BF16 instruction it takes inputs and gives sums below fp32's normal range (under
// 1.2e-38) as zero.
#if defined(__AVX512BF16__)
template <typename D>
constexpr bool kDotPairs = std::is_same_v<D, uint16_t>;

inline fvec dot_pairs(fvec s, uvec a, const uint16_t* b) {
  return reinterpret_cast<fvec>(_mm512_dpbf16_ps(
      reinterpret_cast<__m512>(s), reinterpret_cast<__m512bh>(a),
      reinterpret_cast<__m512bh>(_mm512_loadu_si512(b))));
}

// Two entries' tile rows interleaved token by token against their two bf16 values, for
// vdpbf16ps: per pair vector k of the rows, lo and hi hold (x0[t], x1[t]) for half its tokens
// each, in the order unpacklo/hi_epi16 leave them (per 128-bit lane q: tokens 4q, 16+4q,
// 4q+1, 17+4q in lo, the same +2 in hi); natural_tokens puts them back.
inline void axpy_pair(fvec& lo_sum, fvec& hi_sum, const uint16_t* x0, const uint16_t* x1,
                      __m512bh vv) {
  const __m512i p0 = _mm512_loadu_si512(x0), p1 = _mm512_loadu_si512(x1);
  lo_sum = reinterpret_cast<fvec>(_mm512_dpbf16_ps(reinterpret_cast<__m512>(lo_sum),
      reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(p0, p1)), vv));
  hi_sum = reinterpret_cast<fvec>(_mm512_dpbf16_ps(reinterpret_cast<__m512>(hi_sum),
      reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(p0, p1)), vv));
}

// The sums of axpy_pair over one pair vector as tokens 0..15 (first) and 16..31 (second).
template <int... T>
inline void natural_tokens(fvec lo, fvec hi, fvec* first, fvec* second,
                           std::integer_sequence<int, T...>) {
  // token t = 4q + r (r < 4) of a half is in lo (r < 2) or hi, lane 4q + 2·(r % 2), + 1 for
  // the second half.
  *first = __builtin_shufflevector(lo, hi, ((T % 4 >= 2 ? 16 : 0) + 4 * (T / 4) + 2 * (T % 2))...);
  *second = __builtin_shufflevector(lo, hi,
                                    ((T % 4 >= 2 ? 16 : 0) + 4 * (T / 4) + 2 * (T % 2) + 1)...);
}
#else
template <typename D>
constexpr bool kDotPairs = false;
fvec dot_pairs(fvec s, uvec a, const uint16_t* b);  // never called: kDotPairs is false
#endif

// acc[0 .. NV·kLanes) += Σ_j values[j] · xT[cols[j]] (rows of the padded tile), in partial sums of
// kEntryBlock entries held in registers.
template <int NV, typename C, typename D, typename V>
inline void axpy_entries(float* acc, const D* xT, int64_t ld, const C* cols,
                         const V* values, int64_t j0, int64_t j1) {
  // bf16 rows and values: entries in pairs through vdpbf16ps (axpy_pair), both values exact.
  constexpr bool dot = kDotPairs<D> && std::is_same_v<V, uint16_t>;
  for (int64_t g0 = j0; g0 < j1; g0 += kEntryBlock) {
    const int64_t g1 = std::min(g0 + kEntryBlock, j1);
    // Two sets of sums, even and odd entries (kPairEntries): each vector's chain of FMAs
    // advances every other entry, so an entry does not wait on the previous one's FMA latency.
    fvec part[NV] = {}, odd[NV] = {};
    int64_t j = g0;
    if constexpr (dot) {
#if defined(__AVX512BF16__)
      for (; j + 2 <= g1; j += 2) {
        uint32_t both;
        std::memcpy(&both, values + j, 4);
        const __m512bh vv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(both)));
        const D* x0 = xT + static_cast<int64_t>(cols[j]) * ld;
        const D* x1 = xT + static_cast<int64_t>(cols[j + 1]) * ld;
#pragma GCC unroll 4
        for (int k = 0; k < NV / 2; ++k)
          axpy_pair(odd[2 * k], odd[2 * k + 1], x0 + 2 * k * kLanes, x1 + 2 * k * kLanes, vv);
      }
#pragma GCC unroll 4
      for (int k = 0; k < NV / 2; ++k) {
        fvec first, second;
        natural_tokens(odd[2 * k], odd[2 * k + 1], &first, &second,
                       std::make_integer_sequence<int, kLanes>());
        odd[2 * k] = first;
        odd[2 * k + 1] = second;
      }
#endif
    } else {
      for (; kPairEntries<D> && j + 2 <= g1; j += 2) {
        const float v0 = Float<V>::load(values + j), v1 = Float<V>::load(values + j + 1);
        const D* x0 = xT + static_cast<int64_t>(cols[j]) * ld;
        const D* x1 = xT + static_cast<int64_t>(cols[j + 1]) * ld;
#pragma GCC unroll 8
        for (int k = 0; k < NV; ++k) {
          part[k] = fmadd(v0, tile_vector(x0, k), part[k]);
          odd[k] = fmadd(v1, tile_vector(x1, k), odd[k]);
        }
      }
    }
    for (; j < g1; ++j) {
      const float v = Float<V>::load(values + j);
      const D* xs = xT + static_cast<int64_t>(cols[j]) * ld;
#pragma GCC unroll 8
      for (int k = 0; k < NV; ++k) part[k] = fmadd(v, tile_vector(xs, k), part[k]);
    }
    if constexpr (kPairEntries<D>) {
#pragma GCC unroll 8
      for (int k = 0; k < NV; ++k) part[k] += odd[k];
    }
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) storev(acc + k * kLanes, loadv(acc + k * kLanes) + part[k]);
  }
}

// g[j] += a · xT[cols[j]] over the padded chunk, four entries at a time (four independent
// sums share each load of a). a is fp32, or (kDotPairs) bf16 in the tile's pair layout, whose
// dot products are dot_pairs.
template <int NV, typename C, typename D, typename A>
inline void dot_entries(const A* a, const D* xT, int64_t ld, const C* cols, float* g,
                        int64_t j0, int64_t j1) {
  constexpr bool pairs = kDotPairs<D> && std::is_same_v<A, D>;
  fvec av[NV];
  uvec ap[(NV + 1) / 2];
#pragma GCC unroll 8
  for (int k = 0; k < NV; ++k) {
    if constexpr (pairs) {
      if (k % 2 == 0) ap[k / 2] = *reinterpret_cast<const uvec*>(a + k * kLanes);
    } else {
      av[k] = loadv(a + k * kLanes);
    }
  }
  // s += a · b over vector k of the rows (pairs: over pair vector k / 2, at its odd k).
  auto step = [&](fvec& s, const D* b, int k) {
    if constexpr (pairs) {
      if (k % 2 == 1) s = dot_pairs(s, ap[k / 2], b + (k - 1) * kLanes);
    } else {
      s = fmadd(av[k], tile_vector(b, k), s);
    }
  };
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) {
    const D* b0 = xT + static_cast<int64_t>(cols[j]) * ld;
    const D* b1 = xT + static_cast<int64_t>(cols[j + 1]) * ld;
    const D* b2 = xT + static_cast<int64_t>(cols[j + 2]) * ld;
    const D* b3 = xT + static_cast<int64_t>(cols[j + 3]) * ld;
    fvec s0 = {}, s1 = {}, s2 = {}, s3 = {};
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) {
      step(s0, b0, k);
      step(s1, b1, k);
      step(s2, b2, k);
      step(s3, b3, k);
    }
    g[j] += hsum(s0);
    g[j + 1] += hsum(s1);
    g[j + 2] += hsum(s2);
    g[j + 3] += hsum(s3);
  }
  for (; j < j1; ++j) {
    const D* b = xT + static_cast<int64_t>(cols[j]) * ld;
    fvec s = {};
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) step(s, b, k);
    g[j] += hsum(s);
  }
}

// Calls body(std::integral_constant<int, NV>) with NV = ld / kLanes in 1..8, the vectors per tile
// row, so that the micro-kernels' loops have constant trip counts and stay in registers.
template <typename Body>
inline void with_vectors(int64_t ld, Body&& body) {
  with_constant<8>(static_cast<int>(ld / kLanes), body);
}


// One token: a gathered dot product per row, straight from x (no tile to amortise). Each row's
// entries go kLanes at a time into two vector sums held in registers (one gather each), then
// one at a time for the last few: at 1 token the kernel is bound by its entries' bytes.
template <typename T, typename C, typename V>
void spmm_one_token(const T* x, const T* y_in, T* out, int64_t in, int64_t rows,
                    const int64_t* offsets, const C* cols, const V* values, float scale) {
  float* xf = own_tile.get(in);
  for (int64_t c = 0; c < in; ++c) xf[c] = Float<T>::load(x + c);
#pragma omp parallel
  {
  int64_t r0, r1;
  my_rows(offsets, rows, &r0, &r1);
  for (int64_t r = r0; r < r1; ++r) {
    int64_t j = offsets[r];
    const int64_t end = offsets[r + 1];
    fvec s0 = {}, s1 = {};
    for (; j + 2 * kLanes <= end; j += 2 * kLanes) {
      __builtin_prefetch(values + j + 1024);
      __builtin_prefetch(cols + j + 1024);
      s0 = fmadd(loadv_as_float(values + j), gather_lanes(xf, cols + j), s0);
      s1 = fmadd(loadv_as_float(values + j + kLanes), gather_lanes(xf, cols + j + kLanes), s1);
    }
    if (j + kLanes <= end) {
      s0 = fmadd(loadv_as_float(values + j), gather_lanes(xf, cols + j), s0);
      j += kLanes;
    }
    float total = hsum(s0 + s1);
    for (; j < end; ++j) total = fmadd(Float<V>::load(values + j), xf[cols[j]], total);
    Float<T>::store(out + r, Float<T>::load(y_in + r) + scale * total);
  }
  }
}

// The frame of the row-wise kernels (spmm, sddmm): one parallel region in which each thread
// takes its rows [r0, r1) of S (my_rows); per chunk of tokens x is transposed into the tile
// (in T: the rows the entries gather), then body(r0, r1, t0, tc, ld, xT, own) runs on every
// thread with its own fp32 tile of (r1 - r0) x ld. With kOwnTiles each thread transposes the
// whole chunk into its own tile; else the threads fill one shared tile together, each its share
// of the columns, and all finish a chunk before the next one overwrites it.
template <typename T, typename Body>
void by_token_chunks(const T* x, int64_t tokens, int64_t in, const int64_t* offsets,
                     int64_t rows, int64_t chunk, Body&& body) {
  const int64_t ld_max = round_tokens<T>(std::min(tokens, chunk));
  T* shared = kOwnTiles<T> ? nullptr : shared_tile.get_as<T>(in * ld_max);
#pragma omp parallel
  {
    const int64_t nth = omp_get_num_threads(), me = omp_get_thread_num();
    int64_t r0, r1;
    my_rows(offsets, rows, &r0, &r1);
    T* xT = kOwnTiles<T> ? gather_tile.get_as<T>(in * ld_max) : shared;
    const int64_t c0 = kOwnTiles<T> ? 0 : in * me / nth;
    const int64_t c1 = kOwnTiles<T> ? in : in * (me + 1) / nth;
    float* own = own_tile.get((r1 - r0) * ld_max);
    for (int64_t t0 = 0; t0 < tokens; t0 += chunk) {
      const int64_t tc = std::min(chunk, tokens - t0), ld = round_tokens<T>(tc);
      transpose_chunk(x, in, t0, tc, c0, c1, xT + c0 * ld, ld);
      if constexpr (!kOwnTiles<T>) {
#pragma omp barrier
      }
      body(r0, r1, t0, tc, ld, static_cast<const T*>(xT), own);
      if constexpr (!kOwnTiles<T>) {
#pragma omp barrier
      }
    }
  }
}

// Tokens per thread from which 16-bit spmm splits the tokens between the threads
// (spmm_by_token_ranges) rather than S's rows: each thread then runs all of S over its own
// tokens, so an entry's indices and value are read once per thread, and each thread needs
// enough tokens per entry. bf16, 4096-11008 wide layers, 2 threads: 0.71-0.82x the time at
// 128-256 tokens (64 per thread), 0.83-1.14x at 64 (32 each), 0.69-0.82x at 512-2048.
// (spmm_t_sddmm split the same way was faster from 256 tokens, but its values' gradient then
// sums each thread's tokens apart, and its bits would depend on the thread count.)
constexpr int64_t kSpmmSplitTokens = 64;

// The tokens [a, b) of this thread when they are split between the threads in whole token
// blocks of the tiles (kTileTokens): contiguous ranges, the first threads a block more.
template <typename T>
inline void my_tokens(int64_t tokens, int64_t* a, int64_t* b) {
  const int64_t nth = omp_get_num_threads(), me = omp_get_thread_num();
  const int64_t blocks = (tokens + kTileTokens<T> - 1) / kTileTokens<T>;
  *a = std::min(tokens, blocks * me / nth * kTileTokens<T>);
  *b = std::min(tokens, blocks * (me + 1) / nth * kTileTokens<T>);
}

// The frame of the kernels with the tokens split between the threads: one parallel region in
// which each thread takes its tokens (my_tokens), transposes each chunk of them of src (all
// `features` columns: the rows S's entries gather) into its own gather tile and runs
// body(t0, tc, ld, tile) over all of S.
template <typename T, typename Body>
void by_token_ranges(const T* src, int64_t tokens, int64_t features, int64_t chunk,
                     Body&& body) {
#pragma omp parallel
  {
    int64_t a, b;
    my_tokens<T>(tokens, &a, &b);
    const int64_t ld_max = round_tokens<T>(std::min(std::max<int64_t>(b - a, 1), chunk));
    T* tile = gather_tile.get_as<T>(features * ld_max);
    for (int64_t t0 = a; t0 < b; t0 += chunk) {
      const int64_t tc = std::min(chunk, b - t0), ld = round_tokens<T>(tc);
      transpose_chunk(src, features, t0, tc, 0, features, tile, ld);
      body(t0, tc, ld, static_cast<const T*>(tile));
    }
  }
}

// Tokens per chunk for a tile of `features` gathered rows: as many whole token blocks (up to
// cap) as keep the tile within kGatherTileBytes, so that the rows the entries gather stay in
// L2 with no blocking of S's columns; at least one block.
template <typename D>
inline int64_t tile_chunk(int64_t features, int64_t cap) {
  const int64_t fit = kGatherTileBytes / (features * static_cast<int64_t>(sizeof(D)));
  return std::clamp(fit / kTileTokens<D> * kTileTokens<D>, kTileTokens<D>, cap);
}

// spmm over chunks of kSpmmTokenChunk tokens, S's columns in blocks whose tile rows stay in L2
// while every row of the thread's uses them; each row's sums go through a buffer for all the
// thread's rows (rows x chunk fp32: in memory, not in cache). Many tokens per call amortise it.
template <typename T, typename C, typename V>
void spmm_by_column_blocks(const T* x, const T* y_in, T* out, int64_t tokens, int64_t in,
                           int64_t rows, const int64_t* offsets, const C* cols, const V* values,
                           float scale) {
  by_token_chunks(x, tokens, in, offsets, rows, kSpmmTokenChunk,
                  [&](int64_t r0, int64_t r1, int64_t t0, int64_t tc, int64_t ld,
                      const T* xT, float* acc) {
    std::fill(acc, acc + (r1 - r0) * ld, 0.0f);
    with_vectors(ld, [&](auto nv) {
      by_column_blocks<T>(offsets, cols, r0, r1, in, ld, [&](int64_t r, int64_t j0, int64_t j1) {
        axpy_entries<decltype(nv)::value>(acc + (r - r0) * ld, xT, ld, cols, values, j0, j1);
      });
    });
    add_transposed(acc, ld, t0, tc, r0, r1, y_in, out, rows, scale);
  });
}

// S's rows [r0, r1) over one chunk of tokens (tile xT, ld tokens wide), in groups of kLanes
// rows whose sums (acc: kLanes x ld fp32) stay in L1 until they go out, added to y. Both the
// row-split and the token-split spmm go through here: a row's entries sum in one order.
template <typename T, typename C, typename V>
void rows_in_groups(int64_t r0, int64_t r1, int64_t t0, int64_t tc, int64_t ld, const T* xT,
                    float* acc, const T* y_in, T* out, int64_t rows, const int64_t* offsets,
                    const C* cols, const V* values, float scale) {
  with_vectors(ld, [&](auto nv) {
    for (int64_t g0 = r0; g0 < r1; g0 += kLanes) {
      const int64_t g1 = std::min(g0 + kLanes, r1);
      std::fill(acc, acc + (g1 - g0) * ld, 0.0f);
      for (int64_t r = g0; r < g1; ++r)
        axpy_entries<decltype(nv)::value>(acc + (r - g0) * ld, xT, ld, cols, values,
                                          offsets[r], offsets[r + 1]);
      add_transposed(acc, ld, t0, tc, g0, g1, y_in, out, rows, scale);
    }
  });
}

// spmm over chunks short enough for the whole tile to stay in L2 (tile_chunk), so a row's
// entries go at once and rows go in groups of kLanes whose sums stay in L1 until they go out.
// Shorter chunks mean more passes over S: this wins while a call is one or two of them.
template <typename T, typename C, typename V>
void spmm_by_row_groups(const T* x, const T* y_in, T* out, int64_t tokens, int64_t in,
                        int64_t rows, const int64_t* offsets, const C* cols, const V* values,
                        float scale, int64_t chunk) {
  by_token_chunks(x, tokens, in, offsets, rows, chunk,
                  [&](int64_t r0, int64_t r1, int64_t t0, int64_t tc, int64_t ld,
                      const T* xT, float* acc) {
    rows_in_groups(r0, r1, t0, tc, ld, xT, acc, y_in, out, rows, offsets, cols, values, scale);
  });
}

// spmm with the tokens split between the threads (by_token_ranges): chunks short enough for
// the tile to stay in L2 (tile_chunk), S's rows in groups of kLanes whose sums stay in L1.
template <typename T, typename C, typename V>
void spmm_by_token_ranges(const T* x, const T* y_in, T* out, int64_t tokens, int64_t in,
                          int64_t rows, const int64_t* offsets, const C* cols, const V* values,
                          float scale, int64_t chunk) {
  by_token_ranges(x, tokens, in, chunk, [&](int64_t t0, int64_t tc, int64_t ld, const T* xT) {
    rows_in_groups(int64_t{0}, rows, t0, tc, ld, xT, own_tile.get(kLanes * ld), y_in, out, rows,
                   offsets, cols, values, scale);
  });
}

template <typename T, typename C, typename V>
void spmm_typed(const T* x, const T* y_in, T* out, int64_t tokens, int64_t in, int64_t rows,
                const int64_t* offsets, const C* cols, const V* values, float scale) {
  if (tokens == 1) return spmm_one_token(x, y_in, out, in, rows, offsets, cols, values, scale);
  const int64_t chunk = tile_chunk<T>(in, kSpmmTokenChunk);
  // 16-bit: by tokens also where too few for kSpmmSplitTokens per thread would take S's column
  // blocks (more than two chunks): a row's entries then always sum in the row groups' order,
  // and the bits depend on neither the thread count nor (from 2 tokens) the token count.
  if (kOwnTiles<T> && (tokens >= omp_get_max_threads() * kSpmmSplitTokens || tokens > 2 * chunk))
    return spmm_by_token_ranges(x, y_in, out, tokens, in, rows, offsets, cols, values, scale,
                                chunk);
  if (tokens <= 2 * chunk)
    return spmm_by_row_groups(x, y_in, out, tokens, in, rows, offsets, cols, values, scale, chunk);
  spmm_by_column_blocks(x, y_in, out, tokens, in, rows, offsets, cols, values, scale);
}

template <typename T, typename C>
void sddmm_typed(const T* gy, const T* x, int64_t tokens, int64_t out, int64_t in,
                 const int64_t* offsets, const C* cols, float* g) {
  by_token_chunks(x, tokens, in, offsets, out, kSddmmTokenChunk,
                  [&](int64_t r0, int64_t r1, int64_t t0, int64_t tc, int64_t ld,
                      const T* xT, float* own) {
    if (t0 == 0) std::fill(g + offsets[r0], g + offsets[r1], 0.0f);
    with_vectors(ld, [&](auto nv) {
      constexpr int NV = decltype(nv)::value;
      if constexpr (kDotPairs<T>) {  // gy's rows as bf16 pairs too (dot_pairs)
        T* gyT = reinterpret_cast<T*>(own);
        transpose_chunk(gy, out, t0, tc, r0, r1, gyT, ld);
        by_column_blocks<T>(offsets, cols, r0, r1, in, ld, [&](int64_t r, int64_t j0, int64_t j1) {
          dot_entries<NV>(gyT + (r - r0) * ld, xT, ld, cols, g, j0, j1);
        });
      } else {
        transpose_chunk(gy, out, t0, tc, r0, r1, own, ld);
        by_column_blocks<T>(offsets, cols, r0, r1, in, ld, [&](int64_t r, int64_t j0, int64_t j1) {
          dot_entries<NV>(own + (r - r0) * ld, xT, ld, cols, g, j0, j1);
        });
      }
    });
  });
}

// The backward of the spmm strategy in one pass over S by columns (CSC): column c's entries
// (rows trows[j], values values[perm[j]]) each gather one gy row of the chunk's tile, which
// feeds both products while it is in registers:
//   gx_out[t, c] = gx_in[t, c] + scale · Σ_j values[perm[j]] · gy[t, trows[j]]   (gy·S)
//   g[perm[j]]  (+)= Σ_t gy[t, trows[j]] · x[t, c]                            (sddmm)
// Separately, spmm_t and sddmm each gather every entry's row (and sddmm transposes gy again).
template <int NV, typename C, typename D, typename V, typename X>
inline void column_entries(const X* xc, const D* gyT, int64_t ld, const C* trows,
                           const int64_t* perm, const V* values, float* acc, float* g,
                           int64_t j0, int64_t j1, bool first) {
  // x's column in registers: fp32 vectors, or (kDotPairs: X is bf16) pair vectors as the tiles
  // hold them, for dot_pairs against each gathered row's pair vectors as loaded. With bf16
  // values too, gx's sums go by vdpbf16ps as well (axpy_pair).
  constexpr bool axpy_dot = kDotPairs<D> && std::is_same_v<V, uint16_t>;
  fvec xv[NV];
  uvec xp[(NV + 1) / 2];
#pragma GCC unroll 8
  for (int k = 0; k < NV; ++k) {
    if constexpr (kDotPairs<D>) {
      if (k % 2 == 0) xp[k / 2] = *reinterpret_cast<const uvec*>(xc + k * kLanes);
    } else {
      xv[k] = loadv(xc + k * kLanes);
    }
  }
  for (int64_t b0 = j0; b0 < j1; b0 += kEntryBlock) {
    const int64_t b1 = std::min(b0 + kEntryBlock, j1);
    // Entries in pairs (kPairEntries), a set of gx sums each, as axpy_entries; each entry's
    // dot its own chain, two in flight.
    fvec part[NV] = {}, odd[NV] = {};
    int64_t j = b0;
    if constexpr (axpy_dot) {  // both products by vdpbf16ps, as axpy_entries and dot_entries'
#if defined(__AVX512BF16__)
      for (; j + 2 <= b1; j += 2) {
        const int64_t p0 = perm[j], p1 = perm[j + 1];
        const uint32_t both = values[p0] | static_cast<uint32_t>(values[p1]) << 16;
        const __m512bh vv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(both)));
        const D* row0 = gyT + static_cast<int64_t>(trows[j]) * ld;
        const D* row1 = gyT + static_cast<int64_t>(trows[j + 1]) * ld;
        fvec s0 = {}, s1 = {};
#pragma GCC unroll 4
        for (int k = 0; k < NV / 2; ++k) {
          axpy_pair(odd[2 * k], odd[2 * k + 1], row0 + 2 * k * kLanes, row1 + 2 * k * kLanes, vv);
          s0 = dot_pairs(s0, xp[k], row0 + 2 * k * kLanes);
          s1 = dot_pairs(s1, xp[k], row1 + 2 * k * kLanes);
        }
        float d0, d1;
        hsum2(s0, s1, &d0, &d1);
        g[p0] = first ? d0 : g[p0] + d0;
        g[p1] = first ? d1 : g[p1] + d1;
      }
#pragma GCC unroll 4
      for (int k = 0; k < NV / 2; ++k)
        natural_tokens(odd[2 * k], odd[2 * k + 1], &odd[2 * k], &odd[2 * k + 1],
                       std::make_integer_sequence<int, kLanes>());
#endif
    }
    for (; !axpy_dot && kPairEntries<D> && j + 2 <= b1; j += 2) {
      const int64_t p0 = perm[j], p1 = perm[j + 1];
      const float v0 = Float<V>::load(values + p0), v1 = Float<V>::load(values + p1);
      const D* row0 = gyT + static_cast<int64_t>(trows[j]) * ld;
      const D* row1 = gyT + static_cast<int64_t>(trows[j + 1]) * ld;
      fvec s0 = {}, s1 = {};
#pragma GCC unroll 8
      for (int k = 0; k < NV; ++k) {
        const fvec r0 = tile_vector(row0, k), r1 = tile_vector(row1, k);
        part[k] = fmadd(v0, r0, part[k]);
        odd[k] = fmadd(v1, r1, odd[k]);
        if constexpr (kDotPairs<D>) {
          if (k % 2 == 1) {
            s0 = dot_pairs(s0, xp[k / 2], row0 + (k - 1) * kLanes);
            s1 = dot_pairs(s1, xp[k / 2], row1 + (k - 1) * kLanes);
          }
        } else {
          s0 = fmadd(xv[k], r0, s0);
          s1 = fmadd(xv[k], r1, s1);
        }
      }
      float d0, d1;
      hsum2(s0, s1, &d0, &d1);
      g[p0] = first ? d0 : g[p0] + d0;
      g[p1] = first ? d1 : g[p1] + d1;
    }
    for (; j < b1; ++j) {
      const int64_t p = perm[j];
      const float v = Float<V>::load(values + p);
      const D* row = gyT + static_cast<int64_t>(trows[j]) * ld;
      fvec s0 = {}, s1 = {};  // two chains: the dot does not wait on one FMA's latency
#pragma GCC unroll 8
      for (int k = 0; k < NV; ++k) {
        const fvec r = tile_vector(row, k);
        part[k] = fmadd(v, r, part[k]);
        if constexpr (kDotPairs<D>) {
          if (k % 2 == 1) s0 = dot_pairs(s0, xp[k / 2], row + (k - 1) * kLanes);
        } else {
          if (k % 2 == 0) s0 = fmadd(xv[k], r, s0); else s1 = fmadd(xv[k], r, s1);
        }
      }
      const float d = hsum(s0 + s1);
      g[p] = first ? d : g[p] + d;
    }
    if constexpr (kPairEntries<D>) {
#pragma GCC unroll 8
      for (int k = 0; k < NV; ++k) part[k] += odd[k];
    }
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) storev(acc + k * kLanes, loadv(acc + k * kLanes) + part[k]);
  }
}

template <typename T, typename C, typename V>
void spmm_t_sddmm_typed(const T* gy, const T* x, const T* gx_in, T* gx_out, int64_t tokens,
                        int64_t out, int64_t in, const int64_t* t_offsets, const C* trows,
                        const int64_t* perm, const V* values, float scale, float* g) {
  const int64_t ld_max = round_tokens<T>(std::min(tokens, kSddmmTokenChunk));
  T* gyT = shared_tile.get_as<T>(out * ld_max);  // in T: the rows the entries gather
#pragma omp parallel
  {
    const int64_t nth = omp_get_num_threads(), me = omp_get_thread_num();
    int64_t c0, c1;
    my_rows(t_offsets, in, &c0, &c1);  // S's columns are the rows of its transpose
    const int64_t r0 = out * me / nth, r1 = out * (me + 1) / nth;
    // This thread's columns of x and of gx over the chunk, feature-major: each transposed in
    // (and out) in one sweep whose source rows are read front to back.
    float* xs = own_tile.get(2 * (c1 - c0) * ld_max);
    for (int64_t t0 = 0; t0 < tokens; t0 += kSddmmTokenChunk) {
      const int64_t tc = std::min(kSddmmTokenChunk, tokens - t0), ld = round_tokens<T>(tc);
      float* acc = xs + (c1 - c0) * ld;
      transpose_chunk(gy, out, t0, tc, r0, r1, gyT + r0 * ld, ld);
      // x's columns in fp32, or as bf16 pairs for dot_pairs (in the first half of the same
      // space).
      using X = std::conditional_t<kDotPairs<T>, T, float>;
      X* xcols = reinterpret_cast<X*>(xs);
      transpose_chunk(x, in, t0, tc, c0, c1, xcols, ld);
      std::fill(acc, acc + (c1 - c0) * ld, 0.0f);
#pragma omp barrier
      // No blocking of gy's rows to keep them in L2 (as spmm blocks x's columns): each
      // gathered gy vector feeds two FMAs here (gx's column and the value's gradient), enough
      // work per gather that blocking does not make the loop faster.
      with_vectors(ld, [&](auto nv) {
        for (int64_t c = c0; c < c1; ++c)
          column_entries<decltype(nv)::value>(xcols + (c - c0) * ld, gyT, ld, trows, perm,
                                              values, acc + (c - c0) * ld, g, t_offsets[c],
                                              t_offsets[c + 1], t0 == 0);
      });
      add_transposed(acc, ld, t0, tc, c0, c1, gx_in, gx_out, in, scale);
#pragma omp barrier  // the next chunk overwrites the shared tile
    }
  }
}

}  // namespace

void shira::cpu::spmm(DType dtype, const void* x, const void* y_in, void* out, int64_t tokens,
                      int64_t in, int64_t rows, const int64_t* offsets, const void* cols,
                      int col_bytes, const void* values, bool values_in_dtype, float scale) {
  if (tokens == 0 || rows == 0) return;
  dispatch_sparse(dtype, col_bytes, [&](auto t, auto c) {
    using T = typename decltype(t)::type;
    using C = typename decltype(c)::type;
    auto run = [&](auto* vals) {
      spmm_typed(static_cast<const T*>(x), static_cast<const T*>(y_in), static_cast<T*>(out),
                 tokens, in, rows, offsets, static_cast<const C*>(cols), vals, scale);
    };
    if (values_in_dtype) run(static_cast<const T*>(values));
    else run(static_cast<const float*>(values));
  });
}

void shira::cpu::sddmm(DType dtype, const void* gy, const void* x, int64_t tokens, int64_t out,
                       int64_t in, const int64_t* offsets, const void* cols, int col_bytes,
                       float* g) {
  const int64_t nnz = offsets[out];
  if (nnz == 0) return;
  if (tokens == 0) return std::fill(g, g + nnz, 0.0f);
  dispatch_sparse(dtype, col_bytes, [&](auto t, auto c) {
    using T = typename decltype(t)::type;
    sddmm_typed(static_cast<const T*>(gy), static_cast<const T*>(x), tokens, out, in, offsets,
                static_cast<const typename decltype(c)::type*>(cols), g);
  });
}

void shira::cpu::spmm_t_sddmm(DType dtype, const void* gy, const void* x, const void* gx_in,
                              void* gx_out, int64_t tokens, int64_t out, int64_t in,
                              const int64_t* t_offsets, const void* trows, int row_bytes,
                              const int64_t* perm, const void* values, bool values_in_dtype,
                              float scale, float* g) {
  const int64_t nnz = t_offsets[in];
  if (tokens == 0) return std::fill(g, g + nnz, 0.0f);
  dispatch_sparse(dtype, row_bytes, [&](auto t, auto c) {
    using T = typename decltype(t)::type;
    using C = typename decltype(c)::type;
    auto run = [&](auto* vals) {
      spmm_t_sddmm_typed(static_cast<const T*>(gy), static_cast<const T*>(x),
                         static_cast<const T*>(gx_in), static_cast<T*>(gx_out), tokens, out, in,
                         t_offsets, static_cast<const C*>(trows), perm, vals, scale, g);
    };
    if (values_in_dtype) run(static_cast<const T*>(values));
    else run(static_cast<const float*>(values));
  });
}

int64_t shira::cpu::add_at_indices(DType dtype, const void* weight, void* out, int64_t numel,
                                   const void* idx, int idx_bytes, const void* values,
                                   float scale, int64_t nnz, void* saved) {
  return dispatch_float<CpuFloat>(dtype, nnz, [&](auto t) {
    using T = typename decltype(t)::type;
    return dispatch_index<int32_t, int64_t>(idx_bytes, nnz, [&](auto i) {
      return add_at_indices_typed(static_cast<const T*>(weight), static_cast<T*>(out), numel,
                                  static_cast<const typename decltype(i)::type*>(idx),
                                  static_cast<const T*>(values), scale, nnz,
                                  static_cast<T*>(saved));
    });
  });
}
