// Cross-entropy CUDA launcher (torch-free) for linear_cross_entropy; the call is described by
// common/cross_entropy.h CrossEntropyArgs (float32 / bfloat16 / float16 logits, float loss and lse).
#pragma once
#include <cuda_runtime_api.h>
#include "common/cross_entropy.h"

namespace exaone_ext::cuda {
void cross_entropy_rows(const CrossEntropyArgs& a, cudaStream_t stream);
}  // namespace exaone_ext::cuda
