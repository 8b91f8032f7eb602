// Weight-streaming linear kernels compiled for scalar (flags from cmake/ExaoneExtCpuIsa.cmake).
#include "cpu/linear_impl.h"
