// RoPE on CUDA. The fused rotation is one grid-stride launch over (token, head of q then k,
// column chunk): q and k share the launch and the table row of the token's position. A thread
// moves N elements of each half (rotate-half) or N interleaved elements with 16-byte accesses
// where alignment allows, else one pair. The pair rotation and the llama3 frequencies are
// common/rope.h, shared with the CPU kernels.
#include <cmath>

#include "common/rope.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/rope.h"

namespace exaone_ext::cuda {
namespace {

struct Item {
  const float* cos;
  const float* sin;
  const void* x;  // first element of this head's input row
  void* y;        // and of its output row
  bool ok;
};

// Decodes work item `head_item` = token * (q_heads + k_heads) + head; checks the position.
template <typename T>
__device__ __forceinline__ Item locate(const RopeArgs& a, int64_t head_item, unsigned long long* bad) {
  const int64_t heads = a.q_heads + a.k_heads;
  const int64_t t = head_item / heads, h = head_item - t * heads;
  const int64_t b = t / a.seq, s = t - b * a.seq;
  const int64_t p = a.pos[b * a.pos_sb + s * a.pos_ss];
  Item it;
  if (h < a.q_heads) {
    it.x = static_cast<const T*>(a.q) + b * a.q_sb + s * a.q_ss + h * a.q_sh;
    it.y = static_cast<T*>(a.q_out) + (t * a.q_heads + h) * a.head_dim;
  } else {
    const int64_t hk = h - a.q_heads;
    it.x = static_cast<const T*>(a.k) + b * a.k_sb + s * a.k_ss + hk * a.k_sh;
    it.y = static_cast<T*>(a.k_out) + (t * a.k_heads + hk) * a.head_dim;
  }
  it.ok = p >= 0 && p < a.table_rows;
  if (!it.ok) {
    if (atomicCAS(bad, 0ull, 1ull) == 0ull) bad[1] = static_cast<unsigned long long>(p);
    it.cos = it.sin = nullptr;
  } else {
    it.cos = a.cos + p * a.cos_stride;
    it.sin = a.sin + p * a.sin_stride;
  }
  return it;
}

// N columns of each half per thread (rotate-half), or N interleaved elements (N even).
template <typename T, int N, bool Interleaved>
__global__ void rope_vec_kernel(RopeArgs a, unsigned long long* bad) {
  const int64_t half = a.head_dim / 2;
  const int64_t chunks = (Interleaved ? a.head_dim : half) / N;
  const int64_t total = a.batch * a.seq * (a.q_heads + a.k_heads) * chunks;
  const float sign = a.inverse ? -1.f : 1.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t head_item = i / chunks, col = (i - head_item * chunks) * N;
    const Item it = locate<T>(a, head_item, bad);
    const T* x = static_cast<const T*>(it.x);
    T* y = static_cast<T*>(it.y);
    if constexpr (Interleaved) {
      float v[N], o[N];
      if (it.ok) {
        load_pack<T, N>(x + col, v);
#pragma unroll
        for (int j = 0; j < N; j += 2)
          rope_rotate_pair(v[j], v[j + 1], it.cos[col / 2 + j / 2], sign * it.sin[col / 2 + j / 2], o[j], o[j + 1]);
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j) o[j] = NAN;
      }
      store_pack<T, N>(y + col, o);
    } else {
      float x1[N], x2[N], o1[N], o2[N];
      if (it.ok) {
        load_pack<T, N>(x + col, x1);
        load_pack<T, N>(x + half + col, x2);
#pragma unroll
        for (int j = 0; j < N; ++j)
          rope_rotate_pair(x1[j], x2[j], it.cos[col + j], sign * it.sin[col + j], o1[j], o2[j]);
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j) o1[j] = o2[j] = NAN;
      }
      store_pack<T, N>(y + col, o1);
      store_pack<T, N>(y + half + col, o2);
    }
  }
}

// Any layout and alignment: one pair per thread.
template <typename T>
__global__ void rope_pair_kernel(RopeArgs a, unsigned long long* bad) {
  const int64_t half = a.head_dim / 2;
  const int64_t total = a.batch * a.seq * (a.q_heads + a.k_heads) * half;
  const int64_t step = a.interleaved ? 2 : 1, partner = a.interleaved ? 1 : half;
  const float sign = a.inverse ? -1.f : 1.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t head_item = i / half, pair = i - head_item * half, j = pair * step;
    const Item it = locate<T>(a, head_item, bad);
    const T* x = static_cast<const T*>(it.x);
    T* y = static_cast<T*>(it.y);
    float o1 = NAN, o2 = NAN;
    if (it.ok) rope_rotate_pair(ld(x + j), ld(x + j + partner), it.cos[pair], sign * it.sin[pair], o1, o2);
    st(y + j, o1);
    st(y + j + partner, o2);
  }
}

__global__ void rope_tables_kernel(RopeTableArgs a) {
  const int64_t half = a.freqs.head_dim / 2, total = a.n_positions * half;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / half, c = i - r * half;
    const double angle = double(a.positions[r]) * rope_inv_freq(a.freqs, c);
    double s, co;
    sincos(angle, &s, &co);
    a.cos[i] = float(co);
    a.sin[i] = float(s);
  }
}

constexpr int kThreads = 256;

}  // namespace

void rope_apply(const RopeArgs& a, unsigned long long* bad, cudaStream_t stream) {
  const int64_t half = a.head_dim / 2;
  const int64_t head_items = a.batch * a.seq * (a.q_heads + a.k_heads);
  if (head_items == 0 || half == 0) return;
  by_dtype(a.dtype, [&]<typename T>() {
    constexpr int W = 16 / sizeof(T);
    const int w = vector_width<T>(a.interleaved ? a.head_dim : half, {a.q, a.k, a.q_out, a.k_out},
                                  {a.q_sb, a.q_ss, a.q_sh, a.k_sb, a.k_ss, a.k_sh, half});
    if (w == W && a.interleaved) {
      rope_vec_kernel<T, W, true><<<grid_for(head_items * (a.head_dim / W), kThreads), kThreads, 0, stream>>>(a, bad);
    } else if (w == W) {
      rope_vec_kernel<T, W, false><<<grid_for(head_items * (half / W), kThreads), kThreads, 0, stream>>>(a, bad);
    } else {
      rope_pair_kernel<T><<<grid_for(head_items * half, kThreads), kThreads, 0, stream>>>(a, bad);
    }
  });
  check_launch("rope_apply");
}

void rope_tables(const RopeTableArgs& a, cudaStream_t stream) {
  const int64_t total = a.n_positions * (a.freqs.head_dim / 2);
  if (total == 0) return;
  rope_tables_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(a);
  check_launch("rope_tables");
}

}  // namespace exaone_ext::cuda
