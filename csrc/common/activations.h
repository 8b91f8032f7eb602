// SiLU / SwiGLU math shared by the CPU and CUDA kernels.
#pragma once
#include <cmath>
#include "common/dtypes.h"

namespace exaone_ext {

// One SwiGLU call over `rows` rows of `cols` elements. Row strides in elements; the last
// dimension is contiguous (a fused gate/up projection gives gate and up as two halves of one row).
struct SwigluArgs {
  DType dtype;
  int64_t rows, cols;
  const void* gate; int64_t gate_stride;
  const void* up;   int64_t up_stride;
  const void* dy;   int64_t dy_stride;    // backward only
  void* out;        int64_t out_stride;   // forward: y; backward: dgate
  void* out2;       int64_t out2_stride;  // backward: dup
};

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
