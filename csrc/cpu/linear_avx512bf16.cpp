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

}  // namespace

void linear_rows(const LinearArgs& a, int64_t begin, int64_t end) {
  for (int64_t m0 = 0; m0 < a.m; m0 += kPassRows) {
    const int64_t m1 = std::min(a.m, m0 + kPassRows);
    int64_t n = begin;
    for (; n + kRows <= end; n += kRows) block<kRows>(a, n, m0, m1);
    for (; n < end; ++n) block<1>(a, n, m0, m1);
  }
}

}  // namespace exaone_ext::cpu::avx512bf16
