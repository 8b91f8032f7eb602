// RoPE kernels compiled for avx512 (flags from cmake/ExaoneExtCpuIsa.cmake).
#include "cpu/rope_impl.h"
