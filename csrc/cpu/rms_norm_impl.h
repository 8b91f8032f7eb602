// RMSNorm kernel bodies, written once against cpu/vec.h and compiled per instruction set by
// rms_norm_avx512.cpp, rms_norm_avx2.cpp and rms_norm_scalar.cpp. Each row is read twice (once
// to reduce, once to write); the second read comes from cache, so memory sees one pass.
#pragma once
#include <algorithm>
#include <cmath>
#include <type_traits>
#include "common/rms_norm.h"
#include "cpu/rms_norm.h"
#include "cpu/vec.h"

namespace exaone_ext::cpu::EXAONE_ISA {
namespace {

// v rounded through the storage type T (what an intermediate .to(T) does).
template <typename T>
inline Vec rounded(Vec v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
#if defined(EXAONE_VEC_AVX512)
  } else if constexpr (std::is_same_v<T, bf16>) {  // in registers: the bf16 bits widened back
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v.to_bf16_bits()), 16))};
  } else if constexpr (std::is_same_v<T, f16>) {
    return {_mm512_cvtph_ps(_mm512_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))};
#endif
  } else {
    T tmp[Vec::size];
    v.store(tmp);
    return Vec::load(static_cast<const T*>(tmp));
  }
}

template <typename T>
inline Vec load_n(const T* p, int rem) { return rem ? Vec::load(p, rem) : Vec::load(p); }
template <typename T>
inline void store_n(Vec v, T* p, int rem) { rem ? v.store(p, rem) : v.store(p); }

// Long sums run in blocks of kSumBlock elements, each summed on its own and then added: the longest
// chain of additions is about kSumBlock / (accumulators * lanes) + n / kSumBlock, as short for the
// portable variant (one lane) as for AVX-512. (The portable variant's hidden size 1000 used to be
// four chains of 250: over equal terms, 20x the error rule's float32 budget in the property tests.)
constexpr int64_t kSumBlock = 64 * Vec::size;

// sum of x^2 over n <= kSumBlock elements, four independent accumulators
template <typename T>
Vec sum_squares_block(const T* x, int64_t n) {
  Vec a0 = Vec::zero(), a1 = Vec::zero(), a2 = Vec::zero(), a3 = Vec::zero();
  int64_t i = 0;
  for (; i + 4 * Vec::size <= n; i += 4 * Vec::size) {
    Vec v0 = Vec::load(x + i), v1 = Vec::load(x + i + Vec::size);
    Vec v2 = Vec::load(x + i + 2 * Vec::size), v3 = Vec::load(x + i + 3 * Vec::size);
    a0 = fmadd(v0, v0, a0);
    a1 = fmadd(v1, v1, a1);
    a2 = fmadd(v2, v2, a2);
    a3 = fmadd(v3, v3, a3);
  }
  for (; i + Vec::size <= n; i += Vec::size) {
    Vec v = Vec::load(x + i);
    a0 = fmadd(v, v, a0);
  }
  if (i < n) {
    Vec v = Vec::load(x + i, int(n - i));
    a1 = fmadd(v, v, a1);
  }
  return (a0 + a1) + (a2 + a3);
}

template <typename T>
float sum_squares(const T* x, int64_t n) {
  Vec total = Vec::zero();
  for (int64_t b = 0; b < n; b += kSumBlock) total = total + sum_squares_block(x + b, std::min(kSumBlock, n - b));
  return reduce_add(total);
}

// h = T(x + r) written to h; returns the sum of the rounded h^2 (n <= kSumBlock elements)
template <typename T>
Vec add_sum_squares_block(const T* x, const T* r, T* h, int64_t n) {
  Vec a0 = Vec::zero(), a1 = Vec::zero();
  auto step = [&](int64_t i, int rem, Vec& acc) {
    store_n(load_n(x + i, rem) + load_n(r + i, rem), h + i, rem);
    Vec hv = load_n(static_cast<const T*>(h + i), rem);
    acc = fmadd(hv, hv, acc);
  };
  int64_t i = 0;
  for (; i + 2 * Vec::size <= n; i += 2 * Vec::size) {
    step(i, 0, a0);
    step(i + Vec::size, 0, a1);
  }
  for (; i + Vec::size <= n; i += Vec::size) step(i, 0, a0);
  if (i < n) step(i, int(n - i), a1);
  return a0 + a1;
}

template <typename T>
float add_sum_squares(const T* x, const T* r, T* h, int64_t n) {
  Vec total = Vec::zero();
  for (int64_t b = 0; b < n; b += kSumBlock)
    total = total + add_sum_squares_block(x + b, r + b, h + b, std::min(kSumBlock, n - b));
  return reduce_add(total);
}

template <typename T>
void forward_rows(const RmsNormArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.cols;
  using A = acc_t<T>;
  const A* w = static_cast<const A*>(a.weight);
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * a.x_stride;
    T* y = static_cast<T*>(a.y) + r * n;
    const T* src = x;
    if constexpr (std::is_same_v<T, double>) {
      double ss = 0;
      if (a.residual) {
        const double* res = static_cast<const double*>(a.residual) + r * a.residual_stride;
        double* h = static_cast<double*>(a.h) + r * n;
        for (int64_t i = 0; i < n; ++i) h[i] = x[i] + res[i];
        src = h;
      }
      for (int64_t i = 0; i < n; ++i) ss += src[i] * src[i];
      const double rstd = 1.0 / std::sqrt(ss / double(n) + a.eps);
      static_cast<double*>(a.rstd)[r] = rstd;
      for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (src[i] * rstd);
    } else {
      float ss;
      if (a.residual) {
        const T* res = static_cast<const T*>(a.residual) + r * a.residual_stride;
        T* h = static_cast<T*>(a.h) + r * n;
        ss = add_sum_squares(x, res, h, n);
        src = h;
      } else {
        ss = sum_squares(x, n);
      }
      const float rstd = 1.0f / std::sqrt(ss / float(n) + float(a.eps));
      static_cast<float*>(a.rstd)[r] = rstd;
      const Vec rv = Vec::set1(rstd);
      // the next row's x (and residual) fetched while this pass works from cache (see backward_rows_vec)
      const bool more = r + 1 < a.rows;
      const char* x_next = reinterpret_cast<const char*>(x + a.x_stride);
      const char* res_next = a.residual ? reinterpret_cast<const char*>(static_cast<const T*>(a.residual) +
                                                                        (r + 1) * a.residual_stride)
                                        : nullptr;
      auto step = [&](int64_t i, int rem) {
#if !defined(EXAONE_VEC_SCALAR)
        if (more && (i * int64_t(sizeof(T))) % 64 == 0) {  // once per 64-byte line
          _mm_prefetch(x_next + i * int64_t(sizeof(T)), _MM_HINT_T0);
          if (res_next) _mm_prefetch(res_next + i * int64_t(sizeof(T)), _MM_HINT_T0);
        }
#endif
        Vec nv = rounded<T>(load_n(src + i, rem) * rv);
        store_n(load_n(w + i, rem) * nv, y + i, rem);
      };
      int64_t i = 0;
      for (; i + Vec::size <= n; i += Vec::size) step(i, 0);
      if (i < n) step(i, int(n - i));
    }
  }
}

// Rows r0 .. r0 + R - 1 (R = 1 or 2) of the backward: dx for each, and dy * n of each added to the
// chunk's partial weight-gradient row dw in row order. Two rows at a time load the weight and
// load and store the partial row once for both (the sums are the same, in the same order).
template <typename T, int R>
void backward_rows_vec(const RmsNormBackwardArgs& a, int64_t r0, const float* w, float* dw) {
  const int64_t n = a.cols;
  const T* x[R];
  const T* dy[R];
  const T* dh[R];
  T* dx[R];
  Vec rv[R], cv[R];
  for (int j = 0; j < R; ++j) {
    const int64_t r = r0 + j;
    x[j] = static_cast<const T*>(a.x) + r * a.x_stride;
    dy[j] = static_cast<const T*>(a.dy) + r * a.dy_stride;
    dh[j] = a.dh ? static_cast<const T*>(a.dh) + r * a.dh_stride : nullptr;
    dx[j] = static_cast<T*>(a.dx) + r * n;
  }
  {
    Vec total[R];
    for (int j = 0; j < R; ++j) total[j] = Vec::zero();
    for (int64_t b0 = 0; b0 < n; b0 += kSumBlock) {  // blocked, as sum_squares
      const int64_t b1 = std::min(n, b0 + kSumBlock);
      Vec s0[R], s1[R];
      for (int j = 0; j < R; ++j) s0[j] = s1[j] = Vec::zero();
      int64_t i = b0;
      for (; i + 2 * Vec::size <= b1; i += 2 * Vec::size) {
        const int64_t k = i + Vec::size;
        const Vec w0 = Vec::load(w + i), w1 = Vec::load(w + k);
        for (int j = 0; j < R; ++j) {
          s0[j] = fmadd(Vec::load(dy[j] + i) * w0, Vec::load(x[j] + i), s0[j]);
          s1[j] = fmadd(Vec::load(dy[j] + k) * w1, Vec::load(x[j] + k), s1[j]);
        }
      }
      for (; i < b1; i += Vec::size) {
        const int rem = b1 - i < Vec::size ? int(b1 - i) : 0;
        const Vec w0 = load_n(w + i, rem);
        for (int j = 0; j < R; ++j) s0[j] = fmadd(load_n(dy[j] + i, rem) * w0, load_n(x[j] + i, rem), s0[j]);
      }
      for (int j = 0; j < R; ++j) total[j] = total[j] + (s0[j] + s1[j]);
    }
    for (int j = 0; j < R; ++j) {
      const float rs = static_cast<const float*>(a.rstd)[r0 + j];
      rv[j] = Vec::set1(rs);
      cv[j] = Vec::set1(rs * rs * rs * reduce_add(total[j]) / float(n));
    }
  }
  // The next R rows' x and dy are fetched into cache while this pass works from cache (it reads
  // no new memory but dh), so that their first pass finds them there: measured on one thread at
  // 2048 x 2560 / 4096 bf16, 14 -> 18 and 12 -> 16 GB/s.
  const T* x_next[R];
  const T* dy_next[R];
  int ahead = 0;
  for (int j = 0; j < R; ++j) {
    const int64_t r = r0 + R + j;
    if (r < a.rows) {
      x_next[ahead] = static_cast<const T*>(a.x) + r * a.x_stride;
      dy_next[ahead] = static_cast<const T*>(a.dy) + r * a.dy_stride;
      ++ahead;
    }
  }
  auto step = [&](int64_t k, int rem) {
#if !defined(EXAONE_VEC_SCALAR)
    if ((k * int64_t(sizeof(T))) % 64 == 0) {  // once per 64-byte line
      for (int j = 0; j < ahead; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(x_next[j] + k), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(dy_next[j] + k), _MM_HINT_T0);
      }
    }
#endif
    const Vec wv = load_n(w + k, rem);
    Vec acc = load_n(static_cast<const float*>(dw + k), rem);
    for (int j = 0; j < R; ++j) {
      const Vec dyv = load_n(dy[j] + k, rem), xv = load_n(x[j] + k, rem);
      Vec dxv = rv[j] * (dyv * wv) - cv[j] * xv;
      if (dh[j]) dxv = dxv + load_n(dh[j] + k, rem);
      store_n(dxv, dx[j] + k, rem);
      acc = fmadd(dyv, rounded<T>(xv * rv[j]), acc);
    }
    store_n(acc, dw + k, rem);
  };
  int64_t i = 0;
  for (; i + Vec::size <= n; i += Vec::size) step(i, 0);
  if (i < n) step(i, int(n - i));
}

template <typename T>
void backward_chunk(const RmsNormBackwardArgs& a, int64_t chunk) {
  const int64_t n = a.cols;
  using A = acc_t<T>;
  const A* w = static_cast<const A*>(a.weight);
  A* dw = static_cast<A*>(a.dw_partial) + chunk * n;
  for (int64_t i = 0; i < n; ++i) dw[i] = A(0);
  const int64_t begin = chunk * a.chunk_rows;
  const int64_t end = std::min(a.rows, begin + a.chunk_rows);
  if constexpr (std::is_same_v<T, double>) {
    for (int64_t r = begin; r < end; ++r) {
      const double* x = static_cast<const double*>(a.x) + r * a.x_stride;
      const double* dy = static_cast<const double*>(a.dy) + r * a.dy_stride;
      const double* dh = a.dh ? static_cast<const double*>(a.dh) + r * a.dh_stride : nullptr;
      double* dx = static_cast<double*>(a.dx) + r * n;
      const double rs = static_cast<const double*>(a.rstd)[r];
      double s = 0;
      for (int64_t i = 0; i < n; ++i) s += dy[i] * w[i] * x[i];
      const double c = rs * rs * rs * s / double(n);
      for (int64_t i = 0; i < n; ++i) {
        dx[i] = rs * (dy[i] * w[i]) - c * x[i] + (dh ? dh[i] : 0.0);
        dw[i] += dy[i] * (x[i] * rs);
      }
    }
  } else {
    int64_t r = begin;
    for (; r + 2 <= end; r += 2) backward_rows_vec<T, 2>(a, r, w, dw);
    if (r < end) backward_rows_vec<T, 1>(a, r, w, dw);
  }
}

template <typename T>
void reduce_dw(const RmsNormBackwardArgs& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  const A* p = static_cast<const A*>(a.dw_partial);
  A* dw = static_cast<A*>(a.dw);
  const int64_t n = a.cols;
  if constexpr (std::is_same_v<T, double>) {
    for (int64_t i = begin; i < end; ++i) {
      double s = 0;
      for (int64_t k = 0; k < a.chunks; ++k) s += p[k * n + i];
      dw[i] = s;
    }
  } else {
    // each lane is one column: the chunks are added in order for every column
    auto step = [&](int64_t i, int rem) {
      Vec s = Vec::zero();
      for (int64_t k = 0; k < a.chunks; ++k) s = s + load_n(p + k * n + i, rem);
      store_n(s, dw + i, rem);
    };
    int64_t i = begin;
    for (; i + Vec::size <= end; i += Vec::size) step(i, 0);
    if (i < end) step(i, int(end - i));
  }
}

template <typename T> struct Fwd { static void run(const RmsNormArgs& a, int64_t b, int64_t e) { forward_rows<T>(a, b, e); } };
template <typename T> struct Bwd { static void run(const RmsNormBackwardArgs& a, int64_t c) { backward_chunk<T>(a, c); } };
template <typename T> struct Red { static void run(const RmsNormBackwardArgs& a, int64_t b, int64_t e) { reduce_dw<T>(a, b, e); } };

}  // namespace

void rms_norm_forward_rows(const RmsNormArgs& a, int64_t begin, int64_t end) { by_dtype<Fwd>(a.dtype, a, begin, end); }
void rms_norm_backward_chunk(const RmsNormBackwardArgs& a, int64_t chunk) { by_dtype<Bwd>(a.dtype, a, chunk); }
void rms_norm_reduce_dw(const RmsNormBackwardArgs& a, int64_t begin, int64_t end) { by_dtype<Red>(a.dtype, a, begin, end); }

}  // namespace exaone_ext::cpu::EXAONE_ISA
