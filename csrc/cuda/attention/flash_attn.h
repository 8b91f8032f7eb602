// Grouped-query flash attention on CUDA: launchers (torch-free). The call is described by
// common/attention.h (AttnParams / AttnBwdParams); scratch memory is allocated by the caller.
//
// Paths: bfloat16 / float16 with head dim 64, 80, 96 or 128 run on tensor cores (mma.sync
// m16n8k16, fp32 accumulation, K/V tiles through shared memory with cp.async); every other
// supported case (float32, head dim 256, any head dim <= 256 that is a multiple of 8) runs a plain
// CUDA-core kernel with the same parameters and the same math.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/attention.h"

namespace exaone_ext::cuda {

// Split-KV ("flash-decoding") partition of the keys of each sequence. With num_splits > 1 each split
// writes its output normalised by its own sum and its LSE into float32 scratch laid out
//   out_partial [num_splits, batch, q_heads, seq_q, head_dim], lse_partial [num_splits, batch, q_heads, seq_q]
// and a combine kernel merges them into p.out / p.lse. Dense and kv-cache layouts only (not varlen).
struct FwdSplit {
  int num_splits = 1;
  int64_t keys_per_split = 0;  // a multiple of the key tile (64)
  float* out_partial = nullptr;
  float* lse_partial = nullptr;
};

// The tensor-core forward's block shape (fwd_mma.cuh), in packed q rows: 16, with the four warps
// splitting each key tile, when every sequence has at most 16 packed rows (seq_q * group: decode);
// 128, each warp two 16-row groups (K / V fragments read once for both), when that still gives every
// SM a block; else 64, a warp per 16 rows. flash_attn_set_key_split(false) sets the 16-row shape
// aside; flash_attn_set_wide_rows(mode) chooses the 128-row one: -1 by the rule above (the default),
// 0 never, 1 for every call of more than 16 rows (tests). Each returns its previous setting.
bool flash_attn_set_key_split(bool enabled);
int flash_attn_set_wide_rows(int mode);
int flash_attn_fwd_block_rows(const AttnParams& p);

// How many splits the forward of p should use: enough blocks to fill the device twice over when the
// (batch, heads, query rows) grid alone would not, each split at least 256 keys. p.seq_k is the
// largest key length any sequence can have (the cache capacity for a kv cache). Queries the device
// properties once per device.
FwdSplit flash_attn_split_plan(const AttnParams& p);
inline int64_t flash_attn_split_out_elems(const AttnParams& p, const FwdSplit& s) {
  return int64_t(s.num_splits) * p.batch * p.q_heads * p.seq_q * p.head_dim;
}
inline int64_t flash_attn_split_lse_elems(const AttnParams& p, const FwdSplit& s) {
  return int64_t(s.num_splits) * p.batch * p.q_heads * p.seq_q;
}

// Forward for dense, varlen (p.cu_seqlens_*) and kv-cache (p.cache_seqlens) layouts: writes p.out
// and, when non-null, p.lse. Rows that see no key get zeros and lse -inf.
void flash_attn_forward(const AttnParams& p, const FwdSplit& split, cudaStream_t stream);

// Backward scratch, float32: dsum [q_rows, q_heads] = rowsum(dout * out), and (when
// flash_attn_bwd_needs_dq_accum) dq_accum [q_rows, q_heads, head_dim] ZERO-INITIALISED, where
// q_rows = batch * seq_q (dense) or total_q (varlen).
struct BwdScratch {
  float* dsum = nullptr;
  float* dq_accum = nullptr;
  int64_t q_rows = 0;
};
bool flash_attn_bwd_needs_dq_accum(const AttnBwdParams& p);

// Backward: dq, dk, dv (dk / dv summed over each group's query heads), recomputing the attention
// probabilities from the saved LSE. Every element of dq, dk and dv is written.
void flash_attn_backward(const AttnBwdParams& p, const BwdScratch& scratch, cudaStream_t stream);

// Head dims the CUDA kernels accept: the common rule (tensor cores for 64, 80, 96, 128 in 16-bit types).
inline bool flash_attn_head_dim_supported(int64_t d) { return attn_head_dim_supported(d); }

}  // namespace exaone_ext::cuda
