// SwiGLU forward and backward: one thread per N-element pack (16-byte loads where alignment
// allows), grid-stride over rows x packs. The math is common/activations.h, shared with the CPU.
#include "common/activations.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/swiglu.h"

namespace exaone_ext::cuda {
namespace {

template <typename T, int N>
__global__ void swiglu_fwd_kernel(int64_t rows, int64_t cols, const T* gate, int64_t gs, const T* up, int64_t us,
                                  T* out, int64_t os) {
  const int64_t packs = cols / N, total = rows * packs;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / packs, c = (i - r * packs) * N;
    float g[N], u[N], y[N];
    load_pack<T, N>(gate + r * gs + c, g);
    load_pack<T, N>(up + r * us + c, u);
#pragma unroll
    for (int j = 0; j < N; ++j) y[j] = swiglu_value(g[j], u[j]);
    store_pack<T, N>(out + r * os + c, y);
  }
}

template <typename T, int N>
__global__ void swiglu_bwd_kernel(int64_t rows, int64_t cols, const T* dy, int64_t ds, const T* gate, int64_t gs,
                                  const T* up, int64_t us, T* dgate, int64_t dgs, T* dup, int64_t dus) {
  const int64_t packs = cols / N, total = rows * packs;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / packs, c = (i - r * packs) * N;
    float g[N], u[N], d[N], dg[N], du[N];
    load_pack<T, N>(gate + r * gs + c, g);
    load_pack<T, N>(up + r * us + c, u);
    load_pack<T, N>(dy + r * ds + c, d);
#pragma unroll
    for (int j = 0; j < N; ++j) swiglu_grads(g[j], u[j], d[j], dg[j], du[j]);
    store_pack<T, N>(dgate + r * dgs + c, dg);
    store_pack<T, N>(dup + r * dus + c, du);
  }
}

constexpr int kThreads = 256;

}  // namespace

void swiglu_forward(const SwigluArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.cols == 0) return;
  by_dtype(a.dtype, [&]<typename T>() {
    auto* g = static_cast<const T*>(a.gate);
    auto* u = static_cast<const T*>(a.up);
    auto* y = static_cast<T*>(a.out);
    constexpr int W = 16 / sizeof(T);
    if (vector_width<T>(a.cols, {a.gate, a.up, a.out}, {a.gate_stride, a.up_stride, a.out_stride}) == W) {
      swiglu_fwd_kernel<T, W><<<grid_for(a.rows * a.cols / W, kThreads), kThreads, 0, stream>>>(
          a.rows, a.cols, g, a.gate_stride, u, a.up_stride, y, a.out_stride);
    } else {
      swiglu_fwd_kernel<T, 1><<<grid_for(a.rows * a.cols, kThreads), kThreads, 0, stream>>>(
          a.rows, a.cols, g, a.gate_stride, u, a.up_stride, y, a.out_stride);
    }
  });
  check_launch("swiglu_forward");
}

void swiglu_backward(const SwigluArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.cols == 0) return;
  by_dtype(a.dtype, [&]<typename T>() {
    auto* d = static_cast<const T*>(a.dy);
    auto* g = static_cast<const T*>(a.gate);
    auto* u = static_cast<const T*>(a.up);
    auto* dg = static_cast<T*>(a.out);
    auto* du = static_cast<T*>(a.out2);
    constexpr int W = 16 / sizeof(T);
    if (vector_width<T>(a.cols, {a.dy, a.gate, a.up, a.out, a.out2},
                        {a.dy_stride, a.gate_stride, a.up_stride, a.out_stride, a.out2_stride}) == W) {
      swiglu_bwd_kernel<T, W><<<grid_for(a.rows * a.cols / W, kThreads), kThreads, 0, stream>>>(
          a.rows, a.cols, d, a.dy_stride, g, a.gate_stride, u, a.up_stride, dg, a.out_stride, du, a.out2_stride);
    } else {
      swiglu_bwd_kernel<T, 1><<<grid_for(a.rows * a.cols, kThreads), kThreads, 0, stream>>>(
          a.rows, a.cols, d, a.dy_stride, g, a.gate_stride, u, a.up_stride, dg, a.out_stride, du, a.out2_stride);
    }
  });
  check_launch("swiglu_backward");
}

}  // namespace exaone_ext::cuda
