// Attention on CUDA cores for the cases the tensor-core kernels do not take (float32, head dim 256,
// other multiples of 8): one warp per query row (forward, dq) or per key row (dk / dv), the head
// dim spread over the lanes (lane holds d = lane + 32 t, t < kPer), dot products reduced across the
// warp, softmax statistics in float32 with the shared OnlineSoftmax. Simple rather than fast.
// For float32 inputs the sums over keys / queries (outputs and gradients) and the dot products are
// accumulated in float64: a float32 running sum over ~1000 terms loses several bits, more than a
// float32 matrix multiply (which sums in blocks) does.
#pragma once
#include <cuda_runtime.h>

#include <type_traits>

#include "common/attention.h"
#include "common/attention_layout.h"
#include "cuda/attention/flash_attn.h"
#include "cuda/attention/mma.cuh"
#include "cuda/cuda_utils.cuh"

namespace exaone_ext::cuda::attn {

constexpr int kSimtWarps = 4;  // warps per block

// Accumulator type: float64 for float32 inputs, float32 for bf16 / fp16.
template <typename T>
using SimtAcc = std::conditional_t<std::is_same_v<T, float>, double, float>;

template <typename T, int kPer>
__device__ __forceinline__ void load_row(const T* src, int64_t D, int lane, float (&x)[kPer]) {
#pragma unroll
  for (int t = 0; t < kPer; ++t) {
    const int64_t d = lane + 32 * t;
    x[t] = d < D ? ld(src + d) : 0.f;
  }
}

template <typename T, int kPer>
__device__ __forceinline__ float dot_row(const float (&x)[kPer], const T* src, int64_t D, int lane) {
  SimtAcc<T> acc = 0;
#pragma unroll
  for (int t = 0; t < kPer; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < D) acc += SimtAcc<T>(x[t]) * SimtAcc<T>(ld(src + d));
  }
  return float(warp_sum(acc));
}

// Forward: grid (ceil(seq_q / 4), q_heads, batch * num_splits); warp w of a block is query row
// blockIdx.x * 4 + w.
template <typename T, int kPer>
__global__ void __launch_bounds__(32 * kSimtWarps) fwd_simt_kernel(const AttnParams p, const FwdSplit sp) {
  const int lane = threadIdx.x % 32;
  const int64_t i = int64_t(blockIdx.x) * kSimtWarps + threadIdx.x / 32;
  const int64_t h = blockIdx.y, hk = h / attn_group(p);
  const int64_t b = blockIdx.z / sp.num_splits, split = blockIdx.z % sp.num_splits;
  const SeqRange r = seq_range(p, b);
  if (i >= r.len_q) return;
  const int64_t D = p.head_dim;
  int64_t j_begin = 0, j_end = attn_key_limit(p.causal, i, r.len_q, r.len_k);
  if (sp.num_splits > 1) {
    j_begin = split * sp.keys_per_split;
    if (j_end > j_begin + sp.keys_per_split) j_end = j_begin + sp.keys_per_split;
  }
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  float qv[kPer];
  SimtAcc<T> o[kPer];
  load_row<T, kPer>(static_cast<const T*>(p.q) + attn_row_offset(p, r, b, i, h, p.q_batch_stride, p.q_row_stride,
                                                                 p.q_head_stride),
                    D, lane, qv);
#pragma unroll
  for (int t = 0; t < kPer; ++t) o[t] = 0.f;
  OnlineSoftmax sm;
  for (int64_t j = j_begin; j < j_end; ++j) {
    const float s = dot_row<T, kPer>(qv, k + attn_key_offset(p, r, b, j, hk, p.k_batch_stride, p.k_row_stride,
                                                             p.k_head_stride), D, lane) * p.scale;
    const float alpha = sm.update_max(s);
    const float e = expf(s - sm.m);
    sm.l += e;
    const T* vj = v + attn_key_offset(p, r, b, j, hk, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
#pragma unroll
    for (int t = 0; t < kPer; ++t) {
      const int64_t d = lane + 32 * t;
      o[t] = o[t] * alpha + (d < D ? SimtAcc<T>(e) * SimtAcc<T>(ld(vj + d)) : SimtAcc<T>(0));
    }
  }
  const float inv = sm.inv_l(), lse = sm.lse();
  if (sp.num_splits > 1) {
    const int64_t row = ((split * p.batch + b) * p.q_heads + h) * p.seq_q + i;
#pragma unroll
    for (int t = 0; t < kPer; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < D) sp.out_partial[row * D + d] = float(o[t] * inv);
    }
    if (lane == 0) sp.lse_partial[row] = lse;
  } else {
    T* out = static_cast<T*>(p.out) + attn_row_offset(p, r, b, i, h, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
#pragma unroll
    for (int t = 0; t < kPer; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < D) st(out + d, float(o[t] * inv));
    }
    if (lane == 0 && p.lse) p.lse[attn_lse_offset(p, r, b, i, h)] = lse;
  }
}

// Backward, dq: grid (ceil(seq_q / 4), q_heads, batch); one warp per query row, looping over the
// keys it sees. Writes dq (every row, zeros where no key is visible).
template <typename T, int kPer>
__global__ void __launch_bounds__(32 * kSimtWarps) bwd_dq_simt_kernel(const AttnBwdParams bp, const BwdScratch sc) {
  const AttnParams& p = bp.fwd;
  const int lane = threadIdx.x % 32;
  const int64_t i = int64_t(blockIdx.x) * kSimtWarps + threadIdx.x / 32;
  const int64_t h = blockIdx.y, hk = h / attn_group(p), b = blockIdx.z;
  const SeqRange r = seq_range(p, b);
  if (i >= r.len_q) return;
  const int64_t D = p.head_dim;
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  float qv[kPer], dov[kPer];
  SimtAcc<T> dq[kPer];
  load_row<T, kPer>(static_cast<const T*>(p.q) + attn_row_offset(p, r, b, i, h, p.q_batch_stride, p.q_row_stride,
                                                                 p.q_head_stride), D, lane, qv);
  load_row<T, kPer>(static_cast<const T*>(bp.dout) + attn_row_offset(p, r, b, i, h, bp.do_batch_stride,
                                                                     bp.do_row_stride, bp.do_head_stride), D, lane, dov);
#pragma unroll
  for (int t = 0; t < kPer; ++t) dq[t] = 0.f;
  const float lse = p.lse[attn_lse_offset(p, r, b, i, h)];
  const float dsum = sc.dsum[attn_q_row(p, r, b, i) * p.q_heads + h];
  const int64_t j_end = attn_key_limit(p.causal, i, r.len_q, r.len_k);
  for (int64_t j = 0; j < j_end; ++j) {
    const T* kj = k + attn_key_offset(p, r, b, j, hk, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
    const T* vj = v + attn_key_offset(p, r, b, j, hk, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
    const float s = dot_row<T, kPer>(qv, kj, D, lane) * p.scale;
    const float pr = expf(s - lse);
    const float dp = dot_row<T, kPer>(dov, vj, D, lane);
    const float ds = pr * (dp - dsum);
#pragma unroll
    for (int t = 0; t < kPer; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < D) dq[t] += SimtAcc<T>(ds) * SimtAcc<T>(ld(kj + d));
    }
  }
  T* dst = static_cast<T*>(bp.dq) + attn_row_offset(p, r, b, i, h, bp.dq_batch_stride, bp.dq_row_stride,
                                                    bp.dq_head_stride);
#pragma unroll
  for (int t = 0; t < kPer; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < D) st(dst + d, float(dq[t] * p.scale));
  }
}

// Backward, dk / dv: grid (ceil(seq_k / 4), kv_heads, batch); one warp per key row, looping over
// the group's query heads and the query rows that see the key.
template <typename T, int kPer>
__global__ void __launch_bounds__(32 * kSimtWarps) bwd_dkdv_simt_kernel(const AttnBwdParams bp, const BwdScratch sc) {
  const AttnParams& p = bp.fwd;
  const int lane = threadIdx.x % 32;
  const int64_t j = int64_t(blockIdx.x) * kSimtWarps + threadIdx.x / 32;
  const int64_t hk = blockIdx.y, b = blockIdx.z, g = attn_group(p);
  const SeqRange r = seq_range(p, b);
  if (j >= r.len_k) return;
  const int64_t D = p.head_dim;
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(bp.dout);
  float kv[kPer], vv[kPer];
  SimtAcc<T> dk[kPer], dv[kPer];
  load_row<T, kPer>(static_cast<const T*>(p.k) + attn_key_offset(p, r, b, j, hk, p.k_batch_stride, p.k_row_stride,
                                                                 p.k_head_stride), D, lane, kv);
  load_row<T, kPer>(static_cast<const T*>(p.v) + attn_key_offset(p, r, b, j, hk, p.v_batch_stride, p.v_row_stride,
                                                                 p.v_head_stride), D, lane, vv);
#pragma unroll
  for (int t = 0; t < kPer; ++t) dk[t] = dv[t] = 0.f;
  const int64_t i_begin = attn_first_query(p.causal, j, r.len_q, r.len_k);
  for (int64_t h = hk * g; h < (hk + 1) * g; ++h) {
    for (int64_t i = i_begin; i < r.len_q; ++i) {
      if (j >= attn_key_limit(p.causal, i, r.len_q, r.len_k)) continue;
      const T* qi = q + attn_row_offset(p, r, b, i, h, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
      const T* doi = dout + attn_row_offset(p, r, b, i, h, bp.do_batch_stride, bp.do_row_stride, bp.do_head_stride);
      const float s = dot_row<T, kPer>(kv, qi, D, lane) * p.scale;
      const float pr = expf(s - p.lse[attn_lse_offset(p, r, b, i, h)]);
      const float dp = dot_row<T, kPer>(vv, doi, D, lane);
      const float ds = pr * (dp - sc.dsum[attn_q_row(p, r, b, i) * p.q_heads + h]);
#pragma unroll
      for (int t = 0; t < kPer; ++t) {
        const int64_t d = lane + 32 * t;
        if (d < D) {
          dv[t] += SimtAcc<T>(pr) * SimtAcc<T>(ld(doi + d));
          dk[t] += SimtAcc<T>(ds) * SimtAcc<T>(ld(qi + d));
        }
      }
    }
  }
  T* dkp = static_cast<T*>(bp.dk) + attn_key_offset(p, r, b, j, hk, bp.dk_batch_stride, bp.dk_row_stride,
                                                    bp.dk_head_stride);
  T* dvp = static_cast<T*>(bp.dv) + attn_key_offset(p, r, b, j, hk, bp.dv_batch_stride, bp.dv_row_stride,
                                                    bp.dv_head_stride);
#pragma unroll
  for (int t = 0; t < kPer; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < D) {
      st(dkp + d, float(dk[t] * p.scale));
      st(dvp + d, float(dv[t]));
    }
  }
}

inline void check_grid(int64_t x, int64_t y, int64_t z) {
  if (x > 0x7fffffff || y > 65535 || z > 65535)
    throw std::invalid_argument("exaone_ext: attention grid too large for one launch");
}

template <typename T, int kPer>
void launch_fwd_simt(const AttnParams& p, const FwdSplit& sp, cudaStream_t stream) {
  const int64_t bx = (p.seq_q + kSimtWarps - 1) / kSimtWarps;
  check_grid(bx, p.q_heads, p.batch * sp.num_splits);
  fwd_simt_kernel<T, kPer><<<dim3(unsigned(bx), unsigned(p.q_heads), unsigned(p.batch * sp.num_splits)),
                             32 * kSimtWarps, 0, stream>>>(p, sp);
  check_launch("flash_attn forward (CUDA cores)");
}

template <typename T, int kPer>
void launch_bwd_simt(const AttnBwdParams& bp, const BwdScratch& sc, cudaStream_t stream) {
  const AttnParams& p = bp.fwd;
  const int64_t bq = (p.seq_q + kSimtWarps - 1) / kSimtWarps, bk = (p.seq_k + kSimtWarps - 1) / kSimtWarps;
  check_grid(bq, p.q_heads, p.batch);
  check_grid(bk, p.kv_heads, p.batch);
  if (bq > 0)
    bwd_dq_simt_kernel<T, kPer><<<dim3(unsigned(bq), unsigned(p.q_heads), unsigned(p.batch)), 32 * kSimtWarps, 0,
                                  stream>>>(bp, sc);
  if (bk > 0)
    bwd_dkdv_simt_kernel<T, kPer><<<dim3(unsigned(bk), unsigned(p.kv_heads), unsigned(p.batch)), 32 * kSimtWarps, 0,
                                    stream>>>(bp, sc);
  check_launch("flash_attn backward (CUDA cores)");
}

}  // namespace exaone_ext::cuda::attn
