// The device-independent half of the RoPE ops: argument checks, output allocation and the
// description of the call (RopeArgs / RopeTableArgs). The CPU and CUDA registrations pass a
// runner that executes it on their device.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <tuple>

#include "common/rope.h"

namespace exaone_ext {
// Runs the rotation; returns a position found outside the table, if the device can report one.
// read_back = false: the caller already bounded the positions on the host, so a device need not
// wait for its kernel to report (CUDA then skips the read-back, which would synchronise).
using RopeRunner = std::function<std::optional<int64_t>(const RopeArgs&, bool read_back)>;
using RopeTableRunner = std::function<void(const RopeTableArgs&)>;

// inverse = false: apply_rope (q, k); inverse = true: apply_rope_backward (grad_q, grad_k).
// position_ids_max: the caller's host-side bound on the positions (checked against the table).
std::tuple<at::Tensor, at::Tensor> apply_rope_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                   const at::Tensor& sin, const at::Tensor& position_ids,
                                                   bool interleaved, bool inverse,
                                                   std::optional<int64_t> position_ids_max, const RopeRunner& run);

std::tuple<at::Tensor, at::Tensor> rope_cos_sin_impl(const at::Tensor& positions, int64_t head_dim, double theta,
                                                     bool llama3, double factor, double low_freq_factor,
                                                     double high_freq_factor, double original_max_position,
                                                     const RopeTableRunner& run);
}  // namespace exaone_ext
