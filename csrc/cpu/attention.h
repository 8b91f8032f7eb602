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
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/attention.h"
#include "cpu/isa.h"

namespace exaone_ext::cpu {

constexpr int64_t kAttnBlockK = 64;     // keys per tile
// keys per tile of the bfloat16 forward's O^T path (AttnParams::vt, an outside engine's products):
// larger tiles make fewer, larger products (the O^T accumulator is loaded and stored once per tile)
constexpr int64_t kAttnVtBlockK = 512;
// (query position, head) rows per tile; the O^T path too (128 or 256 rows there were no faster on a
// 2-core Xeon with AMX at head dim 128 and slower at 80)
constexpr int64_t kAttnBlockRows = 64;

// Query positions per tile: the group's heads times this fill about kAttnBlockRows rows.
inline int64_t attn_block_q(int64_t group) {
  return group >= kAttnBlockRows ? 1 : kAttnBlockRows / group;
}

inline int64_t attn_scratch_bytes(int64_t group, int64_t head_dim) {
  const int64_t rows = attn_block_q(group) * group;
  const int64_t mp = (rows + 15) / 16 * 16;
  const int64_t bk = kAttnBlockK;
  // backward needs the most: Qf, Qt, dOf, dOt, dQ and its tile (6 * mp * d), St, dPt (2 * bk * mp),
  // K, V, dK, dV tiles (4 * bk * d), three bf16 [bk, mp] tiles (< bk * mp) and per-row vectors, in
  // 8-byte elements (float64); the forward fits in the same space. 64 bytes of alignment per piece.
  const int64_t elems = 6 * mp * head_dim + 3 * bk * mp + 4 * bk * head_dim + 8 * mp;
  // the forward's O^T path: float Q^T, O^T, staging (3 mp d), K / V tiles (2 bk d), the scores and
  // the bf16 probability pairs of kAttnVtBlockK keys, per-row vectors; 4-byte elements
  const int64_t fwd_vt = (3 * mp * head_dim + 2 * bk * head_dim + 8 * mp) * 4 + kAttnVtBlockK * mp * 6 +
                         8 * mp;  // cend: 8 bytes a row
  return std::max(elems * 8, fwd_vt) + 64 * 32;
}

using exaone_ext::attn_head_dim_supported;  // the head dims the kernels accept: common/attention.h

// ---- decode on bfloat16 with AVX512-BF16 (cpu/attention_decode_avx512bf16.cpp) ----
// For forward calls with few query rows per kv head (seq_q * group <= 8: a decode step or a short
// chunked prefill): one work item is (sequence b, keys [k_begin, k_end)) over ALL kv heads, reading
// that stretch of K / V once and in order. Output like attn_fwd_block: with part_out == nullptr the
// final rows go to p.out / p.lse, otherwise float partials normalised by their own sum to
// part_out [batch, seq_q, q_heads, head_dim] and part_lse [batch, seq_q, q_heads] (rows with no
// visible key: zeros and -inf). Requires bfloat16, head_dim % 16 == 0, K / V rows of even stride.
constexpr int64_t kAttnDecodeBlockKeys = 32;

inline bool attn_decode_rows_ok(int64_t seq_q, int64_t group) { return seq_q * group <= 8; }

// Rows per head (seq_q * group) rounded up to 1, 2, 4 or 8.
inline int attn_decode_padded_rows(const AttnParams& p) {
  const int64_t r = p.seq_q * p.group();
  return r <= 1 ? 1 : r <= 2 ? 2 : r <= 4 ? 4 : 8;
}

inline int64_t attn_decode_scratch_bytes(const AttnParams& p) {
  const int64_t rp = attn_decode_padded_rows(p), rows = p.seq_q * p.group();
  const int64_t dq = (p.head_dim + 31) / 32 * 32;
  const int64_t bytes = p.kv_heads * rp * dq * 2 + p.kv_heads * rows * p.head_dim * 4 + p.kv_heads * 16 * 4 * 2 +
                        kAttnDecodeBlockKeys * rp * 4 + kAttnDecodeBlockKeys / 2 * rp * 4;
  return bytes + 64 * 7;
}

}  // namespace exaone_ext::cpu

namespace exaone_ext::cpu {

// Shared by the decode kernels. Row c of a kv head is (query position c / g, q head c % g of its
// group), c < R = seq_q * g. attn_decode_key_ends: each row sees keys [k_begin, cend[c]) of the item's
// range; returns the end of the keys any row sees.
inline int64_t attn_decode_key_ends(const AttnParams& p, const SeqRange& sr, int64_t k_begin, int64_t k_end,
                                    int32_t* cend) {
  const int64_t g = p.group(), R = p.seq_q * g;
  k_end = k_end < sr.len_k ? k_end : sr.len_k;
  int64_t kmax = k_begin;
  for (int64_t c = 0; c < R; ++c) {
    int64_t e = p.causal ? causal_key_end(c / g, sr.len_q, sr.len_k) : sr.len_k;
    e = e < k_end ? e : k_end;
    cend[c] = int32_t(e > k_begin ? e : k_begin);
    kmax = e > kmax ? e : kmax;
  }
  return kmax;
}

// Score vectors of `lanes` lanes hold keys kk + j (j = lane / RP) for rows r = lane % RP: the key of a
// lane is visible iff kk < lims[lane] (rows past R see none).
inline void attn_decode_lane_limits(const int32_t* cend, int64_t R, int RP, int lanes, int32_t* lims) {
  for (int lane = 0; lane < lanes; ++lane) {
    const int r = lane % RP, j = lane / RP;
    lims[lane] = r < R ? cend[r] - j : INT32_MIN;
  }
}

// The rows of kv head h from an item's float state: O (unnormalised, [R][d], element x at pos(x)),
// the rows' sums l[c] and maxima m[c]. Normalised rows and LSEs go to part_out / part_lse (a split's
// partial) or to p.out (through store(dst, x, value)) and p.lse. A row that saw no key (l == 0)
// gets zeros and -inf; a NaN sum (a NaN score) goes on into out and lse.
template <typename Pos, typename Store>
inline void attn_decode_write_rows(const AttnParams& p, int64_t b, const SeqRange& sr, int64_t h, const float* O,
                                   const float* l, const float* m, float* part_out, float* part_lse, Pos pos,
                                   Store store) {
  const int64_t g = p.group(), R = p.seq_q * g, d = p.head_dim;
  for (int64_t c = 0; c < R; ++c) {
    const int64_t i = c / g, head = h * g + c % g;
    const float lc = l[c], inv = lc == 0.f ? 0.f : 1.f / lc;
    const float lse = lc == 0.f ? -INFINITY : m[c] + std::log(lc);
    const float* o = O + c * d;
    if (part_out) {
      const int64_t row = (b * p.seq_q + i) * p.q_heads + head;
      float* dst = part_out + row * d;
      for (int64_t x = 0; x < d; ++x) dst[x] = o[pos(x)] * inv;
      part_lse[row] = lse;
    } else {
      const int64_t base = b * p.o_batch_stride + (sr.q_start + i) * p.o_row_stride + head * p.o_head_stride;
      for (int64_t x = 0; x < d; ++x) store(base + x, o[pos(x)] * inv);
      if (p.lse) p.lse[b * p.lse_batch_stride + head * p.lse_head_stride + sr.q_start + i] = lse;
    }
  }
}

}  // namespace exaone_ext::cpu

namespace exaone_ext::cpu::avx512bf16 {
// Built when EXAONE_HAVE_AVX512BF16 is defined; call only when cpu_has("avx512bf16").
void attn_decode(const AttnParams& p, int64_t b, int64_t k_begin, int64_t k_end, float* part_out, float* part_lse,
                 void* scratch);
}  // namespace exaone_ext::cpu::avx512bf16

// ---- decode on AVX2 + FMA (cpu/attention_decode_avx2.cpp) ----
// The same work items and outputs as the AVX512-BF16 decode kernel above, for float32, bfloat16 and
// float16 caches, in float32 arithmetic throughout. Requires seq_q * group <= 8 and head_dim % 16 == 0;
// any strides (rows of the last dim contiguous).
namespace exaone_ext::cpu {
inline bool attn_decode_avx2_ok(const AttnParams& p) {
  return attn_decode_rows_ok(p.seq_q, p.group()) && p.head_dim % 16 == 0 && p.head_dim <= 256 &&
         (p.dtype == DType::kFloat32 || p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16);
}

// Keys per block: small enough that one head's K and V rows of a block stay in L1 while P . V makes
// its passes over them, whatever the row stride (rows 4 KiB apart all fall in the same L1 sets).
constexpr int64_t kAttnDecodeAvx2BlockKeys = 8;

inline int64_t attn_decode_avx2_scratch_bytes(const AttnParams& p) {
  const int64_t rp = attn_decode_padded_rows(p), rows = p.seq_q * p.group();
  const int64_t floats = p.kv_heads * rp * p.head_dim + p.kv_heads * rows * p.head_dim + p.kv_heads * 8 * 2 +
                         kAttnDecodeAvx2BlockKeys * rp;
  return floats * 4 + 64 * 6;
}
}  // namespace exaone_ext::cpu

namespace exaone_ext::cpu::avx2 {
// Built when EXAONE_HAVE_AVX2 is defined; call only on an AVX2 + FMA + F16C CPU with attn_decode_avx2_ok(p).
void attn_decode(const AttnParams& p, int64_t b, int64_t k_begin, int64_t k_end, float* part_out, float* part_lse,
                 void* scratch);
}  // namespace exaone_ext::cpu::avx2

EXAONE_DECLARE_ISA_KERNEL(void, attn_fwd_block,
                          (const exaone_ext::AttnParams& p, int64_t b, int64_t kv_head, int64_t q_begin,
                           int64_t q_end, int64_t k_begin, int64_t k_end, float* part_out, float* part_lse,
                           void* scratch))
EXAONE_DECLARE_ISA_KERNEL(void, attn_bwd_rows,
                          (const exaone_ext::AttnBwdParams& p, void* dk_acc, void* dv_acc, int64_t b,
                           int64_t kv_head, int64_t qb_first, int64_t qb_step, void* scratch))
