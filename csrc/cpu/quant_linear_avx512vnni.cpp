// Quantized-weight linear kernels compiled for avx512 plus AVX512-VNNI (the integer paths' multiply-adds
// by vpdpbusd / vpdpwssd; see cpu/isa.h).
#include "cpu/quant_linear_impl.h"
