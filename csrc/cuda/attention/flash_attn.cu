// Attention launchers: the run-time dtype and head dim become one of the instantiated kernels
// (launch.h) here and nowhere else; plus the small kernels around them: the split-KV combine,
// the backward preprocess D = rowsum(dout * out) and the dq float32 -> dtype conversion.
#include <atomic>
#include <stdexcept>
#include <string>

#include "common/attention.h"
#include "common/attention_layout.h"
#include "cuda/attention/flash_attn.h"
#include "cuda/attention/launch.h"
#include "cuda/attention/mma.cuh"
#include "cuda/cuda_utils.cuh"

namespace exaone_ext::cuda {
namespace attn {

EXAONE_ATTN_EXTERN_MMA(bf16, 64)
EXAONE_ATTN_EXTERN_MMA(bf16, 80)
EXAONE_ATTN_EXTERN_MMA(bf16, 96)
EXAONE_ATTN_EXTERN_MMA(bf16, 128)
EXAONE_ATTN_EXTERN_MMA(f16, 64)
EXAONE_ATTN_EXTERN_MMA(f16, 80)
EXAONE_ATTN_EXTERN_MMA(f16, 96)
EXAONE_ATTN_EXTERN_MMA(f16, 128)
EXAONE_ATTN_EXTERN_SIMT(float, 4)
EXAONE_ATTN_EXTERN_SIMT(float, 8)
EXAONE_ATTN_EXTERN_SIMT(bf16, 4)
EXAONE_ATTN_EXTERN_SIMT(bf16, 8)
EXAONE_ATTN_EXTERN_SIMT(f16, 4)
EXAONE_ATTN_EXTERN_SIMT(f16, 8)

namespace {

constexpr int kThreads = 256;

bool uses_mma(DType dt, int64_t d) {
  return (dt == DType::kBFloat16 || dt == DType::kFloat16) && (d == 64 || d == 80 || d == 96 || d == 128);
}

void check_head_dim(int64_t d) {
  if (!flash_attn_head_dim_supported(d))
    throw std::invalid_argument(std::string("exaone_ext: head_dim must be one of ") + kAttnHeadDimsText + ", got " +
                                std::to_string(d));
}

template <typename T>
void fwd_by_dim(const AttnParams& p, const FwdSplit& sp, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    switch (p.head_dim) {
      case 64: return launch_fwd_mma<T, 64>(p, sp, stream);
      case 80: return launch_fwd_mma<T, 80>(p, sp, stream);
      case 96: return launch_fwd_mma<T, 96>(p, sp, stream);
      case 128: return launch_fwd_mma<T, 128>(p, sp, stream);
      default: break;
    }
  }
  if (p.head_dim <= 128) return launch_fwd_simt<T, 4>(p, sp, stream);
  return launch_fwd_simt<T, 8>(p, sp, stream);
}

template <typename T>
void bwd_by_dim(const AttnBwdParams& bp, const BwdScratch& sc, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    switch (bp.fwd.head_dim) {
      case 64: return launch_bwd_mma<T, 64>(bp, sc, stream);
      case 80: return launch_bwd_mma<T, 80>(bp, sc, stream);
      case 96: return launch_bwd_mma<T, 96>(bp, sc, stream);
      case 128: return launch_bwd_mma<T, 128>(bp, sc, stream);
      default: break;
    }
  }
  if (bp.fwd.head_dim <= 128) return launch_bwd_simt<T, 4>(bp, sc, stream);
  return launch_bwd_simt<T, 8>(bp, sc, stream);
}

// Merges the split-KV partials by SplitLse (common/attention.h). One warp per (b, h, i) row; the
// partial row of split s is s * rows + row.
template <typename T>
__global__ void combine_kernel(const AttnParams p, const FwdSplit sp) {
  const int lane = threadIdx.x % 32;
  const int64_t rows = p.batch * p.q_heads * p.seq_q, D = p.head_dim;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; row < rows; row += warps) {
    const int64_t i = row % p.seq_q, h = (row / p.seq_q) % p.q_heads, b = row / (p.seq_q * p.q_heads);
    const SplitLse c = SplitLse::of(sp.lse_partial + row, sp.num_splits, rows);
    const SeqRange r = seq_range(p, b);
    T* out = static_cast<T*>(p.out) + attn_row_offset(p, r, b, i, h, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
    for (int64_t d = lane; d < D; d += 32) {
      float acc = c.init();
      if (c.any())
        for (int s = 0; s < sp.num_splits; ++s)
          acc = fmaf(c.weight(sp.lse_partial[s * rows + row]), sp.out_partial[(s * rows + row) * D + d], acc);
      st(out + d, acc);
    }
    if (lane == 0 && p.lse) p.lse[attn_lse_offset(p, r, b, i, h)] = c.lse();
  }
}

// (b, i) and the range of the q_row-th row of all q rows (b * seq_q + i, or the packed varlen row).
__device__ __forceinline__ void q_row_coords(const AttnParams& p, int64_t q_row, int64_t& b, int64_t& i, SeqRange& r) {
  r = SeqRange{0, 0, 0, 0};
  if (p.cu_seqlens_q) {
    b = 0; i = 0; r.q_start = q_row;
  } else {
    b = q_row / p.seq_q; i = q_row % p.seq_q;
  }
}

// D = rowsum(dout * out) in float32, one warp per (q row, head): dsum [q_rows, q_heads].
template <typename T>
__global__ void bwd_dsum_kernel(const AttnBwdParams bp, const BwdScratch sc) {
  const AttnParams& p = bp.fwd;
  const int lane = threadIdx.x % 32;
  const int64_t items = sc.q_rows * p.q_heads;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t w = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; w < items; w += warps) {
    const int64_t q_row = w / p.q_heads, h = w % p.q_heads;
    int64_t b, i;
    SeqRange r;
    q_row_coords(p, q_row, b, i, r);
    const T* o = static_cast<const T*>(p.out) + attn_row_offset(p, r, b, i, h, p.o_batch_stride, p.o_row_stride,
                                                                p.o_head_stride);
    const T* d = static_cast<const T*>(bp.dout) + attn_row_offset(p, r, b, i, h, bp.do_batch_stride,
                                                                  bp.do_row_stride, bp.do_head_stride);
    float acc = 0.f;
    for (int64_t c = lane; c < p.head_dim; c += 32) acc = fmaf(ld(o + c), ld(d + c), acc);
    acc = attn::warp_sum(acc);
    if (lane == 0) sc.dsum[w] = acc;
  }
}

// dq = dq_accum (float32 [q_rows, q_heads, head_dim]) in dq's dtype and strides.
template <typename T>
__global__ void bwd_dq_convert_kernel(const AttnBwdParams bp, const BwdScratch sc) {
  const AttnParams& p = bp.fwd;
  const int64_t D = p.head_dim, n = sc.q_rows * p.q_heads * D;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = e % D, h = (e / D) % p.q_heads, q_row = e / (D * p.q_heads);
    int64_t b, i;
    SeqRange r;
    q_row_coords(p, q_row, b, i, r);
    T* dq = static_cast<T*>(bp.dq) + attn_row_offset(p, r, b, i, h, bp.dq_batch_stride, bp.dq_row_stride,
                                                     bp.dq_head_stride);
    st(dq + c, sc.dq_accum[e]);
  }
}

}  // namespace
}  // namespace attn

namespace {
std::atomic<bool> g_key_split{true};
std::atomic<int> g_wide_rows{-1};
}  // namespace

bool flash_attn_set_key_split(bool enabled) { return g_key_split.exchange(enabled); }
int flash_attn_set_wide_rows(int mode) { return g_wide_rows.exchange(checked_wide_rows_mode(mode)); }

int flash_attn_fwd_block_rows(const AttnParams& p) {
  if (p.q_heads <= 0 || p.kv_heads <= 0) return 64;
  const int64_t rows = p.seq_q * p.group();
  if (rows <= 16 && g_key_split.load(std::memory_order_relaxed)) return 16;
  // automatic: 128 rows while they still give a block to every SM (fewer would leave SMs idle)
  const int wide = g_wide_rows.load(std::memory_order_relaxed);
  if (wide == 1 || (wide == -1 && (rows + 127) / 128 * p.kv_heads * p.batch >= int64_t(device_sm_count())))
    return 128;
  return 64;
}

FwdSplit flash_attn_split_plan(const AttnParams& p) {
  FwdSplit s;
  if (p.cu_seqlens_q || p.batch <= 0 || p.seq_q <= 0 || p.seq_k <= 0 || p.q_heads <= 0 || p.kv_heads <= 0) return s;
  const int64_t rows = flash_attn_fwd_block_rows(p);
  const int64_t blocks = attn::uses_mma(p.dtype, p.head_dim)
                             ? (p.seq_q * p.group() + rows - 1) / rows * p.kv_heads * p.batch
                             : (p.seq_q + 3) / 4 * p.q_heads * p.batch;
  // Enough blocks to fill the device twice over; four times for the 16-row (decode) blocks, which
  // only stream the cache, so that the last wave's idle SMs cost little.
  const int64_t target = (rows == 16 ? 4 : 2) * int64_t(device_sm_count());
  if (blocks >= target) return s;
  int64_t splits = (target + blocks - 1) / blocks;
  const int64_t by_length = (p.seq_k + 255) / 256;  // at least 256 keys per split
  if (splits > by_length) splits = by_length;
  if (splits > 128) splits = 128;
  if (splits * p.batch > 65535) splits = 65535 / p.batch;
  if (splits <= 1) return s;
  const int64_t keys = ((p.seq_k + splits - 1) / splits + 63) / 64 * 64;
  splits = (p.seq_k + keys - 1) / keys;
  if (splits <= 1) return s;
  s.num_splits = int(splits);
  s.keys_per_split = keys;
  return s;
}

void flash_attn_forward(const AttnParams& p, const FwdSplit& sp, cudaStream_t stream) {
  if (p.batch == 0 || p.seq_q == 0 || p.q_heads == 0) return;
  attn::check_head_dim(p.head_dim);
  if (sp.num_splits > 1 && (p.cu_seqlens_q || !sp.out_partial || !sp.lse_partial || sp.keys_per_split <= 0))
    throw std::invalid_argument("exaone_ext: split-KV attention needs a dense layout and its scratch buffers");
  by_dtype(p.dtype, [&]<typename T>() {
    attn::fwd_by_dim<T>(p, sp, stream);
    if (sp.num_splits > 1) {
      const int64_t rows = p.batch * p.q_heads * p.seq_q;
      attn::combine_kernel<T><<<grid_for(rows * 32, attn::kThreads), attn::kThreads, 0, stream>>>(p, sp);
      check_launch("flash_attn split-KV combine");
    }
  });
}

bool flash_attn_bwd_needs_dq_accum(const AttnBwdParams& p) { return attn::uses_mma(p.fwd.dtype, p.fwd.head_dim); }

void flash_attn_backward(const AttnBwdParams& bp, const BwdScratch& sc, cudaStream_t stream) {
  const AttnParams& p = bp.fwd;
  if (p.batch == 0 || p.q_heads == 0 || p.head_dim == 0) return;
  attn::check_head_dim(p.head_dim);
  if (!sc.dsum || (flash_attn_bwd_needs_dq_accum(bp) && !sc.dq_accum))
    throw std::invalid_argument("exaone_ext: attention backward scratch missing");
  by_dtype(p.dtype, [&]<typename T>() {
    const int64_t items = sc.q_rows * p.q_heads;
    if (items > 0) {
      attn::bwd_dsum_kernel<T><<<grid_for(items * 32, attn::kThreads), attn::kThreads, 0, stream>>>(bp, sc);
      check_launch("flash_attn backward preprocess");
    }
    attn::bwd_by_dim<T>(bp, sc, stream);
    if (flash_attn_bwd_needs_dq_accum(bp) && items > 0) {
      attn::bwd_dq_convert_kernel<T>
          <<<grid_for(items * p.head_dim, attn::kThreads), attn::kThreads, 0, stream>>>(bp, sc);
      check_launch("flash_attn backward dq conversion");
    }
  });
}

}  // namespace exaone_ext::cuda
