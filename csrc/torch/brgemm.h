// oneDNN's batch-reduce GEMM micro-kernels through torch (at::native::cpublas::brgemm), for the
// bfloat16 products of the CPU kernels: AMX tiles on CPUs with AMX-BF16 (several times what
// vdpbf16ps gives), AVX512-BF16 / AVX-512 code elsewhere, so the same route runs (and is tested) on
// CPUs without AMX. The torch-free kernels of csrc/cpu never include this: the torch layer hands
// them brgemm_bf16 as a function pointer, or calls it itself.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace exaone_ext {

// C[M, N] (float32, rows ldc apart) (+)= A[M, K] (bf16, rows lda apart) x B[K, N], B in VNNI pairs:
// B[k][n] at B[(k / 2) * 2 * ldb + 2 * n + k % 2] (K even). add: accumulate into C.
void brgemm_bf16(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                 const uint16_t* A, const uint16_t* B, float* C);

// Hands back this thread's hardware context (AMX tile configuration) after brgemm_bf16 calls.
void brgemm_release();

// Whether brgemm works here: products in the shapes and strides the kernels use against plain
// loops, checked exactly once; any error or difference means no.
bool brgemm_works();

// Whether the CPU has AMX-BF16 tiles.
bool cpu_amx_bf16();

// The rule of a brgemm switch: mode 0 never, -1 (the default) where the CPU has AMX-BF16, and for an
// attention forward (`forward`) also on AMD Zen 5 and later (family 26+, full 512-bit datapaths),
// 1 wherever brgemm works; and always only on the AVX-512 variant with AVX512-BF16 allowed and
// oneDNN enabled.
bool brgemm_allowed(int mode, bool forward = false);

// Returns the mode normalised to -1, 0 or 1.
inline int brgemm_mode(int mode) { return mode < 0 ? -1 : mode > 0 ? 1 : 0; }

// The engine brgemm runs on, in words: "oneDNN brgemm (AMX)" or "oneDNN brgemm (AVX-512)".
const char* brgemm_engine_name();

// ---- y = x @ W.T for a few rows of bfloat16 x, with W's rows as brgemm's A (read where they lie:
// oneDNN's own matmul reorders the whole weight on every call) and x^T in VNNI pairs as its B.
// kBrgemmRowAlign: x is padded with zero rows to a multiple of it (a ragged N ran at the speed of
// the next multiple of 16 or slower). Each call takes kBrgemmFeatures output features over
// kBrgemmDepth elements of k, accumulating in C across k. Measured on a Zen 4 (brgemm's AVX-512
// code, 2 threads, the 2.4B shapes): 32 x 1024 read the weight fastest of 16-64 features x 256,
// 1024 or all of k (all of k at once: 2-4x slower for k = 7168, 32-64 rows streamed far apart).
inline constexpr int64_t kBrgemmRowAlign = 16;
inline constexpr int64_t kBrgemmFeatures = 32;
inline constexpr int64_t kBrgemmDepth = 1024;

// x2 [m, k] bfloat16 (k even) -> x^T in VNNI pairs [k / 2][mp][2], mp = m rounded up to kBrgemmRowAlign
// (the extra rows zero). Returns the tensor; mp through the reference.
at::Tensor brgemm_x_vnni(const at::Tensor& x2, int64_t& mp);

// Output features of W rows w (nb <= kBrgemmFeatures rows, lda apart, bfloat16, k long) for the m
// rows of x_vnni (padded to mp): C [nb][mp] float32 scratch, then y[row][0..nb) (bfloat16, rows
// y_stride apart) for row < m, rounded to nearest even.
void brgemm_features(const uint16_t* w, int64_t lda, int64_t nb, int64_t k, const uint16_t* x_vnni, int64_t m,
                     int64_t mp, float* c, uint16_t* y, int64_t y_stride);

}  // namespace exaone_ext
