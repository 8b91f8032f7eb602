// Attention kernels compiled for avx2 (flags from cmake/ExaoneExtCpuIsa.cmake).
#include "cpu/attention_impl.h"
