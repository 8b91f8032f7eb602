// RMSNorm kernels compiled for scalar (flags from cmake/ExaoneExtCpuIsa.cmake).
#include "cpu/rms_norm_impl.h"
