// The device-independent half of the SwiGLU ops: argument checks, output allocation and the
// description of the call (SwigluArgs). The CPU and CUDA registrations pass a runner that
// executes it on their device.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <tuple>

#include "common/activations.h"

namespace exaone_ext {
using SwigluRunner = std::function<void(const SwigluArgs&)>;

at::Tensor swiglu_impl(const at::Tensor& gate, const at::Tensor& up, const SwigluRunner& run);
std::tuple<at::Tensor, at::Tensor> swiglu_backward_impl(const at::Tensor& grad, const at::Tensor& gate,
                                                        const at::Tensor& up, const SwigluRunner& run);
at::Tensor swiglu_fused_impl(const at::Tensor& gate_up, const SwigluRunner& run);
at::Tensor swiglu_fused_backward_impl(const at::Tensor& grad, const at::Tensor& gate_up, const SwigluRunner& run);
}  // namespace exaone_ext
