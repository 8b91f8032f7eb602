// Flash-attention kernel bodies, written once against cpu/vec.h and compiled per instruction set by
// attention_avx512.cpp, attention_avx2.cpp and attention_scalar.cpp (see cpu/attention.h).
//
// Tiles are kept "keys by rows": S^T [keys, rows] = K [keys, d] . Q^T [d, rows], where a row is a
// (query position, q head) pair of one kv-head group. The softmax statistics of each row are then
// a column of the tile, so the max / exp / sum run along full vectors, Q^T is packed once per
// query block and K / V are used in their natural layout. All products go through one register-
// blocked micro-kernel C (+)= A . B that vectorises over B's rows and broadcasts A's elements
// (A may be read transposed through its strides).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/attention.h"
#include "cpu/vec.h"

namespace exaone_ext::cpu::EXAONE_ISA {
namespace {

constexpr int W = Vec::size;
#if defined(EXAONE_VEC_AVX512)
constexpr int kR = 6, kNV = 4;  // 24 accumulators + 4 B vectors + 1 broadcast of 32 registers
#elif defined(EXAONE_VEC_AVX2)
constexpr int kR = 6, kNV = 2;  // 12 accumulators + 2 B vectors + 1 broadcast of 16 registers
#else
constexpr int kR = 4, kNV = 4;
#endif
constexpr int64_t BK = kAttnBlockK;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename A> constexpr int64_t lanes() { return std::is_same_v<A, double> ? 1 : W; }

// ---- C[i][n] (+)= sum_k a(i, k) * B[k][n], a(i, k) = a[i * a_si + k * a_sc] ----------------------

template <int R, int NV, typename TB>
inline void micro(float* C, int64_t ldc, const float* a, int64_t a_si, int64_t a_sc, const TB* b, int64_t ldb,
                  int64_t K, bool acc) {
  Vec c[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[r][v] = acc ? Vec::load(C + r * ldc + v * W) : Vec::zero();
  for (int64_t k = 0; k < K; ++k) {
    Vec bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = Vec::load(b + k * ldb + v * W);
    const float* ak = a + k * a_sc;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec av = Vec::set1(ak[r * a_si]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] = fmadd(av, bv[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[r][v].store(C + r * ldc + v * W);
}

template <int R, int NV, typename TB>
inline void micro_tail_cols(int nv, float* C, int64_t ldc, const float* a, int64_t a_si, int64_t a_sc, const TB* b,
                            int64_t ldb, int64_t K, bool acc) {
  if constexpr (NV >= 1) {
    if (nv == NV) return micro<R, NV>(C, ldc, a, a_si, a_sc, b, ldb, K, acc);
    micro_tail_cols<R, NV - 1>(nv, C, ldc, a, a_si, a_sc, b, ldb, K, acc);
  }
}

template <int R, typename TB>
inline void micro_rows(float* C, int64_t ldc, const float* a, int64_t a_si, int64_t a_sc, const TB* b, int64_t ldb,
                       int64_t N, int64_t K, bool acc) {
  int64_t n = 0;
  for (; n + kNV * W <= N; n += kNV * W) micro<R, kNV>(C + n, ldc, a, a_si, a_sc, b + n, ldb, K, acc);
  if (n < N) micro_tail_cols<R, kNV - 1>(int((N - n) / W), C + n, ldc, a, a_si, a_sc, b + n, ldb, K, acc);
}

template <int R, typename TB>
inline void micro_tail_rows(int nr, float* C, int64_t ldc, const float* a, int64_t a_si, int64_t a_sc, const TB* b,
                            int64_t ldb, int64_t N, int64_t K, bool acc) {
  if constexpr (R >= 1) {
    if (nr == R) return micro_rows<R>(C, ldc, a, a_si, a_sc, b, ldb, N, K, acc);
    micro_tail_rows<R - 1>(nr, C, ldc, a, a_si, a_sc, b, ldb, N, K, acc);
  }
}

// rows x N result; N must be a multiple of lanes<A>(). B elements of type TB (converted on load).
template <typename A, typename TB>
void gemm(A* C, int64_t ldc, const A* a, int64_t a_si, int64_t a_sc, const TB* b, int64_t ldb, int64_t rows,
          int64_t N, int64_t K, bool acc) {
  if constexpr (std::is_same_v<A, double>) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t n = 0; n < N; ++n) {
        double s = acc ? C[i * ldc + n] : 0.0;
        for (int64_t k = 0; k < K; ++k) s += a[i * a_si + k * a_sc] * double(to_float(b[k * ldb + n]));
        C[i * ldc + n] = s;
      }
  } else {
    int64_t i = 0;
    for (; i + kR <= rows; i += kR) micro_rows<kR>(C + i * ldc, ldc, a + i * a_si, a_si, a_sc, b, ldb, N, K, acc);
    if (i < rows)
      micro_tail_rows<kR - 1>(int(rows - i), C + i * ldc, ldc, a + i * a_si, a_si, a_sc, b, ldb, N, K, acc);
  }
}

// ---- element-wise helpers on [rows][Mp] tiles (Mp a multiple of lanes<A>()) -----------------------

template <typename A, typename T>
inline void load_row(A* dst, const T* src, int64_t d, A mul) {
  if constexpr (std::is_same_v<A, double>) {
    for (int64_t c = 0; c < d; ++c) dst[c] = double(to_float(src[c])) * mul;
  } else {
    const Vec m = Vec::set1(mul);
    for (int64_t c = 0; c < d; c += W) (Vec::load(src + c) * m).store(dst + c);
  }
}

template <typename A, typename T>
inline void store_row(T* dst, const A* src, int64_t d, A mul) {
  if constexpr (std::is_same_v<A, double>) {
    for (int64_t c = 0; c < d; ++c) dst[c] = T(src[c] * mul);
  } else {
    const Vec m = Vec::set1(mul);
    for (int64_t c = 0; c < d; c += W) (Vec::load(src + c) * m).store(dst + c);
  }
}

template <typename A>
inline void add_row(A* dst, const A* src, int64_t d, A mul) {
  if constexpr (std::is_same_v<A, double>) {
    for (int64_t c = 0; c < d; ++c) dst[c] += src[c] * mul;
  } else {
    const Vec m = Vec::set1(mul);
    for (int64_t c = 0; c < d; c += W) fmadd(Vec::load(src + c), m, Vec::load(dst + c)).store(dst + c);
  }
}

template <typename A>
inline void scale_row(A* x, int64_t d, A mul) {
  if constexpr (std::is_same_v<A, double>) {
    for (int64_t c = 0; c < d; ++c) x[c] *= mul;
  } else {
    const Vec m = Vec::set1(mul);
    for (int64_t c = 0; c < d; c += W) (Vec::load(x + c) * m).store(x + c);
  }
}

// mx[c] = max_j S[j][c]
template <typename A>
inline void col_max(const A* S, int64_t nk, int64_t Mp, A* mx) {
  if constexpr (std::is_same_v<A, double>) {
    for (int64_t c = 0; c < Mp; ++c) {
      double m = -INFINITY;
      for (int64_t j = 0; j < nk; ++j) m = std::max(m, S[j * Mp + c]);
      mx[c] = m;
    }
  } else {
    for (int64_t c = 0; c < Mp; c += W) {
      Vec m = Vec::load(S + c);
      for (int64_t j = 1; j < nk; ++j) m = max(m, Vec::load(S + j * Mp + c));
      m.store(mx + c);
    }
  }
}

// S[j][c] = exp(S[j][c] * mul - sub[c]); colsum[c] += sum_j S[j][c]  (colsum may be null)
template <typename A>
inline void exp_cols(A* S, int64_t nk, int64_t Mp, A mul, const A* sub, A* colsum) {
  if constexpr (std::is_same_v<A, double>) {
    for (int64_t c = 0; c < Mp; ++c) {
      double s = 0;
      for (int64_t j = 0; j < nk; ++j) {
        const double e = std::exp(S[j * Mp + c] * mul - sub[c]);
        S[j * Mp + c] = e;
        s += e;
      }
      if (colsum) colsum[c] += s;
    }
  } else {
    const Vec m = Vec::set1(mul);
    for (int64_t c = 0; c < Mp; c += W) {
      const Vec sb = Vec::load(sub + c);
      Vec s = Vec::zero();
      for (int64_t j = 0; j < nk; ++j) {
        const Vec e = vexp(fmadd(Vec::load(S + j * Mp + c), m, Vec::zero() - sb));
        e.store(S + j * Mp + c);
        s = s + e;
      }
      if (colsum) (Vec::load(colsum + c) + s).store(colsum + c);
    }
  }
}

// dS^T = P^T * (dP^T - D[c]), in place in dP
template <typename A>
inline void grad_scores(A* dP, const A* P, int64_t nk, int64_t Mp, const A* D) {
  if constexpr (std::is_same_v<A, double>) {
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t c = 0; c < Mp; ++c) dP[j * Mp + c] = P[j * Mp + c] * (dP[j * Mp + c] - D[c]);
  } else {
    for (int64_t c = 0; c < Mp; c += W) {
      const Vec dv = Vec::load(D + c);
      for (int64_t j = 0; j < nk; ++j)
        (Vec::load(P + j * Mp + c) * (Vec::load(dP + j * Mp + c) - dv)).store(dP + j * Mp + c);
    }
  }
}

// sum_x a[x] * b[x] in the accumulation type, as one fused multiply-add chain in x order: the same
// order the float tile product forms dP = dout . v in, so a row whose output is exactly one value
// row gets dS = P * (dP - D) = 0 exactly.
template <typename A, typename T>
inline A row_dot(const T* a, const T* b, int64_t d) {
  A s = 0;
  for (int64_t x = 0; x < d; ++x) s = std::fma(A(to_float(a[x])), A(to_float(b[x])), s);
  return s;
}

// Masks keys at or beyond each column's end: S[j][c] = fill for kb + j >= cend[c].
template <typename A>
inline void mask_cols(A* S, int64_t nk, int64_t Mp, int64_t M, const int64_t* cend, int64_t kb, A fill) {
  for (int64_t c = 0; c < M; ++c) {
    const int64_t first = std::max<int64_t>(0, cend[c] - kb);
    for (int64_t j = first; j < nk; ++j) S[j * Mp + c] = fill;
  }
}

// Scores of a narrow block (decode: a few rows per group) straight from the K rows in memory:
// S^T[j][r] = dot(Qn[r], K[j]), vectorised along head_dim and reduced per row; rows MR..Mp-1 are 0.
// Reading K in place (no packing) keeps decode at one pass over the cache.
template <int MR, typename T>
void scores_narrow(float* St, int64_t Mp, const float* Qn, int64_t d, const T* k, int64_t ldk, int64_t nk) {
  for (int64_t j = 0; j < nk; ++j) {
    const T* kr = k + j * ldk;
    Vec acc[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) acc[r] = Vec::zero();
    for (int64_t c = 0; c < d; c += W) {
      const Vec kv = Vec::load(kr + c);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[r] = fmadd(Vec::load(Qn + r * d + c), kv, acc[r]);
    }
    float* srow = St + j * Mp;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) srow[r] = reduce_add(acc[r]);
    for (int64_t r = MR; r < Mp; ++r) srow[r] = 0.f;
  }
}

constexpr int64_t kNarrowRows = 8;

template <typename T>
void scores_narrow_rows(int64_t M, float* St, int64_t Mp, const float* Qn, int64_t d, const T* k, int64_t ldk,
                        int64_t nk) {
  switch (M) {
    case 1: return scores_narrow<1>(St, Mp, Qn, d, k, ldk, nk);
    case 2: return scores_narrow<2>(St, Mp, Qn, d, k, ldk, nk);
    case 3: return scores_narrow<3>(St, Mp, Qn, d, k, ldk, nk);
    case 4: return scores_narrow<4>(St, Mp, Qn, d, k, ldk, nk);
    case 5: return scores_narrow<5>(St, Mp, Qn, d, k, ldk, nk);
    case 6: return scores_narrow<6>(St, Mp, Qn, d, k, ldk, nk);
    case 7: return scores_narrow<7>(St, Mp, Qn, d, k, ldk, nk);
    default: return scores_narrow<8>(St, Mp, Qn, d, k, ldk, nk);
  }
}

#if defined(EXAONE_VEC_AVX512)
// ---- bfloat16 tile products on AVX512-BF16 (vdpbf16ps: 32 bf16 products per instruction, float
// accumulation). Only used when the CPU reports avx512bf16 (and set_avx512bf16 has not turned it
// off); the functions carry the target attribute themselves, the rest of this file is compiled
// without it.
#define EXAONE_TARGET_BF16 __attribute__((target("avx512bf16")))

inline bool cpu_bf16_dot() { return avx512bf16_allowed(); }

inline uint32_t load_u32(const void* p) {
  uint32_t x;
  std::memcpy(&x, p, 4);
  return x;
}

// C[i][n] (+)= sum_kp dot(a(i, kp), B[kp][n]) over bf16 pairs: a(i, kp) is the pair at
// a + 2 * (i * a_si + kp * a_sc) (strides in pairs); B is "VNNI" packed: the pair of column n at
// b + kp * ldb + 2 * n (ldb in bf16 elements).
template <int R, int NV>
EXAONE_TARGET_BF16 inline void micro_bf16(float* C, int64_t ldc, const uint16_t* a, int64_t a_si, int64_t a_sc,
                                          const uint16_t* b, int64_t ldb, int64_t KP, bool acc) {
  __m512 c[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[r][v] = acc ? _mm512_loadu_ps(C + r * ldc + v * 16) : _mm512_setzero_ps();
  for (int64_t kp = 0; kp < KP; ++kp) {
    __m512bh bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + kp * ldb + v * 32);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(load_u32(a + 2 * (r * a_si + kp * a_sc))));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], av, bv[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + v * 16, c[r][v]);
}

template <int R, int NV>
EXAONE_TARGET_BF16 inline void micro_bf16_tail_cols(int nv, float* C, int64_t ldc, const uint16_t* a, int64_t a_si,
                                                    int64_t a_sc, const uint16_t* b, int64_t ldb, int64_t KP, bool acc) {
  if constexpr (NV >= 1) {
    if (nv == NV) return micro_bf16<R, NV>(C, ldc, a, a_si, a_sc, b, ldb, KP, acc);
    micro_bf16_tail_cols<R, NV - 1>(nv, C, ldc, a, a_si, a_sc, b, ldb, KP, acc);
  }
}

template <int R>
EXAONE_TARGET_BF16 inline void micro_bf16_rows(float* C, int64_t ldc, const uint16_t* a, int64_t a_si, int64_t a_sc,
                                               const uint16_t* b, int64_t ldb, int64_t N, int64_t KP, bool acc) {
  int64_t n = 0;
  for (; n + kNV * 16 <= N; n += kNV * 16) micro_bf16<R, kNV>(C + n, ldc, a, a_si, a_sc, b + 2 * n, ldb, KP, acc);
  if (n < N)
    micro_bf16_tail_cols<R, kNV - 1>(int((N - n) / 16), C + n, ldc, a, a_si, a_sc, b + 2 * n, ldb, KP, acc);
}

template <int R>
EXAONE_TARGET_BF16 inline void micro_bf16_tail_rows(int nr, float* C, int64_t ldc, const uint16_t* a, int64_t a_si,
                                                    int64_t a_sc, const uint16_t* b, int64_t ldb, int64_t N,
                                                    int64_t KP, bool acc) {
  if constexpr (R >= 1) {
    if (nr == R) return micro_bf16_rows<R>(C, ldc, a, a_si, a_sc, b, ldb, N, KP, acc);
    micro_bf16_tail_rows<R - 1>(nr, C, ldc, a, a_si, a_sc, b, ldb, N, KP, acc);
  }
}

// rows x N (a multiple of 16) result, KP bf16 pairs of inner dimension.
EXAONE_TARGET_BF16 void gemm_bf16(float* C, int64_t ldc, const uint16_t* a, int64_t a_si, int64_t a_sc,
                                  const uint16_t* b, int64_t ldb, int64_t rows, int64_t N, int64_t KP, bool acc) {
  int64_t i = 0;
  for (; i + kR <= rows; i += kR) micro_bf16_rows<kR>(C + i * ldc, ldc, a + 2 * i * a_si, a_si, a_sc, b, ldb, N, KP, acc);
  if (i < rows)
    micro_bf16_tail_rows<kR - 1>(int(rows - i), C + i * ldc, ldc, a + 2 * i * a_si, a_si, a_sc, b, ldb, N, KP, acc);
}

// vpermw indices interleaving two 16-element rows of bf16 (the halves of one register) into 16 pairs.
alignas(64) inline constexpr uint16_t kInterleave16[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                          8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

// Interleaves two 16-element bf16 rows into 16 pairs.
inline __m512i interleave16(__m256i lo_row, __m256i hi_row) {
  const __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(lo_row), hi_row, 1);
  return _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave16), x);
}

// VNNI tile of nk rows of width d (ld apart): dst[kp][n][2] = (src[2kp][n], src[2kp + 1][n]);
// the missing row of an odd nk is zero.
inline void pack_vnni(uint16_t* dst, const bf16* src, int64_t ld, int64_t nk, int64_t d) {
  for (int64_t kp = 0; kp < (nk + 1) / 2; ++kp) {
    const bf16* r0 = src + 2 * kp * ld;
    const bf16* r1 = 2 * kp + 1 < nk ? r0 + ld : nullptr;
    for (int64_t c = 0; c < d; c += 16) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + c));
      const __m256i b = r1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + c)) : _mm256_setzero_si256();
      _mm512_storeu_si512(dst + kp * 2 * d + 2 * c, interleave16(a, b));
    }
  }
}

// Probabilities in bf16 pairs along the keys: dst[kp][c] = (P[2kp][c], P[2kp + 1][c]) from the
// float S^T tile [nk][Mp] (rounded to nearest even, as a cast to bfloat16 does).
inline void pack_prob_pairs(uint16_t* dst, const float* St, int64_t Mp, int64_t nk) {
  for (int64_t kp = 0; kp < (nk + 1) / 2; ++kp) {
    const float* r0 = St + 2 * kp * Mp;
    const float* r1 = 2 * kp + 1 < nk ? r0 + Mp : nullptr;
    for (int64_t c = 0; c < Mp; c += 16) {
      const __m256i a = Vec::load(r0 + c).to_bf16_bits();
      const __m256i b = r1 ? Vec::load(r1 + c).to_bf16_bits() : _mm256_setzero_si256();
      _mm512_storeu_si512(dst + (kp * Mp + c) * 2, interleave16(a, b));
    }
  }
}

// O^T [d][Mp]: column c times alpha[c] (16 columns at a time, skipped where all 16 are 1).
inline void scale_cols(float* Ot, int64_t d, int64_t Mp, const float* alpha) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t c = 0; c < Mp; c += 16) {
    const __m512 a = _mm512_loadu_ps(alpha + c);
    if (_mm512_cmp_ps_mask(a, one, _CMP_EQ_OQ) == 0xffff) continue;
    for (int64_t x = 0; x < d; ++x) _mm512_storeu_ps(Ot + x * Mp + c, _mm512_mul_ps(_mm512_loadu_ps(Ot + x * Mp + c), a));
  }
}

// P^T in bf16 pairs along the keys from the float scores S^T [nk][Mp] in one pass:
// P = exp(S * mul - sub[c]) (mul > 0: the softmax scale folded in; as 2^(S * mul log2 e - sub[c] log2 e)),
// colsum[c] += its float sum,
// dst[kp][c] = (P[2kp][c], P[2kp + 1][c]) rounded to nearest even (vcvtne2ps2bf16: a probability
// below 2^-126 becomes 0 rather than a bf16 denormal); the missing key of an odd nk is 0.
template <int NC>
EXAONE_TARGET_BF16 inline void exp_to_pairs_cols(const float* St, int64_t nk, int64_t Mp, Vec m, const float* sub,
                                                 float* colsum, uint16_t* dst) {
  constexpr float kLog2e = 1.44269504088896341f;
  const __m512i idx = _mm512_load_si512(kInterleave16);
  Vec nsb[NC], s0[NC], s1[NC];
  for (int q = 0; q < NC; ++q) {
    nsb[q] = Vec::zero() - Vec::load(sub + 16 * q) * Vec::set1(kLog2e);
    s0[q] = s1[q] = Vec::zero();
  }
  // NC column groups side by side along each pair of rows: independent chains, rows read in order
  for (int64_t kp = 0; kp < nk / 2; ++kp) {
    const float* r0 = St + 2 * kp * Mp;
#pragma GCC unroll 4
    for (int q = 0; q < NC; ++q) {
      const Vec e0 = exp2_f32(fmadd(Vec::load(r0 + 16 * q), m, nsb[q]));
      const Vec e1 = exp2_f32(fmadd(Vec::load(r0 + Mp + 16 * q), m, nsb[q]));
      s0[q] = s0[q] + e0;
      s1[q] = s1[q] + e1;
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(e1.v, e0.v);  // e0 low half, e1 high half
      _mm512_storeu_si512(dst + (kp * Mp + 16 * q) * 2, _mm512_permutexvar_epi16(idx, both));
    }
  }
  if (nk % 2) {  // the last key pairs with a zero
    const int64_t kp = nk / 2;
    for (int q = 0; q < NC; ++q) {
      const Vec e0 = exp2_f32(fmadd(Vec::load(St + 2 * kp * Mp + 16 * q), m, nsb[q]));
      s0[q] = s0[q] + e0;
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_setzero_ps(), e0.v);
      _mm512_storeu_si512(dst + (kp * Mp + 16 * q) * 2, _mm512_permutexvar_epi16(idx, both));
    }
  }
  for (int q = 0; q < NC; ++q) (Vec::load(colsum + 16 * q) + s0[q] + s1[q]).store(colsum + 16 * q);
}

// mx[c] = max_j S[j][c] as col_max, with up to four groups of 16 columns side by side along each
// row (independent chains; the rows read in order).
template <int NC>
inline void col_max_rows(const float* S, int64_t nk, int64_t Mp, float* mx) {
  Vec m[NC];
  for (int q = 0; q < NC; ++q) m[q] = Vec::load(S + 16 * q);
  for (int64_t j = 1; j < nk; ++j)
#pragma GCC unroll 4
    for (int q = 0; q < NC; ++q) m[q] = max(m[q], Vec::load(S + j * Mp + 16 * q));
  for (int q = 0; q < NC; ++q) m[q].store(mx + 16 * q);
}

// f(std::integral_constant<int, NC>, c) over the columns [0, Mp) in groups of up to four 16-column
// vectors (Mp a multiple of 16), NC the group's vectors.
template <typename F>
inline void by_column_groups(int64_t Mp, const F& f) {
  for (int64_t c = 0; c < Mp; c += 64) {
    switch (std::min<int64_t>(4, (Mp - c) / 16)) {
      case 1: f(std::integral_constant<int, 1>{}, c); break;
      case 2: f(std::integral_constant<int, 2>{}, c); break;
      case 3: f(std::integral_constant<int, 3>{}, c); break;
      default: f(std::integral_constant<int, 4>{}, c); break;
    }
  }
}

inline void col_max_wide(const float* S, int64_t nk, int64_t Mp, float* mx) {
  by_column_groups(Mp, [&](auto nc, int64_t c) { col_max_rows<decltype(nc)::value>(S + c, nk, Mp, mx + c); });
}

EXAONE_TARGET_BF16 inline void exp_to_pairs(const float* St, int64_t nk, int64_t Mp, float mul, const float* sub,
                                            float* colsum, uint16_t* dst) {
  const Vec m = Vec::set1(mul * 1.44269504088896341f);
  by_column_groups(Mp, [&](auto nc, int64_t c) {
    exp_to_pairs_cols<decltype(nc)::value>(St + c, nk, Mp, m, sub + c, colsum + c, dst + 2 * c);
  });
}

// O^T [d][Mp] += v^T . p for the last key of an odd tile: v its column of V^T (d values ldv apart),
// p its probabilities as the low halves of the pairs (as the product of the other keys reads them).
inline void add_last_key_t(float* Ot, int64_t d, int64_t Mp, const uint16_t* v, int64_t ldv, const uint16_t* pairs) {
  for (int64_t c = 0; c < Mp; c += 16) {
    const __m512 pr = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(pairs + 2 * c), 16));
    for (int64_t x = 0; x < d; ++x) {
      const __m512 vx = _mm512_set1_ps(float_from_bits(uint32_t(v[x * ldv]) << 16));
      _mm512_storeu_ps(Ot + x * Mp + c, _mm512_fmadd_ps(vx, pr, _mm512_loadu_ps(Ot + x * Mp + c)));
    }
  }
}

// dst[c][r] = row[r][c] for a 16 x 16 block of 32-bit elements (16 rows anywhere, dst rows ldd apart).
inline void transpose16x16_u32_rows(const uint32_t* const* row, uint32_t* dst, int64_t ldd) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(row[i]);
  for (int i = 0; i < 8; ++i) {  // 32-bit elements of row pairs
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // 64-bit pieces
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * ldd, r[i]);
}

// dst[c][r] = src[r][c] for a 16 x 16 block of 32-bit elements (rows lds / ldd elements apart).
inline void transpose16x16_u32(const uint32_t* src, int64_t lds, uint32_t* dst, int64_t ldd) {
  const uint32_t* row[16];
  for (int i = 0; i < 16; ++i) row[i] = src + i * lds;
  transpose16x16_u32_rows(row, dst, ldd);
}

// Pairs [np][Mp] (u32: two bf16 along the keys, from pack_prob_pairs) to rows [M][ldr] of pairs:
// the row-major A operand (P or dS, [M][2 np] bf16) of an outside engine's product. Whole 16 x 16
// blocks are transposed in registers (rows M..Mp-1 of R, inside the caller's tile, get padding);
// the pairs past the last whole block of 16 one by one.
inline void pairs_to_rows(uint32_t* R, int64_t ldr, const uint32_t* pairs, int64_t Mp, int64_t M, int64_t np) {
  const int64_t np16 = np / 16 * 16;
  for (int64_t c0 = 0; c0 < M; c0 += 16) {
    for (int64_t k0 = 0; k0 < np16; k0 += 16) transpose16x16_u32(pairs + k0 * Mp + c0, Mp, R + c0 * ldr + k0, ldr);
    const int64_t c1 = std::min(M, c0 + 16);
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t kp = np16; kp < np; ++kp) R[c * ldr + kp] = pairs[kp * Mp + c];
  }
}

// C[M][N] (+)= A . B on bf16: A row-major (lda elements), B in pairs along K ([K / 2][ldb][2]), K even;
// the outside engine of p where it has one (AttnParams::bf16_gemm), else vdpbf16ps.
inline void product_bf16(const AttnParams& p, float* C, int64_t ldc, const uint16_t* A, int64_t lda,
                         const uint16_t* B, int64_t ldb, int64_t M, int64_t N, int64_t K, bool add) {
  if (p.bf16_gemm) p.bf16_gemm(M, N, K, lda, ldb, ldc, add, A, B, C);
  else gemm_bf16(C, ldc, A, lda / 2, 1, B, 2 * ldb, M, N, K / 2, add);
}

// As product_bf16 with A = P (or dS) given as np pairs along K per row ([np][Mp], from
// pack_prob_pairs): vdpbf16ps reads them as they are; an outside engine gets them as rows [M][2 np],
// transposed into `rows` (a free tile of at least Mp * np pairs).
inline void product_pairs_bf16(const AttnParams& p, float* C, int64_t ldc, const uint16_t* pairs, int64_t Mp,
                               uint32_t* rows, const uint16_t* B, int64_t ldb, int64_t M, int64_t N, int64_t np,
                               bool add) {
  if (!p.bf16_gemm) return gemm_bf16(C, ldc, pairs, 1, Mp, B, 2 * ldb, M, N, np, add);
  pairs_to_rows(rows, np, reinterpret_cast<const uint32_t*>(pairs), Mp, M, np);
  p.bf16_gemm(M, N, 2 * np, 2 * np, ldb, ldc, add, reinterpret_cast<const uint16_t*>(rows), B, C);
}

constexpr int64_t kPrefetchRows = 8;

// Narrow-block scores on bf16 (decode): S^T[j][r] = dot(q[r], K[j]) with vdpbf16ps along head_dim,
// K rows read in place; rows MR..Mp-1 are 0. q is unscaled bf16 [MR][d].
template <int MR>
EXAONE_TARGET_BF16 void scores_narrow_bf16(float* St, int64_t Mp, const uint16_t* q, int64_t d, const uint16_t* k,
                                           int64_t ldk, const uint16_t* v, int64_t ldv, int64_t nk) {
  const __mmask32 tail = d % 32 ? __mmask32((1u << (d % 32)) - 1u) : __mmask32(0);
  for (int64_t j = 0; j < nk; ++j) {
    const uint16_t* kr = k + j * ldk;
    // Cache rows are kv_heads * head_dim apart: fetch the K row kPrefetchRows ahead and this key's V
    // row (read by the V packing after the scores) early, one request per 64-byte line.
    for (int64_t x = 0; x < d; x += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(kr + kPrefetchRows * ldk + x), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v + j * ldv + x), _MM_HINT_T0);
    }
    __m512 acc[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= d; c += 32) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(kr + c);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(q + r * d + c), kv);
    }
    if (tail) {
      const __m512bh kv = (__m512bh)_mm512_maskz_loadu_epi16(tail, kr + c);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(tail, q + r * d + c), kv);
    }
    float* srow = St + j * Mp;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) srow[r] = _mm512_reduce_add_ps(acc[r]);
    for (int64_t r = MR; r < Mp; ++r) srow[r] = 0.f;
  }
}

inline void scores_narrow_bf16_rows(int64_t M, float* St, int64_t Mp, const uint16_t* q, int64_t d, const uint16_t* k,
                                    int64_t ldk, const uint16_t* v, int64_t ldv, int64_t nk) {
  switch (M) {
    case 1: return scores_narrow_bf16<1>(St, Mp, q, d, k, ldk, v, ldv, nk);
    case 2: return scores_narrow_bf16<2>(St, Mp, q, d, k, ldk, v, ldv, nk);
    case 3: return scores_narrow_bf16<3>(St, Mp, q, d, k, ldk, v, ldv, nk);
    case 4: return scores_narrow_bf16<4>(St, Mp, q, d, k, ldk, v, ldv, nk);
    case 5: return scores_narrow_bf16<5>(St, Mp, q, d, k, ldk, v, ldv, nk);
    case 6: return scores_narrow_bf16<6>(St, Mp, q, d, k, ldk, v, ldv, nk);
    case 7: return scores_narrow_bf16<7>(St, Mp, q, d, k, ldk, v, ldv, nk);
    default: return scores_narrow_bf16<8>(St, Mp, q, d, k, ldk, v, ldv, nk);
  }
}
#endif  // EXAONE_VEC_AVX512

inline char* align64(void* p) {
  const uintptr_t u = reinterpret_cast<uintptr_t>(p);
  return reinterpret_cast<char*>((u + 63) & ~uintptr_t(63));
}

// Bump allocator over the scratch space (64-byte aligned pieces); running past the
// attn_scratch_bytes() the caller provided is a bug that stops the process rather than corrupting memory.
struct Carve {
  char* p;
  char* end;
  Carve(void* scratch, int64_t bytes) : p(align64(scratch)), end(static_cast<char*>(scratch) + bytes) {}
  template <typename X> X* take(int64_t n) {
    X* r = reinterpret_cast<X*>(p);
    p = align64(p + n * int64_t(sizeof(X)));
    if (p > end) __builtin_trap();
    return r;
  }
};

// ---- forward ---------------------------------------------------------------------------------------

template <typename T>
void fwd_block(const AttnParams& p, int64_t b, int64_t kvh, int64_t q_begin, int64_t q_end, int64_t k_begin,
               int64_t k_end, float* part_out, float* part_lse, void* scratch) {
  using A = acc_t<T>;
  const SeqRange sr = seq_range(p, b);
  const int64_t g = p.group(), d = p.head_dim, hq = p.q_heads;
  const int64_t len_q = sr.len_q, len_k = sr.len_k;
  q_end = std::min(q_end, len_q);
  k_end = std::min(k_end, len_k);
  k_begin = std::max<int64_t>(k_begin, 0);
  // the O^T path (bf16, an outside engine, V^T handed in) works on tiles of kAttnVtBlockK keys
  const bool vt_ok = std::is_same_v<T, bf16> && p.bf16_gemm && p.vt;
  const int64_t bq = attn_block_q(g);
  const int64_t mp_max = round_up(bq * g, lanes<A>());

  const int64_t bk_max = vt_ok ? kAttnVtBlockK : BK;
  Carve cv(scratch, attn_scratch_bytes(g, d));
  A* Qt = cv.take<A>(d * mp_max);
  A* O = cv.take<A>(mp_max * d);
  A* St = cv.take<A>(bk_max * mp_max);
  A* Kf = cv.take<A>(BK * d);
  A* Vf = cv.take<A>(BK * d);
  A* Qn = cv.take<A>(mp_max * d);
  uint16_t* Pp = cv.take<uint16_t>(bk_max * mp_max);  // bf16 probability pairs (AVX512-BF16 path)
  A* m = cv.take<A>(mp_max);
  A* l = cv.take<A>(mp_max);
  A* msub = cv.take<A>(mp_max);
  A* alpha = cv.take<A>(mp_max);
  int64_t* cend = cv.take<int64_t>(mp_max);

  const T* qbase = static_cast<const T*>(p.q) + b * p.q_batch_stride + sr.q_start * p.q_row_stride +
                   kvh * g * p.q_head_stride;
  const T* kbase = static_cast<const T*>(p.k) + b * p.k_batch_stride + sr.k_start * p.k_row_stride +
                   kvh * p.k_head_stride;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_batch_stride + sr.k_start * p.v_row_stride +
                   kvh * p.v_head_stride;
  const A scale = std::is_same_v<A, double> ? A(p.scale_f64) : A(p.scale);

  for (int64_t qs = q_begin; qs < q_end; qs += bq) {
    const int64_t qe = std::min(qs + bq, q_end), M = (qe - qs) * g, Mp = round_up(M, lanes<A>());
    // a narrow block (decode) reads K and V in place; a wide one packs tiles for the micro-kernel
    const bool narrow = !std::is_same_v<A, double> && M <= kNarrowRows;
    // bfloat16 with AVX512-BF16: Q^T, V and P as bf16 pairs, products by vdpbf16ps
    bool dot16 = false, vt_path = false;
    A vt_mul = A(1);  // the scale, when the O^T path folds it into the exponent
#if defined(EXAONE_VEC_AVX512)
    if constexpr (std::is_same_v<T, bf16>)
      dot16 = cpu_bf16_dot() && p.k_row_stride % 2 == 0 && p.v_row_stride % 2 == 0;
    // O^T [d][Mp] += V^T . P^T through the outside engine, V^T read in place (AttnParams::vt)
    vt_path = dot16 && !narrow && vt_ok;
    if (vt_path && scale > A(0)) vt_mul = scale;
    uint16_t* Qb = reinterpret_cast<uint16_t*>(Qn);  // narrow: [M][d] unscaled bf16 rows of q
    uint32_t* Qp = reinterpret_cast<uint32_t*>(Qt);  // [d / 2][Mp] pairs of unscaled q
    uint16_t* Vp = reinterpret_cast<uint16_t*>(Vf);  // [nk / 2][d][2]
#endif
    int64_t kmax = k_begin, kmin = k_end;
    for (int64_t c = 0; c < M; ++c) {
      const int64_t i = qs + c / g;
      const int64_t e = std::min(p.causal ? causal_key_end(i, len_q, len_k) : len_k, k_end);
      cend[c] = e;
      kmax = std::max(kmax, e);
      kmin = std::min(kmin, e);
      const T* qr = qbase + i * p.q_row_stride + (c % g) * p.q_head_stride;
      if (narrow && dot16) {
#if defined(EXAONE_VEC_AVX512)
        std::memcpy(Qb + c * d, qr, d * sizeof(T));
#endif
      } else if (narrow) {
        load_row(Qn + c * d, qr, d, scale);
      } else if (dot16) {
#if defined(EXAONE_VEC_AVX512)
        // (the pairs of q rows go to Qp by 16 x 16 transposes below)
#endif
      } else {
        for (int64_t x = 0; x < d; ++x) Qt[x * Mp + c] = A(to_float(qr[x])) * scale;
      }
    }
    for (int64_t c = M; c < Mp; ++c) {
      cend[c] = 0;
      for (int64_t x = 0; x < d; ++x) Qt[x * Mp + c] = 0;
    }
#if defined(EXAONE_VEC_AVX512)
    if (dot16 && !narrow) {  // q rows as pairs [M][d / 2] (rows past M zero) to Qp [d / 2][Mp]
      alignas(64) static const uint32_t kZeroRow[128] = {};  // a zero row of pairs: head dims up to 256
      const int64_t dp = d / 2, dp16 = dp / 16 * 16;
      auto q_row = [&](int64_t c) {
        return c < M ? reinterpret_cast<const uint32_t*>(qbase + (qs + c / g) * p.q_row_stride + (c % g) * p.q_head_stride)
                     : kZeroRow;
      };
      for (int64_t c0 = 0; c0 < Mp; c0 += 16) {
        const uint32_t* row[16];
        for (int64_t r = 0; r < 16; ++r) row[r] = q_row(c0 + r);
        // the next 16 rows (far apart in q: each its own stream) requested while these are moved
        for (int64_t r = 0; r < 16 && c0 + 16 + r < M; ++r) {
          const char* next = reinterpret_cast<const char*>(q_row(c0 + 16 + r));
          for (int64_t x = 0; x < d * int64_t(sizeof(T)); x += 64) _mm_prefetch(next + x, _MM_HINT_T0);
        }
        for (int64_t x0 = 0; x0 < dp16; x0 += 16) {
          const uint32_t* at[16];
          for (int r = 0; r < 16; ++r) at[r] = row[r] + x0;
          transpose16x16_u32_rows(at, Qp + x0 * Mp + c0, Mp);
        }
        for (int64_t x = dp16; x < dp; ++x)
          for (int64_t r = 0; r < 16; ++r) Qp[x * Mp + c0 + r] = load_u32(reinterpret_cast<const T*>(row[r]) + 2 * x);
      }
    }
#endif
    for (int64_t c = 0; c < Mp; ++c) { m[c] = -INFINITY; l[c] = 0; }
    std::fill(O, O + (vt_path ? Mp : M) * d, A(0));  // O^T path: [d][Mp]

    const int64_t step = vt_path ? bk_max : BK;
    for (int64_t kb = k_begin; kb < kmax; kb += step) {
      const int64_t nk = std::min(step, kmax - kb);
      // Scores S^T = K . (scale Q)^T by one of three routes: narrow blocks (decode) read K / V rows
      // in place; bf16 with AVX512-BF16 works on bf16 pairs; otherwise K / V tiles are converted to
      // the accumulation type (float / double tiles are used in place).
      if constexpr (!std::is_same_v<A, double>) {
        if (narrow && !dot16) scores_narrow_rows(M, St, Mp, Qn, d, kbase + kb * p.k_row_stride, p.k_row_stride, nk);
      }
#if defined(EXAONE_VEC_AVX512)
      if (narrow && dot16) {
        scores_narrow_bf16_rows(M, St, Mp, Qb, d, reinterpret_cast<const uint16_t*>(kbase + kb * p.k_row_stride),
                                p.k_row_stride, reinterpret_cast<const uint16_t*>(vbase + kb * p.v_row_stride),
                                p.v_row_stride, nk);
        scale_row(St, nk * Mp, scale);
        pack_vnni(Vp, reinterpret_cast<const bf16*>(vbase + kb * p.v_row_stride), p.v_row_stride, nk, d);
      } else if (dot16) {
        // S^T = K . Q^T on bf16 pairs (K rows read in place), then the scale in float
        product_bf16(p, St, Mp, reinterpret_cast<const uint16_t*>(kbase + kb * p.k_row_stride), p.k_row_stride,
                     reinterpret_cast<const uint16_t*>(Qp), Mp, nk, Mp, d, false);
        if (vt_mul == A(1)) scale_row(St, nk * Mp, scale);
        if (!vt_path) pack_vnni(Vp, reinterpret_cast<const bf16*>(vbase + kb * p.v_row_stride), p.v_row_stride, nk, d);
      }
#endif
#if defined(EXAONE_VEC_AVX512)
      if constexpr (std::is_same_v<A, float>) {
        if (vt_path) {
          // the scale folds into the exponent (scale > 0: the max of the scaled scores is the scaled max)
          if (kb + nk > kmin) mask_cols(St, nk, Mp, M, cend, kb, A(-INFINITY));
          col_max_wide(St, nk, Mp, alpha);
          for (int64_t c = 0; c < Mp; ++c) {
            const A mn = std::max(m[c], alpha[c] * vt_mul);
            const A mu = mn == -INFINITY ? A(0) : mn;
            const A a = std::exp(m[c] - mu);
            m[c] = mn;
            msub[c] = mu;
            l[c] *= a;
            alpha[c] = a;
          }
          exp_to_pairs(St, nk, Mp, vt_mul, msub, l, Pp);
          scale_cols(O, d, Mp, alpha);  // O^T [d][Mp]
          // O^T += V^T . P^T: V^T read in place as A, the pairs as B; an odd last key on its own
          const uint16_t* vtb = static_cast<const uint16_t*>(p.vt) + b * p.vt_batch_stride + kvh * p.vt_head_stride +
                                sr.k_start + kb;
          const int64_t even = nk / 2 * 2;
          if (even > 0) p.bf16_gemm(d, Mp, even, p.vt_dim_stride, Mp, Mp, true, vtb, Pp, O);
          if (even < nk) add_last_key_t(O, d, Mp, vtb + even, p.vt_dim_stride, Pp + even * Mp);
          continue;
        }
      }
#endif
      const A* kt = Kf;  // K / V tile in the accumulation type
      const A* vt = Vf;
      int64_t kld = d, vld = d;
      if (!narrow && !dot16) {
        if constexpr (std::is_same_v<T, A>) {  // float / double: used in place
          kt = reinterpret_cast<const A*>(kbase + kb * p.k_row_stride);
          vt = reinterpret_cast<const A*>(vbase + kb * p.v_row_stride);
          kld = p.k_row_stride;
          vld = p.v_row_stride;
        } else {
          for (int64_t j = 0; j < nk; ++j) {
            load_row(Kf + j * d, kbase + (kb + j) * p.k_row_stride, d, A(1));
            load_row(Vf + j * d, vbase + (kb + j) * p.v_row_stride, d, A(1));
          }
        }
        gemm(St, Mp, kt, kld, 1, Qt, Mp, nk, Mp, d, false);  // S^T = K . (scale Q)^T
      }
      if (kb + nk > kmin) mask_cols(St, nk, Mp, M, cend, kb, A(-INFINITY));
      col_max(St, nk, Mp, alpha);
      for (int64_t c = 0; c < Mp; ++c) {
        const A mn = std::max(m[c], alpha[c]);
        const A mu = mn == -INFINITY ? A(0) : mn;  // a row that has seen no key yet stays at zero
        const A a = std::exp(m[c] - mu);
        m[c] = mn;
        msub[c] = mu;
        l[c] *= a;
        alpha[c] = a;
      }
      exp_cols(St, nk, Mp, A(1), msub, l);
      for (int64_t c = 0; c < M; ++c)
        if (alpha[c] != A(1)) scale_row(O + c * d, d, alpha[c]);
      // O += P . V, P read transposed out of S^T
      if (narrow && !dot16) {
        gemm(O, d, St, 1, Mp, vbase + kb * p.v_row_stride, p.v_row_stride, M, d, nk, true);
      } else if (dot16) {
#if defined(EXAONE_VEC_AVX512)
        pack_prob_pairs(Pp, St, Mp, nk);  // (an outside engine's rows of P go to the scores' tile, free now)
        product_pairs_bf16(p, O, d, Pp, Mp, reinterpret_cast<uint32_t*>(St), Vp, d, M, d, (nk + 1) / 2, true);
#endif
      } else {
        gemm(O, d, St, 1, Mp, vt, vld, M, d, nk, true);
      }
    }

#if defined(EXAONE_VEC_AVX512)
    if (vt_path) {  // O^T [d][Mp] back to rows [Mp][d] (d and Mp multiples of 16), through the free Qn
      if constexpr (std::is_same_v<A, float>) {
        for (int64_t x0 = 0; x0 < d; x0 += 16)
          for (int64_t c0 = 0; c0 < Mp; c0 += 16)
            transpose16x16_u32(reinterpret_cast<const uint32_t*>(O + x0 * Mp + c0), Mp,
                               reinterpret_cast<uint32_t*>(Qn + c0 * d + x0), d);
      }
    }
#endif
    const A* Orow = vt_path ? Qn : O;  // the finished rows [M][d]
    for (int64_t c = 0; c < M; ++c) {
      const int64_t i = qs + c / g, head = kvh * g + c % g;
      // l == 0: the row saw no key (zeros, lse -inf). A NaN score makes l NaN, and the NaN must
      // reach out and lse (a split-KV combine would otherwise drop the whole split as empty).
      const A inv = l[c] == A(0) ? A(0) : A(1) / l[c];
      const float lse = l[c] == A(0) ? -INFINITY : float(m[c] + std::log(l[c]));
      if (part_out) {
        const int64_t r = (b * p.seq_q + i) * hq + head;
        store_row(part_out + r * d, Orow + c * d, d, inv);
        part_lse[r] = lse;
      } else {
        T* o = static_cast<T*>(p.out) + b * p.o_batch_stride + (sr.q_start + i) * p.o_row_stride +
               head * p.o_head_stride;
        store_row(o, Orow + c * d, d, inv);
        if (p.lse) p.lse[b * p.lse_batch_stride + head * p.lse_head_stride + sr.q_start + i] = lse;
      }
    }
  }
}

// ---- backward --------------------------------------------------------------------------------------

template <typename T>
void bwd_rows(const AttnBwdParams& bp, void* dk_acc_v, void* dv_acc_v, int64_t b, int64_t kvh,
              int64_t qb_first, int64_t qb_step, void* scratch) {
  using A = acc_t<T>;
  const AttnParams& p = bp.fwd;
  const SeqRange sr = seq_range(p, b);
  const int64_t g = p.group(), d = p.head_dim;
  const int64_t len_q = sr.len_q, len_k = sr.len_k;
  const int64_t bq = attn_block_q(g);
  const int64_t mp_max = round_up(bq * g, lanes<A>());

  Carve cv(scratch, attn_scratch_bytes(g, d));
  A* Qf = cv.take<A>(mp_max * d);
  A* Qt = cv.take<A>(d * mp_max);
  A* dOf = cv.take<A>(mp_max * d);
  A* dOt = cv.take<A>(d * mp_max);
  A* dQ = cv.take<A>(mp_max * d);
  A* St = cv.take<A>(BK * mp_max);
  A* dPt = cv.take<A>(BK * mp_max);
  A* Kf = cv.take<A>(BK * d);
  A* Vf = cv.take<A>(BK * d);
  A* dKt = cv.take<A>(BK * d);
  A* dVt = cv.take<A>(BK * d);
  A* dQt = cv.take<A>(mp_max * d);
  uint16_t* Pb = cv.take<uint16_t>(BK * mp_max);   // AVX512-BF16 path: P, dS as bf16 [nk][Mp]
  uint16_t* dSb = cv.take<uint16_t>(BK * mp_max);
  uint16_t* dSp = cv.take<uint16_t>(BK * mp_max);  // dS in bf16 pairs along the keys
  A* lse_c = cv.take<A>(mp_max);
  A* D_c = cv.take<A>(mp_max);
  int64_t* cend = cv.take<int64_t>(mp_max);

  const int64_t krow0 = p.cu_seqlens_k ? sr.k_start : b * p.seq_k;  // first k row in the dk / dv accumulators
  A* dk_acc = static_cast<A*>(dk_acc_v) + krow0 * d;
  A* dv_acc = static_cast<A*>(dv_acc_v) + krow0 * d;
  const T* qbase = static_cast<const T*>(p.q) + b * p.q_batch_stride + sr.q_start * p.q_row_stride +
                   kvh * g * p.q_head_stride;
  const T* obase = static_cast<const T*>(p.out) + b * p.o_batch_stride + sr.q_start * p.o_row_stride +
                   kvh * g * p.o_head_stride;
  const T* dobase = static_cast<const T*>(bp.dout) + b * bp.do_batch_stride + sr.q_start * bp.do_row_stride +
                    kvh * g * bp.do_head_stride;
  T* dqbase = static_cast<T*>(bp.dq) + b * bp.dq_batch_stride + sr.q_start * bp.dq_row_stride +
              kvh * g * bp.dq_head_stride;
  const T* kbase = static_cast<const T*>(p.k) + b * p.k_batch_stride + sr.k_start * p.k_row_stride +
                   kvh * p.k_head_stride;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_batch_stride + sr.k_start * p.v_row_stride +
                   kvh * p.v_head_stride;
  const float* lse = p.lse + b * p.lse_batch_stride + sr.q_start;
  const A scale = std::is_same_v<A, double> ? A(p.scale_f64) : A(p.scale);
  const int64_t nqb = (len_q + bq - 1) / bq;
  // bfloat16 with AVX512-BF16: all five tile products on bf16 pairs (K / V rows read in pairs in
  // place, so their row strides must be even)
  bool dot16 = false;
#if defined(EXAONE_VEC_AVX512)
  if constexpr (std::is_same_v<T, bf16>)
    dot16 = cpu_bf16_dot() && p.k_row_stride % 2 == 0 && p.v_row_stride % 2 == 0;
  uint32_t* Qp = reinterpret_cast<uint32_t*>(Qt);     // [d / 2][Mp] pairs of q (S^T = K . Q^T)
  uint32_t* dOp = reinterpret_cast<uint32_t*>(dOt);   // [d / 2][Mp] pairs of dout (dP^T = V . dO^T)
  uint16_t* Qv = reinterpret_cast<uint16_t*>(Qf);     // [M / 2][d][2] (dK = dS^T . Q)
  uint16_t* dOv = reinterpret_cast<uint16_t*>(dOf);   // [M / 2][d][2] (dV = P^T . dO)
  uint16_t* Kv = reinterpret_cast<uint16_t*>(Kf);     // [nk / 2][d][2] (dQ = dS . K)
#endif

  for (int64_t qbi = qb_first; qbi < nqb; qbi += qb_step) {
    const int64_t qs = qbi * bq, qe = std::min(qs + bq, len_q), M = (qe - qs) * g, Mp = round_up(M, lanes<A>());
    int64_t kmax = 0, kmin = len_k;
    for (int64_t c = 0; c < M; ++c) {
      const int64_t i = qs + c / g, h = c % g, head = kvh * g + h;
      cend[c] = p.causal ? causal_key_end(i, len_q, len_k) : len_k;
      kmax = std::max(kmax, cend[c]);
      kmin = std::min(kmin, cend[c]);
      lse_c[c] = A(lse[head * p.lse_head_stride + i]);
      const T* qr = qbase + i * p.q_row_stride + h * p.q_head_stride;
      const T* dr = dobase + i * bp.do_row_stride + h * bp.do_head_stride;
      D_c[c] = row_dot<A>(dr, obase + i * p.o_row_stride + h * p.o_head_stride, d);  // D = rowsum(dout * out)
#if defined(EXAONE_VEC_AVX512)
      if (dot16) {
        uint16_t* Qb = reinterpret_cast<uint16_t*>(dQt);  // staging rows, free until the key loop
        std::memcpy(Qb + c * d, qr, d * sizeof(T));
        std::memcpy(Qb + (mp_max + c) * d, dr, d * sizeof(T));
        for (int64_t x = 0; x < d / 2; ++x) {
          Qp[x * Mp + c] = load_u32(qr + 2 * x);
          dOp[x * Mp + c] = load_u32(dr + 2 * x);
        }
        continue;
      }
#endif
      load_row(Qf + c * d, qr, d, A(1));
      load_row(dOf + c * d, dr, d, A(1));
      for (int64_t x = 0; x < d; ++x) {
        Qt[x * Mp + c] = Qf[c * d + x] * scale;  // as the forward does, so S matches it bit for bit
        dOt[x * Mp + c] = dOf[c * d + x];
      }
    }
    for (int64_t c = M; c < Mp; ++c) {
      lse_c[c] = 0;
      D_c[c] = 0;
      for (int64_t x = 0; x < d; ++x) Qt[x * Mp + c] = dOt[x * Mp + c] = 0;
    }
#if defined(EXAONE_VEC_AVX512)
    if (dot16) {
      const uint16_t* Qb = reinterpret_cast<const uint16_t*>(dQt);
      pack_vnni(Qv, reinterpret_cast<const bf16*>(Qb), d, M, d);
      pack_vnni(dOv, reinterpret_cast<const bf16*>(Qb + mp_max * d), d, M, d);
    }
#endif
    if constexpr (std::is_same_v<A, double>) {
      // float64 (gradcheck): the forward saved the log-sum-exp in float32, which would leave P with
      // float32's relative error; recompute it in float64 (online max and sum over the key blocks)
      A* m_run = dQt;  // the dS . K tile is free until the key loop
      A* l_run = dQt + mp_max;
      for (int64_t c = 0; c < M; ++c) {
        m_run[c] = -std::numeric_limits<A>::infinity();
        l_run[c] = 0;
      }
      for (int64_t kb = 0; kb < kmax; kb += BK) {
        const int64_t nk = std::min(BK, kmax - kb);
        for (int64_t j = 0; j < nk; ++j) load_row(Kf + j * d, kbase + (kb + j) * p.k_row_stride, d, A(1));
        gemm(St, Mp, Kf, d, 1, Qt, Mp, nk, Mp, d, false);
        for (int64_t c = 0; c < M; ++c) {
          const int64_t jn = std::min(nk, std::max<int64_t>(0, cend[c] - kb));
          if (jn == 0) continue;
          A m = m_run[c];
          for (int64_t j = 0; j < jn; ++j) m = std::max(m, St[j * Mp + c]);
          A l = l_run[c] * std::exp(m_run[c] - m);
          for (int64_t j = 0; j < jn; ++j) l += std::exp(St[j * Mp + c] - m);
          m_run[c] = m;
          l_run[c] = l;
        }
      }
      for (int64_t c = 0; c < M; ++c)
        if (l_run[c] > 0) lse_c[c] = m_run[c] + std::log(l_run[c]);
    }
    std::fill(dQ, dQ + M * d, A(0));
    for (int64_t kb = 0; kb < kmax; kb += BK) {
      const int64_t nk = std::min(BK, kmax - kb);
#if defined(EXAONE_VEC_AVX512)
      if (dot16) {
        const T* kt = kbase + kb * p.k_row_stride;
        const T* vt = vbase + kb * p.v_row_stride;
        pack_vnni(Kv, reinterpret_cast<const bf16*>(kt), p.k_row_stride, nk, d);
        // S^T exactly as the forward computes it, then P^T = exp(S^T - lse)
        product_bf16(p, St, Mp, reinterpret_cast<const uint16_t*>(kt), p.k_row_stride,
                     reinterpret_cast<const uint16_t*>(Qp), Mp, nk, Mp, d, false);
        scale_row(St, nk * Mp, scale);
        exp_cols(St, nk, Mp, A(1), lse_c, static_cast<A*>(nullptr));
        if (kb + nk > kmin) mask_cols(St, nk, Mp, M, cend, kb, A(0));
        product_bf16(p, dPt, Mp, reinterpret_cast<const uint16_t*>(vt), p.v_row_stride,
                     reinterpret_cast<const uint16_t*>(dOp), Mp, nk, Mp, d, false);
        grad_scores(dPt, St, nk, Mp, D_c);
        for (int64_t x = 0; x < nk * Mp; x += W) {
          Vec::load(St + x).store(reinterpret_cast<bf16*>(Pb) + x);
          Vec::load(dPt + x).store(reinterpret_cast<bf16*>(dSb) + x);
        }
        pack_prob_pairs(dSp, dPt, Mp, nk);
        const int64_t mpairs = (M + 1) / 2;  // an odd M pairs with a zero row of the packed Q / dO
        product_bf16(p, dVt, d, Pb, Mp, dOv, d, nk, d, 2 * mpairs, false);   // P^T . dO
        product_bf16(p, dKt, d, dSb, Mp, Qv, d, nk, d, 2 * mpairs, false);  // dS^T . Q
        // dS . K (an outside engine's rows of dS go to P's tile, free now)
        product_pairs_bf16(p, dQt, d, dSp, Mp, reinterpret_cast<uint32_t*>(Pb), Kv, d, M, d, (nk + 1) / 2, false);
        for (int64_t j = 0; j < nk; ++j) {
          add_row(dv_acc + (kb + j) * d, dVt + j * d, d, A(1));
          add_row(dk_acc + (kb + j) * d, dKt + j * d, d, A(1));
        }
        for (int64_t c = 0; c < M; ++c) add_row(dQ + c * d, dQt + c * d, d, A(1));
        continue;
      }
#endif
      for (int64_t j = 0; j < nk; ++j) {
        load_row(Kf + j * d, kbase + (kb + j) * p.k_row_stride, d, A(1));
        load_row(Vf + j * d, vbase + (kb + j) * p.v_row_stride, d, A(1));
      }
      gemm(St, Mp, Kf, d, 1, Qt, Mp, nk, Mp, d, false);              // S^T = K . (scale Q)^T
      exp_cols(St, nk, Mp, A(1), lse_c, static_cast<A*>(nullptr));  // P^T = exp(S^T - lse)
      if (kb + nk > kmin) mask_cols(St, nk, Mp, M, cend, kb, A(0));
      gemm(dPt, Mp, Vf, d, 1, dOt, Mp, nk, Mp, d, false);             // dP^T = V . dO^T
      grad_scores(dPt, St, nk, Mp, D_c);                               // dS^T
      // Each tile product is formed on its own and then added, so the long sums over all query
      // (key) blocks are sums of block sums rather than one sequential chain.
      gemm(dVt, d, St, Mp, 1, dOf, d, nk, d, M, false);   // P^T . dO
      gemm(dKt, d, dPt, Mp, 1, Qf, d, nk, d, M, false);   // dS^T . Q (unscaled)
      gemm(dQt, d, dPt, 1, Mp, Kf, d, M, d, nk, false);   // dS . K
      for (int64_t j = 0; j < nk; ++j) {
        add_row(dv_acc + (kb + j) * d, dVt + j * d, d, A(1));
        add_row(dk_acc + (kb + j) * d, dKt + j * d, d, A(1));
      }
      for (int64_t c = 0; c < M; ++c) add_row(dQ + c * d, dQt + c * d, d, A(1));
    }
    for (int64_t c = 0; c < M; ++c) {
      const int64_t i = qs + c / g, h = c % g;
      store_row(dqbase + i * bp.dq_row_stride + h * bp.dq_head_stride, dQ + c * d, d, scale);
    }
  }
}

template <typename T> struct Fwd {
  template <typename... Args> static void run(Args&&... args) { fwd_block<T>(args...); }
};
template <typename T> struct Bwd {
  template <typename... Args> static void run(Args&&... args) { bwd_rows<T>(args...); }
};

}  // namespace

void attn_fwd_block(const AttnParams& p, int64_t b, int64_t kv_head, int64_t q_begin, int64_t q_end, int64_t k_begin,
                    int64_t k_end, float* part_out, float* part_lse, void* scratch) {
  by_dtype<Fwd>(p.dtype, p, b, kv_head, q_begin, q_end, k_begin, k_end, part_out, part_lse, scratch);
}

void attn_bwd_rows(const AttnBwdParams& p, void* dk_acc, void* dv_acc, int64_t b, int64_t kv_head, int64_t qb_first,
                   int64_t qb_step, void* scratch) {
  by_dtype<Bwd>(p.fwd.dtype, p, dk_acc, dv_acc, b, kv_head, qb_first, qb_step, scratch);
}

}  // namespace exaone_ext::cpu::EXAONE_ISA
