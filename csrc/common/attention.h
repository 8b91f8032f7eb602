// Parameters and math shared by the CPU and CUDA attention kernels (no torch, no CUDA runtime).
//
// Layouts (strides in elements, so any view whose last dim is contiguous works without a copy):
//   dense:   q [batch, seq_q, q_heads, head_dim], k/v [batch, seq_k, kv_heads, head_dim]
//   varlen:  q [total_q, q_heads, head_dim], k/v [total_k, kv_heads, head_dim], with int32
//            cu_seqlens_q / cu_seqlens_k [batch + 1]; sequence b owns rows cu[b] .. cu[b+1]-1
//            (batch strides are then unused and the row offsets come from cu_seqlens)
//   kv-cache decode: k/v are the caches [batch, max_seq, kv_heads, head_dim]; the valid length
//            of sequence b is cache_seqlens[b] (after any new tokens have been appended)
//   lse:     float32; dense [batch, q_heads, seq_q], varlen [q_heads, total_q]
//
// Grouping: kv head j serves q heads j*g .. (j+1)*g-1, g = q_heads / kv_heads.
// Causal mask, bottom-right aligned: query i of a sequence with (len_q, len_k) sees keys
// 0 .. i + len_k - len_q. A query that sees no key outputs zeros and has lse = -inf.
#pragma once
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/dtypes.h"

namespace exaone_ext {

// The head dims the attention kernels are built for (a multiple of 16 keeps every CPU vector
// full): the one rule, used by the CPU and CUDA kernels and the argument checks, whose message
// quotes kAttnHeadDimsText, and read by Python through build_info()["attention_head_dims"].
inline constexpr int64_t kAttnHeadDims[] = {64, 80, 96, 128, 256};
inline constexpr const char kAttnHeadDimsText[] = "64, 80, 96, 128, 256";

// The CUDA forward's 128-row switch (cuda/attention/flash_attn.h): -1 automatic, 0 never, 1 always.
inline int checked_wide_rows_mode(int mode) {
  if (mode < -1 || mode > 1)
    throw std::invalid_argument("exaone_ext: wide-row mode must be -1 (automatic), 0 (never) or 1 (always), got " +
                                std::to_string(mode));
  return mode;
}

inline bool attn_head_dim_supported(int64_t d) {
  for (int64_t h : kAttnHeadDims)
    if (d == h) return true;
  return false;
}

struct AttnParams {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, seq_q = 0, seq_k = 0;  // dense sizes; for varlen seq_* are the max lengths
  int64_t q_heads = 0, kv_heads = 0, head_dim = 0;
  bool causal = true;
  float scale = 1.f;  // softmax scale (default 1/sqrt(head_dim))
  double scale_f64 = 1.0;  // the same, not rounded to float: float64 kernels (CPU) use it

  const void* q = nullptr; const void* k = nullptr; const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // may be null when not needed
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;  // lse row stride is 1

  const int32_t* cu_seqlens_q = nullptr;   // varlen
  const int32_t* cu_seqlens_k = nullptr;   // varlen
  const int32_t* cache_seqlens = nullptr;  // kv-cache decode: valid keys per sequence

  // CPU, bfloat16 on AVX512-BF16: an outside engine for the tile products, handed in by the torch
  // layer (oneDNN's brgemm micro-kernels: AMX tiles where the CPU has them); null: the kernels' own
  // vdpbf16ps products. C[M][N] (+= when add) A . B: A [M][K] row-major (lda elements), B in pairs
  // along K ([K / 2][ldb][2]), K even, C row-major (ldc floats).
  void (*bf16_gemm)(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                    const uint16_t* A, const uint16_t* B, float* C) = nullptr;

  // CPU, with bf16_gemm: v transposed per kv head, [.., kv_heads, head_dim, keys] with keys
  // contiguous (rows vt_dim_stride apart; varlen: the packed key rows as columns), made by the torch
  // layer for the wide forward blocks, so that O^T += V^T . P^T reads V^T in place as the product's
  // A and the probabilities in the pairs they are formed in (no per-block packing or transposing).
  // Null: the forward packs V per block.
  const void* vt = nullptr;
  int64_t vt_batch_stride = 0, vt_head_stride = 0, vt_dim_stride = 0;

  int64_t group() const { return q_heads / kv_heads; }
};

// Gradients of the attention (same layouts as the forward; dq like q, dk/dv like k/v).
struct AttnBwdParams {
  AttnParams fwd;  // q, k, v, out, lse of the forward
  const void* dout = nullptr;
  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  void* dq = nullptr; void* dk = nullptr; void* dv = nullptr;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;
};

// Row offsets and lengths of sequence b for the q and k sides.
struct SeqRange { int64_t q_start, len_q, k_start, len_k; };

EXAONE_HD SeqRange seq_range(const AttnParams& p, int64_t b) {
  SeqRange r;
  if (p.cu_seqlens_q) {
    r.q_start = p.cu_seqlens_q[b];
    r.len_q = p.cu_seqlens_q[b + 1] - r.q_start;
    r.k_start = p.cu_seqlens_k[b];
    r.len_k = p.cu_seqlens_k[b + 1] - r.k_start;
  } else {
    r.q_start = 0; r.len_q = p.seq_q; r.k_start = 0; r.len_k = p.seq_k;
    if (p.cache_seqlens) {  // clamped: on CUDA the lengths may reach the kernels unchecked
      const int64_t l = p.cache_seqlens[b];
      r.len_k = l < 0 ? 0 : (l > p.seq_k ? p.seq_k : l);
    }
  }
  return r;
}

// Last key index (exclusive bound) visible to query i under the bottom-right causal mask.
EXAONE_HD int64_t causal_key_end(int64_t i, int64_t len_q, int64_t len_k) {
  const int64_t end = i + len_k - len_q + 1;
  return end < 0 ? 0 : (end > len_k ? len_k : end);
}

// Online softmax: running max m and running sum l of exp(s - m) for one query row.
// After a block with maximum m_blk, the previous sum and output are rescaled by exp(m - m_new).
struct OnlineSoftmax {
  float m = -INFINITY;
  float l = 0.f;
  // Returns the factor to rescale the previous accumulator by; sets m to the new max.
  EXAONE_HD float update_max(float block_max) {
    const float m_new = block_max > m ? block_max : m;
    const float alpha = (m == -INFINITY) ? 0.f : expf(m - m_new);
    m = m_new;
    l *= alpha;
    return alpha;
  }
  // l == 0: the row saw no key. A NaN score leaves l NaN, and NaN must come out (never "no key").
  EXAONE_HD float lse() const { return l == 0.f ? -INFINITY : m + logf(l); }
  EXAONE_HD float inv_l() const { return l == 0.f ? 0.f : 1.f / l; }
};

// Combine of split-KV partial results (flash-decoding), the one rule of the CPU and CUDA kernels:
// split s of a query row has (lse_s, out_s) with out_s already normalised by its own sum; the row is
// out = sum_s weight(lse_s) * out_s with weight(lse_s) = exp(lse_s - lse), lse = log sum_s exp(lse_s).
// A row no split saw a key for is zero with lse -inf; a NaN partial LSE (a NaN score in that split)
// makes the row NaN, as attention over all the keys would be, instead of being dropped as empty.
struct SplitLse {
  float max = -INFINITY;
  float sum = 0.f;
  bool nan = false;
  // Reads the n partial LSEs lse[0], lse[stride], ... of one row.
  EXAONE_HD static SplitLse of(const float* lse, int n, int64_t stride) {
    SplitLse c;
    for (int s = 0; s < n; ++s) {
      const float x = lse[s * stride];
      c.nan |= x != x;
      c.max = x > c.max ? x : c.max;  // a NaN never wins: it is counted above
    }
    if (!c.nan && c.max != -INFINITY)
      for (int s = 0; s < n; ++s) c.sum += expf(lse[s * stride] - c.max);
    return c;
  }
  // Whether any split contributes (otherwise every output element is init()).
  EXAONE_HD bool any() const { return !nan && sum > 0.f; }
  // The value every output element starts from: 0, or NaN for a NaN row.
  EXAONE_HD float init() const { return nan ? NAN : 0.f; }
  // The weight of a split (only when any()); even 0 is applied, so 0 * NaN keeps a NaN value visible.
  EXAONE_HD float weight(float lse_s) const { return expf(lse_s - max) / sum; }
  EXAONE_HD float lse() const { return nan ? NAN : (sum > 0.f ? max + logf(sum) : -INFINITY); }
};

}  // namespace exaone_ext
