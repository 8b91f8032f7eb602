// Attention kernels compiled for avx512 (flags from cmake/ExaoneExtCpuIsa.cmake).
#include "cpu/attention_impl.h"
