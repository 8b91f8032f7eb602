// Weight-streaming linear kernels compiled for avx2 (flags from cmake/ExaoneExtCpuIsa.cmake).
#include "cpu/linear_impl.h"
