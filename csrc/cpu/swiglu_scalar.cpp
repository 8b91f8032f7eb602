// SwiGLU kernels compiled for scalar (flags from cmake/ExaoneExtCpuIsa.cmake).
#include "cpu/swiglu_impl.h"
