// Attention kernels compiled for scalar (flags from cmake/ExaoneExtCpuIsa.cmake).
#include "cpu/attention_impl.h"
