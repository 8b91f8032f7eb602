// Quantized-weight linear kernels compiled for avx2 (flags from cmake/ExaoneExtCpuIsa.cmake).
#include "cpu/quant_linear_impl.h"
