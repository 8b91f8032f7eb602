// Weight-streaming linear layer for few rows (decode): y[m, n] = sum_k x[m, k] * w[n, k].
// The caller splits the output features into ranges, one per thread; a range's weight rows are read
// from memory once and multiplied with every row of x while they are in cache.
#pragma once
#include <cstdint>
#include "common/dtypes.h"
#include "cpu/isa.h"

namespace exaone_ext {

struct LinearArgs {
  DType dtype;           // of w and y
  int64_t m, k, n;       // x [m, k], w [n, k], y [m, n]
  const void* x;         // float32 [m, k] (float64 when dtype is float64), rows x_stride apart
  int64_t x_stride;
  const void* w;         // dtype [n, k], rows w_stride apart (last dim contiguous)
  int64_t w_stride;
  void* y;               // dtype [m, n], rows y_stride apart
  int64_t y_stride;
  // Optional, bfloat16 weights and m >= 2: x in pair order for a variant that splits 2 * V bfloat16
  // weights into their even and odd elements (one shift and one AND, no widening shuffle), V its
  // float lanes. x_pairs [m, k / pair_group * pair_group] float32 (rows that long apart): in every
  // group of pair_group = 2 * V elements, first x[2i] (i < V), then x[2i + 1]. A variant with
  // another V ignores it; the elements of k past the last whole group are read from x.
  const float* x_pairs = nullptr;
  int64_t pair_group = 0;
};

// The pair group of the AVX2 variant (the one that uses x_pairs); 0: none.
inline constexpr int64_t kLinearPairGroupAvx2 = 16;

// Output features computed together (the weight rows interleaved in the inner loop); ranges passed
// to linear_rows should start at a multiple of this so that threads never share a cache line of y.
inline constexpr int64_t kLinearRowBlock = 4;

}  // namespace exaone_ext

// Output features [n_begin, n_end) for all m rows.
EXAONE_DECLARE_ISA_KERNEL(void, linear_rows, (const exaone_ext::LinearArgs& a, int64_t n_begin, int64_t n_end))

namespace exaone_ext::cpu::avx512bf16 {
// bfloat16 only, with vdpbf16ps; here x is bfloat16 [m, k] (a.x), pairs along k multiplied and
// summed in float32. One row of x (a.m == 1) reads the weight rows one after the other. Built when
// EXAONE_HAVE_AVX512BF16 is defined; call only when cpu_has("avx512bf16").
void linear_rows(const exaone_ext::LinearArgs& a, int64_t n_begin, int64_t n_end);
}  // namespace exaone_ext::cpu::avx512bf16
