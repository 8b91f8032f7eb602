// Weight-streaming linear kernel body, written once against cpu/vec.h and compiled per instruction
// set by linear_avx512.cpp, linear_avx2.cpp and linear_scalar.cpp.
//
// For a block of R output features and a tile of MT rows of x, R * MT accumulators stay in registers
// while k advances: each step loads R weight vectors (16-bit types converted in registers) and one x
// vector per row, then does R * MT independent FMAs. k advances in chunks; within a chunk the tiles
// of rows take turns, so the chunk of weight rows is read from memory by the first tile and from L1
// by the others: the weight streams from memory once per call for up to kPassRows rows of x.
//
// Prefetch: each load is paired with a prefetch into L2 of the same place in the next block's rows
// (R rows further on). A block's R rows are adjacent, so the prefetches sweep the weight one block
// ahead of the loads. Measured against a 1 GiB sum on the lm_head shape (2560 -> 102400, one row):
// 90-95% of the sum's rate, against 78-80% when each row was prefetched 1 KiB ahead of itself (the
// hardware prefetcher restarts at every block of 4 short rows) and ~88% with no software prefetch.
#pragma once
#include <algorithm>
#include <type_traits>
#include "cpu/linear.h"
#include "cpu/vec.h"

namespace exaone_ext::cpu::EXAONE_ISA {
namespace {

constexpr int kRows = int(kLinearRowBlock);
// Rows of x per tile: R * MT accumulators + R weights + 1 x must fit the register file.
constexpr int kTile = Vec::size >= 16 ? 4 : 2;
// Rows of x handled per pass over the weight (their accumulators live in a small buffer between chunks).
constexpr int kPassRows = 16;
// Elements of k per chunk: the chunk of a block's weight rows (4 x 512 x 2 bytes for bf16) is read
// from memory by the first tile and from L1 by the others.
constexpr int64_t kChunk = 512;

// Independent partial sums per output: the SIMD variants have Vec::size lanes; the one-lane scalar
// build keeps kAccs of its own, so that no variant adds a long row of products into one running sum
// (a single float sum over k = 2560 products loses about sqrt(k) times more than eight interleaved ones).
constexpr int kAccs = Vec::size == 1 ? 8 : 1;

// k in [k0, k1) for output features n0..n0+R-1 and rows m0..m1, accumulators in acc[(j * R + r) * kAccs + u].
template <typename T, int R, int MT>
void tile(const LinearArgs& a, int64_t n0, int64_t m0, int64_t k0, int64_t k1, Vec* accbuf) {
  const T* w[R];
  for (int r = 0; r < R; ++r) w[r] = static_cast<const T*>(a.w) + (n0 + r) * a.w_stride;
  const float* x[MT];
  for (int j = 0; j < MT; ++j) x[j] = static_cast<const float*>(a.x) + (m0 + j) * a.x_stride;
  Vec acc[MT][R][kAccs];
  for (int j = 0; j < MT; ++j)
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < kAccs; ++u) acc[j][r][u] = accbuf[(j * R + r) * kAccs + u];
  const int64_t next = R * a.w_stride;
  int64_t i = k0;
  if constexpr (kAccs > 1) {
    // one lane: kAccs consecutive products go to kAccs different sums
    for (; i + kAccs <= k1; i += kAccs)
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < kAccs; ++u) {
          const Vec wv = Vec::load(w[r] + i + u);
          for (int j = 0; j < MT; ++j) acc[j][r][u] = fmadd(Vec::load(x[j] + i + u), wv, acc[j][r][u]);
        }
  } else {
    // two vectors per step: a 64-byte line of bf16/f16 weights per row
    for (; i + 2 * Vec::size <= k1; i += 2 * Vec::size) {
      Vec w0[R], w1[R];
      for (int r = 0; r < R; ++r) {
        __builtin_prefetch(w[r] + i + next, 0, 2);
        w0[r] = Vec::load(w[r] + i);
        w1[r] = Vec::load(w[r] + i + Vec::size);
      }
      for (int j = 0; j < MT; ++j) {
        const Vec x0 = Vec::load(x[j] + i), x1 = Vec::load(x[j] + i + Vec::size);
        for (int r = 0; r < R; ++r) acc[j][r][0] = fmadd(x1, w1[r], fmadd(x0, w0[r], acc[j][r][0]));
      }
    }
  }
  for (; i < k1; i += Vec::size) {
    const int rem = k1 - i < Vec::size ? int(k1 - i) : 0;
    Vec wv[R];
    for (int r = 0; r < R; ++r) wv[r] = rem ? Vec::load(w[r] + i, rem) : Vec::load(w[r] + i);
    for (int j = 0; j < MT; ++j) {
      const Vec xv = rem ? Vec::load(x[j] + i, rem) : Vec::load(x[j] + i);
      for (int r = 0; r < R; ++r) acc[j][r][0] = fmadd(xv, wv[r], acc[j][r][0]);
    }
  }
  for (int j = 0; j < MT; ++j)
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < kAccs; ++u) accbuf[(j * R + r) * kAccs + u] = acc[j][r][u];
}

// Variants with Vec::load_bf16_even / load_bf16_odd (AVX2) take bfloat16 weights 2 * Vec::size at a
// time against x in pair order (LinearArgs::x_pairs) when there are several rows: the widening of the
// weights, paid again by every tile of rows, drops from a shuffle and a shift per Vec::size weights to
// one shift (even elements) and one AND (odd ones). Even elements first, then odd ones: kPairTile x
// vectors, R * kPairTile accumulators and one weight vector fill the sixteen registers, and a step of
// 24 FMAs loads 6 x vectors and the weights' 4 x 32 bytes twice (from L1). Measured on Zen 3 (2560 ->
// 102400 / 7168, 8-64 rows): 1.3-1.5x the widening tiles; tiles of 2 rows with both halves of x in
// registers, or of 3 with x read by the FMAs from memory, gave 1.2-1.4x.
template <typename V>
constexpr bool kHasPairs = requires(const bf16* p) { V::load_bf16_even(p); V::load_bf16_odd(p); };
constexpr bool kPairs = kHasPairs<Vec>;
constexpr int kPairTile = 3;

template <int R, int MT, typename V = Vec>  // V: dependent, so that variants without pairs never see the call
void tile_pairs(const LinearArgs& a, int64_t n0, int64_t m0, int64_t k0, int64_t k1, Vec* accbuf) {
  if constexpr (kHasPairs<V>) {
    constexpr int64_t G = 2 * Vec::size;
    const int64_t kp = a.k / G * G;
    const bf16* w[R];
    for (int r = 0; r < R; ++r) w[r] = static_cast<const bf16*>(a.w) + (n0 + r) * a.w_stride;
    const float* xp[MT];
    for (int j = 0; j < MT; ++j) xp[j] = a.x_pairs + (m0 + j) * kp;
    Vec acc[MT][R];
    for (int j = 0; j < MT; ++j)
      for (int r = 0; r < R; ++r) acc[j][r] = accbuf[j * R + r];
    const int64_t next = R * a.w_stride;
    const int64_t end = std::min(k1, kp);
    int64_t i = k0;
    for (; i + G <= end; i += G) {
      // even elements, then odd ones: MT x vectors, R * MT accumulators and one weight vector in
      // registers (each weight row's 32 bytes are read twice, from L1)
      Vec xv[MT];
      for (int j = 0; j < MT; ++j) xv[j] = Vec::load(xp[j] + i);
      for (int r = 0; r < R; ++r) {
        __builtin_prefetch(w[r] + i + next, 0, 2);
        const V e = V::load_bf16_even(w[r] + i);
        for (int j = 0; j < MT; ++j) acc[j][r] = fmadd(xv[j], e, acc[j][r]);
      }
      for (int j = 0; j < MT; ++j) xv[j] = Vec::load(xp[j] + i + Vec::size);
      for (int r = 0; r < R; ++r) {
        const V o = V::load_bf16_odd(w[r] + i);
        for (int j = 0; j < MT; ++j) acc[j][r] = fmadd(xv[j], o, acc[j][r]);
      }
    }
    for (int j = 0; j < MT; ++j)
      for (int r = 0; r < R; ++r) accbuf[j * R + r] = acc[j][r];
    if (i < k1) tile<bf16, R, MT>(a, n0, m0, i, k1, accbuf);  // past the last whole group: x as given
  }
}

// The sum of one output's kAccs partial sums, pairwise.
inline float reduce_accs(const Vec* acc) {
  if constexpr (kAccs == 1) {
    return reduce_add(acc[0]);
  } else {
    float s[kAccs];
    for (int u = 0; u < kAccs; ++u) s[u] = reduce_add(acc[u]);
    for (int width = kAccs / 2; width > 0; width /= 2)
      for (int u = 0; u < width; ++u) s[u] += s[u + width];
    return s[0];
  }
}

// Output features n0..n0+R-1 for rows m0..m1 (m1 - m0 <= kPassRows), the weight rows read once.
template <typename T, int R>
void block(const LinearArgs& a, int64_t n0, int64_t m0, int64_t m1) {
  Vec accbuf[kPassRows * R * kAccs];
  for (auto& v : accbuf) v = Vec::zero();
  const bool pairs = kPairs && std::is_same_v<T, bf16> && a.x_pairs != nullptr && a.pair_group == 2 * Vec::size &&
                     m1 - m0 >= 2;
  for (int64_t k0 = 0; k0 < a.k; k0 += kChunk) {
    const int64_t k1 = std::min(a.k, k0 + kChunk);
    int64_t m = m0;
    if (pairs) {
      for (; m + kPairTile <= m1; m += kPairTile) tile_pairs<R, kPairTile>(a, n0, m, k0, k1, accbuf + (m - m0) * R);
      switch (m1 - m) {
        case 1: tile_pairs<R, 1>(a, n0, m, k0, k1, accbuf + (m - m0) * R); break;
        case 2: tile_pairs<R, 2>(a, n0, m, k0, k1, accbuf + (m - m0) * R); break;
        default: break;
      }
      continue;
    }
    for (; m + kTile <= m1; m += kTile) tile<T, R, kTile>(a, n0, m, k0, k1, accbuf + (m - m0) * R * kAccs);
    Vec* rest = accbuf + (m - m0) * R * kAccs;
    switch (m1 - m) {
      case 1: tile<T, R, 1>(a, n0, m, k0, k1, rest); break;
      case 2: if constexpr (kTile > 2) tile<T, R, 2>(a, n0, m, k0, k1, rest); break;
      case 3: if constexpr (kTile > 3) tile<T, R, 3>(a, n0, m, k0, k1, rest); break;
      default: break;
    }
  }
  for (int64_t m = m0; m < m1; ++m) {
    T* y = static_cast<T*>(a.y) + m * a.y_stride + n0;
    for (int r = 0; r < R; ++r) y[r] = from_float<T>(reduce_accs(accbuf + ((m - m0) * R + r) * kAccs));
  }
}

template <typename T>
void rows(const LinearArgs& a, int64_t begin, int64_t end) {
  for (int64_t m0 = 0; m0 < a.m; m0 += kPassRows) {
    const int64_t m1 = std::min(a.m, m0 + kPassRows);
    int64_t n = begin;
    for (; n + kRows <= end; n += kRows) block<T, kRows>(a, n, m0, m1);
    for (; n < end; ++n) block<T, 1>(a, n, m0, m1);
  }
}

// float64 (gradcheck only): a plain loop accumulating in double
void rows_double(const LinearArgs& a, int64_t begin, int64_t end) {
  const double* x = static_cast<const double*>(a.x);
  const double* w = static_cast<const double*>(a.w);
  double* y = static_cast<double*>(a.y);
  for (int64_t n = begin; n < end; ++n)
    for (int64_t j = 0; j < a.m; ++j) {
      double s = 0;
      for (int64_t i = 0; i < a.k; ++i) s += x[j * a.x_stride + i] * w[n * a.w_stride + i];
      y[j * a.y_stride + n] = s;
    }
}

}  // namespace

void linear_rows(const LinearArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case DType::kFloat32: return rows<float>(a, begin, end);
    case DType::kBFloat16: return rows<bf16>(a, begin, end);
    case DType::kFloat16: return rows<f16>(a, begin, end);
    case DType::kFloat64: return rows_double(a, begin, end);
  }
}

}  // namespace exaone_ext::cpu::EXAONE_ISA
