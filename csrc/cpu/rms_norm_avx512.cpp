// RMSNorm kernels compiled for avx512 (flags from cmake/ExaoneExtCpuIsa.cmake).
#include "cpu/rms_norm_impl.h"
