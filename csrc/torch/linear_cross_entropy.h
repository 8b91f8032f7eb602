// The device-independent half of linear_cross_entropy: argument checks, the loop over chunks of
// tokens (each chunk's logits from the library matmul, then the cross-entropy kernel over them,
// then the chunk's gradient matmuls) and the reduction. The CPU and CUDA registrations pass a
// runner that executes the kernel on their device.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <tuple>

#include "common/cross_entropy.h"

namespace exaone_ext {
using CrossEntropyRunner = std::function<void(const CrossEntropyArgs&)>;

// reduction: 0 none ([N] per-token loss), 1 mean over targets != ignore_index (0 when none), 2 sum.
// grad_hidden / grad_weight: also return the gradients of the summed per-token loss (unscaled by
// the reduction or any incoming gradient; empty tensors when not asked for).
// Returns (loss, lse [N], grad_hidden [N, D], grad_weight [V, D]); loss and lse are float32
// (float64 for float64 inputs).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_impl(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, int64_t ignore_index,
    int64_t reduction, int64_t chunk_size, bool grad_hidden, bool grad_weight, const CrossEntropyRunner& run);

// Gradients of sum_r grad_loss[r] * loss[r] from the saved lse, each chunk's logits recomputed.
// grad_loss: [N] or a 0-dim scale for every row.
std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_backward_impl(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const at::Tensor& lse, int64_t ignore_index, int64_t chunk_size, bool grad_hidden, bool grad_weight,
    const CrossEntropyRunner& run);
}  // namespace exaone_ext
