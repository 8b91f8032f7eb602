// Argument checks shared by the CPU and CUDA registrations of the SwiGLU ops.
#pragma once
#include <ATen/core/Tensor.h>

namespace exaone_ext {
void check_swiglu(const at::Tensor& gate, const at::Tensor& up, const char* op);
void check_swiglu_fused(const at::Tensor& gate_up, const char* op);
}  // namespace exaone_ext
