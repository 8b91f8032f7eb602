// Allocation of the elementwise ops' outputs (SwiGLU, RMSNorm, RoPE). On CPU, outputs of 4 MiB and more
// come from huge-page mappings that are kept for reuse when freed (see output.cpp); everything
// else is at::empty.
#pragma once
#include <ATen/core/Tensor.h>

namespace exaone_ext {

// An uninitialised contiguous tensor of the given shape and options, as at::empty.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace exaone_ext
