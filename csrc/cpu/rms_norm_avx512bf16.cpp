// RMSNorm kernels compiled for avx512 plus AVX512-BF16 (bf16 stores by vcvtneps2bf16; see cpu/isa.h).
#include "cpu/rms_norm_impl.h"
