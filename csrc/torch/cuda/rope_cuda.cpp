// CUDA registrations of the RoPE ops: the shared checks and allocation (torch/rope.h), a device
// guard, torch's current stream, then the torch-free launchers of csrc/cuda/rope.cu.
//
// A position outside the table is reported by the kernel through a device flag; reading it back
// waits for the stream. It is not read back when the caller bounded the positions on the host
// (position_ids_max: the model's decode steps) nor while the stream is being captured into a CUDA
// graph; there the affected rows come out as NaN instead. Nothing outside the table is read.
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/rope.h"
#include "torch/rope.h"

namespace exaone_ext {
namespace {

std::optional<int64_t> run_cuda(const RopeArgs& a, bool read_back) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor bad = at::zeros({2}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA, c10::cuda::current_device()));
  cuda::rope_apply(a, reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()), stream);
  if (!read_back) return std::nullopt;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return std::nullopt;
  const at::Tensor host = bad.to(at::kCPU);
  const int64_t* flag = host.const_data_ptr<int64_t>();
  if (flag[0] == 0) return std::nullopt;
  return flag[1];
}

void run_cuda_tables(const RopeTableArgs& a) { cuda::rope_tables(a, c10::cuda::getCurrentCUDAStream()); }

std::tuple<at::Tensor, at::Tensor> apply_rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                   const at::Tensor& sin, const at::Tensor& position_ids,
                                                   bool interleaved, std::optional<int64_t> position_ids_max) {
  c10::cuda::CUDAGuard guard(q.device());
  return apply_rope_impl(q, k, cos, sin, position_ids, interleaved, false, position_ids_max, run_cuda);
}

std::tuple<at::Tensor, at::Tensor> apply_rope_backward_cuda(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                            const at::Tensor& cos, const at::Tensor& sin,
                                                            const at::Tensor& position_ids, bool interleaved,
                                                            std::optional<int64_t> position_ids_max) {
  c10::cuda::CUDAGuard guard(grad_q.device());
  return apply_rope_impl(grad_q, grad_k, cos, sin, position_ids, interleaved, true, position_ids_max, run_cuda);
}

std::tuple<at::Tensor, at::Tensor> rope_cos_sin_cuda(const at::Tensor& positions, int64_t head_dim, double theta,
                                                     bool llama3, double factor, double low_freq_factor,
                                                     double high_freq_factor, double original_max_position) {
  c10::cuda::CUDAGuard guard(positions.device());
  return rope_cos_sin_impl(positions, head_dim, theta, llama3, factor, low_freq_factor, high_freq_factor,
                           original_max_position, run_cuda_tables);
}

}  // namespace
}  // namespace exaone_ext

TORCH_LIBRARY_IMPL(exaone_ext, CUDA, m) {
  m.impl("rope_cos_sin", &exaone_ext::rope_cos_sin_cuda);
  m.impl("apply_rope", &exaone_ext::apply_rope_cuda);
  m.impl("apply_rope_backward", &exaone_ext::apply_rope_backward_cuda);
}
