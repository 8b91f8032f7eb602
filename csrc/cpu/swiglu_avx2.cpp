// SwiGLU kernels compiled for avx2 (flags from cmake/ExaoneExtCpuIsa.cmake).
#include "cpu/swiglu_impl.h"
