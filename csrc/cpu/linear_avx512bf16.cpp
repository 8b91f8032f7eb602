// Weight-streaming linear kernel for bfloat16 with AVX512-BF16 (vdpbf16ps), compiled with the
// AVX-512 flags plus -mavx512bf16 (cmake/ExaoneExtCpuIsa.cmake) and called only when the CPU reports
// avx512bf16. x stays bfloat16: each vdpbf16ps multiplies 32 pairs of bf16 exactly and adds them to
// 16 float32 accumulators, so one instruction consumes a whole 64-byte line of a weight row.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "cpu/linear.h"

namespace exaone_ext::cpu::avx512bf16 {
namespace {

constexpr int kRows = int(kLinearRowBlock);
constexpr int kTile = 4;
constexpr int kPassRows = 16;       // rows of x per pass over the weight
constexpr int64_t kChunk = 512;     // elements of k per chunk (see linear_impl.h)
// One row of x: how far ahead of the loads the weight is prefetched into L2, in bytes.
constexpr int64_t kPrefetchAhead = 4096;

inline __m512bh load_pairs(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load_pairs(const uint16_t* p, int n) {
  return (__m512bh)_mm512_maskz_loadu_epi16(__mmask32((uint64_t(1) << n) - 1), p);
}

inline uint16_t to_bf16_bits(float f) { return from_float<bf16>(f).bits; }

// k in [k0, k1) for output features n0..n0+R-1 and rows m0..m0+MT-1, accumulators in acc[j * R + r].
template <int R, int MT>
void tile(const LinearArgs& a, int64_t n0, int64_t m0, int64_t k0, int64_t k1, __m512* accbuf) {
  const uint16_t* w[R];
  for (int r = 0; r < R; ++r) w[r] = static_cast<const uint16_t*>(a.w) + (n0 + r) * a.w_stride;
  const uint16_t* x[MT];
  for (int j = 0; j < MT; ++j) x[j] = static_cast<const uint16_t*>(a.x) + (m0 + j) * a.x_stride;
  __m512 acc[MT][R];
  for (int j = 0; j < MT; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = accbuf[j * R + r];
  const int64_t next = R * a.w_stride;
  int64_t i = k0;
  for (; i + 32 <= k1; i += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      // the same place in the next block's rows, into L2 (see linear_impl.h)
      _mm_prefetch(reinterpret_cast<const char*>(w[r] + i + next), _MM_HINT_T1);
      wv[r] = load_pairs(w[r] + i);
    }
    for (int j = 0; j < MT; ++j) {
      const __m512bh xv = load_pairs(x[j] + i);
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], xv, wv[r]);
    }
  }
  if (i < k1) {
    const int rem = int(k1 - i);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_pairs(w[r] + i, rem);
    for (int j = 0; j < MT; ++j) {
      const __m512bh xv = load_pairs(x[j] + i, rem);
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], xv, wv[r]);
    }
  }
  for (int j = 0; j < MT; ++j)
    for (int r = 0; r < R; ++r) accbuf[j * R + r] = acc[j][r];
}

// Output features n0..n0+R-1 for rows m0..m1 (m1 - m0 <= kPassRows), the weight rows read once.
template <int R>
void block(const LinearArgs& a, int64_t n0, int64_t m0, int64_t m1) {
  __m512 accbuf[kPassRows * R];
  for (auto& v : accbuf) v = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < a.k; k0 += kChunk) {
    const int64_t k1 = std::min(a.k, k0 + kChunk);
    int64_t m = m0;
    for (; m + kTile <= m1; m += kTile) tile<R, kTile>(a, n0, m, k0, k1, accbuf + (m - m0) * R);
    __m512* rest = accbuf + (m - m0) * R;
    switch (m1 - m) {
      case 1: tile<R, 1>(a, n0, m, k0, k1, rest); break;
      case 2: tile<R, 2>(a, n0, m, k0, k1, rest); break;
      case 3: tile<R, 3>(a, n0, m, k0, k1, rest); break;
      default: break;
    }
  }
  for (int64_t m = m0; m < m1; ++m) {
    uint16_t* y = static_cast<uint16_t*>(a.y) + m * a.y_stride + n0;
    for (int r = 0; r < R; ++r) y[r] = to_bf16_bits(_mm512_reduce_add_ps(accbuf[(m - m0) * R + r]));
  }
}

// One row of x (batch-1 decode): output features [begin, end) one after the other, each over all
// of k with four accumulators, so that the weight is read as ONE sequential stream, prefetched
// kPrefetchAhead bytes ahead. The blocked kernel above walks four rows side by side (four streams a
// row apart, plus their prefetch streams); on the projections of the 2.4B model (13-73 MB each) the
// single stream read 3-8% faster in this machine's slow memory state and up to ~20% faster in its
// fast one (both kernels timed alternately over all 30 layers' projections in one process), where
// it went past the rate of a 1 GiB float32 sum. With more rows of x it is not used: each weight
// vector would need one x load per row (load-bound from 2 rows, and x from L2 for k = 7168), where
// the blocked kernel reuses each load across its tile.
void single_row(const LinearArgs& a, int64_t begin, int64_t end) {
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  uint16_t* y = static_cast<uint16_t*>(a.y);
  for (int64_t n = begin; n < end; ++n) {
    const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * a.w_stride;
    const char* ahead = reinterpret_cast<const char*>(w) + kPrefetchAhead;
    __m512 acc[4];
    for (auto& v : acc) v = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 128 <= a.k; i += 128) {
      for (int u = 0; u < 4; ++u) {
        _mm_prefetch(ahead + 2 * i + 64 * u, _MM_HINT_T1);
        acc[u] = _mm512_dpbf16_ps(acc[u], load_pairs(x + i + 32 * u), load_pairs(w + i + 32 * u));
      }
    }
    for (int u = 0; i < a.k; i += 32, ++u) {  // at most four more steps, the last one masked
      const int rem = int(std::min<int64_t>(32, a.k - i));
      acc[u] = _mm512_dpbf16_ps(acc[u], load_pairs(x + i, rem), load_pairs(w + i, rem));
    }
    const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    y[n] = to_bf16_bits(_mm512_reduce_add_ps(s));
  }
}

// 2-4 rows of x with k small enough for x to stay in L1 (kFewRowsMaxElems): output features one
// after the other as in single_row (the weight read as ONE sequential stream), each over all of k
// with one accumulator per row, x's rows read back from L1 for every feature. Measured on a Zen 4
// (2 threads; this build and the previous one alternated, three rounds): 2560 -> 102400 (the 2.4B
// head) 10.6-11.7 against 13.6-15.4 ms at 2-4 rows, 2560 -> 14336 1.17-1.38 against 1.51-1.94 ms;
// at k = 7168 (x past L1) 0.69-0.97 against 0.56-0.62 ms in a first try, at 5-6 rows of k = 2560
// no clear gain, at 8 rows 2x slower (eight x loads per weight vector): the blocked kernel above
// keeps those.
constexpr int64_t kFewRowsMax = 4;
constexpr int64_t kFewRowsMaxElems = 10240;  // m * k: 20 KiB of bf16 x, in a 32 KiB L1

template <int MT>
void few_rows(const LinearArgs& a, int64_t begin, int64_t end) {
  const uint16_t* x[MT];
  for (int j = 0; j < MT; ++j) x[j] = static_cast<const uint16_t*>(a.x) + j * a.x_stride;
  uint16_t* y = static_cast<uint16_t*>(a.y);
  for (int64_t n = begin; n < end; ++n) {
    const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * a.w_stride;
    const char* ahead = reinterpret_cast<const char*>(w) + kPrefetchAhead;
    __m512 acc[MT];
    for (auto& v : acc) v = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= a.k; i += 32) {
      _mm_prefetch(ahead + 2 * i, _MM_HINT_T1);
      const __m512bh wv = load_pairs(w + i);
      for (int j = 0; j < MT; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], load_pairs(x[j] + i), wv);
    }
    if (i < a.k) {
      const int rem = int(a.k - i);
      const __m512bh wv = load_pairs(w + i, rem);
      for (int j = 0; j < MT; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], load_pairs(x[j] + i, rem), wv);
    }
    for (int j = 0; j < MT; ++j) y[j * a.y_stride + n] = to_bf16_bits(_mm512_reduce_add_ps(acc[j]));
  }
}

}  // namespace

void linear_rows(const LinearArgs& a, int64_t begin, int64_t end) {
  if (a.m == 1) return single_row(a, begin, end);
  if (a.m <= kFewRowsMax && a.m * a.k <= kFewRowsMaxElems)
    return a.m == 2 ? few_rows<2>(a, begin, end) : a.m == 3 ? few_rows<3>(a, begin, end) : few_rows<4>(a, begin, end);
  for (int64_t m0 = 0; m0 < a.m; m0 += kPassRows) {
    const int64_t m1 = std::min(a.m, m0 + kPassRows);
    int64_t n = begin;
    for (; n + kRows <= end; n += kRows) block<kRows>(a, n, m0, m1);
    for (; n < end; ++n) block<1>(a, n, m0, m1);
  }
}

}  // namespace exaone_ext::cpu::avx512bf16
