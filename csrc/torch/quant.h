// The device-independent half of exaone_ext::linear_int8 / linear_int4 (quantized weights, layouts
// in cpu/quant_linear.h): argument checks, the output shape, and the prefill path that expands the
// weight a tile at a time into x's dtype for the library matrix multiply.
#pragma once
#include <ATen/core/Tensor.h>

#include "torch/common.h"
#include "torch/linear.h"

#include <functional>
#include <vector>

namespace exaone_ext {

// Checks x [..., in], qweight int8 [out, in], scales [out] (float32 or x's dtype); returns x's shape
// with the last dimension replaced by out.
std::vector<int64_t> check_linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales);

// Checks x [..., in], qweight uint8 [out, in / 2], scales [out, in / group_size] (float32 or x's
// dtype), zeros uint8 [out, in / group_size], group_size a positive multiple of 32 dividing in.
std::vector<int64_t> check_linear_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                       const at::Tensor& zeros, int64_t group_size);

// linear_int8_cat / linear_int4_cat: x and lists of the single op's weight tensors (at least one,
// the lists equally long), each checked as by the single op (the error names the weight's place in
// the lists); returns x's shape with the last dimension replaced by the sum of out_features.
std::vector<int64_t> check_linear_int8_cat(const at::Tensor& x, at::TensorList qweights, at::TensorList scales);
std::vector<int64_t> check_linear_int4_cat(const at::Tensor& x, at::TensorList qweights, at::TensorList scales,
                                           at::TensorList zeros, int64_t group_size);

// Up to this many rows of x the weight-streaming kernels run; above, linear_tiled (torch/linear.h).
// 16-bit x on a CPU without instructions for its type (torch/linear.h cpu_native_16bit_matmul):
// up to 64 rows (int4 on Zen 3 at 2560 <-> 7168: streaming 32 rows in two passes 10-13 ms, float32
// tiles 15-22 ms; 64 rows about 20-26 against 31-34 ms).
inline constexpr int64_t kQuantStreamMaxRows = 16;
inline constexpr int64_t kQuantStreamMaxRowsNonNative = 64;
// int4 with bfloat16/float16 x uses integer multiply-adds (x as 15-bit integers, cpu/quant_linear.h)
// where the CPU variant has them, for every row count that streams the weight; float32 x widens the
// weight to float32.
// Allow (true, the default) or forbid that integer path; returns the previous setting (tests and
// benchmarks compare the two).
bool set_quant_int_dot(bool enabled);
// One row of x on the integer paths: features one after the other, the weight as one stream
// (QuantLinearArgs::row_stream; on by default). Returns the previous setting.
bool set_quant_row_stream(bool enabled);
// How far ahead of its loads a one-row stream prefetches the weight (QuantLinearArgs::prefetch_ahead),
// in bytes, for int8 (bits 8) or int4 (bits 4). Per CPU by default: on a 2-core AMD Zen 2 (AVX2 only)
// int8 reads fastest 768-1024 bytes ahead and slower from 1.5 KiB on, int4 there and both formats on
// Intel 1.5-4 KiB ahead (README, Quantized weights).
int64_t quant_prefetch_ahead(int64_t bits);
// Sets it (bytes in 0..1 MiB; 0: no software prefetch; -1: back to the CPU's default); returns the
// previous value. Benchmarks sweep it.
int64_t set_quant_prefetch_ahead(int64_t bits, int64_t bytes);

// The weight half of a quantized-linear argument struct (the CPU kernels' QuantLinearArgs, the
// CUDA GEMV's QuantGemvArgs: fields bits, s_dtype, k, n, group, q, q_stride, scales, zeros), from
// checked tensors; zeros undefined for int8. Returns the tensors the pointers refer to (contiguous
// copies where needed), which must outlive the call.
struct QuantWeightTensors {
  at::Tensor q, s, z;
};
template <typename Args>
QuantWeightTensors fill_quant_weight(Args& a, int bits, const at::Tensor& qweight, const at::Tensor& scales,
                                     const at::Tensor& zeros, int64_t k, int64_t group, const char* op);

template <typename Args>
QuantWeightTensors fill_quant_weight(Args& a, int bits, const at::Tensor& qweight, const at::Tensor& scales,
                                     const at::Tensor& zeros, int64_t k, int64_t group, const char* op) {
  QuantWeightTensors t{weight_rows_of(qweight), scales.contiguous(), zeros.defined() ? zeros.contiguous() : zeros};
  a.bits = bits;
  a.s_dtype = kernel_dtype(t.s, op, "scales", false);
  a.k = k;
  a.n = t.q.size(0);
  a.group = group;
  a.q = t.q.const_data_ptr();
  a.q_stride = t.q.size(0) > 1 ? t.q.stride(0) : t.q.size(1);
  a.scales = t.s.const_data_ptr();
  a.zeros = t.z.defined() ? t.z.template const_data_ptr<uint8_t>() : nullptr;
  return t;
}

}  // namespace exaone_ext
