// Quantized-weight linear CUDA launchers (torch-free). Weight formats as in cpu/quant_linear.h:
// int8 [n, k] with scales [n]; int4 packed uint8 [n, k / 2] (blocks of 32: byte j holds element j
// low, 16 + j high) with scales and uint8 zero points [n, k / group].
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>
#include "common/dtypes.h"

namespace exaone_ext::cuda {

struct QuantGemvArgs {
  int bits;               // 8 or 4
  DType dtype;            // of x and y
  DType s_dtype;          // of the scales: float32 or dtype
  int64_t m, k, n;        // x [m, k], w [n, k], y [m, n]
  int64_t group;          // int4 only
  const void* x;          // dtype [m, k], rows x_stride apart (last dim contiguous)
  int64_t x_stride;
  const void* q;          // weight rows, q_stride bytes apart
  int64_t q_stride;
  const void* scales;     // contiguous
  const uint8_t* zeros;   // contiguous (int4)
  void* y;                // dtype [m, n], rows y_stride apart
  int64_t y_stride;
};

// Rows of x the GEMV takes (one register accumulator per row and lane).
inline constexpr int64_t kQuantGemvMaxRows = 16;

// y = x @ dequantise(w).T for m <= kQuantGemvMaxRows: one warp per output feature streams its row.
void quant_gemv(const QuantGemvArgs& a, cudaStream_t stream);
// Rows [n0, n1) of the dequantised weight into out (dtype [n1 - n0, k], contiguous); x, y unused.
void quant_dequant(const QuantGemvArgs& a, int64_t n0, int64_t n1, void* out, cudaStream_t stream);

}  // namespace exaone_ext::cuda
