// SwiGLU CPU kernels: out = silu(gate) * up, row by row. Rows may be strided (a fused gate/up
// projection gives gate and up as two halves of one row); the last dimension is contiguous.
#pragma once
#include <cstdint>
#include "common/dtypes.h"
#include "cpu/isa.h"

namespace exaone_ext::cpu {

struct SwigluArgs {
  DType dtype;
  int64_t cols;
  const void* gate; int64_t gate_stride;  // strides between rows, in elements
  const void* up;   int64_t up_stride;
  const void* dy;   int64_t dy_stride;    // backward only
  void* out;        int64_t out_stride;   // forward: y; backward: dgate
  void* out2;       int64_t out2_stride;  // backward: dup
};

}  // namespace exaone_ext::cpu

EXAONE_DECLARE_ISA_KERNEL(void, swiglu_forward_rows, (const exaone_ext::cpu::SwigluArgs& a, int64_t begin, int64_t end))
EXAONE_DECLARE_ISA_KERNEL(void, swiglu_backward_rows, (const exaone_ext::cpu::SwigluArgs& a, int64_t begin, int64_t end))
