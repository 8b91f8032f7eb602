// Tensor-core and shared-memory primitives of the attention kernels (sm_80 and up).
//
// mma.sync m16n8k16, row.col, 16-bit inputs, fp32 accumulators. With lane = 4 * gid + tig
// (gid = lane / 4, tig = lane % 4), the fragments hold:
//   A (16 x 16, m x k): a[0] = A[gid][2tig, 2tig+1]      a[1] = A[gid+8][2tig, 2tig+1]
//                        a[2] = A[gid][2tig+8, 2tig+9]    a[3] = A[gid+8][2tig+8, 2tig+9]
//   B (16 x 8,  k x n): b0 = B[2tig, 2tig+1][gid]        b1 = B[2tig+8, 2tig+9][gid]
//   C (16 x 8,  m x n): c[0], c[1] = C[gid][2tig, 2tig+1]  c[2], c[3] = C[gid+8][2tig, 2tig+1]
// (the lower 16 bits of a register hold the element with the smaller k). So the C fragments of two
// adjacent n-tiles (columns 0-7 and 8-15) are, element for element, the A fragment of a k16 chunk:
// that is how P = softmax(S) feeds the next product without leaving registers.
//
// Shared tiles are arrays of 16-bit words with a row stride (in elements) that is a multiple of 8
// plus 8, so 16-byte rows stay aligned and the fragment loads below hit distinct banks.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common/dtypes.h"

namespace exaone_ext::cuda::attn {

constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, bf16> || std::is_same_v<T, f16>, "mma takes bfloat16 or float16");
  if constexpr (std::is_same_v<T, bf16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats rounded to T, lo in the lower half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, bf16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// Bits of one float rounded to T.
template <typename T>
__device__ __forceinline__ uint16_t bits_of(float x) {
  if constexpr (std::is_same_v<T, bf16>) {
    const __nv_bfloat16 v = __float2bfloat16_rn(x);
    return *reinterpret_cast<const uint16_t*>(&v);
  } else {
    const __half v = __float2half_rn(x);
    return *reinterpret_cast<const uint16_t*>(&v);
  }
}

// Two consecutive elements (even index) of a shared tile as one register.
__device__ __forceinline__ uint32_t lds_pair(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }
// Two elements one row apart (row stride `stride`) as one register: p[0] low, p[stride] high.
__device__ __forceinline__ uint32_t lds_col_pair(const uint16_t* p, int stride) {
  return uint32_t(p[0]) | (uint32_t(p[stride]) << 16);
}

// Four 8x8 matrices of 16-bit elements from shared memory in one instruction. Lane l supplies the
// address of row l % 8 of matrix l / 8 (16-byte aligned). Without .trans, register i of lane l holds
// row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 of matrix i; with .trans it holds rows 2 (l % 4)
// and 2 (l % 4) + 1 of column l / 4: exactly an A/B fragment half of the mma above.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row_address) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* row_address) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// --- asynchronous global -> shared copies --------------------------------------------------------
// 16 bytes; when !valid nothing is read and the destination is zero-filled.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Copies a tile of `rows` rows x D elements (D a multiple of 8) into shared memory with row stride
// SD. row_ptr(r) gives the global address of row r, or nullptr for a row that does not exist
// (zero-filled). With aligned (every row address 16-byte aligned) the copy is asynchronous
// (cp.async, to be committed and waited by the caller); otherwise it is an ordinary load and store.
template <int D, int SD, int kThreads, typename RowPtr>
__device__ __forceinline__ void load_tile(uint16_t* smem, int rows, bool aligned, const RowPtr& row_ptr,
                                          const void* any_valid_address) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert(D % 8 == 0, "rows are copied in 16-byte chunks");
  for (int c = threadIdx.x; c < rows * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const uint16_t* src = static_cast<const uint16_t*>(row_ptr(r));
    uint16_t* dst = smem + r * SD + col;
    if (aligned) {
      cp_async_16(dst, src ? static_cast<const void*>(src + col) : any_valid_address, src != nullptr);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = src ? src[col + e] : uint16_t(0);
    }
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// 2^x on the special-function unit (ex2.approx, denormal results flushed to zero): the tensor-core
// kernels' softmax, whose bf16/fp16 probabilities need no more. The build has no --use_fast_math,
// so plain exp2f/expf elsewhere (the float32 path) stay accurate.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace exaone_ext::cuda::attn
