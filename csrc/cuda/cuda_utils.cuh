// Device helpers shared by the CUDA kernels: conversions through the hardware intrinsics,
// 16-byte vector access and launch-error reporting. CUDA headers only, no torch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/dtypes.h"

namespace exaone_ext::cuda {

__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const bf16* p) { return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(p)); }
__device__ __forceinline__ float ld(const f16* p) { return __half2float(*reinterpret_cast<const __half*>(p)); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(bf16* p, float v) { *reinterpret_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(v); }
__device__ __forceinline__ void st(f16* p, float v) { *reinterpret_cast<__half*>(p) = __float2half_rn(v); }

// N elements of T moved as one aligned 16-byte (or smaller) transaction.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[N]) {
  Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = ld(&pk.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) st(&pk.v[i], in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// Elements per 16 bytes when every pointer and row stride allows it, else 1.
template <typename T>
inline int vector_width(int64_t cols, std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides) {
  constexpr int w = 16 / sizeof(T);
  if (cols % w) return 1;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16) return 1;
  for (int64_t s : strides)
    if (s % w) return 1;
  return w;
}

inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("exaone_ext: CUDA launch of ") + what + " failed: " + cudaGetErrorString(err));
}

// Blocks for a grid-stride loop over n work items: enough to fill the device, never more than needed.
inline unsigned grid_for(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  const int64_t cap = 65535LL * 8;
  return unsigned(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// Multiprocessors of the current device, asked once per device.
inline int device_sm_count() {
  static std::atomic<int> cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) check_launch("cudaGetDevice");
  if (dev < 0 || dev >= 64) dev = 0;
  int n = cache[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
      cudaGetLastError();
      n = 108;
    }
    cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Calls f.template operator()<T>() with T the storage type of dt (float32 / bfloat16 / float16).
template <typename F>
void by_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: f.template operator()<float>(); return;
    case DType::kBFloat16: f.template operator()<bf16>(); return;
    case DType::kFloat16: f.template operator()<f16>(); return;
    default: throw std::invalid_argument("exaone_ext: CUDA kernels take float32, bfloat16 or float16");
  }
}

}  // namespace exaone_ext::cuda
