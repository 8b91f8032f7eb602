// RMSNorm CPU kernels: forward over rows [begin, end); backward over one chunk of rows (writing
// dx and that chunk's partial weight gradient); the fixed-order sum of the partials over columns
// [begin, end). See common/rms_norm.h for the math and the reduction order.
#pragma once
#include <cstdint>
#include "common/rms_norm.h"
#include "cpu/isa.h"

EXAONE_DECLARE_ISA_KERNEL_BF16(void, rms_norm_forward_rows, (const exaone_ext::RmsNormArgs& a, int64_t begin, int64_t end))
EXAONE_DECLARE_ISA_KERNEL_BF16(void, rms_norm_backward_chunk, (const exaone_ext::RmsNormBackwardArgs& a, int64_t chunk))
EXAONE_DECLARE_ISA_KERNEL_BF16(void, rms_norm_reduce_dw, (const exaone_ext::RmsNormBackwardArgs& a, int64_t begin, int64_t end))
