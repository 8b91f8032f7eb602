// RMSNorm CUDA launchers (torch-free); calls are described by common/rms_norm.h.
#pragma once
#include <cuda_runtime_api.h>
#include "common/rms_norm.h"

namespace exaone_ext::cuda {
// Row chunks of the deterministic weight-gradient sum on CUDA (one block per chunk in stage one).
constexpr int64_t kRmsNormMaxChunks = 512;

void rms_norm_forward(const RmsNormArgs& a, cudaStream_t stream);           // y, rstd (and h with a residual)
void rms_norm_backward(const RmsNormBackwardArgs& a, cudaStream_t stream);  // dx, dw (two-stage dw sum)
}  // namespace exaone_ext::cuda
