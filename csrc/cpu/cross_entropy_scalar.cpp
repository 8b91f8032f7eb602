// Cross-entropy kernels compiled for scalar (flags from cmake/ExaoneExtCpuIsa.cmake).
#include "cpu/cross_entropy_impl.h"
