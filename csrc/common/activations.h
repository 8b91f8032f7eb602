// SiLU / SwiGLU math shared by the CPU and CUDA kernels.
#pragma once
#include <cmath>
#include "common/dtypes.h"

namespace exaone_ext {

template <typename A> EXAONE_HD A sigmoid(A x) { return A(1) / (A(1) + exp(-x)); }

// forward: silu(g) * u
template <typename A> EXAONE_HD A swiglu_value(A g, A u) { return g * sigmoid(g) * u; }

// backward: d/dg [g s(g) u] = u s (1 + g (1 - s)),  d/du = g s(g)
template <typename A> EXAONE_HD void swiglu_grads(A g, A u, A dy, A& dg, A& du) {
  const A s = sigmoid(g);
  du = dy * g * s;
  dg = dy * u * s * (A(1) + g * (A(1) - s));
}

}  // namespace exaone_ext
