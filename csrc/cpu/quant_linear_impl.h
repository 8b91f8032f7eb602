// Quantized-weight linear kernel bodies, written once against cpu/vec.h and compiled per instruction
// set by quant_linear_avx512.cpp, quant_linear_avx2.cpp and quant_linear_scalar.cpp.
//
// As in linear_impl.h, a block of R output features and a tile of MT rows of x keep R * MT
// accumulators in registers while k advances, and the tiles of rows take turns over a chunk of k
// so that the weight comes from memory once per pass of up to kPassRows rows. The weights are
// widened to float32 in registers (int8: sign-extend and convert; int4: mask or shift, subtract the
// zero point as an integer, convert) and multiplied with float32 x: the result is the dequantised
// weight's product to float32 rounding, without rounding x to an integer type. int8 scales apply
// once per output at the end; int4 scales once per group, to the group's partial sums.
// With 16-bit x on AVX2 / AVX-512, x is instead rounded to 15-bit integers per group of 128 (well
// below its own rounding) and meets the weights in integer multiply-adds (block4i_f32 for int4,
// block8i_f32 for int8 up to kX8IntMaxRows rows), which keep up with memory at one row.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#include "cpu/quant_linear.h"
#include "cpu/vec.h"

namespace exaone_ext::cpu::EXAONE_ISA {
namespace {

constexpr int kR = int(kQuantRowBlock);
constexpr int kTile = Vec::size >= 16 ? 4 : 2;   // rows of x per tile (register file)
constexpr int kPassRows = 16;                     // rows of x per pass over the weight
constexpr int kBlk = int(kInt4Block);             // elements of k per unpacking step
constexpr int kNV = kBlk / Vec::size;             // vectors per step
constexpr int64_t kChunk8 = 512;                  // int8: elements of k per chunk (R rows x 512 B in L1)

#if defined(EXAONE_VEC_AVX2)
// 8 int8 weights from p as one float vector.
inline Vec load8_int8(const int8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}
#endif

// 32 int8 weights from p as kNV float vectors, in order.
inline void load_block8(const int8_t* p, Vec* w) {
#if defined(EXAONE_VEC_AVX512)
  for (int v = 0; v < 2; ++v)
    w[v] = {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * v))))};
#elif defined(EXAONE_VEC_AVX2)
  for (int v = 0; v < 4; ++v) w[v] = load8_int8(p + 8 * v);
#else
  for (int v = 0; v < kBlk; ++v) w[v] = Vec::set1(float(p[v]));
#endif
}

// 32 int4 weights (16 bytes from p, packed as quant_linear.h says) minus the zero point z, as kNV
// float vectors in order.
inline void load_block4(const uint8_t* p, int z, Vec* w) {
#if defined(EXAONE_VEC_AVX512)
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i zz = _mm512_set1_epi32(z);
  w[0] = {_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, _mm512_set1_epi32(15)), zz))};
  w[1] = {_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), zz))};
#elif defined(EXAONE_VEC_AVX2)
  const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
  const __m256i lo = _mm256_set1_epi32(15), zz = _mm256_set1_epi32(z);
  w[0] = {_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b0, lo), zz))};
  w[1] = {_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b1, lo), zz))};
  w[2] = {_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b0, 4), zz))};
  w[3] = {_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b1, 4), zz))};
#else
  for (int j = 0; j < 16; ++j) {
    w[j] = Vec::set1(float(int(p[j] & 15) - z));
    w[16 + j] = Vec::set1(float(int(p[j] >> 4) - z));
  }
#endif
}

inline float scale_at(const QuantLinearArgs& a, int64_t i) {
  switch (a.s_dtype) {
    case DType::kBFloat16: return to_float(static_cast<const bf16*>(a.scales)[i]);
    case DType::kFloat16: return to_float(static_cast<const f16*>(a.scales)[i]);
    default: return static_cast<const float*>(a.scales)[i];
  }
}

// With one row of x, two accumulators per output feature so that the FMA chains overlap; the
// portable variant keeps eight partial sums (as the AVX2 lanes do), which also bounds the rounding
// error of long sums.
template <int MT> constexpr int kAcc = Vec::size == 1 ? 8 : (MT == 1 ? 2 : 1);

template <int NA>
inline Vec sum_of(const Vec* t) {  // pairwise
  if constexpr (NA == 1) return t[0];
  else return sum_of<NA / 2>(t) + sum_of<NA / 2>(t + NA / 2);
}

// int8: k in [k0, k1) (multiples of kBlk) for features n0.. and rows m0..; sums in acc[j * R + r].
template <int R, int MT>
void tile8(const QuantLinearArgs& a, int64_t n0, int64_t m0, int64_t k0, int64_t k1, Vec* acc) {
  constexpr int NA = kAcc<MT>;
  const int8_t* q[R];
  for (int r = 0; r < R; ++r) q[r] = static_cast<const int8_t*>(a.q) + (n0 + r) * a.q_stride;
  const float* x[MT];
  for (int j = 0; j < MT; ++j) x[j] = a.x + (m0 + j) * a.x_stride;
  Vec t[MT][R][NA];
  for (int j = 0; j < MT; ++j)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < NA; ++c) t[j][r][c] = c ? Vec::zero() : acc[j * R + r];
  const int64_t next = R * a.q_stride;  // the next block's rows, prefetched one block ahead
  for (int64_t i = k0; i < k1; i += kBlk) {
    for (int r = 0; r < R; ++r) {
      if ((i & 63) == 0) __builtin_prefetch(q[r] + i + next, 0, 2);
      Vec w[kNV];
      load_block8(q[r] + i, w);
      for (int j = 0; j < MT; ++j)
        for (int v = 0; v < kNV; ++v)
          t[j][r][v % NA] = fmadd(Vec::load(x[j] + i + v * Vec::size), w[v], t[j][r][v % NA]);
    }
  }
  for (int j = 0; j < MT; ++j)
    for (int r = 0; r < R; ++r) acc[j * R + r] = sum_of<NA>(t[j][r]);
}

#if defined(EXAONE_VEC_AVX2)
// int8 with several rows on AVX2: steps of one vector (8 weights) with the x vectors of kTile8s rows
// in registers and one widened weight vector at a time: R * kTile8s accumulators + kTile8s x + 1
// weight fill the sixteen registers, where the 32-weight steps of tile8 (4 weight vectors, x read
// by the FMAs) widen every weight again in each 2-row tile. Zen 3, against tile8, alternated:
// 2560 -> 102400 1.2x at 3-4 rows, 1.28-1.33x at 8, 1.23-1.28x at 16; 2560 -> 7168 1.33-1.38x at 8.
constexpr int kTile8s = 3;

template <int R, int MT>
void tile8s(const QuantLinearArgs& a, int64_t n0, int64_t m0, int64_t k0, int64_t k1, Vec* acc) {
  const int8_t* q[R];
  for (int r = 0; r < R; ++r) q[r] = static_cast<const int8_t*>(a.q) + (n0 + r) * a.q_stride;
  const float* x[MT];
  for (int j = 0; j < MT; ++j) x[j] = a.x + (m0 + j) * a.x_stride;
  Vec t[MT][R];
  for (int j = 0; j < MT; ++j)
    for (int r = 0; r < R; ++r) t[j][r] = acc[j * R + r];
  const int64_t next = R * a.q_stride;
  for (int64_t i = k0; i < k1; i += Vec::size) {
    Vec xv[MT];
    for (int j = 0; j < MT; ++j) xv[j] = Vec::load(x[j] + i);
    for (int r = 0; r < R; ++r) {
      if ((i & 63) == 0) __builtin_prefetch(q[r] + i + next, 0, 2);
      const Vec w = load8_int8(q[r] + i);
      for (int j = 0; j < MT; ++j) t[j][r] = fmadd(xv[j], w, t[j][r]);
    }
  }
  for (int j = 0; j < MT; ++j)
    for (int r = 0; r < R; ++r) acc[j * R + r] = t[j][r];
}
#endif

// int4: group g for features n0.. (scales sc, zero points zp) and rows m0..; acc += sc * sums.
template <int R, int MT>
void tile4(const QuantLinearArgs& a, int64_t n0, int64_t m0, int64_t g, const float* sc, const int* zp, Vec* acc) {
  constexpr int NA = kAcc<MT>;
  const int64_t k0 = g * a.group;
  const uint8_t* q[R];
  for (int r = 0; r < R; ++r) q[r] = static_cast<const uint8_t*>(a.q) + (n0 + r) * a.q_stride + k0 / 2;
  const float* x[MT];
  for (int j = 0; j < MT; ++j) x[j] = a.x + (m0 + j) * a.x_stride + k0;
  Vec t[MT][R][NA];
  for (int j = 0; j < MT; ++j)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < NA; ++c) t[j][r][c] = Vec::zero();
  for (int64_t i = 0; i < a.group; i += kBlk) {
    for (int r = 0; r < R; ++r) {
      Vec w[kNV];
      load_block4(q[r] + i / 2, zp[r], w);
      for (int j = 0; j < MT; ++j)
        for (int v = 0; v < kNV; ++v)
          t[j][r][v % NA] = fmadd(Vec::load(x[j] + i + v * Vec::size), w[v], t[j][r][v % NA]);
    }
  }
  for (int j = 0; j < MT; ++j)
    for (int r = 0; r < R; ++r) {
      acc[j * R + r] = fmadd(Vec::set1(sc[r]), sum_of<NA>(t[j][r]), acc[j * R + r]);
    }
}

#if defined(__AVX2__)
// ---- int4 with integer multiply-adds (x prepared by prepare_x4) ----
// The kernel order of a group's x parts: in steps of 64 elements, one 32-byte load of the weight
// gives [low nibbles | high nibbles] of two 32-element blocks A and B as the byte vectors
// lo = [A0..A15, B0..B15] and hi = [A16..A31, B16..B31], so x is stored as
// [x0..x15, x32..x47, x16..x31, x48..x63] per 64; a trailing block of 32 (groups of 32, 96, ...)
// is unpacked with a 16-byte load and kept in order.
inline int64_t x4_order(int64_t i, int64_t group) {  // position in the group -> position in the order
  const int64_t c = i & ~int64_t(63), j = i & 63;
  if (c + 64 > group) return i;                       // the trailing 32
  const int64_t blk = j >> 5, half = (j >> 4) & 1, e = j & 15;  // A/B, low/high nibble, byte
  return c + 32 * half + 16 * blk + e;
}

constexpr float kX4Max = 16383.f;  // |128 * hi + lo| <= 16383

// The largest |x[i]| of x[0..n) (n a multiple of 8) into amax; false where a value is infinite or
// NaN, or where the largest is positive but below 1e-30 (too small for a float scale of the integers).
inline bool x_amax(const float* x, int64_t n, float& amax) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 amax8 = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, v));
    const __m256 z = _mm256_mul_ps(v, _mm256_setzero_ps());   // NaN where v is infinite or NaN
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(z, z, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(bad)) return false;
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  amax = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
  return !(amax > 0.f && amax < 1e-30f);
}

// 16 int32 (each within int16) as 16 int16 in order (packs interleaves the halves; the permute
// restores the order).
inline __m256i words_in_order(__m256i p0, __m256i p1) {
  return _mm256_permute4x64_epi64(_mm256_packs_epi32(p0, p1), 0xD8);
}

// x * inv rounded to the nearest integer within +-kX4Max, 8 at a time.
inline __m256i x_ints(const float* x, __m256 inv) {
  return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_set1_ps(kX4Max),
                                          _mm256_max_ps(_mm256_set1_ps(-kX4Max), _mm256_mul_ps(_mm256_loadu_ps(x), inv))));
}

bool prepare_x4_impl(const QuantLinearArgs& a, int8_t* xq, float* xs, int32_t* xsum) {
  const int64_t G = a.group, groups = a.k / G;
  if (G > 8192) return false;  // keeps z * (sum of v) and the lane sums within int32
  for (int64_t m = 0; m < a.m; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* x = a.x + m * a.x_stride + g * G;
      float amax;
      if (!x_amax(x, G, amax)) return false;
      const __m256 inv = _mm256_set1_ps(amax > 0.f ? kX4Max / amax : 0.f);
      int8_t* hi = xq + m * 2 * a.k + 2 * g * G;
      int8_t* lo = hi + G;
      __m256i sum = _mm256_setzero_si256();
      const __m256i m127 = _mm256_set1_epi32(127);
      for (int64_t i = 0; i < G; i += 16) {  // 16 in a row keep their order (x4_order moves runs of 16)
        const __m256i v0 = x_ints(x + i, inv), v1 = x_ints(x + i + 8, inv);
        sum = _mm256_add_epi32(sum, _mm256_add_epi32(v0, v1));
        auto bytes = [](__m256i p0, __m256i p1) {  // 16 int32 (each in -128..127) -> 16 int8 in order
          const __m256i w = words_in_order(p0, p1);
          return _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
        };
        const int64_t o = x4_order(i, G);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + o), bytes(_mm256_srai_epi32(v0, 7), _mm256_srai_epi32(v1, 7)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + o), bytes(_mm256_and_si256(v0, m127), _mm256_and_si256(v1, m127)));
      }
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      xs[m * groups + g] = amax / kX4Max;
      xsum[m * groups + g] = _mm_cvtsi128_si32(s4);
    }
  }
  return true;
}

// int8: x per block of kX8Block as 15-bit integers in order (int16), and the block's scale.
bool prepare_x8_impl(const QuantLinearArgs& a, int16_t* xw, float* xs) {
  if (a.k % 16) return false;
  const int64_t blocks = (a.k + kX8Block - 1) / kX8Block;
  for (int64_t m = 0; m < a.m; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k0 = b * kX8Block, len = std::min<int64_t>(kX8Block, a.k - k0);
      const float* x = a.x + m * a.x_stride + k0;
      float amax;
      if (!x_amax(x, len, amax)) return false;
      const __m256 inv = _mm256_set1_ps(amax > 0.f ? kX4Max / amax : 0.f);
      int16_t* o = xw + m * a.k + k0;
      for (int64_t i = 0; i < len; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), words_in_order(x_ints(x + i, inv), x_ints(x + i + 8, inv)));
      xs[m * blocks + b] = amax / kX4Max;
    }
  return true;
}

// The integer dot products of one feature's group of weight bytes (q) with MT rows' x parts (xq[j]:
// the group's hi parts, its lo parts G further, in kernel order): s[j] gets 8 partial sums of
// q * (128 * hi + lo). The nibbles are unpacked once for all MT rows; x is read through memory
// operands from L1. Inlined and unrolled so that the sums stay in registers.
#if defined(__AVX512VNNI__)
// The AVX512-VNNI variant: vpdpbusd sums four nibble x byte products straight into 32 bits, so the
// high and low halves of x each keep one 32-bit sum per row over the group (no 16-bit stage, no
// widening multiply-adds), combined as 128 * high + low at the end. Same nibble / x order.
template <int MT, int kG>
__attribute__((always_inline)) inline void dots4i(const uint8_t* q, const int8_t* const* xq, int64_t group, __m256i* s) {
  const int64_t G = kG ? kG : group;
  const __m256i nib = _mm256_set1_epi8(15);
  auto ld = [](const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  __m256i sh[MT], sl[MT];
#pragma GCC unroll 16
  for (int j = 0; j < MT; ++j) sh[j] = sl[j] = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 64 <= G; i += 64) {  // 32 bytes: low nibbles against x[i..i+31], high ones x[i+32..i+63]
    const __m256i b = ld(q + i / 2);
    const __m256i w0 = _mm256_and_si256(b, nib), w1 = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
#pragma GCC unroll 16
    for (int j = 0; j < MT; ++j) {
      const int8_t* xh = xq[j] + i;
      const int8_t* xl = xh + G;
      sh[j] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(sh[j], w0, ld(xh)), w1, ld(xh + 32));
      sl[j] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(sl[j], w0, ld(xl)), w1, ld(xl + 32));
    }
  }
  if (i < G) {  // 32 left: one 16-byte load
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i / 2));
    const __m128i n16 = _mm_set1_epi8(15);
    const __m256i w0 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), n16), _mm_and_si128(b, n16));
#pragma GCC unroll 16
    for (int j = 0; j < MT; ++j) {
      const int8_t* xh = xq[j] + i;
      sh[j] = _mm256_dpbusd_epi32(sh[j], w0, ld(xh));
      sl[j] = _mm256_dpbusd_epi32(sl[j], w0, ld(xh + G));
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < MT; ++j) s[j] = _mm256_add_epi32(_mm256_slli_epi32(sh[j], 7), sl[j]);
}
#else
template <int MT, int kG>
__attribute__((always_inline)) inline void dots4i(const uint8_t* q, const int8_t* const* xq, int64_t group, __m256i* s) {
  const int64_t G = kG ? kG : group;
  const __m256i nib = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  auto ld = [](const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  auto mad = [&](__m256i w, const int8_t* x) { return _mm256_maddubs_epi16(w, ld(x)); };
  auto widen = [&](__m256i ph, __m256i pl) {  // 128 * ph + pl, pairs summed into 32 bits
    return _mm256_add_epi32(_mm256_slli_epi32(_mm256_madd_epi16(ph, ones), 7), _mm256_madd_epi16(pl, ones));
  };
#pragma GCC unroll 16
  for (int j = 0; j < MT; ++j) s[j] = _mm256_setzero_si256();
  // 16-bit sums of at most 4 maddubs results (each pair |.| <= 2 * 15 * 128) before widening
  int64_t i = 0;
  for (; i + 128 <= G; i += 128) {
    const __m256i b0 = ld(q + i / 2), b1 = ld(q + i / 2 + 32);
    const __m256i w0 = _mm256_and_si256(b0, nib), w1 = _mm256_and_si256(_mm256_srli_epi16(b0, 4), nib);
    const __m256i w2 = _mm256_and_si256(b1, nib), w3 = _mm256_and_si256(_mm256_srli_epi16(b1, 4), nib);
#pragma GCC unroll 16
    for (int j = 0; j < MT; ++j) {
      const int8_t* xh = xq[j] + i;
      const int8_t* xl = xh + G;
      const __m256i ph = _mm256_add_epi16(_mm256_add_epi16(mad(w0, xh), mad(w1, xh + 32)),
                                          _mm256_add_epi16(mad(w2, xh + 64), mad(w3, xh + 96)));
      const __m256i pl = _mm256_add_epi16(_mm256_add_epi16(mad(w0, xl), mad(w1, xl + 32)),
                                          _mm256_add_epi16(mad(w2, xl + 64), mad(w3, xl + 96)));
      s[j] = _mm256_add_epi32(s[j], widen(ph, pl));
    }
  }
  for (; i < G;) {  // the rest of the group: 64 (one 32-byte load), then 32 (one 16-byte load)
    __m256i w0, w1;
    const bool full = i + 64 <= G;
    if (full) {
      const __m256i b = ld(q + i / 2);
      w0 = _mm256_and_si256(b, nib), w1 = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
    } else {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i / 2));
      const __m128i n16 = _mm_set1_epi8(15);
      w0 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), n16), _mm_and_si128(b, n16));
      w1 = _mm256_setzero_si256();
    }
#pragma GCC unroll 16
    for (int j = 0; j < MT; ++j) {
      const int8_t* xh = xq[j] + i;
      const int8_t* xl = xh + G;
      __m256i ph = mad(w0, xh), pl = mad(w0, xl);
      if (full) ph = _mm256_add_epi16(ph, mad(w1, xh + 32)), pl = _mm256_add_epi16(pl, mad(w1, xl + 32));
      s[j] = _mm256_add_epi32(s[j], widen(ph, pl));
    }
    i += full ? 64 : 32;
  }
}
#endif  // __AVX512VNNI__

// Four consecutive scales as float32.
inline __m128 load4_scales(const float* p) { return _mm_loadu_ps(p); }
inline __m128 load4_scales(const bf16* p) {
  return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 16));
}
inline __m128 load4_scales(const f16* p) { return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }

// The scales and zero points of features n0..n0+R-1 as [groups][R] tables (four groups of four
// features transposed at a time).
template <int R, typename S>
void tables4i(const QuantLinearArgs& a, const S* scales, int64_t n0, float* sct, int32_t* zt) {
  const int64_t groups = a.k / a.group;
  int64_t g = 0;
  if constexpr (R % 4 == 0) {
    for (; g + 4 <= groups; g += 4)
      for (int r0 = 0; r0 < R; r0 += 4) {
        const S* sr = scales + (n0 + r0) * groups + g;
        const uint8_t* zr = a.zeros + (n0 + r0) * groups + g;
        __m128 s0 = load4_scales(sr), s1 = load4_scales(sr + groups);
        __m128 s2 = load4_scales(sr + 2 * groups), s3 = load4_scales(sr + 3 * groups);
        _MM_TRANSPOSE4_PS(s0, s1, s2, s3);
        float* st = sct + g * R + r0;
        _mm_storeu_ps(st, s0), _mm_storeu_ps(st + R, s1), _mm_storeu_ps(st + 2 * R, s2), _mm_storeu_ps(st + 3 * R, s3);
        auto z4 = [&](int r) {
          int32_t w;
          std::memcpy(&w, zr + r * groups, 4);
          return _mm_castsi128_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(w)));
        };
        __m128 z0 = z4(0), z1 = z4(1), z2 = z4(2), z3 = z4(3);
        _MM_TRANSPOSE4_PS(z0, z1, z2, z3);
        auto* zz = reinterpret_cast<float*>(zt + g * R + r0);
        _mm_storeu_ps(zz, z0), _mm_storeu_ps(zz + R, z1), _mm_storeu_ps(zz + 2 * R, z2), _mm_storeu_ps(zz + 3 * R, z3);
      }
  }
  for (; g < groups; ++g)
    for (int r = 0; r < R; ++r) {
      sct[g * R + r] = to_float(scales[(n0 + r) * groups + g]);
      zt[g * R + r] = a.zeros[(n0 + r) * groups + g];
    }
}

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The bytes [start, start + len) from p, line by line. The integer paths prefetch the next block of
// R weight rows while they work: where rows are back to back it is one stretch of memory, read in
// order, as much per step as the step reads of its own block (eight rows' groups side by side are
// eight short streams that the hardware prefetchers barely follow); else the same bytes of the row
// R further.
inline void prefetch_span(const void* p, int64_t start, int64_t len) {
  for (int64_t o = (start + 63) / 64 * 64; o < start + len; o += 64)
    __builtin_prefetch(static_cast<const char*>(p) + o, 0, 2);
}

// Rows m0..m1 of x in tiles of 4, then one of 2 and one of 1 (tile.template operator()<MT>(m)).
template <typename F>
void over_row_tiles(int64_t m0, int64_t m1, F&& tile) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) tile.template operator()<4>(m);
  if (m + 2 <= m1) tile.template operator()<2>(m), m += 2;
  if (m < m1) tile.template operator()<1>(m);
}

// As block() for int4 with the x of prepare_x4. The R features' scales and zero points are
// gathered once per block into [groups][R] tables. Per group, each feature's nibbles are unpacked
// once and meet the MT rows' x in integer multiply-adds (dots4i); the 8 integer partial sums are
// converted and added into the (row, feature) float accumulator with the group's scale times x's,
// and the zero points' part, z * scale * (sum of v), into one correction per row and feature
// (sum of (q - z) * v = sum of q * v - z * sum of v). The rows' accumulators live in registers
// across the groups and are reduced once at the end.
template <int R, int kG = 0>
void block4i_f32(const QuantLinearArgs& a, int64_t n0, int64_t m0, int64_t m1, float* out) {
  if constexpr (kG == 0) {  // the usual groups as constants (AWQ and quantize: 128; GGUF Q4_0: 32)
    if (a.group == 128) return block4i_f32<R, 128>(a, n0, m0, m1, out);
    if (a.group == 32) return block4i_f32<R, 32>(a, n0, m0, m1, out);
    if (a.group == 256) return block4i_f32<R, 256>(a, n0, m0, m1, out);
  }
  const int64_t G = kG ? kG : a.group, groups = a.k / G;
  constexpr int64_t kStackGroups = 256;  // tables on the stack up to 256 groups (k = 32768 at 128)
  float sc_stack[kStackGroups * R];
  int32_t z_stack[kStackGroups * R];
  std::vector<float> sc_heap;
  std::vector<int32_t> z_heap;
  float* sct = sc_stack;
  int32_t* zt = z_stack;
  if (groups > kStackGroups) {
    sc_heap.resize(size_t(groups * R)), z_heap.resize(size_t(groups * R));
    sct = sc_heap.data(), zt = z_heap.data();
  }
  switch (a.s_dtype) {
    case DType::kBFloat16: tables4i<R>(a, static_cast<const bf16*>(a.scales), n0, sct, zt); break;
    case DType::kFloat16: tables4i<R>(a, static_cast<const f16*>(a.scales), n0, sct, zt); break;
    default: tables4i<R>(a, static_cast<const float*>(a.scales), n0, sct, zt); break;
  }
  const uint8_t* q0 = static_cast<const uint8_t*>(a.q) + n0 * a.q_stride;
  const bool contiguous = 2 * a.q_stride == a.k;  // rows back to back (prefetch_span)
  // MT rows at a time, their R accumulators each in registers
  auto tile = [&]<int MT>(int64_t m) {
    __m256 acc[R][MT];
    float corr[MT][R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int j = 0; j < MT; ++j) acc[r][j] = _mm256_setzero_ps();
    for (int j = 0; j < MT; ++j)
      for (int r = 0; r < R; ++r) corr[j][r] = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* xq[MT];
      alignas(32) float scl[MT][R];  // the group's scale times x's, per row and feature
      __m256 sc, zc;                 // R == 8: the group's scales, and zero points times scales
      if constexpr (R == 8) {
        sc = _mm256_loadu_ps(sct + g * R);
        zc = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(zt + g * R))), sc);
      }
      for (int j = 0; j < MT; ++j) {
        xq[j] = a.xq + (m + j) * 2 * a.k + 2 * g * G;
        const float sx = a.xs[(m + j) * groups + g], zs = sx * float(a.xsum[(m + j) * groups + g]);
        if constexpr (R == 8) {
          _mm256_store_ps(scl[j], _mm256_mul_ps(sc, _mm256_set1_ps(sx)));
          _mm256_storeu_ps(corr[j], _mm256_fmadd_ps(zc, _mm256_set1_ps(zs), _mm256_loadu_ps(corr[j])));
        } else {
          for (int r = 0; r < R; ++r) {
            scl[j][r] = sct[g * R + r] * sx;
            corr[j][r] += float(zt[g * R + r]) * sct[g * R + r] * zs;
          }
        }
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const uint8_t* q = q0 + r * a.q_stride + g * G / 2;
        if (contiguous) prefetch_span(q0 + R * a.q_stride, (g * R + r) * G / 2, G / 2);
        else prefetch_span(q + R * a.q_stride, 0, G / 2);
        __m256i s[MT];
        dots4i<MT, kG>(q, xq, G, s);
#pragma GCC unroll 16
        for (int j = 0; j < MT; ++j)
          acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[j]), _mm256_broadcast_ss(&scl[j][r]), acc[r][j]);
      }
    }
    for (int j = 0; j < MT; ++j)
      for (int r = 0; r < R; ++r) out[(m - m0 + j) * R + r] = hsum_ps(acc[r][j]) - corr[j][r];
  };
  over_row_tiles(m0, m1, tile);
}

// Eight consecutive scales as float32.
inline __m256 load8_scales(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8_scales(const bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline __m256 load8_scales(const f16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// int4 with ONE row of x on the integer path (x of prepare_x4): output features [begin, end) one
// after the other, each over all of k, so that the weight is read as one sequential stream with a
// prefetch a.prefetch_ahead bytes ahead (the rows of a weight are back to back), as bf16's
// single_row does; the block kernel above walks R rows side by side (R short streams). Per feature,
// the groups' scales times x's, sxs[g], and the zero points' part, sum over g of z * scale * xs *
// xsum, are formed eight groups to a vector first; then each group's integer sum (dots4i) is
// converted and added into one float accumulator with sxs[g].
template <typename T, typename S, int kG>
void row4i_stream(const QuantLinearArgs& a, const S* scales, int64_t begin, int64_t end) {
  const int64_t G = kG ? kG : a.group, groups = a.k / G;
  constexpr int64_t kStackGroups = 256;
  float sxs_stack[kStackGroups], xsx_stack[kStackGroups];
  std::vector<float> heap;
  float* sxs = sxs_stack;
  float* xsx = xsx_stack;  // xs * xsum per group (the zero points' part per unit of z * scale)
  if (groups > kStackGroups) {
    heap.resize(size_t(2 * groups));
    sxs = heap.data(), xsx = heap.data() + groups;
  }
  for (int64_t g = 0; g < groups; ++g) xsx[g] = a.xs[g] * float(a.xsum[g]);
  const int8_t* xq[1] = {a.xq};
#if defined(__AVX512VNNI__)
  // Groups of 128 or 256 with AVX512-VNNI: one 64-byte load holds 128 weights, whose low nibbles
  // meet x's elements [0, 32) and [64, 96) of the 128 and the high ones [32, 64) and [96, 128) in
  // prepare_x4's order; xz holds x's parts rearranged so that each of those is one 64-byte load.
  // Made once per chunk of features this is called for (2 k bytes, a few hundred 32-byte copies
  // beside the chunk's weight bytes), read for every feature of it.
  thread_local std::vector<int8_t> xz_buf;
  const int8_t* xz = nullptr;
  if constexpr (kG % 128 == 0 && kG > 0) {
    xz_buf.resize(size_t(2 * a.k));
    for (int64_t c = 0; c < 2 * a.k; c += 128) {  // every 128 of the hi and lo parts (G a multiple of 128)
      std::memcpy(xz_buf.data() + c, a.xq + c, 32);
      std::memcpy(xz_buf.data() + c + 32, a.xq + c + 64, 32);
      std::memcpy(xz_buf.data() + c + 64, a.xq + c + 32, 32);
      std::memcpy(xz_buf.data() + c + 96, a.xq + c + 96, 32);
    }
    xz = xz_buf.data();
  }
#endif
  // Groups of 32 (GGUF's Q4_0 blocks) and, with AVX512-VNNI, 64 (some AWQ checkpoints), with k a
  // multiple of the step: the wide steps of the groups of 128 (AVX512-VNNI: 64 bytes, 128 weights;
  // else 32 bytes, 64 weights), whose 16-byte lanes are 32-element blocks, each lane's sums scaled by
  // its own group's sxs (one permute of the step's consecutive sxs). Before: a 16-byte step per block
  // of 32, 1.4-2x the time per weight on Zen 5. xz per step: the hi parts of its blocks' first 16
  // elements, of their last 16, then the lo parts the same way (runs of 16 keep their order in
  // prepare_x4's layout).
#if defined(__AVX512VNNI__)
  constexpr int64_t kStep = 128;
  constexpr bool kSmall = kG == 32 || kG == 64;
#else
  constexpr int64_t kStep = 64;   // AVX2 (groups of 64 already take 32-byte steps there)
  constexpr bool kSmall = kG == 32;
  thread_local std::vector<int8_t> xz_buf;
  const int8_t* xz = nullptr;
#endif
  const bool small_steps = kSmall && a.k % kStep == 0;
  if (small_steps) {
    constexpr int kBlocks = int(kStep / 32);
    xz_buf.resize(size_t(2 * a.k));
    for (int64_t c = 0; c < a.k; c += kStep) {
      int8_t* dst = xz_buf.data() + 2 * c;
      for (int b = 0; b < kBlocks; ++b) {
        const int64_t e = c + 32 * b, g = e / G, i = e - g * G;   // the block's first element, its group
        const int8_t* hi = a.xq + 2 * g * G;
        for (int half = 0; half < 2; ++half) {
          const int64_t o = x4_order(i + 16 * half, G);
          std::memcpy(dst + 16 * kBlocks * half + 16 * b, hi + o, 16);                  // H0, H1
          std::memcpy(dst + 16 * kBlocks * (2 + half) + 16 * b, hi + G + o, 16);        // L0, L1
        }
      }
    }
    xz = xz_buf.data();
  }
  T* y = static_cast<T*>(a.y);
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* q = static_cast<const uint8_t*>(a.q) + n * a.q_stride;
    const S* sr = scales + n * groups;
    const uint8_t* zr = a.zeros + n * groups;
    __m256 corr8 = _mm256_setzero_ps();
    float corr = 0.f;
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
      const __m256 sc = load8_scales(sr + g);
      _mm256_storeu_ps(sxs + g, _mm256_mul_ps(sc, _mm256_loadu_ps(a.xs + g)));
      int64_t z8;
      std::memcpy(&z8, zr + g, 8);
      const __m256 zf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(z8)));
      corr8 = _mm256_fmadd_ps(_mm256_mul_ps(zf, sc), _mm256_loadu_ps(xsx + g), corr8);
    }
    for (; g < groups; ++g) {
      sxs[g] = to_float(sr[g]) * a.xs[g];
      corr += float(zr[g]) * to_float(sr[g]) * xsx[g];
    }
    const char* ahead = reinterpret_cast<const char*>(q) + a.prefetch_ahead;
#if defined(__AVX512VNNI__)
    if constexpr (kG % 128 == 0 && kG > 0) {  // 512-bit steps of 128 weights on x in xz's order
      const __m512i nib = _mm512_set1_epi8(15);
      auto ld = [](const int8_t* p) { return _mm512_loadu_si512(p); };
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      for (g = 0; g < groups; ++g) {
        const int8_t* xh = xz + 2 * g * G;
        const int8_t* xl = xh + G;
        __m512i sh = _mm512_setzero_si512(), sl = _mm512_setzero_si512();
#pragma GCC unroll 2
        for (int64_t c = 0; c < G; c += 128) {
          _mm_prefetch(ahead + (g * G + c) / 2, _MM_HINT_T1);
          const __m512i b = _mm512_loadu_si512(q + (g * G + c) / 2);
          const __m512i w0 = _mm512_and_si512(b, nib), w1 = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
          sh = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sh, w0, ld(xh + c)), w1, ld(xh + c + 64));
          sl = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sl, w0, ld(xl + c)), w1, ld(xl + c + 64));
        }
        const __m512 v = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(sh, 7), sl));
        if (g & 1) acc1 = _mm512_fmadd_ps(v, _mm512_set1_ps(sxs[g]), acc1);
        else acc0 = _mm512_fmadd_ps(v, _mm512_set1_ps(sxs[g]), acc0);
      }
      y[n] = from_float<T>(_mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) - (hsum_ps(corr8) + corr));
      continue;
    }
    if (small_steps) {  // 512-bit steps of 128 weights, a scale per 16-byte lane
      const __m512i nib = _mm512_set1_epi8(15);
      // lane l of a step takes sxs[first group of the step + l / (G / 32)]
      const __m512i lanes = kG == 32 ? _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0)
                                     : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      for (int64_t c = 0; c < a.k; c += 128) {
        _mm_prefetch(ahead + c / 2, _MM_HINT_T1);
        const int8_t* x = xz + 2 * c;
        const __m512i b = _mm512_loadu_si512(q + c / 2);
        const __m512i w0 = _mm512_and_si512(b, nib), w1 = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
        const __m512i zero = _mm512_setzero_si512();
        const __m512i sh = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, w0, _mm512_loadu_si512(x)), w1,
                                               _mm512_loadu_si512(x + 64));
        const __m512i sl = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, w0, _mm512_loadu_si512(x + 128)), w1,
                                               _mm512_loadu_si512(x + 192));
        const __m512 v = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(sh, 7), sl));
        const __m128 s4 = kG == 32 ? _mm_loadu_ps(sxs + c / G)   // the step's 4 (or 2) groups, no further
                                   : _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sxs + c / G)));
        const __m512 sc = _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(s4));
        if (c & 128) acc1 = _mm512_fmadd_ps(v, sc, acc1);
        else acc0 = _mm512_fmadd_ps(v, sc, acc0);
      }
      y[n] = from_float<T>(_mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) - (hsum_ps(corr8) + corr));
      continue;
    }
#else
    if (small_steps) {  // 32-byte steps of 64 weights (two blocks of 32, groups of 32), a scale per 16-byte lane
      const __m256i nib = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
      const __m256i lanes = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
      auto ld = [](const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      for (int64_t c = 0; c < a.k; c += 64) {
        _mm_prefetch(ahead + c / 2, _MM_HINT_T1);
        const int8_t* x = xz + 2 * c;
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + c / 2));
        const __m256i w0 = _mm256_and_si256(b, nib), w1 = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
        // 16-bit sums of two products of pairs: |.| <= 2 * 2 * 15 * 128
        const __m256i ph = _mm256_add_epi16(_mm256_maddubs_epi16(w0, ld(x)), _mm256_maddubs_epi16(w1, ld(x + 32)));
        const __m256i pl = _mm256_add_epi16(_mm256_maddubs_epi16(w0, ld(x + 64)), _mm256_maddubs_epi16(w1, ld(x + 96)));
        const __m256 v = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(_mm256_madd_epi16(ph, ones), 7),
                                                             _mm256_madd_epi16(pl, ones)));
        const __m128 s2 = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sxs + c / 32)));
        const __m256 sc = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s2), lanes);
        if (c & 64) acc1 = _mm256_fmadd_ps(v, sc, acc1);
        else acc0 = _mm256_fmadd_ps(v, sc, acc0);
      }
      y[n] = from_float<T>(hsum_ps(_mm256_add_ps(acc0, acc1)) - (hsum_ps(corr8) + corr));
      continue;
    }
#endif
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (g = 0; g < groups; ++g) {
      const uint8_t* qg = q + g * G / 2;
      for (int64_t o = 0; o < G / 2; o += 64) _mm_prefetch(ahead + g * G / 2 + o, _MM_HINT_T1);
      __m256i s[1];
      xq[0] = a.xq + 2 * g * G;
      dots4i<1, kG>(qg, xq, G, s);
      if (g & 1) acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[0]), _mm256_broadcast_ss(sxs + g), acc1);
      else acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[0]), _mm256_broadcast_ss(sxs + g), acc0);
    }
    y[n] = from_float<T>(hsum_ps(_mm256_add_ps(acc0, acc1)) - (hsum_ps(corr8) + corr));
  }
}

template <typename T, typename S>
void row4i_stream(const QuantLinearArgs& a, const S* scales, int64_t begin, int64_t end) {
  if (a.group == 128) return row4i_stream<T, S, 128>(a, scales, begin, end);
  if (a.group == 32) return row4i_stream<T, S, 32>(a, scales, begin, end);
  if (a.group == 64) return row4i_stream<T, S, 64>(a, scales, begin, end);
  if (a.group == 256) return row4i_stream<T, S, 256>(a, scales, begin, end);
  row4i_stream<T, S, 0>(a, scales, begin, end);
}

template <typename T>
void row4i_stream(const QuantLinearArgs& a, int64_t begin, int64_t end) {
  switch (a.s_dtype) {
    case DType::kBFloat16: return row4i_stream<T>(a, static_cast<const bf16*>(a.scales), begin, end);
    case DType::kFloat16: return row4i_stream<T>(a, static_cast<const f16*>(a.scales), begin, end);
    default: return row4i_stream<T>(a, static_cast<const float*>(a.scales), begin, end);
  }
}

// int8 with ONE row of x on the integer path (x of prepare_x8): as row4i_stream, output features
// one after the other over all of k (one sequential stream, prefetched a.prefetch_ahead bytes
// ahead). Per block of kX8Block inputs, two integer sums take turns over the 16-weight steps, and
// the block's sum is converted and added into the float accumulator with x's block scale; the
// feature's scale applies once at the end.
template <typename T>
void row8i_stream(const QuantLinearArgs& a, int64_t begin, int64_t end) {
  const int64_t blocks = (a.k + kX8Block - 1) / kX8Block, full = a.k / kX8Block;
  T* y = static_cast<T*>(a.y);
  auto ld = [](const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  auto dot = [&](__m256i s, const int8_t* q, const int16_t* x) {
    const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
#if defined(__AVX512VNNI__)
    return _mm256_dpwssd_epi32(s, w, ld(x));
#else
    return _mm256_add_epi32(s, _mm256_madd_epi16(w, ld(x)));
#endif
  };
#if defined(__AVX512BW__)
  // 512-bit steps of 32 weights (one 32-byte load sign-extended to 32 int16): half the instructions
  // per weight of the 256-bit steps below (on a Zen 5 core 38 -> 61 GB/s of int8 weights from cache).
  auto dot512 = [](__m512i s, const int8_t* q, const int16_t* x) {
    const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(s, w, _mm512_loadu_si512(x));
#else
    return _mm512_add_epi32(s, _mm512_madd_epi16(w, _mm512_loadu_si512(x)));
#endif
  };
#endif
  for (int64_t n = begin; n < end; ++n) {
    const int8_t* q = static_cast<const int8_t*>(a.q) + n * a.q_stride;
    const char* ahead = reinterpret_cast<const char*>(q) + a.prefetch_ahead;
#if defined(__AVX512BW__)
    {
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      for (int64_t b = 0; b < full; ++b) {
        const int64_t k0 = b * kX8Block;
        _mm_prefetch(ahead + k0, _MM_HINT_T1);
        _mm_prefetch(ahead + k0 + 64, _MM_HINT_T1);
        __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int64_t c = 0; c < kX8Block; c += 64) {
          s0 = dot512(s0, q + k0 + c, a.xw + k0 + c);
          s1 = dot512(s1, q + k0 + c + 32, a.xw + k0 + c + 32);
        }
        const __m512 v = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), sx = _mm512_set1_ps(a.xs[b]);
        if (b & 1) acc1 = _mm512_fmadd_ps(v, sx, acc1);
        else acc0 = _mm512_fmadd_ps(v, sx, acc0);
      }
      float tail = 0.f;
      if (blocks > full) {  // the last block: k % kX8Block inputs, a multiple of 16
        const int64_t k0 = full * kX8Block;
        __m256i s0 = _mm256_setzero_si256();
        for (int64_t c = k0; c < a.k; c += 16) s0 = dot(s0, q + c, a.xw + c);
        tail = hsum_ps(_mm256_cvtepi32_ps(s0)) * a.xs[full];
      }
      y[n] = from_float<T>((_mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + tail) * scale_at(a, n));
      continue;
    }
#endif
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t b = 0; b < full; ++b) {
      const int64_t k0 = b * kX8Block;
      _mm_prefetch(ahead + k0, _MM_HINT_T1);
      _mm_prefetch(ahead + k0 + 64, _MM_HINT_T1);
      __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int64_t c = 0; c < kX8Block; c += 32) {
        s0 = dot(s0, q + k0 + c, a.xw + k0 + c);
        s1 = dot(s1, q + k0 + c + 16, a.xw + k0 + c + 16);
      }
      const __m256 v = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)), sx = _mm256_broadcast_ss(a.xs + b);
      if (b & 1) acc1 = _mm256_fmadd_ps(v, sx, acc1);
      else acc0 = _mm256_fmadd_ps(v, sx, acc0);
    }
    if (blocks > full) {  // the last block: k % kX8Block inputs, a multiple of 16
      const int64_t k0 = full * kX8Block;
      __m256i s0 = _mm256_setzero_si256();
      for (int64_t c = k0; c < a.k; c += 16) s0 = dot(s0, q + c, a.xw + c);
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_broadcast_ss(a.xs + full), acc0);
    }
    y[n] = from_float<T>(hsum_ps(_mm256_add_ps(acc0, acc1)) * scale_at(a, n));
  }
}

// Results of R features for rows m0..m1 (at most kPassRows, [rows][R] float32) stored into y.
template <typename T, int R>
void store_rows(const QuantLinearArgs& a, int64_t n0, int64_t m0, int64_t m1, const float* out) {
  for (int64_t m = m0; m < m1; ++m) {
    T* y = static_cast<T*>(a.y) + m * a.y_stride + n0;
    for (int r = 0; r < R; ++r) y[r] = from_float<T>(out[(m - m0) * R + r]);
  }
}

// As block() for int8 with the x of prepare_x8: per block of kX8Block inputs and feature, the
// weights are sign-extended to 16 bits once for all MT rows and meet each row's integers in
// multiply-adds (pairs summed into 32 bits: |.| <= 2 * 127 * 16383 a pair, 8 pairs a lane per block);
// the lane sums are converted and added into the (row, feature) float accumulator with the block's
// scale of x; the feature's scale applies once at the end.
template <int R>
void block8i_f32(const QuantLinearArgs& a, int64_t n0, int64_t m0, int64_t m1, float* out) {
  const int64_t blocks = (a.k + kX8Block - 1) / kX8Block, full = a.k / kX8Block;
  const int8_t* q0 = static_cast<const int8_t*>(a.q) + n0 * a.q_stride;
  const bool contiguous = a.q_stride == a.k;
  auto tile = [&]<int MT>(int64_t m) {
    __m256 acc[R][MT];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int j = 0; j < MT; ++j) acc[r][j] = _mm256_setzero_ps();
    auto block = [&]<int64_t kLen>(int64_t b, int64_t len) __attribute__((always_inline)) {
      const int64_t L = kLen ? kLen : len, k0 = b * kX8Block;
      const int16_t* xw[MT];
      __m256 sx[MT];
#pragma GCC unroll 16
      for (int j = 0; j < MT; ++j) {
        xw[j] = a.xw + (m + j) * a.k + k0;
        sx[j] = _mm256_set1_ps(a.xs[(m + j) * blocks + b]);
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const int8_t* q = q0 + r * a.q_stride + k0;
        if (contiguous) prefetch_span(q0 + R * a.q_stride, k0 * R + r * L, L);
        else prefetch_span(q + R * a.q_stride, 0, L);
        __m256i sum[MT];
        int64_t c = 0;
#if defined(__AVX512BW__)
        {  // 512-bit steps of 32 weights (as row8i_stream), the two halves of each sum added after
          __m512i wide[MT];
#pragma GCC unroll 16
          for (int j = 0; j < MT; ++j) wide[j] = _mm512_setzero_si512();
#pragma GCC unroll 4
          for (; c + 32 <= L; c += 32) {
            const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + c)));
#pragma GCC unroll 16
            for (int j = 0; j < MT; ++j)
#if defined(__AVX512VNNI__)
              wide[j] = _mm512_dpwssd_epi32(wide[j], w, _mm512_loadu_si512(xw[j] + c));
#else
              wide[j] = _mm512_add_epi32(wide[j], _mm512_madd_epi16(w, _mm512_loadu_si512(xw[j] + c)));
#endif
          }
#pragma GCC unroll 16
          for (int j = 0; j < MT; ++j)
            sum[j] = _mm256_add_epi32(_mm512_castsi512_si256(wide[j]), _mm512_extracti64x4_epi64(wide[j], 1));
        }
#else
#pragma GCC unroll 16
        for (int j = 0; j < MT; ++j) sum[j] = _mm256_setzero_si256();
#endif
#pragma GCC unroll 8
        for (; c < L; c += 16) {
          const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c)));
#pragma GCC unroll 16
          for (int j = 0; j < MT; ++j)
#if defined(__AVX512VNNI__)
            sum[j] = _mm256_dpwssd_epi32(sum[j], w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xw[j] + c)));
#else
            sum[j] = _mm256_add_epi32(sum[j], _mm256_madd_epi16(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xw[j] + c))));
#endif
        }
#pragma GCC unroll 16
        for (int j = 0; j < MT; ++j) acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[j]), sx[j], acc[r][j]);
      }
    };
    for (int64_t b = 0; b < full; ++b) block.template operator()<kX8Block>(b, kX8Block);
    if (blocks > full) block.template operator()<0>(full, a.k - full * kX8Block);
    for (int j = 0; j < MT; ++j)
      for (int r = 0; r < R; ++r) out[(m - m0 + j) * R + r] = hsum_ps(acc[r][j]) * scale_at(a, n0 + r);
  };
  over_row_tiles(m0, m1, tile);
}

// Whether x was prepared for an integer path (int4: prepare_x4, int8: prepare_x8).
inline bool int_path(const QuantLinearArgs& a) { return a.bits == 4 ? a.xq != nullptr : a.xw != nullptr; }

// Features n0..n0+R-1 for rows m0..m1 on the integer path of a's format.
template <typename T, int R>
void block_int(const QuantLinearArgs& a, int64_t n0, int64_t m0, int64_t m1) {
  float out[kPassRows * R];
  if (a.bits == 4) block4i_f32<R>(a, n0, m0, m1, out);
  else block8i_f32<R>(a, n0, m0, m1, out);
  store_rows<T, R>(a, n0, m0, m1, out);
}
#endif  // __AVX2__

// Rows m0..m1 of x in tiles of kTile (and one shorter tile), calling f.template operator()<MT>(m, acc).
template <int R, typename F>
void over_tiles(int64_t m0, int64_t m1, Vec* accbuf, F&& f) {
  int64_t m = m0;
  for (; m + kTile <= m1; m += kTile) f.template operator()<kTile>(m, accbuf + (m - m0) * R);
  Vec* rest = accbuf + (m - m0) * R;
  switch (m1 - m) {
    case 1: f.template operator()<1>(m, rest); break;
    case 2: if constexpr (kTile > 2) f.template operator()<2>(m, rest); break;
    case 3: if constexpr (kTile > 3) f.template operator()<3>(m, rest); break;
    default: break;
  }
}

// Output features n0..n0+R-1 for rows m0..m1 (m1 - m0 <= kPassRows), the weight rows read once.
template <typename T, int R>
void block(const QuantLinearArgs& a, int64_t n0, int64_t m0, int64_t m1) {
#if defined(__AVX2__)
  if (int_path(a)) return block_int<T, R>(a, n0, m0, m1);
#endif
  Vec accbuf[kPassRows * R];
  for (auto& v : accbuf) v = Vec::zero();
  if (a.bits == 4) {
    const int64_t groups = a.k / a.group;
    for (int64_t g = 0; g < groups; ++g) {
      float sc[R];
      int zp[R];
      for (int r = 0; r < R; ++r) {
        sc[r] = scale_at(a, (n0 + r) * groups + g);
        zp[r] = a.zeros[(n0 + r) * groups + g];
        // the same group of the next block's rows (a 64-byte line for groups of 128)
        for (int64_t b = 0; b < a.group / 2; b += 64)
          __builtin_prefetch(static_cast<const uint8_t*>(a.q) + (n0 + R + r) * a.q_stride + g * a.group / 2 + b, 0, 2);
      }
      over_tiles<R>(m0, m1, accbuf, [&]<int MT>(int64_t m, Vec* acc) { tile4<R, MT>(a, n0, m, g, sc, zp, acc); });
    }
    for (int64_t m = m0; m < m1; ++m) {
      T* y = static_cast<T*>(a.y) + m * a.y_stride + n0;
      for (int r = 0; r < R; ++r) y[r] = from_float<T>(reduce_add(accbuf[(m - m0) * R + r]));
    }
    return;
  }
  const int64_t kmain = a.k - a.k % kBlk;
  for (int64_t k0 = 0; k0 < kmain; k0 += kChunk8) {
    const int64_t k1 = std::min(kmain, k0 + kChunk8);
#if defined(EXAONE_VEC_AVX2)
    if (m1 - m0 >= 2) {
      int64_t m = m0;
      for (; m + kTile8s <= m1; m += kTile8s) tile8s<R, kTile8s>(a, n0, m, k0, k1, accbuf + (m - m0) * R);
      if (m1 - m == 2) tile8s<R, 2>(a, n0, m, k0, k1, accbuf + (m - m0) * R);
      if (m1 - m == 1) tile8s<R, 1>(a, n0, m, k0, k1, accbuf + (m - m0) * R);
      continue;
    }
#endif
    over_tiles<R>(m0, m1, accbuf, [&]<int MT>(int64_t m, Vec* acc) { tile8<R, MT>(a, n0, m, k0, k1, acc); });
  }
  for (int64_t m = m0; m < m1; ++m) {
    T* y = static_cast<T*>(a.y) + m * a.y_stride + n0;
    const float* x = a.x + m * a.x_stride;
    for (int r = 0; r < R; ++r) {
      const int8_t* q = static_cast<const int8_t*>(a.q) + (n0 + r) * a.q_stride;
      float tail = 0.f;  // the last k % 32 elements
      for (int64_t i = kmain; i < a.k; ++i) tail += x[i] * float(q[i]);
      y[r] = from_float<T>(scale_at(a, n0 + r) * (reduce_add(accbuf[(m - m0) * R + r]) + tail));
    }
  }
}

template <typename T>
void rows(const QuantLinearArgs& a, int64_t begin, int64_t end) {
  for (int64_t m0 = 0; m0 < a.m; m0 += kPassRows) {
    const int64_t m1 = std::min(a.m, m0 + kPassRows);
    int64_t n = begin;
#if defined(__AVX2__)
    if (a.m == 1 && a.row_stream && int_path(a)) {
      if (a.bits == 4) row4i_stream<T>(a, begin, end);
      else row8i_stream<T>(a, begin, end);
      return;
    }
    if (int_path(a))
      for (; n + 2 * kR <= end; n += 2 * kR) block_int<T, 2 * kR>(a, n, m0, m1);
#endif
    for (; n + kR <= end; n += kR) block<T, kR>(a, n, m0, m1);
    for (; n < end; ++n) block<T, 1>(a, n, m0, m1);
  }
}

template <typename T>
void dequant(const QuantLinearArgs& a, int64_t begin, int64_t end, T* out) {
  for (int64_t n = begin; n < end; ++n) {
    T* o = out + (n - begin) * a.k;
    Vec w[kNV];
    if (a.bits == 4) {
      const uint8_t* q = static_cast<const uint8_t*>(a.q) + n * a.q_stride;
      const int64_t groups = a.k / a.group;
      for (int64_t g = 0; g < groups; ++g) {
        const Vec s = Vec::set1(scale_at(a, n * groups + g));
        const int z = a.zeros[n * groups + g];
        for (int64_t i = g * a.group; i < (g + 1) * a.group; i += kBlk) {
          load_block4(q + i / 2, z, w);
          for (int v = 0; v < kNV; ++v) (w[v] * s).store(o + i + v * Vec::size);
        }
      }
    } else {
      const int8_t* q = static_cast<const int8_t*>(a.q) + n * a.q_stride;
      const float sf = scale_at(a, n);
      const Vec s = Vec::set1(sf);
      const int64_t kmain = a.k - a.k % kBlk;
      for (int64_t i = 0; i < kmain; i += kBlk) {
        load_block8(q + i, w);
        for (int v = 0; v < kNV; ++v) (w[v] * s).store(o + i + v * Vec::size);
      }
      for (int64_t i = kmain; i < a.k; ++i) o[i] = from_float<T>(float(q[i]) * sf);
    }
  }
}

}  // namespace

void quant_linear_rows(const QuantLinearArgs& a, int64_t begin, int64_t end) {
  switch (a.y_dtype) {
    case DType::kBFloat16: return rows<bf16>(a, begin, end);
    case DType::kFloat16: return rows<f16>(a, begin, end);
    default: return rows<float>(a, begin, end);
  }
}

bool quant_prepare_x4(const QuantLinearArgs& a, int8_t* xq, float* xs, int32_t* xsum) {
#if defined(__AVX2__)
  return a.bits == 4 && prepare_x4_impl(a, xq, xs, xsum);
#else
  (void)a, (void)xq, (void)xs, (void)xsum;
  return false;
#endif
}

bool quant_prepare_x8(const QuantLinearArgs& a, int16_t* xw, float* xs) {
#if defined(__AVX2__)
  return a.bits == 8 && prepare_x8_impl(a, xw, xs);
#else
  (void)a, (void)xw, (void)xs;
  return false;
#endif
}

void quant_dequant_rows(const QuantLinearArgs& a, int64_t begin, int64_t end, void* out, DType out_dtype) {
  switch (out_dtype) {
    case DType::kBFloat16: return dequant(a, begin, end, static_cast<bf16*>(out));
    case DType::kFloat16: return dequant(a, begin, end, static_cast<f16*>(out));
    default: return dequant(a, begin, end, static_cast<float*>(out));
  }
}

}  // namespace exaone_ext::cpu::EXAONE_ISA
