// RoPE CUDA launchers (torch-free); the calls are described by common/rope.h.
#pragma once
#include <cuda_runtime_api.h>
#include "common/rope.h"

namespace exaone_ext::cuda {
// Rotates q and k in one launch. `bad` is a zeroed device buffer of two 64-bit words: a token
// whose position is outside the table sets bad[0] = 1 and bad[1] = its position (the first to
// get there), and its outputs become NaN; nothing outside the table is ever read.
void rope_apply(const RopeArgs& a, unsigned long long* bad, cudaStream_t stream);
void rope_tables(const RopeTableArgs& a, cudaStream_t stream);  // float64 math, float32 tables
}  // namespace exaone_ext::cuda
