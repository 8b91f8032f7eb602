// Backward attention on tensor cores (FlashAttention-2 scheme), bfloat16 / float16, head dim D.
//
// Block = (64 keys, kv head hk, sequence b); 4 warps, 16 keys each. The block keeps its K and V
// tiles in shared memory and dK, dV in registers, and walks the packed q rows (all g query heads
// of the group, common/attention_layout.h) that see any of its keys, 64 at a time:
//   S^T = K Q^T,  P^T = exp(S^T * scale - lse),  dV += P^T dO,  dP^T = V dO^T,
//   dS^T = P^T * (dP^T - D),  dK += dS^T Q,  dQ += dS K  (float32 atomics into dq_accum)
// with D = rowsum(dout * out) from the preprocess kernel. dS^T goes through shared memory for dQ,
// whose rows are split over the warps. dK, dV are written directly (no atomics: the block owns its
// keys for every query head of the group), scaled by softmax_scale for dK.
#pragma once
#include <cuda_runtime.h>

#include "common/attention.h"
#include "common/attention_layout.h"
#include "cuda/attention/flash_attn.h"
#include "cuda/attention/fwd_mma.cuh"
#include "cuda/attention/mma.cuh"
#include "cuda/cuda_utils.cuh"

namespace exaone_ext::cuda::attn {

constexpr int kBwdKeys = 64;  // keys per block
constexpr int kBwdRows = 64;  // packed q rows per step
constexpr int kBwdThreads = 128;

template <int D>
struct BwdSmem {
  static constexpr int kStride = D + 8;
  static constexpr int kDsStride = kBwdRows + 8;
  static constexpr size_t kTileBytes = size_t(2 * kBwdKeys + 2 * kBwdRows) * kStride * sizeof(uint16_t);  // K V Q dO
  static constexpr size_t kBytes = kTileBytes + size_t(kBwdKeys) * kDsStride * sizeof(uint16_t)          // dS^T
                                   + 2 * kBwdRows * sizeof(float) + kBwdRows * sizeof(int);  // lse, D, limit
};

// acc (this warp's 16 rows of sA x kBwdRows rows of sB) = sA . sB^T over the head dim D: both
// S^T = K Q^T and dP^T = V dO^T. sA, sB are [rows][SD] tiles in shared memory.
template <typename T, int D, int SD>
__device__ __forceinline__ void warp_rows_times_tile_t(float (&acc)[kBwdRows / 8][4], const uint16_t* sA,
                                                       const uint16_t* sB, int warp, int gid, int tig, int mi,
                                                       int mr) {
#pragma unroll
  for (int nt = 0; nt < kBwdRows / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint16_t* a0 = sA + (warp * 16 + gid) * SD + kk * 16 + tig * 2;
    const uint32_t a[4] = {lds_pair(a0), lds_pair(a0 + 8 * SD), lds_pair(a0 + 8), lds_pair(a0 + 8 * SD + 8)};
#pragma unroll
    for (int nt = 0; nt < kBwdRows / 8; nt += 2) {  // B = sB^T for row tiles nt, nt + 1
      uint32_t bb[4];
      ldmatrix_x4(bb, sB + ((nt + (mi >> 1)) * 8 + mr) * SD + kk * 16 + (mi & 1) * 8);
      mma_16816<T>(acc[nt], a, bb[0], bb[1]);
      mma_16816<T>(acc[nt + 1], a, bb[2], bb[3]);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kBwdThreads) bwd_mma_kernel(const AttnBwdParams bp, const BwdScratch sc,
                                                              const bool aligned) {
  static_assert(D % 16 == 0, "head dim must be a multiple of 16 on tensor cores");
  constexpr int SD = BwdSmem<D>::kStride;
  constexpr int SS = BwdSmem<D>::kDsStride;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sK = smem;
  uint16_t* sV = sK + kBwdKeys * SD;
  uint16_t* sQ = sV + kBwdKeys * SD;
  uint16_t* sdO = sQ + kBwdRows * SD;
  uint16_t* sdS = sdO + kBwdRows * SD;  // dS^T [keys][rows]
  // each row's key limit (32 bits: a sequence's keys are far fewer than 2^31)
  int* sLimit = reinterpret_cast<int*>(sdS + kBwdKeys * SS);  // 4-byte aligned: offsets are multiples of 16 B
  float* sLse = reinterpret_cast<float*>(sLimit + kBwdRows);
  float* sDsum = sLse + kBwdRows;

  const AttnParams& p = bp.fwd;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gid = lane / 4, tig = lane % 4;
  const int mi = lane / 8, mr = lane % 8;  // ldmatrix: this lane addresses row mr of matrix mi
  const int64_t n0 = int64_t(blockIdx.x) * kBwdKeys;
  const int64_t hk = blockIdx.y, b = blockIdx.z, g = attn_group(p);
  const SeqRange r = seq_range(p, b);
  if (n0 >= r.len_k) return;  // uniform over the block

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(bp.dout);
  const float scale_log2 = p.scale * kLog2e;

  // Packed rows that can see a key of this block: from the first query that sees key n0.
  const int64_t rows_total = r.len_q * g;
  const int64_t m_begin = attn_first_query(p.causal, n0, r.len_q, r.len_k) * g / kBwdRows * kBwdRows;

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
    for (int c = 0; c < 4; ++c) dk[dt][c] = dv[dt][c] = 0.f;

  if (m_begin < rows_total) {
    load_tile<D, SD, kBwdThreads>(sK, kBwdKeys, aligned, [&](int row) -> const void* {
      const int64_t j = n0 + row;
      return j < r.len_k ? k + attn_key_offset(p, r, b, j, hk, p.k_batch_stride, p.k_row_stride, p.k_head_stride)
                         : nullptr;
    }, k);
    load_tile<D, SD, kBwdThreads>(sV, kBwdKeys, aligned, [&](int row) -> const void* {
      const int64_t j = n0 + row;
      return j < r.len_k ? v + attn_key_offset(p, r, b, j, hk, p.v_batch_stride, p.v_row_stride, p.v_head_stride)
                         : nullptr;
    }, v);
    cp_async_commit();
  }

  for (int64_t m0 = m_begin; m0 < rows_total; m0 += kBwdRows) {
    __syncthreads();  // the previous step is done with sQ, sdO, sdS and the row vectors
    load_tile<D, SD, kBwdThreads>(sQ, kBwdRows, aligned, [&](int row) -> const void* {
      const int64_t pr = m0 + row, i = pr / g;
      return i < r.len_q ? q + attn_row_offset(p, r, b, i, hk * g + pr % g, p.q_batch_stride, p.q_row_stride,
                                               p.q_head_stride)
                         : nullptr;
    }, q);
    load_tile<D, SD, kBwdThreads>(sdO, kBwdRows, aligned, [&](int row) -> const void* {
      const int64_t pr = m0 + row, i = pr / g;
      return i < r.len_q ? dout + attn_row_offset(p, r, b, i, hk * g + pr % g, bp.do_batch_stride, bp.do_row_stride,
                                                  bp.do_head_stride)
                         : nullptr;
    }, dout);
    cp_async_commit();
    if (tid < kBwdRows) {
      const int64_t pr = m0 + tid, i = pr / g, h = hk * g + pr % g;
      const bool valid = i < r.len_q;
      sLimit[tid] = valid ? int(attn_key_limit(p.causal, i, r.len_q, r.len_k)) : 0;  // 0: sees nothing
      sLse[tid] = valid ? p.lse[attn_lse_offset(p, r, b, i, h)] : 0.f;
      sDsum[tid] = valid ? sc.dsum[attn_q_row(p, r, b, i) * p.q_heads + h] : 0.f;
    }
    cp_async_wait<0>();
    __syncthreads();

    // S^T (this warp's 16 keys x 64 rows).
    float st[kBwdRows / 8][4];
    warp_rows_times_tile_t<T, D, SD>(st, sK, sQ, warp, gid, tig, mi, mr);
    // P^T, masked where the row does not see the key (or does not exist).
#pragma unroll
    for (int nt = 0; nt < kBwdRows / 8; ++nt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int row = nt * 8 + tig * 2 + (c & 1);
        const int j = int(n0) + warp * 16 + gid + 8 * (c >> 1);
        st[nt][c] = j < sLimit[row] ? fast_exp2(fmaf(st[nt][c], scale_log2, -sLse[row] * kLog2e)) : 0.f;
      }
    }
    // dV += P^T dO.
#pragma unroll
    for (int kt = 0; kt < kBwdRows / 16; ++kt) {
      const uint32_t a[4] = {pack2<T>(st[2 * kt][0], st[2 * kt][1]), pack2<T>(st[2 * kt][2], st[2 * kt][3]),
                             pack2<T>(st[2 * kt + 1][0], st[2 * kt + 1][1]),
                             pack2<T>(st[2 * kt + 1][2], st[2 * kt + 1][3])};
#pragma unroll
      for (int dt = 0; dt < D / 8; dt += 2) {  // B = dO (rows x d), transposed on load, d tiles dt, dt + 1
        uint32_t ob[4];
        ldmatrix_x4_trans(ob, sdO + (kt * 16 + (mi & 1) * 8 + mr) * SD + (dt + (mi >> 1)) * 8);
        mma_16816<T>(dv[dt], a, ob[0], ob[1]);
        mma_16816<T>(dv[dt + 1], a, ob[2], ob[3]);
      }
    }
    // dP^T = V dO^T.
    float dpt[kBwdRows / 8][4];
    warp_rows_times_tile_t<T, D, SD>(dpt, sV, sdO, warp, gid, tig, mi, mr);
    // dS^T = P^T (dP^T - D), kept in st; also to shared memory for dQ.
#pragma unroll
    for (int nt = 0; nt < kBwdRows / 8; ++nt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) st[nt][c] = st[nt][c] * (dpt[nt][c] - sDsum[nt * 8 + tig * 2 + (c & 1)]);
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        uint16_t* dst = sdS + (warp * 16 + gid + 8 * h2) * SS + nt * 8 + tig * 2;
        *reinterpret_cast<uint32_t*>(dst) = pack2<T>(st[nt][2 * h2], st[nt][2 * h2 + 1]);
      }
    }
    // dK += dS^T Q.
#pragma unroll
    for (int kt = 0; kt < kBwdRows / 16; ++kt) {
      const uint32_t a[4] = {pack2<T>(st[2 * kt][0], st[2 * kt][1]), pack2<T>(st[2 * kt][2], st[2 * kt][3]),
                             pack2<T>(st[2 * kt + 1][0], st[2 * kt + 1][1]),
                             pack2<T>(st[2 * kt + 1][2], st[2 * kt + 1][3])};
#pragma unroll
      for (int dt = 0; dt < D / 8; dt += 2) {  // B = Q (rows x d), transposed on load
        uint32_t qb[4];
        ldmatrix_x4_trans(qb, sQ + (kt * 16 + (mi & 1) * 8 + mr) * SD + (dt + (mi >> 1)) * 8);
        mma_16816<T>(dk[dt], a, qb[0], qb[1]);
        mma_16816<T>(dk[dt + 1], a, qb[2], qb[3]);
      }
    }
    __syncthreads();  // all of dS^T is in shared memory

    // dQ (rows warp * 16 .. + 15 of this step) = dS K, A[m][k] = dS^T[k][m].
    float dq[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;
#pragma unroll
    for (int kt = 0; kt < kBwdKeys / 16; ++kt) {
      // A = dS (rows x keys) = dS^T transposed on load: matrices (keys kt*16.., rows w*16..),
      // (keys kt*16.., rows w*16+8..), (keys kt*16+8.., rows w*16..), (keys kt*16+8.., rows w*16+8..).
      uint32_t a[4];
      ldmatrix_x4_trans(a, sdS + (kt * 16 + (mi >> 1) * 8 + mr) * SS + warp * 16 + (mi & 1) * 8);
#pragma unroll
      for (int dt = 0; dt < D / 8; dt += 2) {  // B = K (keys x d), transposed on load
        uint32_t kb[4];
        ldmatrix_x4_trans(kb, sK + (kt * 16 + (mi & 1) * 8 + mr) * SD + (dt + (mi >> 1)) * 8);
        mma_16816<T>(dq[dt], a, kb[0], kb[1]);
        mma_16816<T>(dq[dt + 1], a, kb[2], kb[3]);
      }
    }
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int64_t pr = m0 + warp * 16 + gid + 8 * h2, i = pr / g, h = hk * g + pr % g;
      if (i >= r.len_q) continue;
      float* dst = sc.dq_accum + (attn_q_row(p, r, b, i) * p.q_heads + h) * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        atomicAdd(dst + dt * 8 + tig * 2, dq[dt][2 * h2] * p.scale);
        atomicAdd(dst + dt * 8 + tig * 2 + 1, dq[dt][2 * h2 + 1] * p.scale);
      }
    }
  }

  T* dkp = static_cast<T*>(bp.dk);
  T* dvp = static_cast<T*>(bp.dv);
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int64_t j = n0 + warp * 16 + gid + 8 * h2;
    if (j >= r.len_k) continue;
    T* dkr = dkp + attn_key_offset(p, r, b, j, hk, bp.dk_batch_stride, bp.dk_row_stride, bp.dk_head_stride);
    T* dvr = dvp + attn_key_offset(p, r, b, j, hk, bp.dv_batch_stride, bp.dv_row_stride, bp.dv_head_stride);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int col = dt * 8 + tig * 2;
      st(dkr + col, dk[dt][2 * h2] * p.scale);
      st(dkr + col + 1, dk[dt][2 * h2 + 1] * p.scale);
      st(dvr + col, dv[dt][2 * h2]);
      st(dvr + col + 1, dv[dt][2 * h2 + 1]);
    }
  }
}

template <typename T, int D>
void launch_bwd_mma(const AttnBwdParams& bp, const BwdScratch& sc, cudaStream_t stream) {
  const AttnParams& p = bp.fwd;
  const bool aligned = rows_aligned_16(p.q, {p.q_batch_stride, p.q_row_stride, p.q_head_stride}, 2) &&
                       rows_aligned_16(p.k, {p.k_batch_stride, p.k_row_stride, p.k_head_stride}, 2) &&
                       rows_aligned_16(p.v, {p.v_batch_stride, p.v_row_stride, p.v_head_stride}, 2) &&
                       rows_aligned_16(bp.dout, {bp.do_batch_stride, bp.do_row_stride, bp.do_head_stride}, 2);
  const int64_t blocks_x = (p.seq_k + kBwdKeys - 1) / kBwdKeys;
  if (blocks_x == 0) return;
  if (blocks_x > 0x7fffffff || p.kv_heads > 65535 || p.batch > 65535)
    throw std::invalid_argument("exaone_ext: attention grid too large for one launch");
  auto kernel = bwd_mma_kernel<T, D>;
  constexpr size_t smem = BwdSmem<D>::kBytes;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) != cudaSuccess)
    check_launch("flash_attn backward (shared memory attribute)");
  kernel<<<dim3(unsigned(blocks_x), unsigned(p.kv_heads), unsigned(p.batch)), kBwdThreads, smem, stream>>>(bp, sc,
                                                                                                       aligned);
  check_launch("flash_attn backward");
}

}  // namespace exaone_ext::cuda::attn
