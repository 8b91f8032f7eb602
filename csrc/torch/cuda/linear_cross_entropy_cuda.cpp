// CUDA registrations of linear_cross_entropy: the shared checks, chunk loop and matmuls
// (torch/linear_cross_entropy.h), a device guard, torch's current stream, then the torch-free
// kernel of csrc/cuda/cross_entropy.cu. Targets are not range-checked on CUDA (no synchronisation):
// an out-of-range target gives a NaN loss.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/cross_entropy.h"
#include "torch/linear_cross_entropy.h"

namespace exaone_ext {
namespace {

void run_cuda(const CrossEntropyArgs& a) { cuda::cross_entropy_rows(a, c10::cuda::getCurrentCUDAStream()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, int64_t ignore_index,
    int64_t reduction, int64_t chunk_size, bool grad_hidden, bool grad_weight) {
  c10::cuda::CUDAGuard guard(hidden.device());
  return linear_cross_entropy_impl(hidden, weight, targets, ignore_index, reduction, chunk_size, grad_hidden,
                                   grad_weight, run_cuda);
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const at::Tensor& lse, int64_t ignore_index, int64_t chunk_size, bool grad_hidden, bool grad_weight) {
  c10::cuda::CUDAGuard guard(hidden.device());
  return linear_cross_entropy_backward_impl(grad_loss, hidden, weight, targets, lse, ignore_index, chunk_size,
                                            grad_hidden, grad_weight, run_cuda);
}

}  // namespace
}  // namespace exaone_ext

TORCH_LIBRARY_IMPL(exaone_ext, CUDA, m) {
  m.impl("linear_cross_entropy", &exaone_ext::linear_cross_entropy_cuda);
  m.impl("linear_cross_entropy_backward", &exaone_ext::linear_cross_entropy_backward_cuda);
}
