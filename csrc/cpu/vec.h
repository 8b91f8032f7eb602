// A small float-vector type for the CPU kernels, one definition per instruction set.
//
// Include this only from csrc/cpu/*_avx512.cpp, *_avx2.cpp (compiled with those flags) or from
// portable files; the type lives in namespace exaone_ext::cpu::EXAONE_ISA so that code compiled
// with wide instructions can never be linked in place of portable code. Kernels are written once
// against this interface (cpu/*_impl.h) and instantiated in each ISA file.
//
// The AVX-512 code is also compiled with AVX512-BF16 (namespace avx512bf16, see isa.h), where
// stores to bf16 convert with vcvtneps2bf16.
//
//   Vec::size                   lanes (16 for AVX-512, 8 for AVX2, 1 for the portable fallback)
//   Vec::load(p) / store(p)     float, bf16 or f16 memory; 16-bit types converted in registers
//   Vec::load(p, n) / store(p, n)  the first n < size lanes (tails)
//   + - * /, fmadd, max, min, vexp, reduce_add, reduce_max; exp2_f32 (AVX-512: vscalefps)
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include "common/dtypes.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#if defined(__AVX512BF16__)
// csrc/cpu/*_avx512bf16.cpp: the AVX-512 code with float -> bf16 conversion by vcvtneps2bf16
#define EXAONE_ISA avx512bf16
#elif defined(__AVX512VNNI__)
// csrc/cpu/*_avx512vnni.cpp: the AVX-512 code with integer dot products by vpdpbusd / vpdpwssd
#define EXAONE_ISA avx512vnni
#else
#define EXAONE_ISA avx512
#endif
#define EXAONE_VEC_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define EXAONE_ISA avx2
#define EXAONE_VEC_AVX2 1
#include <immintrin.h>
#else
#define EXAONE_ISA scalar
#define EXAONE_VEC_SCALAR 1
#endif

namespace exaone_ext::cpu::EXAONE_ISA {

#if defined(EXAONE_VEC_AVX512)

struct Vec {
  static constexpr int size = 16;
  __m512 v;
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load(const bf16* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  static Vec load(const f16* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  static Vec load(const float* p, int n) { return {_mm512_maskz_loadu_ps(mask(n), p)}; }
  static Vec load(const bf16* p, int n) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask(n), p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  static Vec load(const f16* p, int n) { return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p))}; }

  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(bf16* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits()); }
  void store(f16* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  void store(float* p, int n) const { _mm512_mask_storeu_ps(p, mask(n), v); }
  void store(bf16* p, int n) const { _mm256_mask_storeu_epi16(p, mask(n), to_bf16_bits()); }
  void store(f16* p, int n) const {
    _mm256_mask_storeu_epi16(p, mask(n), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }

  static __mmask16 mask(int n) { return __mmask16((1u << n) - 1u); }
  // round to nearest even; NaN -> quiet NaN
  __m256i to_bf16_bits() const {
#if defined(__AVX512BF16__)
    // vcvtneps2bf16 rounds the same way and quiets NaN the same way (high half | 0x40), but takes
    // float32 denormals (magnitude below 2^-126) as zero: those become signed zeros here instead
    // of bf16 denormals (an absolute difference below 1.2e-38).
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    r = _mm512_srli_epi32(r, 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
#endif
  }
};
inline Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
inline Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
// max/min return the second operand when either is NaN: keep the data operand second to propagate NaN.
inline Vec max(Vec bound, Vec x) { return {_mm512_max_ps(bound.v, x.v)}; }
inline Vec min(Vec bound, Vec x) { return {_mm512_min_ps(bound.v, x.v)}; }
inline float reduce_add(Vec a) { return _mm512_reduce_add_ps(a.v); }
inline float reduce_max(Vec a) { return _mm512_reduce_max_ps(a.v); }
inline Vec round_nearest(Vec a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline Vec pow2i(Vec n) {  // 2^n for integral n in [-126, 127]
  __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(e, 23))};
}
inline Vec zero_below(Vec x, float lo, Vec r) {  // r where x >= lo (or NaN), 0 where x < lo
  return {_mm512_maskz_mov_ps(~_mm512_cmp_ps_mask(x.v, _mm512_set1_ps(lo), _CMP_LT_OQ), r.v)};
}
inline Vec scale_pow2(Vec p, Vec n) { return {_mm512_scalef_ps(p.v, n.v)}; }  // p * 2^n, exact, saturating
// 1/d to ~2^-28 relative: the 14-bit estimate refined by one Newton step (d finite, nonzero)
inline Vec recip(Vec d) {
  __m512 y = _mm512_rcp14_ps(d.v);
  return {_mm512_mul_ps(y, _mm512_fnmadd_ps(d.v, y, _mm512_set1_ps(2.f)))};
}
// t = floor(t) + f with f in [0, 1): returns f (exact; vreduceps with round-down)
inline Vec frac_floor(Vec t) { return {_mm512_reduce_ps(t.v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)}; }
#define EXAONE_VEC_HAS_SCALEF 1

#elif defined(EXAONE_VEC_AVX2)

struct Vec {
  static constexpr int size = 8;
  __m256 v;
  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec set1(float x) { return {_mm256_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load(const bf16* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  }
  static Vec load(const f16* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
  // Of the 2 * size bf16 at p, as floats: the even elements p[0], p[2], ..., p[14] (one shift of the
  // 32-bit lanes) and the odd ones p[1], p[3], ... (one AND); the widening load above costs a
  // shuffle and a shift per 8.
  static Vec load_bf16_even(const bf16* p) {
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 16))};
  }
  static Vec load_bf16_odd(const bf16* p) {
    return {_mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                                                 _mm256_set1_epi32(int(0xFFFF0000u))))};
  }
  template <typename T> static Vec load(const T* p, int n) {
    T buf[size] = {};
    std::memcpy(buf, p, sizeof(T) * n);
    return load(buf);
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(bf16* p) const {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(qnan), nan));
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  void store(f16* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  template <typename T> void store(T* p, int n) const {
    T buf[size];
    store(buf);
    std::memcpy(p, buf, sizeof(T) * n);
  }
};
inline Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm256_div_ps(a.v, b.v)}; }
inline Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec max(Vec bound, Vec x) { return {_mm256_max_ps(bound.v, x.v)}; }
inline Vec min(Vec bound, Vec x) { return {_mm256_min_ps(bound.v, x.v)}; }
inline float reduce_add(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float reduce_max(Vec a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline Vec round_nearest(Vec a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline Vec round_down(Vec a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)}; }
inline Vec pow2i(Vec n) {
  __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(e, 23))};
}
inline Vec zero_below(Vec x, float lo, Vec r) {
  return {_mm256_andnot_ps(_mm256_cmp_ps(x.v, _mm256_set1_ps(lo), _CMP_LT_OQ), r.v)};
}
// 1/d to ~2^-23 relative: the 12-bit estimate refined by one Newton step (d finite, normal)
inline Vec recip(Vec d) {
  __m256 y = _mm256_rcp_ps(d.v);
  return {_mm256_mul_ps(y, _mm256_fnmadd_ps(d.v, y, _mm256_set1_ps(2.f)))};
}

#else  // portable: one lane, plain C++

struct Vec {
  static constexpr int size = 1;
  float v;
  static Vec zero() { return {0.f}; }
  static Vec set1(float x) { return {x}; }
  template <typename T> static Vec load(const T* p) { return {to_float(*p)}; }
  template <typename T> static Vec load(const T* p, int n) { return {n > 0 ? to_float(*p) : 0.f}; }
  template <typename T> void store(T* p) const { *p = from_float<T>(v); }
  template <typename T> void store(T* p, int n) const { if (n > 0) *p = from_float<T>(v); }
};
inline Vec operator+(Vec a, Vec b) { return {a.v + b.v}; }
inline Vec operator-(Vec a, Vec b) { return {a.v - b.v}; }
inline Vec operator*(Vec a, Vec b) { return {a.v * b.v}; }
inline Vec operator/(Vec a, Vec b) { return {a.v / b.v}; }
inline Vec fmadd(Vec a, Vec b, Vec c) { return {std::fma(a.v, b.v, c.v)}; }
inline Vec max(Vec bound, Vec x) { return {std::isnan(x.v) ? x.v : (x.v > bound.v ? x.v : bound.v)}; }
inline Vec min(Vec bound, Vec x) { return {std::isnan(x.v) ? x.v : (x.v < bound.v ? x.v : bound.v)}; }
inline float reduce_add(Vec a) { return a.v; }
inline float reduce_max(Vec a) { return a.v; }
inline Vec round_nearest(Vec a) { return {std::nearbyint(a.v)}; }
inline Vec pow2i(Vec n) { return {std::ldexp(1.0f, int(n.v))}; }
inline Vec zero_below(Vec x, float lo, Vec r) { return {x.v < lo ? 0.f : r.v}; }
inline Vec recip(Vec d) { return {1.f / d.v}; }

#endif

// exp(x) in float to ~1 ulp: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, then a
// degree-7 polynomial in r (the classic Cephes expf coefficients) scaled by 2^n.
// exp(-inf) and anything below the float range is exactly 0; NaN propagates.
inline Vec exp_reduced(Vec xc, Vec& n) {
  n = round_nearest(xc * Vec::set1(1.44269504088896341f));
  Vec r = fmadd(n, Vec::set1(-0.693359375f), xc);
  r = fmadd(n, Vec::set1(2.12194440e-4f), r);
  Vec p = Vec::set1(1.9875691500e-4f);
  p = fmadd(p, r, Vec::set1(1.3981999507e-3f));
  p = fmadd(p, r, Vec::set1(8.3334519073e-3f));
  p = fmadd(p, r, Vec::set1(4.1665795894e-2f));
  p = fmadd(p, r, Vec::set1(1.6666665459e-1f));
  p = fmadd(p, r, Vec::set1(5.0000001201e-1f));
  return fmadd(p, r * r, r + Vec::set1(1.0f));
}

inline Vec vexp(Vec x) {
#if defined(EXAONE_VEC_SCALAR)
  return {std::exp(x.v)};  // one lane: libm is exact and faster than the emulated reduction
#elif defined(EXAONE_VEC_HAS_SCALEF)
  // scalef saturates to 0 / inf by itself; the clamp only keeps the reduction exact.
  Vec n;
  Vec p = exp_reduced(min(Vec::set1(89.f), max(Vec::set1(-104.f), x)), n);
  return scale_pow2(p, n);
#else
  Vec n;
  Vec p = exp_reduced(min(Vec::set1(88.3762626647949f), max(Vec::set1(-87.3365478515625f), x)), n);
  return zero_below(x, -87.3365478515625f, p * pow2i(n));
#endif
}

// 1 / (1 + exp(-x)); x is clamped to +-88 first so that exp stays finite (sigmoid is 0 / 1 to
// float precision there), letting the reciprocal be a refined estimate instead of a division.
inline Vec vsigmoid(Vec x) {
  Vec xc = min(Vec::set1(88.f), max(Vec::set1(-88.f), x));
  return recip(Vec::set1(1.0f) + vexp(Vec::zero() - xc));
}

// 2^t to float precision (8.7e-8 relative on [0, 1) in float arithmetic, as vexp): t = n + f with
// n = floor(t), f in [0, 1) (vreduceps), 2^f by a degree-6 polynomial fitted for relative error,
// times 2^n by vscalefps (AVX-512 only). Below -160 the result is 0; NaN propagates.
#if defined(EXAONE_VEC_HAS_SCALEF)
inline Vec exp2_f32(Vec t) {
  t = max(Vec::set1(-160.f), t);
  const Vec f = frac_floor(t);
  Vec p = Vec::set1(2.120031713275239e-4f);
  p = fmadd(p, f, Vec::set1(1.2580584734678268e-3f));
  p = fmadd(p, f, Vec::set1(9.664114564657211e-3f));
  p = fmadd(p, f, Vec::set1(5.549038201570511e-2f));
  p = fmadd(p, f, Vec::set1(2.402283251285553e-1f));
  p = fmadd(p, f, Vec::set1(6.931471228599548e-1f));
  p = fmadd(p, f, Vec::set1(1.0f));
  return scale_pow2(p, t);
}
#endif

// 2^t for results that end up rounded to a 16-bit float (bf16 / f16), for t in [-126, 120]
// (callers clamp): t = n + f with n = floor(t), f in [0, 1), 2^f by a degree-4 polynomial fitted
// for relative error (2.7e-6 in float arithmetic). With the rounding of t itself (|t| 2^-24) the
// result is within 1e-5 relative: under 1% of half a bf16 ulp (2^-9) and 2% of half an f16 ulp.
inline Vec exp2_lowp(Vec t) {
#if defined(EXAONE_VEC_SCALAR)
  return {std::exp2(t.v)};
#else
#if defined(EXAONE_VEC_HAS_SCALEF)
  const Vec f = frac_floor(t);
#else
  const Vec n = round_down(t);
  const Vec f = t - n;
#endif
  Vec p = Vec::set1(1.3533973135054111e-2f);
  p = fmadd(p, f, Vec::set1(5.201134458184242e-2f));
  p = fmadd(p, f, Vec::set1(2.414432317018509e-1f));
  p = fmadd(p, f, Vec::set1(6.930036544799805e-1f));
  p = fmadd(p, f, Vec::set1(1.0000026226043701f));
#if defined(EXAONE_VEC_HAS_SCALEF)
  return scale_pow2(p, t);  // p * 2^floor(t)
#else
  return p * pow2i(n);
#endif
#endif
}

// sigmoid(x) = 1 / (1 + e) with e = exp(-x) returned too (1 - sigmoid(x) = e * sigmoid(x) without
// cancellation), for results rounded to bf16 / f16 (see exp2_lowp). -x log2(e) is clamped to
// [-126, 120]: sigmoid is 1 to float precision below and under 2^-120 above, and 1 + e stays a
// normal float so that the refined reciprocal estimate replaces a division. NaN propagates.
inline Vec vsigmoid_lowp(Vec x, Vec& e) {
  const Vec t = min(Vec::set1(120.f), max(Vec::set1(-126.f), x * Vec::set1(-1.44269504088896341f)));
  e = exp2_lowp(t);
  return recip(Vec::set1(1.0f) + e);
}

// The float32-accurate sigmoid with e = exp(-x) returned too (as vsigmoid_lowp).
inline Vec vsigmoid(Vec x, Vec& e) {
  const Vec xc = min(Vec::set1(88.f), max(Vec::set1(-88.f), x));
  e = vexp(Vec::zero() - xc);
  return recip(Vec::set1(1.0f) + e);
}

// Calls F<T>::run(args...) with T the storage type of `t`. float64 exists only in the portable
// variant (gradcheck); the torch layer routes float64 there.
template <template <typename> class F, typename... Args>
void by_dtype(DType t, Args&&... args) {
  switch (t) {
    case DType::kFloat32: return F<float>::run(args...);
    case DType::kBFloat16: return F<bf16>::run(args...);
    case DType::kFloat16: return F<f16>::run(args...);
    case DType::kFloat64:
#if defined(EXAONE_VEC_SCALAR)
      return F<double>::run(args...);
#else
      break;
#endif
  }
}

}  // namespace exaone_ext::cpu::EXAONE_ISA
