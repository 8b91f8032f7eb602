// RoPE on CUDA. Where 16-byte accesses are allowed the fused rotation walks tokens, a block per
// token at a time: the token's position is read once, thread t keeps one column chunk (N elements
// of each half, rotate-half, or N interleaved elements) and that chunk's cos / sin in registers and
// rotates it in heads t / chunks, + heads per pass, ... of q then k. Otherwise one grid-stride
// launch over (token, head, pair) moves one pair per thread. The pair rotation and the llama3 frequencies are
// common/rope.h, shared with the CPU kernels.
#include <algorithm>
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

// Token-major: blockDim.x = chunks * heads per pass (see rope_apply).
// table_vec: the cos / sin rows allow 16-byte loads of a chunk's entries.
template <typename T, int N, bool Interleaved>
__global__ void rope_vec_kernel(RopeArgs a, unsigned long long* bad, bool table_vec) {
  const int half = int(a.head_dim / 2);
  const int chunks = (Interleaved ? 2 * half : half) / N;
  const int per_pass = int(blockDim.x) / chunks;
  const int chunk = int(threadIdx.x) % chunks, h0 = int(threadIdx.x) / chunks;
  const int heads = int(a.q_heads + a.k_heads);
  const int col = chunk * N;                     // first element of this thread's chunk (of the first half)
  const int tcol = Interleaved ? col / 2 : col;  // its first table column
  const float sign = a.inverse ? -1.f : 1.f;
  const int64_t tokens = a.batch * a.seq;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int64_t b = t / a.seq, s = t - b * a.seq;
    const int64_t p = a.pos[b * a.pos_sb + s * a.pos_ss];
    const bool ok = p >= 0 && p < a.table_rows;
    if (!ok && threadIdx.x == 0 && atomicCAS(bad, 0ull, 1ull) == 0ull) bad[1] = static_cast<unsigned long long>(p);
    constexpr int kT = Interleaved ? N / 2 : N;  // table entries of a chunk
    float c[kT], sn[kT];
    if (ok) {
      const float* cp = a.cos + p * a.cos_stride + tcol;
      const float* sp = a.sin + p * a.sin_stride + tcol;
      if constexpr (kT % 4 == 0) {
        if (table_vec) {
#pragma unroll
          for (int j = 0; j < kT; j += 4) {
            const float4 cv = *reinterpret_cast<const float4*>(cp + j);
            const float4 sv = *reinterpret_cast<const float4*>(sp + j);
            c[j] = cv.x; c[j + 1] = cv.y; c[j + 2] = cv.z; c[j + 3] = cv.w;
            sn[j] = sv.x; sn[j + 1] = sv.y; sn[j + 2] = sv.z; sn[j + 3] = sv.w;
          }
        }
      }
      if (!(kT % 4 == 0 && table_vec)) {
#pragma unroll
        for (int j = 0; j < kT; ++j) {
          c[j] = cp[j];
          sn[j] = sp[j];
        }
      }
#pragma unroll
      for (int j = 0; j < kT; ++j) sn[j] *= sign;
    }
    const T* qrow = static_cast<const T*>(a.q) + b * a.q_sb + s * a.q_ss;
    const T* krow = static_cast<const T*>(a.k) + b * a.k_sb + s * a.k_ss;
    T* qout = static_cast<T*>(a.q_out) + t * a.q_heads * a.head_dim;
    T* kout = static_cast<T*>(a.k_out) + t * a.k_heads * a.head_dim;
    for (int h = h0; h < heads; h += per_pass) {
      const bool is_q = h < a.q_heads;
      const T* x = is_q ? qrow + h * a.q_sh : krow + (h - a.q_heads) * a.k_sh;
      T* y = is_q ? qout + int64_t(h) * a.head_dim : kout + int64_t(h - a.q_heads) * a.head_dim;
      if constexpr (Interleaved) {
        float v[N], o[N];
        if (ok) {
          load_pack<T, N>(x + col, v);
#pragma unroll
          for (int j = 0; j < N; j += 2) rope_rotate_pair(v[j], v[j + 1], c[j / 2], sn[j / 2], o[j], o[j + 1]);
        } else {
#pragma unroll
          for (int j = 0; j < N; ++j) o[j] = NAN;
        }
        store_pack<T, N>(y + col, o);
      } else {
        float x1[N], x2[N], o1[N], o2[N];
        if (ok) {
          load_pack<T, N>(x + col, x1);
          load_pack<T, N>(x + half + col, x2);
#pragma unroll
          for (int j = 0; j < N; ++j) rope_rotate_pair(x1[j], x2[j], c[j], sn[j], o1[j], o2[j]);
        } else {
#pragma unroll
          for (int j = 0; j < N; ++j) o1[j] = o2[j] = NAN;
        }
        store_pack<T, N>(y + col, o1);
        store_pack<T, N>(y + half + col, o2);
      }
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
    const int64_t heads = a.q_heads + a.k_heads, tokens = a.batch * a.seq;
    const int64_t chunks = (a.interleaved ? a.head_dim : half) / W;
    if (w == W && chunks <= kThreads && heads <= 0x7fffffffLL) {
      // a block: every chunk of as many heads as fit in kThreads threads
      const int64_t per_pass = std::min<int64_t>(heads, kThreads / chunks);
      const int threads = int(chunks * per_pass);
      const unsigned blocks = unsigned(std::min<int64_t>(tokens, int64_t(device_sm_count()) * (2048 / threads)));
      // chunks start at multiples of 4 table entries (W >= 4 elements: 2 interleaved pairs at least)
      const bool table_vec = reinterpret_cast<uintptr_t>(a.cos) % 16 == 0 &&
                             reinterpret_cast<uintptr_t>(a.sin) % 16 == 0 && a.cos_stride % 4 == 0 &&
                             a.sin_stride % 4 == 0;
      if (a.interleaved) {
        rope_vec_kernel<T, W, true><<<blocks, threads, 0, stream>>>(a, bad, table_vec);
      } else {
        rope_vec_kernel<T, W, false><<<blocks, threads, 0, stream>>>(a, bad, table_vec);
      }
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
