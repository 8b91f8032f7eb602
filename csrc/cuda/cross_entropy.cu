// Cross-entropy over rows of logits: one block per row (grid-stride over rows), three passes over
// the row (max, sum of exp(x - max), then softmax - onehot written in place), block reductions
// through warp shuffles. The target's entry is written by the thread that owns its column, from
// the logit every thread read before the row was overwritten. Out-of-range targets are not
// reported (that would need a synchronisation): their loss and gradient row become NaN.
#include <cmath>

#include "common/cross_entropy.h"
#include "cuda/cross_entropy.h"
#include "cuda/cuda_utils.cuh"

namespace exaone_ext::cuda {
namespace {

constexpr int kThreads = 256;

template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, w) : v + w;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? smem[lane] : (kMax ? -INFINITY : 0.f);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, w) : v + w;
  }
  __syncthreads();  // smem is reused by the next reduction
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) cross_entropy_kernel(CrossEntropyArgs a) {
  __shared__ float smem[32];
  const int64_t vocab = a.vocab;
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    T* x = static_cast<T*>(a.logits) + r * a.logits_stride;
    const int64_t t = a.targets[r];
    const TargetKind kind = target_kind(t, a.ignore_index, vocab);
    const bool valid = kind == TargetKind::kValid;
    const float xt = valid ? ld(x + t) : 0.f;
    float* lse_p = static_cast<float*>(a.lse) + r;
    float lse;
    if (a.from_lse) {
      lse = *lse_p;
    } else {
      float m = -INFINITY;
      for (int64_t i = threadIdx.x; i < vocab; i += kThreads) m = fmaxf(m, ld(x + i));
      m = block_reduce<true>(m, smem);  // fmaxf drops NaN; the sum below carries it into lse
      float s = 0.f;
      for (int64_t i = threadIdx.x; i < vocab; i += kThreads) s += expf(ld(x + i) - m);
      s = block_reduce<false>(s, smem);
      lse = m + logf(s);
      if (threadIdx.x == 0) *lse_p = lse;
    }
    if (threadIdx.x == 0 && a.loss) {
      static_cast<float*>(a.loss)[r] = valid ? lse - xt : (kind == TargetKind::kIgnored ? 0.f : NAN);
    }
    if (a.write_grad) {
      float scale = a.row_scale ? static_cast<const float*>(a.row_scale)[r * a.row_scale_stride] : 1.f;
      if (kind == TargetKind::kIgnored) scale = 0.f;
      if (kind == TargetKind::kOutOfRange) scale = NAN;
      __syncthreads();  // every thread has read x[t] before the row is overwritten
      for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
        float g = scale == 0.f ? 0.f : expf(ld(x + i) - lse) * scale;
        if (valid && i == t) g = (expf(xt - lse) - 1.f) * scale;
        st(x + i, g);
      }
    }
    __syncthreads();
  }
}

}  // namespace

void cross_entropy_rows(const CrossEntropyArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return;
  const unsigned blocks = unsigned(a.rows < 65535LL * 8 ? a.rows : 65535LL * 8);
  by_dtype(a.dtype, [&]<typename T>() { cross_entropy_kernel<T><<<blocks, kThreads, 0, stream>>>(a); });
  check_launch("cross_entropy_rows");
}

}  // namespace exaone_ext::cuda
