// Weight-streaming linear kernel for bfloat16 with AVX512-BF16 (vdpbf16ps), compiled with the
// AVX-512 flags plus -mavx512bf16 (cmake/ExaoneExtCpuIsa.cmake) and called only when the CPU reports
// avx512bf16. x stays bfloat16: each vdpbf16ps multiplies 32 pairs of bf16 exactly and adds them to
// 16 float32 accumulators, so one instruction consumes a whole 64-byte line of a weight row.
#include <immintrin.h>

#include <cstdint>

#include "cpu/linear.h"

namespace exaone_ext::cpu::avx512bf16 {
namespace {

constexpr int kRows = int(kLinearRowBlock);
constexpr int kTile = 4;
constexpr int64_t kPrefetch = 512;  // elements (1 KiB) ahead of the loads on each weight row

inline __m512bh load_pairs(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load_pairs(const uint16_t* p, int n) {
  return (__m512bh)_mm512_maskz_loadu_epi16(__mmask32((uint64_t(1) << n) - 1), p);
}

inline uint16_t to_bf16_bits(float f) { return from_float<bf16>(f).bits; }

template <int R, int MT>
void tile(const LinearArgs& a, int64_t n0, int64_t m0) {
  const int64_t K = a.k;
  const uint16_t* w[R];
  for (int r = 0; r < R; ++r) w[r] = static_cast<const uint16_t*>(a.w) + (n0 + r) * a.w_stride;
  const uint16_t* x[MT];
  for (int j = 0; j < MT; ++j) x[j] = static_cast<const uint16_t*>(a.x) + (m0 + j) * a.x_stride;
  __m512 acc[MT][R];
  for (int j = 0; j < MT; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= K; i += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w[r] + i + kPrefetch), _MM_HINT_NTA);
      wv[r] = load_pairs(w[r] + i);
    }
    for (int j = 0; j < MT; ++j) {
      const __m512bh xv = load_pairs(x[j] + i);
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], xv, wv[r]);
    }
  }
  if (i < K) {
    const int rem = int(K - i);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_pairs(w[r] + i, rem);
    for (int j = 0; j < MT; ++j) {
      const __m512bh xv = load_pairs(x[j] + i, rem);
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], xv, wv[r]);
    }
  }
  for (int j = 0; j < MT; ++j) {
    uint16_t* y = static_cast<uint16_t*>(a.y) + (m0 + j) * a.y_stride + n0;
    for (int r = 0; r < R; ++r) y[r] = to_bf16_bits(_mm512_reduce_add_ps(acc[j][r]));
  }
}

template <int R>
void block(const LinearArgs& a, int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + kTile <= a.m; m0 += kTile) tile<R, kTile>(a, n0, m0);
  switch (a.m - m0) {
    case 1: tile<R, 1>(a, n0, m0); break;
    case 2: tile<R, 2>(a, n0, m0); break;
    case 3: tile<R, 3>(a, n0, m0); break;
    default: break;
  }
}

}  // namespace

void linear_rows(const LinearArgs& a, int64_t begin, int64_t end) {
  int64_t n = begin;
  for (; n + kRows <= end; n += kRows) block<kRows>(a, n);
  for (; n < end; ++n) block<1>(a, n);
}

}  // namespace exaone_ext::cpu::avx512bf16
