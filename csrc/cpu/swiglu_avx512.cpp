// SwiGLU kernels compiled for avx512 (flags from cmake/ExaoneExtCpuIsa.cmake).
#include "cpu/swiglu_impl.h"
