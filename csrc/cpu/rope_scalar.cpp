// RoPE kernels compiled for scalar (flags from cmake/ExaoneExtCpuIsa.cmake).
#include "cpu/rope_impl.h"
