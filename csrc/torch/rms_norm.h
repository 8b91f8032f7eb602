// The device-independent half of the RMSNorm ops: argument checks, output allocation and the
// description of the call (common/rms_norm.h). The CPU and CUDA registrations pass runners that
// execute it on their device.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <functional>
#include <tuple>

#include "common/rms_norm.h"

namespace exaone_ext {
using RmsNormRunner = std::function<void(const RmsNormArgs&)>;
using RmsNormBackwardRunner = std::function<void(const RmsNormBackwardArgs&)>;

// -> (y, rstd)
std::tuple<at::Tensor, at::Tensor> rms_norm_impl(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                 const RmsNormRunner& run);
// -> (y, h = x + residual, rstd)
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_impl(const at::Tensor& x, const at::Tensor& residual,
                                                                 const at::Tensor& weight, double eps,
                                                                 const RmsNormRunner& run);
// -> (dx, dweight); max_chunks bounds the row chunks of the deterministic weight-gradient sum.
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_impl(const at::Tensor& dy, const at::Tensor& x,
                                                          const at::Tensor& weight, const at::Tensor& rstd,
                                                          const std::optional<at::Tensor>& dh, int64_t max_chunks,
                                                          const RmsNormBackwardRunner& run);
}  // namespace exaone_ext
