// CUDA registration of exaone_ext::linear_int8 / linear_int4 (and their _cat forms): the shared checks (torch/quant.h), a
// device guard, then the GEMV of csrc/cuda/quant_linear.cu for up to 16 rows of x, or tiles of the
// weight dequantised on the device and multiplied by cuBLAS (linear_tiled) above.
#include <ATen/Functions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/quant_linear.h"
#include "torch/common.h"
#include "torch/quant.h"

namespace exaone_ext {
namespace {

at::Tensor quant_linear_cuda(const at::Tensor& x, cuda::QuantGemvArgs a, const std::vector<int64_t>& out_shape) {
  c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  if (M == 0 || a.n == 0 || a.k == 0) return at::zeros(out_shape, x.options());
  a.m = M;
  const at::Tensor x2 = x.reshape({M, a.k}).contiguous();
  if (M > cuda::kQuantGemvMaxRows) {
    return linear_tiled(x2, a.n, [&](int64_t n0, int64_t n1, const at::Tensor& tile) {
      cuda::quant_dequant(a, n0, n1, tile.data_ptr(), stream);
    }).view(out_shape);
  }
  at::Tensor y = at::empty({M, a.n}, x.options());
  a.x = x2.const_data_ptr();
  a.x_stride = a.k;
  a.y = y.data_ptr();
  a.y_stride = a.n;
  cuda::quant_gemv(a, stream);
  return y.view(out_shape);
}

at::Tensor linear_int8_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  const std::vector<int64_t> shape = check_linear_int8(x, qweight, scales);
  cuda::QuantGemvArgs a{};
  const QuantWeightTensors keep = fill_quant_weight(a, 8, qweight, scales, at::Tensor(), qweight.size(1), 0, "linear_int8");
  a.dtype = kernel_dtype(x, "linear_int8", "x", false);
  return quant_linear_cuda(x, a, shape);
}

at::Tensor linear_int4_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& zeros, int64_t group_size) {
  const std::vector<int64_t> shape = check_linear_int4(x, qweight, scales, zeros, group_size);
  cuda::QuantGemvArgs a{};
  const QuantWeightTensors keep = fill_quant_weight(a, 4, qweight, scales, zeros, x.size(-1), group_size, "linear_int4");
  a.dtype = kernel_dtype(x, "linear_int4", "x", false);
  return quant_linear_cuda(x, a, shape);
}

// The cat ops: one GEMV (or tiled product) per weight, into its columns of y.
at::Tensor linear_int8_cat_cuda(const at::Tensor& x, at::TensorList qweights, at::TensorList scales) {
  const std::vector<int64_t> shape = check_linear_int8_cat(x, qweights, scales);
  std::vector<at::Tensor> parts;
  for (size_t i = 0; i < qweights.size(); ++i) parts.push_back(linear_int8_cuda(x, qweights[i], scales[i]));
  return parts.size() == 1 ? parts[0].view(shape) : at::cat(parts, -1).view(shape);
}

at::Tensor linear_int4_cat_cuda(const at::Tensor& x, at::TensorList qweights, at::TensorList scales,
                                at::TensorList zeros, int64_t group_size) {
  const std::vector<int64_t> shape = check_linear_int4_cat(x, qweights, scales, zeros, group_size);
  std::vector<at::Tensor> parts;
  for (size_t i = 0; i < qweights.size(); ++i)
    parts.push_back(linear_int4_cuda(x, qweights[i], scales[i], zeros[i], group_size));
  return parts.size() == 1 ? parts[0].view(shape) : at::cat(parts, -1).view(shape);
}

}  // namespace
}  // namespace exaone_ext

TORCH_LIBRARY_IMPL(exaone_ext, CUDA, m) {
  m.impl("linear_int8", &exaone_ext::linear_int8_cuda);
  m.impl("linear_int4", &exaone_ext::linear_int4_cuda);
  m.impl("linear_int8_cat", &exaone_ext::linear_int8_cat_cuda);
  m.impl("linear_int4_cat", &exaone_ext::linear_int4_cat_cuda);
}
