// oneDNN's batch-reduce GEMM micro-kernels through torch (at::native::cpublas::brgemm), for the
// bfloat16 products of the CPU kernels: AMX tiles on CPUs with AMX-BF16 (several times what
// vdpbf16ps gives), AVX512-BF16 / AVX-512 code elsewhere, so the same route runs (and is tested) on
// CPUs without AMX. The torch-free kernels of csrc/cpu never include this: the torch layer hands
// them brgemm_bf16 as a function pointer, or calls it itself.
#pragma once
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

// The rule of a brgemm switch: mode 0 never, -1 (the default) where the CPU has AMX-BF16, 1 wherever
// brgemm works; and always only on the AVX-512 variant with AVX512-BF16 allowed and oneDNN enabled.
bool brgemm_allowed(int mode);

// Returns the mode normalised to -1, 0 or 1.
inline int brgemm_mode(int mode) { return mode < 0 ? -1 : mode > 0 ? 1 : 0; }

// The engine brgemm runs on, in words: "oneDNN brgemm (AMX)" or "oneDNN brgemm (AVX-512)".
const char* brgemm_engine_name();

}  // namespace exaone_ext
