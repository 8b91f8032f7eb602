// CUDA registrations of the RMSNorm ops: the shared checks and allocation (torch/rms_norm.h), a
// device guard, torch's current stream, then the torch-free launchers of csrc/cuda/rms_norm.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/rms_norm.h"
#include "torch/rms_norm.h"

namespace exaone_ext {
namespace {

void forward_on_stream(const RmsNormArgs& a) { cuda::rms_norm_forward(a, c10::cuda::getCurrentCUDAStream()); }
void backward_on_stream(const RmsNormBackwardArgs& a) { cuda::rms_norm_backward(a, c10::cuda::getCurrentCUDAStream()); }

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  c10::cuda::CUDAGuard guard(x.device());
  return rms_norm_impl(x, weight, eps, forward_on_stream);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                                 const at::Tensor& weight, double eps) {
  c10::cuda::CUDAGuard guard(x.device());
  return add_rms_norm_impl(x, residual, weight, eps, forward_on_stream);
}
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                          const at::Tensor& weight, const at::Tensor& rstd,
                                                          const std::optional<at::Tensor>& dh) {
  c10::cuda::CUDAGuard guard(x.device());
  return rms_norm_backward_impl(dy, x, weight, rstd, dh, cuda::kRmsNormMaxChunks, backward_on_stream);
}

}  // namespace
}  // namespace exaone_ext

TORCH_LIBRARY_IMPL(exaone_ext, CUDA, m) {
  m.impl("rms_norm", &exaone_ext::rms_norm_cuda);
  m.impl("add_rms_norm", &exaone_ext::add_rms_norm_cuda);
  m.impl("rms_norm_backward", &exaone_ext::rms_norm_backward_cuda);
}
