// The CPU kernels of the operators, exactly as registered for the CPU dispatch key in
// csrc/torch/ops_*.cpp (checks included). decode_layers (torch/ops_decode_layers.cpp) calls them
// one after the other without going back through the dispatcher or Python.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace exaone_ext {

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                                const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> apply_rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                  const at::Tensor& sin, const at::Tensor& position_ids,
                                                  bool interleaved, std::optional<int64_t> position_ids_max);
std::tuple<at::Tensor, at::Tensor> apply_rope_backward_cpu(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                           const at::Tensor& cos, const at::Tensor& sin,
                                                           const at::Tensor& position_ids, bool interleaved,
                                                           std::optional<int64_t> position_ids_max);
at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad, const at::Tensor& gate,
                                                       const at::Tensor& up);
at::Tensor swiglu_fused_cpu(const at::Tensor& gate_up);
at::Tensor flash_attn_kvcache_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                                  const std::optional<at::Tensor>& v_new, bool causal, double softmax_scale,
                                  std::optional<int64_t> cache_seqlens_max);
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight);
at::Tensor linear_cat_cpu(const at::Tensor& x, at::TensorList weights);
at::Tensor linear_int8_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales);
at::Tensor linear_int4_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t group_size);
at::Tensor linear_int8_cat_cpu(const at::Tensor& x, at::TensorList qweights, at::TensorList scales);
at::Tensor linear_int4_cat_cpu(const at::Tensor& x, at::TensorList qweights, at::TensorList scales,
                               at::TensorList zeros, int64_t group_size);

}  // namespace exaone_ext
