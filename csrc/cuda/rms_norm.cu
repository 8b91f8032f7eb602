// RMSNorm forward and backward on CUDA.
//
// Forward: one warp per row when a row is at most kWarpPacks packs (several rows per block);
// rows of up to kResidentThreads * 8 packs (the model's hidden sizes) take the resident kernel:
// enough blocks to fill the device, each keeping its columns of the weight in registers and walking
// rows with the row's values held in registers between the sum of squares and the scaling (x read
// once, h never read back); longer rows get one block per row. A pack is N elements moved as one 16-byte access when every
// pointer and stride allows, else one element. Each thread visits the same columns in both
// passes, so the second pass (and, for add_rms_norm, the read back of h it wrote) is its own data.
// Backward: stage one, one block per fixed chunk of rows: dx for each row and that chunk's partial
// weight gradient (each thread owns its columns, rows added in order); stage two adds the partial
// rows in chunk order per column. Both orders depend on the shape only: the result is reproducible.
#include "common/rms_norm.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/rms_norm.h"

namespace exaone_ext::cuda {
namespace {

constexpr int kWarpPacks = 64;      // rows of at most this many packs get one warp
constexpr int kRowsPerBlock = 4;    // warps (rows) per block in the warp-per-row forward
constexpr int kMaxThreads = 512;
constexpr int kResidentThreads = 256;  // most threads of a resident block (packs per thread 1, 2, 4 or 8)

template <typename T> __device__ __forceinline__ float rnd(float v) { return v; }
template <> __device__ __forceinline__ float rnd<bf16>(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
template <> __device__ __forceinline__ float rnd<f16>(float v) { return __half2float(__float2half_rn(v)); }

// N float32 weights; 16-byte loads when N is a multiple of 4 (the pointer is then 16-byte aligned).
template <int N>
__device__ __forceinline__ void load_weight(const float* p, float (&w)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 v = *reinterpret_cast<const float4*>(p + i);
      w[i] = v.x; w[i + 1] = v.y; w[i + 2] = v.z; w[i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) w[i] = p[i];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (kBlock) or over the warp; every thread gets the result. Fixed tree: deterministic.
template <bool kBlock>
__device__ __forceinline__ float row_sum(float v, float* smem) {
  v = warp_sum(v);
  if constexpr (kBlock) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    __syncthreads();  // smem may still be read from the previous call
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = lane < warps ? smem[lane] : 0.f;
    v = warp_sum(v);
  }
  return v;
}

template <typename T, int N, bool kAdd, bool kBlock>
__global__ void rms_norm_fwd_kernel(RmsNormArgs a) {
  __shared__ float smem[32];
  const int64_t row = kBlock ? int64_t(blockIdx.x) : int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int tid = kBlock ? threadIdx.x : threadIdx.x % 32;
  const int nthreads = kBlock ? blockDim.x : 32;
  if (row >= a.rows) return;  // whole warps only (warp mode); never taken in block mode
  const int64_t n = a.cols;
  const T* x = static_cast<const T*>(a.x) + row * a.x_stride;
  const float* w = static_cast<const float*>(a.weight);
  T* y = static_cast<T*>(a.y) + row * n;
  const T* src = x;
  float ss = 0.f;
  if constexpr (kAdd) {
    const T* r = static_cast<const T*>(a.residual) + row * a.residual_stride;
    T* h = static_cast<T*>(a.h) + row * n;
    for (int64_t c = int64_t(tid) * N; c < n; c += int64_t(nthreads) * N) {
      float xv[N], rv[N];
      load_pack<T, N>(x + c, xv);
      load_pack<T, N>(r + c, rv);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        xv[j] = rnd<T>(xv[j] + rv[j]);
        ss += xv[j] * xv[j];
      }
      store_pack<T, N>(h + c, xv);
    }
    src = h;
  } else {
    for (int64_t c = int64_t(tid) * N; c < n; c += int64_t(nthreads) * N) {
      float xv[N];
      load_pack<T, N>(x + c, xv);
#pragma unroll
      for (int j = 0; j < N; ++j) ss += xv[j] * xv[j];
    }
  }
  ss = row_sum<kBlock>(ss, smem);
  // one per row: worth computing correctly rounded (rsqrtf is a 2-ulp approximation, and the
  // weight gradient sums this error over every row)
  const float rstd = float(1.0 / sqrt(double(ss) / double(n) + a.eps));
  if (tid == 0) static_cast<float*>(a.rstd)[row] = rstd;
  for (int64_t c = int64_t(tid) * N; c < n; c += int64_t(nthreads) * N) {
    float xv[N], wv[N];
    load_pack<T, N>(src + c, xv);
    load_weight<N>(w + c, wv);
#pragma unroll
    for (int j = 0; j < N; ++j) xv[j] = wv[j] * rnd<T>(xv[j] * rstd);
    store_pack<T, N>(y + c, xv);
  }
}

// Resident forward: thread t owns packs t, t + blockDim, ... (kPacks of them) of every row; the
// block walks rows blockIdx.x, + gridDim.x, ... with the weight loaded once.
template <typename T, int N, int kPacks, bool kAdd>
__global__ void __launch_bounds__(kResidentThreads) rms_norm_fwd_resident_kernel(RmsNormArgs a) {
  __shared__ float smem[32];
  const int64_t n = a.cols;
  const int tid = threadIdx.x;
  float wv[kPacks][N];
  bool has[kPacks];
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int64_t c = (int64_t(k) * blockDim.x + tid) * N;
    has[k] = c < n;
    if (has[k]) {
      load_weight<N>(static_cast<const float*>(a.weight) + c, wv[k]);
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) wv[k][j] = 0.f;
    }
  }
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(a.x) + row * a.x_stride;
    T* y = static_cast<T*>(a.y) + row * n;
    float xv[kPacks][N];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t c = (int64_t(k) * blockDim.x + tid) * N;
      if (!has[k]) continue;
      load_pack<T, N>(x + c, xv[k]);
      if constexpr (kAdd) {
        float rv[N];
        load_pack<T, N>(static_cast<const T*>(a.residual) + row * a.residual_stride + c, rv);
#pragma unroll
        for (int j = 0; j < N; ++j) xv[k][j] = rnd<T>(xv[k][j] + rv[j]);
        store_pack<T, N>(static_cast<T*>(a.h) + row * n + c, xv[k]);
      }
#pragma unroll
      for (int j = 0; j < N; ++j) ss += xv[k][j] * xv[k][j];
    }
    ss = row_sum<true>(ss, smem);
    const float rstd = float(1.0 / sqrt(double(ss) / double(n) + a.eps));  // as the other kernels
    if (tid == 0) static_cast<float*>(a.rstd)[row] = rstd;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      if (!has[k]) continue;
#pragma unroll
      for (int j = 0; j < N; ++j) xv[k][j] = wv[k][j] * rnd<T>(xv[k][j] * rstd);
      store_pack<T, N>(y + (int64_t(k) * blockDim.x + tid) * N, xv[k]);
    }
  }
}

// One block per chunk of rows: dx, and the chunk's partial weight gradient in dw_partial[chunk].
template <typename T, int N>
__global__ void rms_norm_bwd_kernel(RmsNormBackwardArgs a) {
  __shared__ float smem[32];
  const int64_t n = a.cols, chunk = blockIdx.x;
  const float* w = static_cast<const float*>(a.weight);
  float* dw = static_cast<float*>(a.dw_partial) + chunk * n;
  const int64_t begin = chunk * a.chunk_rows;
  const int64_t end = min(a.rows, begin + a.chunk_rows);
  const int64_t step = int64_t(blockDim.x) * N;
  for (int64_t c = int64_t(threadIdx.x) * N; c < n; c += step)
#pragma unroll
    for (int j = 0; j < N; ++j) dw[c + j] = 0.f;
  for (int64_t row = begin; row < end; ++row) {
    const T* x = static_cast<const T*>(a.x) + row * a.x_stride;
    const T* dy = static_cast<const T*>(a.dy) + row * a.dy_stride;
    T* dx = static_cast<T*>(a.dx) + row * n;
    const float rs = static_cast<const float*>(a.rstd)[row];
    float s = 0.f;
    for (int64_t c = int64_t(threadIdx.x) * N; c < n; c += step) {
      float xv[N], dv[N], wv[N];
      load_pack<T, N>(x + c, xv);
      load_pack<T, N>(dy + c, dv);
      load_weight<N>(w + c, wv);
#pragma unroll
      for (int j = 0; j < N; ++j) s += dv[j] * wv[j] * xv[j];
    }
    s = row_sum<true>(s, smem);
    const float k = rs * rs * rs * s / float(n);
    for (int64_t c = int64_t(threadIdx.x) * N; c < n; c += step) {
      float xv[N], dv[N], wv[N], out[N];
      load_pack<T, N>(x + c, xv);
      load_pack<T, N>(dy + c, dv);
      load_weight<N>(w + c, wv);
      if (a.dh) {
        load_pack<T, N>(static_cast<const T*>(a.dh) + row * a.dh_stride + c, out);
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j) out[j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        out[j] += rs * (dv[j] * wv[j]) - k * xv[j];
        dw[c + j] += dv[j] * rnd<T>(xv[j] * rs);
      }
      store_pack<T, N>(dx + c, out);
    }
  }
}

// dw[c] = sum over chunks, in chunk order, of dw_partial[chunk][c], added in float64 (up to 512
// chunks: a float32 running sum would lose more than PyTorch's own reduction does)
__global__ void rms_norm_dw_reduce_kernel(const float* partial, float* dw, int64_t chunks, int64_t cols) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < cols; c += int64_t(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int64_t k = 0; k < chunks; ++k) s += partial[k * cols + c];
    dw[c] = float(s);
  }
}

int threads_for(int64_t packs) {
  int64_t t = (packs + 31) / 32 * 32;
  return int(t < 32 ? 32 : (t > kMaxThreads ? kMaxThreads : t));
}

// Blocks for the resident kernel: as many as fit on the device at once, never more than rows.
template <typename Kernel>
unsigned resident_blocks(Kernel kernel, int threads, int64_t rows) {
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0) != cudaSuccess || per_sm <= 0) {
    cudaGetLastError();
    per_sm = 1;
  }
  const int64_t blocks = int64_t(per_sm) * device_sm_count();
  return unsigned(rows < blocks ? rows : blocks);
}

template <typename T, int N, bool kAdd>
void launch_forward(const RmsNormArgs& a, cudaStream_t stream) {
  const int64_t packs = (a.cols + N - 1) / N;
  if (packs <= kWarpPacks) {
    const unsigned blocks = unsigned((a.rows + kRowsPerBlock - 1) / kRowsPerBlock);
    rms_norm_fwd_kernel<T, N, kAdd, false><<<blocks, 32 * kRowsPerBlock, 0, stream>>>(a);
  } else if (packs <= 8 * kResidentThreads) {
    auto launch = [&]<int kPacks>() {
      const int threads = int((packs + kPacks - 1) / kPacks + 31) / 32 * 32;
      auto kernel = rms_norm_fwd_resident_kernel<T, N, kPacks, kAdd>;
      kernel<<<resident_blocks(kernel, threads, a.rows), threads, 0, stream>>>(a);
    };
    if (packs <= kResidentThreads) {
      launch.template operator()<1>();
    } else if (packs <= 2 * kResidentThreads) {
      launch.template operator()<2>();
    } else if (packs <= 4 * kResidentThreads) {
      launch.template operator()<4>();
    } else {
      launch.template operator()<8>();
    }
  } else {
    rms_norm_fwd_kernel<T, N, kAdd, true><<<unsigned(a.rows), threads_for(packs), 0, stream>>>(a);
  }
}

}  // namespace

void rms_norm_forward(const RmsNormArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.cols == 0) return;
  if (a.rows > 0x7fffffffLL) throw std::invalid_argument("exaone_ext.rms_norm: more than 2^31 - 1 rows");
  by_dtype(a.dtype, [&]<typename T>() {
    constexpr int W = 16 / sizeof(T);
    const bool vec = vector_width<T>(a.cols, {a.x, a.residual ? a.residual : a.x, a.y, a.h ? a.h : a.y, a.weight},
                                     {a.x_stride, a.residual ? a.residual_stride : a.x_stride}) == W;
    if (a.residual) {
      vec ? launch_forward<T, W, true>(a, stream) : launch_forward<T, 1, true>(a, stream);
    } else {
      vec ? launch_forward<T, W, false>(a, stream) : launch_forward<T, 1, false>(a, stream);
    }
  });
  check_launch("rms_norm_forward");
}

void rms_norm_backward(const RmsNormBackwardArgs& a, cudaStream_t stream) {
  if (a.cols == 0) return;
  by_dtype(a.dtype, [&]<typename T>() {
    constexpr int W = 16 / sizeof(T);
    const bool vec = vector_width<T>(a.cols, {a.x, a.dy, a.dx, a.dh ? a.dh : a.dx, a.weight},
                                     {a.x_stride, a.dy_stride, a.dh ? a.dh_stride : a.x_stride}) == W;
    if (a.chunks > 0) {
      if (vec) {
        rms_norm_bwd_kernel<T, W><<<unsigned(a.chunks), threads_for(a.cols / W), 0, stream>>>(a);
      } else {
        rms_norm_bwd_kernel<T, 1><<<unsigned(a.chunks), threads_for(a.cols), 0, stream>>>(a);
      }
    }
  });
  check_launch("rms_norm_backward (rows)");
  rms_norm_dw_reduce_kernel<<<grid_for(a.cols, 256), 256, 0, stream>>>(
      static_cast<const float*>(a.dw_partial), static_cast<float*>(a.dw), a.chunks, a.cols);
  check_launch("rms_norm_backward (weight gradient)");
}

}  // namespace exaone_ext::cuda
