// Forward attention on tensor cores (FlashAttention-2 scheme), bfloat16 / float16, head dim D.
//
// Block = (kRows packed q rows, kv head hk, sequence b [, split]). The packed rows pr = i * g + hh
// (common/attention_layout.h) put all g query heads of the group in one block, so each K/V tile is
// read once per group, and a single decode token of a GQA group fills g rows. 4 warps. Q is staged
// through shared memory into registers once; K/V tiles of 64 keys are double buffered in shared
// memory with cp.async. S = Q K^T and O += P V run on mma.sync with the online softmax in registers
// (exp2 with the scale folded in). Causal: the key range of the block ends at the last visible key
// of its last row; only tiles crossing a row's limit are masked.
//
// Two shapes of block (fwd_block_rows): kRows = 64, each warp 16 rows against all 64 keys of a tile
// (prefill); kRows = 16 when a sequence has at most 16 packed rows (decode: g rows per token), where
// the rows of one warp would leave three warps idle and one warp's products would bound the key
// stream: every warp takes the same 16 rows against its own 16 keys of each tile, keeps its own
// softmax state, and the four partial results are merged through shared memory at the end (the
// SplitLse rule within a block).
#pragma once
#include <cuda_runtime.h>

#include "common/attention.h"
#include "common/attention_layout.h"
#include "cuda/attention/flash_attn.h"
#include "cuda/attention/mma.cuh"
#include "cuda/cuda_utils.cuh"

namespace exaone_ext::cuda::attn {

constexpr int kFwdKeys = 64;  // keys per tile (32 for the 128-row blocks: their registers hold twice the rows)
constexpr int kFwdWarps = 4;
constexpr int kFwdThreads = 32 * kFwdWarps;

// The three block shapes: rows, and how the four warps share them.
template <int kRows>
struct FwdShape {
  static_assert(kRows == 16 || kRows == 64 || kRows == 128, "a block is 16, 64 or 128 packed rows");
  static constexpr bool kKeySplit = kRows == 16;                             // warps split the keys
  static constexpr int kGroups = kRows == 128 ? 2 : 1;                       // 16-row groups per warp
  static constexpr int kKeys = kRows == 128 ? kFwdKeys / 2 : kFwdKeys;      // keys per tile
  static constexpr int kWarpKeys = kKeySplit ? kKeys / kFwdWarps : kKeys;   // keys of a tile per warp
  static constexpr bool kQInRegisters = kGroups == 1;  // 128 rows: Q fragments re-read from shared memory
};

template <int D, int kRows>
struct FwdSmem {
  static constexpr int kStride = D + 8;
  static constexpr int kKeys = FwdShape<kRows>::kKeys;
  static constexpr size_t kBytes = size_t(kRows + 4 * kKeys) * kStride * sizeof(uint16_t);  // Q, 2x K, 2x V
  // the key-split merge reuses the K buffers for every warp's float32 rows and the V buffers for m / l
  static_assert(!FwdShape<kRows>::kKeySplit ||
                    size_t(kFwdWarps) * kRows * D * sizeof(float) <= size_t(2) * kKeys * kStride * 2,
                "key-split merge rows fit in the K buffers");
};

template <typename T, int D, int kRows>
__global__ void __launch_bounds__(kFwdThreads) fwd_mma_kernel(const AttnParams p, const FwdSplit sp, const bool aligned) {
  static_assert(D % 16 == 0, "head dim must be a multiple of 16 on tensor cores");
  using Shape = FwdShape<kRows>;
  constexpr bool kKeySplit = Shape::kKeySplit;
  constexpr int kG = Shape::kGroups;
  constexpr int kKeys = Shape::kKeys;
  constexpr int kWarpKeys = Shape::kWarpKeys;
  constexpr int SD = FwdSmem<D, kRows>::kStride;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sQ = smem;
  uint16_t* sK = sQ + kRows * SD;  // buffer n at sK + n * kKeys * SD
  uint16_t* sV = sK + 2 * kKeys * SD;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gid = lane / 4, tig = lane % 4;
  const int mi = lane / 8, mr = lane % 8;  // ldmatrix: this lane addresses row mr of matrix mi
  const int row0 = kKeySplit ? 0 : warp * 16 * kG;    // this warp's first row in the block (group q: + 16 q)
  const int key0 = kKeySplit ? warp * kWarpKeys : 0;  // and its first key in each tile
  const int64_t hk = blockIdx.y;
  const int64_t b = blockIdx.z / sp.num_splits;
  const int64_t split = blockIdx.z % sp.num_splits;
  const int64_t g = attn_group(p);
  const SeqRange r = seq_range(p, b);
  const int64_t rows_total = r.len_q * g;  // packed rows of this sequence
  // causal: the blocks with the most keys (the last rows) start first, so the short ones fill the tail
  const int64_t mb = p.causal ? int64_t(gridDim.x) - 1 - blockIdx.x : int64_t(blockIdx.x);
  const int64_t m0 = mb * kRows;
  if (m0 >= rows_total) return;  // uniform over the block

  // Keys of this block: the split's range, cut at the last key any of its rows may see.
  const int64_t kv_begin = sp.num_splits > 1 ? split * sp.keys_per_split : 0;
  int64_t kv_split_end = sp.num_splits > 1 ? kv_begin + sp.keys_per_split : r.len_k;
  if (kv_split_end > r.len_k) kv_split_end = r.len_k;
  const int64_t last_row = (m0 + kRows < rows_total ? m0 + kRows : rows_total) - 1;
  int64_t kv_end = attn_key_limit(p.causal, last_row / g, r.len_q, r.len_k);
  if (kv_end > kv_split_end) kv_end = kv_split_end;
  int64_t min_limit = attn_key_limit(p.causal, m0 / g, r.len_q, r.len_k);  // the block's first row sees least
  if (min_limit > kv_split_end) min_limit = kv_split_end;
  const int n_tiles = kv_end > kv_begin ? int((kv_end - kv_begin + kKeys - 1) / kKeys) : 0;

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  // Q rows (packed) -> shared.
  load_tile<D, SD, kFwdThreads>(sQ, kRows, aligned, [&](int row) -> const void* {
    const int64_t pr = m0 + row, i = pr / g;
    if (i >= r.len_q) return nullptr;
    return q + attn_row_offset(p, r, b, i, hk * g + pr % g, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  }, q);
  cp_async_commit();

  auto load_kv = [&](int64_t n0, int buf) {
    load_tile<D, SD, kFwdThreads>(sK + buf * kKeys * SD, kKeys, aligned, [&](int row) -> const void* {
      const int64_t j = n0 + row;
      if (j >= r.len_k) return nullptr;
      return k + attn_key_offset(p, r, b, j, hk, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
    }, k);
    load_tile<D, SD, kFwdThreads>(sV + buf * kKeys * SD, kKeys, aligned, [&](int row) -> const void* {
      const int64_t j = n0 + row;
      if (j >= r.len_k) return nullptr;
      return v + attn_key_offset(p, r, b, j, hk, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
    }, v);
  };

  cp_async_wait<0>();
  __syncthreads();

  // This thread's rows: row0 + 16 q + gid (+ 8) for group q.
  const bool warp_active = m0 + row0 < rows_total;
  // Each row's key limit, counted from kv_begin (32 bits: a sequence's keys are far fewer than 2^31).
  int limit[kG][2];
#pragma unroll
  for (int gq = 0; gq < kG; ++gq)
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int64_t pr = m0 + row0 + 16 * gq + gid + 8 * h2;
      int64_t lim = attn_key_limit(p.causal, pr / g, r.len_q, r.len_k);
      if (lim > kv_split_end) lim = kv_split_end;
      limit[gq][h2] = int(lim - kv_begin);
    }

  // A fragments of Q for one k16 chunk: kept for every chunk (one group), or re-read (two groups).
  uint32_t qf[Shape::kQInRegisters ? D / 16 : 1][4];
  auto q_fragment = [&](int gq, int kk, uint32_t (&a)[4]) {
    // matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
    ldmatrix_x4(a, sQ + (row0 + 16 * gq + (mi & 1) * 8 + mr) * SD + kk * 16 + (mi >> 1) * 8);
  };
  if constexpr (Shape::kQInRegisters) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) q_fragment(0, kk, qf[kk]);
  }

  float o[kG][D / 8][4];
#pragma unroll
  for (int gq = 0; gq < kG; ++gq)
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) o[gq][dt][0] = o[gq][dt][1] = o[gq][dt][2] = o[gq][dt][3] = 0.f;
  OnlineSoftmax sm[kG][2];  // l is this thread's partial sum until the end

  if (n_tiles > 0) load_kv(kv_begin, 0);
  cp_async_commit();

  for (int t = 0; t < n_tiles; ++t) {
    const int buf = t & 1;
    const int64_t n0 = kv_begin + int64_t(t) * kKeys;
    if (t + 1 < n_tiles) load_kv(n0 + kKeys, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // tile t has landed (tile t + 1 may still be in flight)
    __syncthreads();

    if (warp_active) {
      const uint16_t* tK = sK + buf * kKeys * SD;
      const uint16_t* tV = sV + buf * kKeys * SD;
      float s[kG][kWarpKeys / 8][4];
#pragma unroll
      for (int gq = 0; gq < kG; ++gq)
#pragma unroll
        for (int nt = 0; nt < kWarpKeys / 8; ++nt) s[gq][nt][0] = s[gq][nt][1] = s[gq][nt][2] = s[gq][nt][3] = 0.f;
      // S = Q K^T. B fragments of K^T for key tiles nt, nt + 1 (of this warp's keys): matrices
      // (keys nt*8.., d kk*16..), (.., d + 8), (keys (nt+1)*8.., d kk*16..), (.., d + 8).
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t qa[kG][4];
#pragma unroll
        for (int gq = 0; gq < kG; ++gq) {
          if constexpr (Shape::kQInRegisters) {
#pragma unroll
            for (int e = 0; e < 4; ++e) qa[gq][e] = qf[kk][e];
          } else {
            q_fragment(gq, kk, qa[gq]);
          }
        }
#pragma unroll
        for (int nt = 0; nt < kWarpKeys / 8; nt += 2) {
          uint32_t kb[4];
          ldmatrix_x4(kb, tK + (key0 + (nt + (mi >> 1)) * 8 + mr) * SD + kk * 16 + (mi & 1) * 8);
#pragma unroll
          for (int gq = 0; gq < kG; ++gq) {
            mma_16816<T>(s[gq][nt], qa[gq], kb[0], kb[1]);
            mma_16816<T>(s[gq][nt + 1], qa[gq], kb[2], kb[3]);
          }
        }
      }

      // Scale, mask, online softmax (row h2 = c / 2 of the fragment).
      const bool need_mask = n0 + kKeys > min_limit;
#pragma unroll
      for (int gq = 0; gq < kG; ++gq) {
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < kWarpKeys / 8; ++nt) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            float x = s[gq][nt][c] * p.scale;
            if (need_mask && t * kKeys + key0 + nt * 8 + tig * 2 + (c & 1) >= limit[gq][c >> 1]) x = -INFINITY;
            s[gq][nt][c] = x;
            mx[c >> 1] = fmaxf(mx[c >> 1], x);
          }
        }
        float alpha[2], base[2];
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
          alpha[h2] = sm[gq][h2].update_max(quad_max(mx[h2]));
          base[h2] = sm[gq][h2].m == -INFINITY ? 0.f : sm[gq][h2].m * kLog2e;  // no key yet: all p = 0
        }
        float rowsum[2] = {0.f, 0.f};
#pragma unroll
        for (int nt = 0; nt < kWarpKeys / 8; ++nt) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const float e = fast_exp2(fmaf(s[gq][nt][c], kLog2e, -base[c >> 1]));
            s[gq][nt][c] = e;
            rowsum[c >> 1] += e;
          }
        }
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) sm[gq][h2].l += rowsum[h2];
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          o[gq][dt][0] *= alpha[0]; o[gq][dt][1] *= alpha[0];
          o[gq][dt][2] *= alpha[1]; o[gq][dt][3] *= alpha[1];
        }
      }

      // O += P V: P's C fragments become A fragments; V (keys x D) is read column-wise.
#pragma unroll
      for (int kt = 0; kt < kWarpKeys / 16; ++kt) {
        uint32_t a[kG][4];
#pragma unroll
        for (int gq = 0; gq < kG; ++gq) {
          a[gq][0] = pack2<T>(s[gq][2 * kt][0], s[gq][2 * kt][1]);
          a[gq][1] = pack2<T>(s[gq][2 * kt][2], s[gq][2 * kt][3]);
          a[gq][2] = pack2<T>(s[gq][2 * kt + 1][0], s[gq][2 * kt + 1][1]);
          a[gq][3] = pack2<T>(s[gq][2 * kt + 1][2], s[gq][2 * kt + 1][3]);
        }
        // B fragments of V for d tiles dt, dt + 1, transposed on load: matrices (keys kt*16.., d dt*8..),
        // (keys kt*16+8.., d dt*8..), (keys kt*16.., d (dt+1)*8..), (keys kt*16+8.., d (dt+1)*8..).
#pragma unroll
        for (int dt = 0; dt < D / 8; dt += 2) {
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, tV + (key0 + kt * 16 + (mi & 1) * 8 + mr) * SD + (dt + (mi >> 1)) * 8);
#pragma unroll
          for (int gq = 0; gq < kG; ++gq) {
            mma_16816<T>(o[gq][dt], a[gq], vb[0], vb[1]);
            mma_16816<T>(o[gq][dt + 1], a[gq], vb[2], vb[3]);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with buffer `buf` before it is refilled
  }
  cp_async_wait<0>();

  T* out = static_cast<T*>(p.out);
  if constexpr (kKeySplit) {
    // Merge the four warps' results for the block's 16 rows: every warp's (m, l) into shared memory,
    // then its rows rescaled to the largest m, then each thread sums the warps for its elements.
    __syncthreads();  // every warp is past its last read of the K / V buffers
    float* red_o = reinterpret_cast<float*>(sK);  // [warp][row][D]
    float* red_m = reinterpret_cast<float*>(sV);  // [warp][row]
    float* red_l = red_m + kFwdWarps * kRows;
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const float l = quad_sum(sm[0][h2].l);
      if (tig == 0) {
        red_m[warp * kRows + gid + 8 * h2] = sm[0][h2].m;
        red_l[warp * kRows + gid + 8 * h2] = l;
      }
    }
    __syncthreads();
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int row = gid + 8 * h2;
      float mx = -INFINITY;
#pragma unroll
      for (int w = 0; w < kFwdWarps; ++w) mx = fmaxf(mx, red_m[w * kRows + row]);
      // a warp that saw no key of this row (m = -inf) contributes nothing; o is then all zero
      const float f = sm[0][h2].m == -INFINITY ? 0.f : expf(sm[0][h2].m - mx);
      float* dst = red_o + (warp * kRows + row) * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        dst[dt * 8 + tig * 2] = o[0][dt][2 * h2] * f;
        dst[dt * 8 + tig * 2 + 1] = o[0][dt][2 * h2 + 1] * f;
      }
    }
    __syncthreads();
    for (int e = tid; e < kRows * D; e += kFwdThreads) {
      const int row = e / D, d = e - row * D;
      const int64_t pr = m0 + row;
      if (pr >= rows_total) continue;
      OnlineSoftmax fin;
#pragma unroll
      for (int w = 0; w < kFwdWarps; ++w) fin.m = fmaxf(fin.m, red_m[w * kRows + row]);
      float acc = 0.f;
#pragma unroll
      for (int w = 0; w < kFwdWarps; ++w) {
        const float mw = red_m[w * kRows + row];
        // NaN * 0 stays NaN: a NaN sum of one warp reaches the row, as over all keys
        fin.l += red_l[w * kRows + row] * (mw == -INFINITY ? 0.f : expf(mw - fin.m));
        acc += red_o[(w * kRows + row) * D + d];
      }
      const int64_t i = pr / g, h = hk * g + pr % g;
      const float val = acc * fin.inv_l();
      if (sp.num_splits > 1) {
        const int64_t srow = ((split * p.batch + b) * p.q_heads + h) * p.seq_q + i;
        sp.out_partial[srow * D + d] = val;
        if (d == 0) sp.lse_partial[srow] = fin.lse();
      } else {
        st(out + attn_row_offset(p, r, b, i, h, p.o_batch_stride, p.o_row_stride, p.o_head_stride) + d, val);
        if (d == 0 && p.lse) p.lse[attn_lse_offset(p, r, b, i, h)] = fin.lse();
      }
    }
    return;
  }

  if (!warp_active) return;
#pragma unroll
  for (int gq = 0; gq < kG; ++gq)
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      sm[gq][h2].l = quad_sum(sm[gq][h2].l);
      const int64_t pr = m0 + row0 + 16 * gq + gid + 8 * h2, i = pr / g, h = hk * g + pr % g;
      if (i >= r.len_q) continue;
      const float inv = sm[gq][h2].inv_l(), lse = sm[gq][h2].lse();
      if (sp.num_splits > 1) {
        const int64_t row = ((split * p.batch + b) * p.q_heads + h) * p.seq_q + i;
        float* dst = sp.out_partial + row * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          dst[dt * 8 + tig * 2] = o[gq][dt][2 * h2] * inv;
          dst[dt * 8 + tig * 2 + 1] = o[gq][dt][2 * h2 + 1] * inv;
        }
        if (tig == 0) sp.lse_partial[row] = lse;
      } else {
        T* dst = out + attn_row_offset(p, r, b, i, h, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          st(dst + dt * 8 + tig * 2, o[gq][dt][2 * h2] * inv);
          st(dst + dt * 8 + tig * 2 + 1, o[gq][dt][2 * h2 + 1] * inv);
        }
        if (tig == 0 && p.lse) p.lse[attn_lse_offset(p, r, b, i, h)] = lse;
      }
    }
}

// Whether every row the tile loader touches is 16-byte aligned.
inline bool rows_aligned_16(const void* ptr, std::initializer_list<int64_t> strides, int elem_bytes) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16) return false;
  for (int64_t s : strides)
    if ((s * elem_bytes) % 16) return false;
  return true;
}

template <typename T, int D>
void launch_fwd_mma(const AttnParams& p, const FwdSplit& sp, cudaStream_t stream) {
  const bool aligned = rows_aligned_16(p.q, {p.q_batch_stride, p.q_row_stride, p.q_head_stride}, 2) &&
                       rows_aligned_16(p.k, {p.k_batch_stride, p.k_row_stride, p.k_head_stride}, 2) &&
                       rows_aligned_16(p.v, {p.v_batch_stride, p.v_row_stride, p.v_head_stride}, 2);
  const int rows = flash_attn_fwd_block_rows(p);
  const int64_t blocks_x = (p.seq_q * attn_group(p) + rows - 1) / rows;
  const int64_t blocks_z = p.batch * sp.num_splits;
  if (blocks_x > 0x7fffffff || p.kv_heads > 65535 || blocks_z > 65535)
    throw std::invalid_argument("exaone_ext: attention grid too large for one launch");
  auto launch = [&]<int kRows>() {
    auto kernel = fwd_mma_kernel<T, D, kRows>;
    constexpr size_t smem = FwdSmem<D, kRows>::kBytes;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) != cudaSuccess)
      check_launch("flash_attn forward (shared memory attribute)");
    kernel<<<dim3(unsigned(blocks_x), unsigned(p.kv_heads), unsigned(blocks_z)), kFwdThreads, smem, stream>>>(
        p, sp, aligned);
  };
  if (rows == 16) {
    launch.template operator()<16>();
  } else if (rows == 128) {
    launch.template operator()<128>();
  } else {
    launch.template operator()<64>();
  }
  check_launch("flash_attn forward");
}

}  // namespace exaone_ext::cuda::attn
