// CUDA registrations of the SwiGLU ops: the shared checks and allocation (torch/swiglu.h), a
// device guard, torch's current stream, then the torch-free launchers of csrc/cuda/swiglu.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/swiglu.h"
#include "torch/swiglu.h"

namespace exaone_ext {
namespace {

SwigluRunner on_stream(void (*launch)(const SwigluArgs&, cudaStream_t)) {
  return [launch](const SwigluArgs& a) { launch(a, c10::cuda::getCurrentCUDAStream()); };
}

at::Tensor swiglu_cuda(const at::Tensor& gate, const at::Tensor& up) {
  c10::cuda::CUDAGuard guard(gate.device());
  return swiglu_impl(gate, up, on_stream(&cuda::swiglu_forward));
}
std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(const at::Tensor& grad, const at::Tensor& gate,
                                                        const at::Tensor& up) {
  c10::cuda::CUDAGuard guard(gate.device());
  return swiglu_backward_impl(grad, gate, up, on_stream(&cuda::swiglu_backward));
}
at::Tensor swiglu_fused_cuda(const at::Tensor& gate_up) {
  c10::cuda::CUDAGuard guard(gate_up.device());
  return swiglu_fused_impl(gate_up, on_stream(&cuda::swiglu_forward));
}
at::Tensor swiglu_fused_backward_cuda(const at::Tensor& grad, const at::Tensor& gate_up) {
  c10::cuda::CUDAGuard guard(gate_up.device());
  return swiglu_fused_backward_impl(grad, gate_up, on_stream(&cuda::swiglu_backward));
}

}  // namespace
}  // namespace exaone_ext

TORCH_LIBRARY_IMPL(exaone_ext, CUDA, m) {
  m.impl("swiglu", &exaone_ext::swiglu_cuda);
  m.impl("swiglu_backward", &exaone_ext::swiglu_backward_cuda);
  m.impl("swiglu_fused", &exaone_ext::swiglu_fused_cuda);
  m.impl("swiglu_fused_backward", &exaone_ext::swiglu_fused_backward_cuda);
}
