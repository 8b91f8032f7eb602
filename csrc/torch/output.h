// Allocation of the elementwise ops' outputs (SwiGLU, RMSNorm). On CPU, outputs of 32 MiB and more
// come from their own mapping backed by transparent huge pages; everything else is at::empty.
#pragma once
#include <ATen/core/Tensor.h>

namespace exaone_ext {

// An uninitialised contiguous tensor of the given shape and options, as at::empty.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace exaone_ext
