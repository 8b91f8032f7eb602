// CUDA registration of exaone_ext::linear and linear_cat: the shared checks (torch/linear.h), a device guard, then
// at::matmul. cuBLAS already reads the weight at memory bandwidth for decode-sized inputs and is
// the right choice for prefill, so there is no hand-written kernel here.
#include <ATen/Functions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "torch/linear.h"

namespace exaone_ext {
namespace {

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& weight) {
  const std::vector<int64_t> out_shape = check_linear(x, weight);
  c10::cuda::CUDAGuard guard(x.device());
  return at::matmul(x, weight.t()).reshape(out_shape);
}

at::Tensor linear_cat_cuda(const at::Tensor& x, at::TensorList weights) {
  const std::vector<at::Tensor> ws(weights.begin(), weights.end());
  const std::vector<int64_t> out_shape = check_linear_cat(x, ws);
  c10::cuda::CUDAGuard guard(x.device());
  std::vector<at::Tensor> parts;
  for (const at::Tensor& w : ws) parts.push_back(at::matmul(x, w.t()));
  return at::cat(parts, -1).reshape(out_shape);
}

}  // namespace
}  // namespace exaone_ext

TORCH_LIBRARY_IMPL(exaone_ext, CUDA, m) {
  m.impl("linear", &exaone_ext::linear_cuda);
  m.impl("linear_cat", &exaone_ext::linear_cat_cuda);
}
