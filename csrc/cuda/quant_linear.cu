// Quantized-weight GEMV (decode) and tile dequantisation (prefill, before cuBLAS). One warp per
// output feature: each lane loads 16 bytes of the row at a time (16 int8 or 32 int4 weights),
// widens them to float with the scale (and zero point) applied, and multiplies them with every row
// of x; the lanes' sums meet by warp shuffles. The weight is read once, in 512-byte coalesced runs.
#include "cuda/cuda_utils.cuh"
#include "cuda/quant_linear.h"

namespace exaone_ext::cuda {
namespace {

constexpr int kWarps = 4;  // output features per block
constexpr int kMaxRows = int(kQuantGemvMaxRows);

// The 16 or 32 weights of 16 bytes at p (byte offset `byte` of row n), dequantised.
template <int Bits, typename S, bool Vec16>
__device__ __forceinline__ void weights16(const QuantGemvArgs& a, const uint8_t* row, int64_t n, int64_t byte,
                                          float (&w)[32]) {
  uint8_t b[16];
  if constexpr (Vec16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(row + byte);
    const uint8_t* rb = reinterpret_cast<const uint8_t*>(&raw);
#pragma unroll
    for (int e = 0; e < 16; ++e) b[e] = rb[e];
  } else {
#pragma unroll
    for (int e = 0; e < 16; ++e) b[e] = row[byte + e];
  }
  if constexpr (Bits == 8) {
    const float s = ld(static_cast<const S*>(a.scales) + n);
#pragma unroll
    for (int e = 0; e < 16; ++e) w[e] = float(int8_t(b[e])) * s;
  } else {
    const int64_t groups = a.k / a.group, g = (2 * byte) / a.group;
    const float s = ld(static_cast<const S*>(a.scales) + n * groups + g);
    const int z = a.zeros[n * groups + g];
#pragma unroll
    for (int e = 0; e < 16; ++e) {
      w[e] = float(int(b[e] & 15) - z) * s;
      w[16 + e] = float(int(b[e] >> 4) - z) * s;
    }
  }
}

template <typename T, typename S, int Bits, bool Vec16>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(QuantGemvArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= a.n) return;
  constexpr int per = Bits == 8 ? 16 : 32;  // weights per 16 bytes
  const uint8_t* row = static_cast<const uint8_t*>(a.q) + n * a.q_stride;
  const T* x = static_cast<const T*>(a.x);
  float acc[kMaxRows];
#pragma unroll
  for (int j = 0; j < kMaxRows; ++j) acc[j] = 0.f;
  const int64_t full = a.k / per;  // whole 16-byte runs (int4: k is a multiple of 32)
  for (int64_t c = lane; c < full; c += 32) {
    float w[32];
    weights16<Bits, S, Vec16>(a, row, n, c * 16, w);
    const int64_t k0 = c * per;
#pragma unroll
    for (int j = 0; j < kMaxRows; ++j) {
      if (j < a.m) {
        const T* xr = x + j * a.x_stride + k0;
#pragma unroll
        for (int e = 0; e < per; ++e) acc[j] = fmaf(ld(xr + e), w[e], acc[j]);
      }
    }
  }
  if constexpr (Bits == 8) {  // the last k % 16 elements
    const float s = ld(static_cast<const S*>(a.scales) + n);
    for (int64_t i = full * per + lane; i < a.k; i += 32) {
      const float w = float(int8_t(row[i])) * s;
#pragma unroll
      for (int j = 0; j < kMaxRows; ++j)
        if (j < a.m) acc[j] = fmaf(ld(x + j * a.x_stride + i), w, acc[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < kMaxRows; ++j) {
    if (j < a.m) {
      float v = acc[j];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) st(static_cast<T*>(a.y) + j * a.y_stride + n, v);
    }
  }
}

// One thread per 16 bytes of weight.
template <typename T, typename S, int Bits, bool Vec16>
__global__ void dequant_kernel(QuantGemvArgs a, int64_t n0, int64_t n1, T* out) {
  constexpr int per = Bits == 8 ? 16 : 32;
  const int64_t runs = (a.k + per - 1) / per, total = (n1 - n0) * runs;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / runs, c = i - r * runs, n = n0 + r;
    const uint8_t* row = static_cast<const uint8_t*>(a.q) + n * a.q_stride;
    T* o = out + r * a.k + c * per;
    if (Bits == 8 && (c + 1) * per > a.k) {  // a short last run
      const float s = ld(static_cast<const S*>(a.scales) + n);
      for (int64_t e = c * per; e < a.k; ++e) st(out + r * a.k + e, float(int8_t(row[e])) * s);
      continue;
    }
    float w[32];
    weights16<Bits, S, Vec16>(a, row, n, c * 16, w);
#pragma unroll
    for (int e = 0; e < per; ++e) st(o + e, w[e]);
  }
}

// Calls f.template operator()<T, S, Bits, Vec16>().
template <typename F>
void dispatch(const QuantGemvArgs& a, F&& f) {
  const bool vec = reinterpret_cast<uintptr_t>(a.q) % 16 == 0 && a.q_stride % 16 == 0;
  by_dtype(a.dtype, [&]<typename T>() {
    const auto with_s = [&]<typename S>() {
      const auto with_bits = [&]<int Bits>() {
        if (vec) f.template operator()<T, S, Bits, true>();
        else f.template operator()<T, S, Bits, false>();
      };
      if (a.bits == 8) with_bits.template operator()<8>();
      else with_bits.template operator()<4>();
    };
    if (a.s_dtype == DType::kFloat32) with_s.template operator()<float>();
    else with_s.template operator()<T>();
  });
}

}  // namespace

void quant_gemv(const QuantGemvArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return;
  if (a.m > kQuantGemvMaxRows) throw std::invalid_argument("exaone_ext: quant_gemv takes at most 16 rows of x");
  dispatch(a, [&]<typename T, typename S, int Bits, bool V>() {
    const unsigned blocks = unsigned((a.n + kWarps - 1) / kWarps);
    gemv_kernel<T, S, Bits, V><<<blocks, kWarps * 32, 0, stream>>>(a);
  });
  check_launch("quant_gemv");
}

void quant_dequant(const QuantGemvArgs& a, int64_t n0, int64_t n1, void* out, cudaStream_t stream) {
  if (n1 <= n0 || a.k == 0) return;
  dispatch(a, [&]<typename T, typename S, int Bits, bool V>() {
    const int64_t per = Bits == 8 ? 16 : 32;
    dequant_kernel<T, S, Bits, V><<<grid_for((n1 - n0) * ((a.k + per - 1) / per), 256), 256, 0, stream>>>(
        a, n0, n1, static_cast<T*>(out));
  });
  check_launch("quant_dequant");
}

}  // namespace exaone_ext::cuda
