// Linear layers with quantized weights: y[m, n] = sum_k x[m, k] * w[n, k], where w is stored as
//
//   int8 (bits 8): q int8 [n, k], s [n];           w[n, k] = q[n, k] * s[n]
//   int4 (bits 4): q uint8 [n, k / 2], s and z [n, k / group];
//                  w[n, k] = (q[n, k] - z[n, k / group]) * s[n, k / group]
//     Packing of int4: k in blocks of 32; byte j (0..15) of a block holds element j in its low
//     nibble and element 16 + j in its high nibble, so that one 16-byte load unpacks into the
//     elements in order with one mask and one shift (no shuffle of x). z is uint8 in 0..15.
//     k must be a multiple of the group, the group a multiple of 32.
//
// Decode (few rows of x): quant_linear_rows streams each weight row once, dequantising in
// registers, with float32 accumulation. Prefill: quant_dequant_rows expands rows of the weight into
// a float32/bf16/f16 tile for a library matrix multiply.
#pragma once
#include <cstdint>
#include "common/dtypes.h"
#include "cpu/isa.h"

namespace exaone_ext {

struct QuantLinearArgs {
  int bits;               // 8 or 4
  DType y_dtype;          // of y (float32, bfloat16, float16)
  DType s_dtype;          // of the scales (float32, bfloat16, float16)
  int64_t m, k, n;        // x [m, k], w [n, k], y [m, n]
  int64_t group;          // int4: elements per scale and zero point along k; int8: unused
  const float* x;         // float32 [m, k], rows x_stride apart
  int64_t x_stride;
  const void* q;          // packed weight rows, q_stride bytes apart
  int64_t q_stride;
  const void* scales;     // int8: [n]; int4: [n, k / group] contiguous
  const uint8_t* zeros;   // int4: [n, k / group] contiguous; int8: null
  void* y;                // y_dtype [m, n], rows y_stride apart
  int64_t y_stride;
  // int4 only, when quant_prepare_x4 has filled them (else null: x is read as float32 above). x as
  // integers per group: x ~= xs[g] * (128 * hi + lo), hi in -128..127 and lo in 0..127 (15 bits:
  // well below a bf16/f16 input's rounding), so that the weight's nibbles meet x in integer
  // multiply-adds (u8 x s8 -> s16 pairs) instead of being widened to float32 one by one.
  const int8_t* xq = nullptr;   // [m, 2 * k]: per group, its hi parts then its lo parts, in kernel order
  const float* xs = nullptr;    // [m, k / group]: the group's scale
  const int32_t* xsum = nullptr;  // [m, k / group]: sum of the group's 128 * hi + lo (for the zero points)
  // int8 only, when quant_prepare_x8 has filled it (else null): x as 15-bit integers per block of
  // kX8Block, x ~= xs[b] * xw (xs [m, ceil(k / kX8Block)]), for int16 multiply-adds against the
  // sign-extended weights.
  const int16_t* xw = nullptr;  // [m, k]
  // One row of x on an integer path: the output features one after the other, each over all of
  // k, so that the weight is read as one sequential stream (quant_linear_impl.h, row4i_stream /
  // row8i_stream); false: blocks of features side by side, as for several rows.
  bool row_stream = false;
  // How far ahead of its loads a one-row stream prefetches the weight into L2, in bytes (the torch
  // layer picks it per CPU: quant_prefetch_ahead in torch/quant.h).
  int64_t prefetch_ahead = 4096;
};

// Output features handled together; chunk boundaries given to quant_linear_rows should be
// multiples of it.
inline constexpr int64_t kQuantRowBlock = 4;
// int4 packing block (elements of k per 16 bytes).
inline constexpr int64_t kInt4Block = 32;
// int8's integer path: elements of k per scale of x (the last block of a row may be shorter).
inline constexpr int64_t kX8Block = 128;
// ... taken for up to this many rows of x (more rows: the float path's register tiles are faster).
inline constexpr int64_t kX8IntMaxRows = 4;

}  // namespace exaone_ext

// y's columns [n_begin, n_end), for all m rows (m up to any size; meant for up to ~16).
EXAONE_DECLARE_ISA_KERNEL(void, quant_linear_rows, (const exaone_ext::QuantLinearArgs& a, int64_t n_begin, int64_t n_end))
namespace exaone_ext::cpu::avx512vnni {  // cpu/isa.h: avx512vnni_active()
void quant_linear_rows(const exaone_ext::QuantLinearArgs& a, int64_t n_begin, int64_t n_end);
}
// Fills xq, xs and xsum (shapes as in QuantLinearArgs) from a.x for every row; returns false, with
// nothing to use, where this variant has no integer path (portable code) or where x is not
// representable that way (a non-finite value, or a group whose largest magnitude is below 1e-30),
// and then quant_linear_rows reads a.x as floats.
EXAONE_DECLARE_ISA_KERNEL(bool, quant_prepare_x4,
                          (const exaone_ext::QuantLinearArgs& a, int8_t* xq, float* xs, int32_t* xsum))
// Fills xw and xs (as in QuantLinearArgs) from a.x for every row, for int8 weights; returns false,
// with nothing to use, where this variant has no integer path, where k is not a multiple of 16, or
// where x is not representable that way (as quant_prepare_x4).
EXAONE_DECLARE_ISA_KERNEL(bool, quant_prepare_x8, (const exaone_ext::QuantLinearArgs& a, int16_t* xw, float* xs))
// Dequantised weight rows [n_begin, n_end) into out (out_dtype [n_end - n_begin, k], contiguous).
// a.x and a.y are not used.
EXAONE_DECLARE_ISA_KERNEL(void, quant_dequant_rows,
                          (const exaone_ext::QuantLinearArgs& a, int64_t n_begin, int64_t n_end, void* out,
                           exaone_ext::DType out_dtype))
