// SwiGLU CUDA launchers (torch-free); the call is described by common/activations.h SwigluArgs.
#pragma once
#include <cuda_runtime_api.h>
#include "common/activations.h"

namespace exaone_ext::cuda {
void swiglu_forward(const SwigluArgs& a, cudaStream_t stream);   // out = silu(gate) * up
void swiglu_backward(const SwigluArgs& a, cudaStream_t stream);  // out = dgate, out2 = dup
}  // namespace exaone_ext::cuda
