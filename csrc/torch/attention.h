// Argument validation, allocation and parameter filling shared by the CPU and CUDA registrations
// of the flash-attention ops (csrc/torch/ops_attention.cpp, csrc/torch/cuda/attention_cuda.cpp).
// Device-agnostic: everything here is torch ops and host-side checks; a kernel receives the
// filled AttnParams / AttnBwdParams and never sees an unchecked value.
//
// Every prepare_* function
//   - raises ValueError / TypeError naming the op and the argument for any bad input: rank and
//     shape, q_heads not a multiple of kv_heads, head dim not in kAttnHeadDims, dtype
//     (float32 / bfloat16 / float16; float64 too on CPU), device, a non-contiguous last dimension
//     (the Python API makes the last dimension contiguous before calling the ops), a non-finite
//     softmax_scale;
//   - reads the sequence offsets / lengths on the host to validate them (int32, 1-D, any strides,
//     non-decreasing, within the packed tensors, no longer than max_seqlen_*; cache lengths within
//     max_seq). For CUDA tensors this is one small device-to-host copy per call (a sync), the price
//     of never letting a bad offset reach a kernel;
//   - allocates the outputs on the inputs' device: out contiguous like q; lse float32
//     [batch, q_heads, seq_q] (dense) or [q_heads, total_q] (varlen). For varlen, rows that belong to
//     no sequence (outside cu_seqlens[0] .. cu_seqlens[-1]) get out = 0 and lse = -inf.
//   - backward: dq like q, dk / dv like k / v, all contiguous and zero-filled (so a kernel may
//     accumulate into them); lse must be the forward's contiguous float32 LSE.
//
// KV cache: prepare_flash_attn_kvcache writes k_new / v_new into the caches itself (one index_put_
// per cache, a device-agnostic scatter at each row's offset cache_seqlens[b]); the kernel only reads
// the caches. seqlens_after is a new int32 tensor (on the caches' device) holding cache_seqlens +
// seq_new (or a copy of cache_seqlens without new tokens); the returned params point at it, so the
// caller keeps seqlens_after alive while the kernel runs. cache_seqlens itself is never modified.
// cache_seqlens_max, when given, is the caller's bound on cache_seqlens (checked against max_seq on
// the host): on CUDA the lengths are then not read back from the device (a synchronisation per
// call, which would stall the queue of launches every layer); on the CPU they are read anyway and
// must not exceed it. Without it the lengths are read and checked one by one on every device.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "common/attention.h"

namespace exaone_ext {

// CPU decode kernels (torch/ops_attention.cpp): allow (true) or forbid the kernels that read a KV
// cache once over all kv heads for few query rows (AVX512-BF16, AVX2); returns the previous setting.
bool set_attn_decode(bool enabled);
// The decode kernels' short caches cut into one key range per thread (kDecodeMinRangeElems in
// torch/ops_attention.cpp; on by default): allow (true) or forbid; returns the previous setting.
bool set_attn_decode_thread_ranges(bool enabled);
// CPU attention's per-thread scratch filled with all-ones bytes (NaN in every float type) before the
// kernels run (tests: a read of scratch no kernel wrote shows as NaN); returns the previous setting.
bool set_attn_poison_scratch(bool enabled);
// Which kernel a CPU decode call takes now, per cache dtype, in words (build_info()).
std::string attn_decode_kernels();
// The engine of CPU bfloat16 flash attention's tile products (forward and backward): oneDNN's
// brgemm ("oneDNN brgemm (AMX)" where the CPU has AMX-BF16: the default there), the kernels' own
// "avx512bf16" products, or "float32" tiles. set_attn_brgemm: -1 the default, 0 never, 1 wherever
// brgemm works (AVX-512 with oneDNN); returns the previous mode.
int set_attn_brgemm(int mode);
std::string attn_bf16_products();

// Dense copies of the varlen offsets the params point at (the caller keeps them while the kernels run).
struct VarlenOffsets {
  at::Tensor cu_q, cu_k;
};

AttnParams prepare_flash_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                  double softmax_scale, at::Tensor& out, at::Tensor& lse);

AttnParams prepare_flash_attn_varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                         int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                         double softmax_scale, at::Tensor& out, at::Tensor& lse,
                                         VarlenOffsets& offsets);

AttnBwdParams prepare_flash_attn_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool causal,
                                     double softmax_scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);

AttnBwdParams prepare_flash_attn_varlen_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                            int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                            double softmax_scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                                            VarlenOffsets& offsets);

AttnParams prepare_flash_attn_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                                      const std::optional<at::Tensor>& v_new, bool causal, double softmax_scale,
                                      std::optional<int64_t> cache_seqlens_max, at::Tensor& out,
                                      at::Tensor& seqlens_after);

}  // namespace exaone_ext
