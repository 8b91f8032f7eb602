// Quantized-weight linear kernels compiled for scalar (flags from cmake/ExaoneExtCpuIsa.cmake).
#include "cpu/quant_linear_impl.h"
