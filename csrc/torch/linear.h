// The device-independent half of exaone_ext::linear: argument checks and the output shape.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

namespace exaone_ext {
// Checks x [..., in] and weight [out, in] (same device and dtype); returns x's shape with the last
// dimension replaced by out.
std::vector<int64_t> check_linear(const at::Tensor& x, const at::Tensor& weight);

// Checks x [..., in] and weights [out_i, in] (at least one; same device and dtype as x); returns x's
// shape with the last dimension replaced by sum(out_i).
std::vector<int64_t> check_linear_cat(const at::Tensor& x, const std::vector<at::Tensor>& weights);

// Whether bfloat16 calls may use the AVX512-BF16 kernel (when built and the CPU has it); for tests
// and comparisons. Returns the previous setting.
bool set_linear_bf16_dot(bool enabled);
}  // namespace exaone_ext
