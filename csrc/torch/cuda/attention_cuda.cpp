// CUDA registrations of the flash-attention ops: the shared checks, allocation and parameter
// filling (torch/attention.h; outputs go to q's device), then a device guard, scratch memory from
// torch's allocator, torch's current stream and the torch-free launchers of
// csrc/cuda/attention/flash_attn.h.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/attention/flash_attn.h"
#include "torch/attention.h"

namespace exaone_ext {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// Forward with the split-KV partition the device wants (dense and kv-cache layouts only).
void run_forward(const AttnParams& p, const at::Tensor& like, bool allow_split) {
  cuda::FwdSplit split;
  at::Tensor out_partial, lse_partial;
  if (allow_split) split = cuda::flash_attn_split_plan(p);
  if (split.num_splits > 1) {
    const auto f32 = like.options().dtype(at::kFloat);
    out_partial = at::empty({cuda::flash_attn_split_out_elems(p, split)}, f32);
    lse_partial = at::empty({cuda::flash_attn_split_lse_elems(p, split)}, f32);
    split.out_partial = out_partial.data_ptr<float>();
    split.lse_partial = lse_partial.data_ptr<float>();
  }
  // The scratch tensors stay alive until the end of this function; the caching allocator keeps
  // their memory reserved for work already queued on the current stream.
  cuda::flash_attn_forward(p, split, current_stream());
}

void run_backward(const AttnBwdParams& bp, const at::Tensor& q, int64_t q_rows) {
  const auto f32 = q.options().dtype(at::kFloat);
  const at::Tensor dsum = at::empty({q_rows, bp.fwd.q_heads}, f32);
  at::Tensor dq_accum;
  cuda::BwdScratch sc;
  sc.q_rows = q_rows;
  sc.dsum = dsum.data_ptr<float>();
  if (cuda::flash_attn_bwd_needs_dq_accum(bp)) {
    dq_accum = at::zeros({q_rows, bp.fwd.q_heads, bp.fwd.head_dim}, f32);
    sc.dq_accum = dq_accum.data_ptr<float>();
  }
  cuda::flash_attn_backward(bp, sc, current_stream());
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       bool causal, double softmax_scale) {
  at::Tensor out, lse;
  const AttnParams p = prepare_flash_attn_fwd(q, k, v, causal, softmax_scale, out, lse);
  c10::cuda::CUDAGuard guard(q.device());  // after the checks: q is a CUDA tensor
  run_forward(p, q, /*allow_split=*/true);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> flash_attn_varlen_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                              const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                              int64_t max_seqlen_k, bool causal,
                                                              double softmax_scale) {
  at::Tensor out, lse;
  VarlenOffsets offsets;
  const AttnParams p = prepare_flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                     causal, softmax_scale, out, lse, offsets);
  c10::cuda::CUDAGuard guard(q.device());  // after the checks: q is a CUDA tensor
  run_forward(p, q, /*allow_split=*/false);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_cuda(const at::Tensor& dout, const at::Tensor& q,
                                                                   const at::Tensor& k, const at::Tensor& v,
                                                                   const at::Tensor& out, const at::Tensor& lse,
                                                                   bool causal, double softmax_scale) {
  at::Tensor dq, dk, dv;
  const AttnBwdParams bp = prepare_flash_attn_bwd(dout, q, k, v, out, lse, causal, softmax_scale, dq, dk, dv);
  c10::cuda::CUDAGuard guard(q.device());  // after the checks: q is a CUDA tensor
  run_backward(bp, q, q.size(0) * q.size(1));
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_varlen_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double softmax_scale) {
  at::Tensor dq, dk, dv;
  VarlenOffsets offsets;
  const AttnBwdParams bp = prepare_flash_attn_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                         max_seqlen_q, max_seqlen_k, causal, softmax_scale, dq, dk, dv,
                                                         offsets);
  c10::cuda::CUDAGuard guard(q.device());  // after the checks: q is a CUDA tensor
  run_backward(bp, q, q.size(0));
  return {dq, dk, dv};
}

at::Tensor flash_attn_kvcache_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                                   const std::optional<at::Tensor>& v_new, bool causal, double softmax_scale,
                                   std::optional<int64_t> cache_seqlens_max) {
  at::Tensor out, seqlens_after;  // seqlens_after backs p.cache_seqlens: alive until the launches are queued
  const AttnParams p = prepare_flash_attn_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal,
                                                  softmax_scale, cache_seqlens_max, out, seqlens_after);
  c10::cuda::CUDAGuard guard(q.device());  // after the checks: q is a CUDA tensor
  run_forward(p, q, /*allow_split=*/true);
  return out;
}

}  // namespace
}  // namespace exaone_ext

TORCH_LIBRARY_IMPL(exaone_ext, CUDA, m) {
  m.impl("flash_attn_fwd", &exaone_ext::flash_attn_fwd_cuda);
  m.impl("flash_attn_bwd", &exaone_ext::flash_attn_bwd_cuda);
  m.impl("flash_attn_varlen_fwd", &exaone_ext::flash_attn_varlen_fwd_cuda);
  m.impl("flash_attn_varlen_bwd", &exaone_ext::flash_attn_varlen_bwd_cuda);
  m.impl("flash_attn_kvcache", &exaone_ext::flash_attn_kvcache_cuda);
}
