// Cross-entropy kernel body, written once against cpu/vec.h and compiled per instruction set by
// cross_entropy_avx512.cpp, cross_entropy_avx2.cpp and cross_entropy_scalar.cpp.
//
// A row of logits (up to ~100K entries, 200-400 KB) stays in L2 across the three passes: max, sum
// of exp(x - max), then (with write_grad) softmax - onehot written over the logits in place, so the
// gradient of a chunk needs no second buffer.
#pragma once
#include <cmath>
#include <limits>
#include <type_traits>
#include "common/cross_entropy.h"
#include "cpu/cross_entropy.h"
#include "cpu/vec.h"

namespace exaone_ext::cpu::EXAONE_ISA {
namespace {

template <typename A, typename T>
A row_lse(const T* x, int64_t n) {
  if constexpr (std::is_same_v<T, double>) {
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < n; ++i) m = std::isnan(x[i]) || x[i] > m ? x[i] : m;
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - m);
    return m + std::log(s);
  } else {
    const int64_t vend = n - n % Vec::size;
    Vec mv = Vec::set1(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < vend; i += Vec::size) mv = max(mv, Vec::load(x + i));
    float m = reduce_max(mv);
    for (int64_t i = vend; i < n; ++i) {
      const float v = to_float(x[i]);
      m = std::isnan(v) || v > m ? v : m;
    }
    // Two accumulators hide the latency of the adds behind the exponentials.
    const Vec mb = Vec::set1(m);
    Vec s0 = Vec::zero(), s1 = Vec::zero();
    int64_t i = 0;
    for (; i + 2 * Vec::size <= vend; i += 2 * Vec::size) {
      s0 = s0 + vexp(Vec::load(x + i) - mb);
      s1 = s1 + vexp(Vec::load(x + i + Vec::size) - mb);
    }
    if (i < vend) s0 = s0 + vexp(Vec::load(x + i) - mb);
    float s = reduce_add(s0 + s1);
    for (int64_t j = vend; j < n; ++j) s += std::exp(to_float(x[j]) - m);
    return m + std::log(s);
  }
}

// x <- (exp(x - lse) - onehot(t)) * scale, in place.
template <typename A, typename T>
void row_grad(T* x, int64_t n, A lse, A scale, int64_t t, bool valid) {
  const A xt = valid ? A(to_float(x[t])) : A(0);
  if constexpr (std::is_same_v<T, double>) {
    for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i] - lse) * scale;
  } else {
    const int64_t vend = n - n % Vec::size;
    const Vec l = Vec::set1(lse), sc = Vec::set1(scale);
    for (int64_t i = 0; i < vend; i += Vec::size) (vexp(Vec::load(x + i) - l) * sc).store(x + i);
    for (int64_t i = vend; i < n; ++i) x[i] = from_float<T>(std::exp(to_float(x[i]) - lse) * scale);
  }
  // the target's entry from its exact logit, rounded once (as softmax - onehot computed in A)
  if (valid) store_acc(x + t, A((std::exp(xt - lse) - A(1)) * scale));
}

template <typename T>
void rows(const CrossEntropyArgs& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  const A nan = std::numeric_limits<A>::quiet_NaN();
  for (int64_t r = begin; r < end; ++r) {
    T* x = static_cast<T*>(a.logits) + r * a.logits_stride;
    const int64_t t = a.targets[r];
    const TargetKind kind = target_kind(t, a.ignore_index, a.vocab);
    const bool valid = kind == TargetKind::kValid;
    A* lse_p = static_cast<A*>(a.lse) + r;
    const A lse = a.from_lse ? *lse_p : row_lse<A>(x, a.vocab);
    if (!a.from_lse) *lse_p = lse;
    if (a.loss) {
      static_cast<A*>(a.loss)[r] = valid ? A(lse - A(to_float(x[t]))) : (kind == TargetKind::kIgnored ? A(0) : nan);
    }
    if (!a.write_grad) continue;
    A scale = a.row_scale ? static_cast<const A*>(a.row_scale)[r * a.row_scale_stride] : A(1);
    if (kind == TargetKind::kIgnored) scale = 0;
    if (kind == TargetKind::kOutOfRange) scale = nan;
    if (scale == A(0)) {
      for (int64_t i = 0; i < a.vocab; ++i) x[i] = from_float<T>(0.f);
    } else {
      row_grad<A>(x, a.vocab, lse, scale, t, valid);
    }
  }
}

template <typename T> struct Rows { static void run(const CrossEntropyArgs& a, int64_t b, int64_t e) { rows<T>(a, b, e); } };

}  // namespace

void cross_entropy_rows(const CrossEntropyArgs& a, int64_t begin, int64_t end) { by_dtype<Rows>(a.dtype, a, begin, end); }

}  // namespace exaone_ext::cpu::EXAONE_ISA
