// SwiGLU kernel bodies, written once against cpu/vec.h and compiled per instruction set by
// swiglu_avx512.cpp, swiglu_avx2.cpp and swiglu_scalar.cpp.
#pragma once
#include <type_traits>
#include "common/activations.h"
#include "cpu/swiglu.h"
#include "cpu/vec.h"

namespace exaone_ext::cpu::EXAONE_ISA {
namespace {

// sigmoid(g) and e = exp(-g). Results stored as bf16 / f16 take the cheaper exponential
// (vec.h: vsigmoid_lowp, 1e-5 relative, far below their rounding); float32 the accurate one.
// Both clamp g, so sigmoid(-inf) would be a tiny nonzero number and silu(-inf) = -inf; it is made 0
// exactly, so that silu(-inf) = -inf * 0 = NaN as PyTorch gives, in every variant and dtype.
template <typename T>
inline Vec sigmoid_of(Vec g, Vec& e) {
  Vec s;
  if constexpr (std::is_same_v<T, float>) {
    s = vsigmoid(g, e);
  } else {
    s = vsigmoid_lowp(g, e);
  }
  return zero_below(g, -3.4028234663852886e38f, s);
}

template <typename T>
inline Vec silu_of(Vec g) {
  Vec e;
  return g * sigmoid_of<T>(g, e);
}

template <typename T>
void forward_rows(const SwigluArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.cols;
  for (int64_t r = begin; r < end; ++r) {
    const T* g = static_cast<const T*>(a.gate) + r * a.gate_stride;
    const T* u = static_cast<const T*>(a.up) + r * a.up_stride;
    T* y = static_cast<T*>(a.out) + r * a.out_stride;
    if constexpr (std::is_same_v<T, double>) {
      for (int64_t i = 0; i < n; ++i) y[i] = swiglu_value(g[i], u[i]);
    } else {
      int64_t i = 0;
      for (; i + Vec::size <= n; i += Vec::size) {
        (silu_of<T>(Vec::load(g + i)) * Vec::load(u + i)).store(y + i);
      }
      if (i < n) {
        const int rem = int(n - i);
        (silu_of<T>(Vec::load(g + i, rem)) * Vec::load(u + i, rem)).store(y + i, rem);
      }
    }
  }
}

template <typename T>
void backward_rows(const SwigluArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.cols;
  for (int64_t r = begin; r < end; ++r) {
    const T* g = static_cast<const T*>(a.gate) + r * a.gate_stride;
    const T* u = static_cast<const T*>(a.up) + r * a.up_stride;
    const T* dy = static_cast<const T*>(a.dy) + r * a.dy_stride;
    T* dg = static_cast<T*>(a.out) + r * a.out_stride;
    T* du = static_cast<T*>(a.out2) + r * a.out2_stride;
    if constexpr (std::is_same_v<T, double>) {
      for (int64_t i = 0; i < n; ++i) swiglu_grads(g[i], u[i], dy[i], dg[i], du[i]);
    } else {
      // d/dg = u s (1 + g (1 - s)) with 1 - s = e s (no cancellation where s is near 1)
      const Vec one = Vec::set1(1.f);
      auto step = [&](int64_t i, int rem) {
        Vec gv = rem ? Vec::load(g + i, rem) : Vec::load(g + i);
        Vec uv = rem ? Vec::load(u + i, rem) : Vec::load(u + i);
        Vec dyv = rem ? Vec::load(dy + i, rem) : Vec::load(dy + i);
        Vec e;
        Vec s = sigmoid_of<T>(gv, e);
        Vec gs = gv * s;
        Vec dgv = dyv * uv * s * fmadd(gs, e, one);
        Vec duv = dyv * gs;
        if (rem) {
          dgv.store(dg + i, rem);
          duv.store(du + i, rem);
        } else {
          dgv.store(dg + i);
          duv.store(du + i);
        }
      };
      int64_t i = 0;
      for (; i + Vec::size <= n; i += Vec::size) step(i, 0);
      if (i < n) step(i, int(n - i));
    }
  }
}

template <typename T> struct Fwd { static void run(const SwigluArgs& a, int64_t b, int64_t e) { forward_rows<T>(a, b, e); } };
template <typename T> struct Bwd { static void run(const SwigluArgs& a, int64_t b, int64_t e) { backward_rows<T>(a, b, e); } };

}  // namespace

void swiglu_forward_rows(const SwigluArgs& a, int64_t begin, int64_t end) { by_dtype<Fwd>(a.dtype, a, begin, end); }
void swiglu_backward_rows(const SwigluArgs& a, int64_t begin, int64_t end) { by_dtype<Bwd>(a.dtype, a, begin, end); }

}  // namespace exaone_ext::cpu::EXAONE_ISA
