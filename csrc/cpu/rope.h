// RoPE CPU kernels. rope_apply_tokens rotates q and k for tokens [begin, end) of a RopeArgs call
// (token t = batch index * seq + position in the sequence) and returns the first token whose
// position lies outside the table, or -1; such tokens are skipped. rope_tables fills rows
// [begin, end) of the cos / sin tables (float64 math, portable code only).
#pragma once
#include <cstdint>
#include "common/rope.h"
#include "cpu/isa.h"

EXAONE_DECLARE_ISA_KERNEL(int64_t, rope_apply_tokens, (const exaone_ext::RopeArgs& a, int64_t begin, int64_t end))

namespace exaone_ext::cpu {
void rope_tables(const RopeTableArgs& a, int64_t begin, int64_t end);
}  // namespace exaone_ext::cpu
