// RMSNorm kernels compiled for avx2 (flags from cmake/ExaoneExtCpuIsa.cmake).
#include "cpu/rms_norm_impl.h"
