// Cross-entropy kernels compiled for avx2 (flags from cmake/ExaoneExtCpuIsa.cmake).
#include "cpu/cross_entropy_impl.h"
