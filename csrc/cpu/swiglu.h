// SwiGLU CPU kernels: out = silu(gate) * up over rows [begin, end) of a SwigluArgs call.
#pragma once
#include <cstdint>
#include "common/activations.h"
#include "cpu/isa.h"

EXAONE_DECLARE_ISA_KERNEL_BF16(void, swiglu_forward_rows, (const exaone_ext::SwigluArgs& a, int64_t begin, int64_t end))
EXAONE_DECLARE_ISA_KERNEL_BF16(void, swiglu_backward_rows, (const exaone_ext::SwigluArgs& a, int64_t begin, int64_t end))
