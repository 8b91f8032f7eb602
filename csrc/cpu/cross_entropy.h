// Cross-entropy CPU kernels (linear_cross_entropy): rows [begin, end) of a CrossEntropyArgs call.
#pragma once
#include <cstdint>
#include "common/cross_entropy.h"
#include "cpu/isa.h"

EXAONE_DECLARE_ISA_KERNEL(void, cross_entropy_rows, (const exaone_ext::CrossEntropyArgs& a, int64_t begin, int64_t end))
