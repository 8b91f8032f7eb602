// RMSNorm call descriptions shared by the CPU and CUDA kernels (torch-free).
//
// Forward (EXAONE's order of operations): with h = x (rms_norm) or h = T(x + residual) (add_rms_norm),
//   rstd = 1 / sqrt(mean(h^2) + eps)            in float32 (float64 for float64 inputs)
//   y    = T(weight * T(h * rstd))               T = the input dtype
// Backward, with n = T(h * rstd) and g = dy * weight (float32, the cast through T treated as identity):
//   dh     = rstd * g - h * rstd^3 * sum(g * h) / cols   (+ the incoming gradient of h, if any)
//   dweight = sum over rows of dy * n, reduced deterministically: rows are cut into fixed chunks of
//             chunk_rows rows, each chunk sums its rows in order into its own partial row, and the
//             partial rows are added in chunk order. Neither depends on the number of threads.
#pragma once
#include <cstdint>
#include "common/dtypes.h"

namespace exaone_ext {

struct RmsNormArgs {
  DType dtype;  // of x, residual, y and h
  int64_t rows, cols;
  double eps;
  const void* x; int64_t x_stride;                // row stride in elements; the last dim is contiguous
  const void* residual; int64_t residual_stride;  // add_rms_norm; nullptr for rms_norm
  const void* weight;                             // [cols] contiguous float32 (float64 for float64 x)
  void* y;                                        // [rows, cols] contiguous
  void* h;                                        // add_rms_norm: x + residual, [rows, cols] contiguous
  void* rstd;                                     // [rows] float32 (float64 for float64 x)
};

struct RmsNormBackwardArgs {
  DType dtype;  // of dy, x, dh and dx
  int64_t rows, cols;
  const void* dy; int64_t dy_stride;
  const void* x; int64_t x_stride;    // the normalised input (h for add_rms_norm)
  const void* weight;                 // [cols] contiguous float32 (float64)
  const void* rstd;                   // [rows] float32 (float64), from the forward
  const void* dh; int64_t dh_stride;  // optional gradient of h added to dx; nullptr when absent
  void* dx;                           // [rows, cols] contiguous
  void* dw_partial;                   // [chunks, cols] float32 (float64) scratch
  void* dw;                           // [cols] float32 (float64) result
  int64_t chunks, chunk_rows;
};

// Splits rows into at most max_chunks chunks of equal size (the last one shorter): a function of
// the shape only, so the weight gradient's summation order is fixed.
EXAONE_HD void rms_norm_chunking(int64_t rows, int64_t max_chunks, int64_t& chunks, int64_t& chunk_rows) {
  if (rows <= 0) {
    chunks = 0;
    chunk_rows = 1;
    return;
  }
  const int64_t c = rows < max_chunks ? rows : max_chunks;
  chunk_rows = (rows + c - 1) / c;
  chunks = (rows + chunk_rows - 1) / chunk_rows;
}

}  // namespace exaone_ext
