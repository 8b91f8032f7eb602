// Grouped-query flash attention on the CPU: forward (dense, varlen, kv-cache, split-KV partials)
// and backward, as tiled online softmax. Torch-free; the torch layer (csrc/torch/ops_attention.cpp)
// validates the arguments, fills AttnParams and spreads the work items over threads.
//
// Work items
//   forward:  (sequence b, kv head, query positions [q_begin, q_end), keys [k_begin, k_end)).
//             All q heads of the group are processed together against each key tile, so a K/V
//             tile is read once per group. With part_out == nullptr the normalised output and the
//             LSE go to p.out / p.lse; otherwise the tile is one split of a split-KV pass and writes
//             float partials (normalised by its own sum) part_out [batch, seq_q, q_heads, head_dim]
//             and part_lse [batch, seq_q, q_heads] (dense / kv-cache layouts only).
//   backward: (sequence b, kv head, query blocks qb_first, qb_first + qb_step, ...) of
//             attn_block_q(group) positions. The item owns dq of its query rows (written to bp.dq,
//             scaled) and adds its share of dK / dV (unscaled dK: the caller multiplies by the
//             softmax scale) into dk_acc / dv_acc, accumulators of the accumulation type (float;
//             double for float64) holding the rows of this kv head: [rows_k, head_dim] with
//             rows_k = batch * seq_k (dense) or total_k (varlen). Items that add into the same
//             accumulators must not run concurrently: the torch layer gives each concurrent split its
//             own accumulators and sums them in a fixed order (deterministic, no atomics).
//             D = rowsum(dout * out) is formed per query block from p.out and bp.dout.
//
// Scratch: each call needs attn_scratch_bytes(group, head_dim) bytes, 64-byte aligned, private
// to the calling thread.
#pragma once
#include <cstdint>

#include "common/attention.h"
#include "cpu/isa.h"

namespace exaone_ext::cpu {

constexpr int64_t kAttnBlockK = 64;     // keys per tile
constexpr int64_t kAttnBlockRows = 64;  // (query position, head) rows per tile

// Query positions per tile: the group's heads times this fill about kAttnBlockRows rows.
inline int64_t attn_block_q(int64_t group) {
  return group >= kAttnBlockRows ? 1 : kAttnBlockRows / group;
}

inline int64_t attn_scratch_bytes(int64_t group, int64_t head_dim) {
  const int64_t rows = attn_block_q(group) * group;
  const int64_t mp = (rows + 15) / 16 * 16;
  const int64_t bk = kAttnBlockK;
  // backward needs the most: Qf, Qt, dOf, dOt, dQ and its tile (6 * mp * d), St, dPt (2 * bk * mp),
  // K, V, dK, dV tiles (4 * bk * d) and per-row vectors; the forward fits in the same space.
  const int64_t elems = 6 * mp * head_dim + 2 * bk * mp + 4 * bk * head_dim + 8 * mp + 16 * 16;
  return elems * 8 + 64 * 16;
}

// Which head dims the kernels accept (a multiple of 16 keeps every vector full).
inline bool attn_head_dim_supported(int64_t d) { return d == 64 || d == 80 || d == 96 || d == 128 || d == 256; }

}  // namespace exaone_ext::cpu

EXAONE_DECLARE_ISA_KERNEL(void, attn_fwd_block,
                          (const exaone_ext::AttnParams& p, int64_t b, int64_t kv_head, int64_t q_begin,
                           int64_t q_end, int64_t k_begin, int64_t k_end, float* part_out, float* part_lse,
                           void* scratch))
EXAONE_DECLARE_ISA_KERNEL(void, attn_bwd_rows,
                          (const exaone_ext::AttnBwdParams& p, void* dk_acc, void* dv_acc, int64_t b,
                           int64_t kv_head, int64_t qb_first, int64_t qb_step, void* scratch))
