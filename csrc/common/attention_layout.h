// Index arithmetic of the attention layouts (common/attention.h), written once for every kernel.
//
// A query row is named by (sequence b, row i of that sequence, q head h); a key row by
// (b, row j, kv head). In the varlen layout the batch strides are never used: the packed row is
// q_start + i (resp. k_start + j). "Packed" q rows of a GQA group: the kernels that process all
// query heads of kv head hk together number the rows of one sequence pr = i * group + (h - hk * group),
// so consecutive rows share the query position and walk the group's heads.
#pragma once
#include <cstdint>

#include "common/attention.h"

namespace exaone_ext {

// Query heads per kv head (AttnParams::group for device code).
EXAONE_HD int64_t attn_group(const AttnParams& p) { return p.q_heads / p.kv_heads; }

// Element offset of q row (b, i, h) in q / out / dout-like tensors with the given strides.
EXAONE_HD int64_t attn_row_offset(const AttnParams& p, const SeqRange& r, int64_t b, int64_t i, int64_t h,
                                  int64_t batch_stride, int64_t row_stride, int64_t head_stride) {
  return (p.cu_seqlens_q ? 0 : b * batch_stride) + (r.q_start + i) * row_stride + h * head_stride;
}

// Element offset of key row (b, j, kv head hk) in k / v / dk / dv-like tensors.
EXAONE_HD int64_t attn_key_offset(const AttnParams& p, const SeqRange& r, int64_t b, int64_t j, int64_t hk,
                                  int64_t batch_stride, int64_t row_stride, int64_t head_stride) {
  return (p.cu_seqlens_k ? 0 : b * batch_stride) + (r.k_start + j) * row_stride + hk * head_stride;
}

// Offset of the LSE of q row (b, i, h): dense [batch, q_heads, seq_q], varlen [q_heads, total_q].
EXAONE_HD int64_t attn_lse_offset(const AttnParams& p, const SeqRange& r, int64_t b, int64_t i, int64_t h) {
  return (p.cu_seqlens_q ? 0 : b * p.lse_batch_stride) + h * p.lse_head_stride + r.q_start + i;
}

// Index of q row (b, i) among all q rows: b * seq_q + i (dense) or the packed row (varlen). Scratch
// buffers laid out [q_rows, q_heads(, head_dim)] are addressed with it.
EXAONE_HD int64_t attn_q_row(const AttnParams& p, const SeqRange& r, int64_t b, int64_t i) {
  return (p.cu_seqlens_q ? 0 : b * p.seq_q) + r.q_start + i;
}

// Exclusive end of the keys query i may see: the causal bound, or every key of the sequence.
EXAONE_HD int64_t attn_key_limit(bool causal, int64_t i, int64_t len_q, int64_t len_k) {
  return causal ? causal_key_end(i, len_q, len_k) : len_k;
}

// First query row that sees key j (len_q when none does).
EXAONE_HD int64_t attn_first_query(bool causal, int64_t j, int64_t len_q, int64_t len_k) {
  if (!causal) return 0;
  const int64_t i = j - (len_k - len_q);  // causal_key_end(i) > j  <=>  i >= j - len_k + len_q
  return i < 0 ? 0 : (i > len_q ? len_q : i);
}

}  // namespace exaone_ext
