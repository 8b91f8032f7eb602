// RoPE kernel bodies, written once against cpu/vec.h and compiled per instruction set by
// rope_avx512.cpp, rope_avx2.cpp and rope_scalar.cpp.
//
// Per token: the table row of its position is loaded once per chunk of columns, then every q head
// and every k head of the token is rotated with it, so q and k go through in one pass. The
// products and the sum are rounded exactly as the float32 reference rounds them (no fused
// multiply-add), and the result is rounded once to the storage type.
#pragma once
#include <algorithm>
#include <type_traits>
#include "common/rope.h"
#include "cpu/rope.h"
#include "cpu/vec.h"

namespace exaone_ext::cpu::EXAONE_ISA {
namespace {

struct Token {
  const float* cos;
  const float* sin;
  const void* q; const void* k;  // first head of the token
  void* q_out; void* k_out;
};

// Resolves token t; false when its position is outside the table.
inline bool locate(const RopeArgs& a, int64_t t, size_t elem, Token& tok) {
  const int64_t b = t / a.seq, s = t - b * a.seq;
  const int64_t p = a.pos[b * a.pos_sb + s * a.pos_ss];
  if (p < 0 || p >= a.table_rows) return false;
  tok.cos = a.cos + p * a.cos_stride;
  tok.sin = a.sin + p * a.sin_stride;
  tok.q = static_cast<const char*>(a.q) + (b * a.q_sb + s * a.q_ss) * int64_t(elem);
  tok.k = static_cast<const char*>(a.k) + (b * a.k_sb + s * a.k_ss) * int64_t(elem);
  tok.q_out = static_cast<char*>(a.q_out) + t * a.q_heads * a.head_dim * int64_t(elem);
  tok.k_out = static_cast<char*>(a.k_out) + t * a.k_heads * a.head_dim * int64_t(elem);
  return true;
}

// Plain loop, one pair at a time: float64 (gradcheck) and the portable variant.
template <typename T>
void rotate_token_scalar(const RopeArgs& a, const Token& tok) {
  using A = acc_t<T>;
  const int64_t half = a.head_dim / 2;
  // rotate-half pairs (i, i + half); interleaved pairs (2i, 2i + 1)
  const int64_t lo_step = a.interleaved ? 2 : 1, partner = a.interleaved ? 1 : half;
  auto heads = [&](const T* in, int64_t head_stride, int64_t n_heads, T* out) {
    for (int64_t h = 0; h < n_heads; ++h) {
      const T* x = in + h * head_stride;
      T* y = out + h * a.head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const A c = A(tok.cos[i]), s = a.inverse ? -A(tok.sin[i]) : A(tok.sin[i]);
        const int64_t j = i * lo_step;
        A ya, yb;
        rope_rotate_pair<A>(load_acc(x + j), load_acc(x + j + partner), c, s, ya, yb);
        store_acc(y + j, ya);
        store_acc(y + j + partner, yb);
      }
    }
  };
  heads(static_cast<const T*>(tok.q), a.q_sh, a.q_heads, static_cast<T*>(tok.q_out));
  heads(static_cast<const T*>(tok.k), a.k_sh, a.k_heads, static_cast<T*>(tok.k_out));
}

#if !defined(EXAONE_VEC_SCALAR)

// Loads `n` (<= Vec::size / 2) table entries and repeats each twice: [c0 c0 c1 c1 ...].
inline Vec load_pairs(const float* p, int n) {
#if defined(EXAONE_VEC_AVX512)
  const __m512 v = _mm512_castps256_ps512(_mm256_maskz_loadu_ps(__mmask8((1u << n) - 1u), p));
  return {_mm512_permutexvar_ps(_mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0), v)};
#else
  float buf[4] = {};
  std::memcpy(buf, p, sizeof(float) * n);
  const __m256 v = _mm256_castps128_ps256(_mm_loadu_ps(buf));
  return {_mm256_permutevar8x32_ps(v, _mm256_set_epi32(3, 3, 2, 2, 1, 1, 0, 0))};
#endif
}

// [x1 x0 x3 x2 ...]: each element's partner in the interleaved layout.
inline Vec swap_pairs(Vec x) {
#if defined(EXAONE_VEC_AVX512)
  return {_mm512_permute_ps(x.v, 0xB1)};
#else
  return {_mm256_permute_ps(x.v, 0xB1)};
#endif
}

// Flips the sign of the even lanes (sign_even) or of the odd lanes.
inline Vec negate_lanes(Vec x, bool even) {
#if defined(EXAONE_VEC_AVX512)
  const __m512i m = even ? _mm512_set1_epi64(0x80000000LL) : _mm512_set1_epi64(int64_t(0x8000000000000000ULL));
  return {_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x.v), m))};
#else
  const __m256i m = even ? _mm256_set1_epi64x(0x80000000LL) : _mm256_set1_epi64x(int64_t(0x8000000000000000ULL));
  return {_mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(x.v), m))};
#endif
}

template <typename T>
inline Vec load_n(const T* p, int n) { return n == Vec::size ? Vec::load(p) : Vec::load(p, n); }
template <typename T>
inline void store_n(Vec v, T* p, int n) { n == Vec::size ? v.store(p) : v.store(p, n); }

// Rotate-half layout: columns [i, i + n) pair with [half + i, half + i + n).
template <typename T>
void rotate_token_half(const RopeArgs& a, const Token& tok) {
  const int64_t half = a.head_dim / 2;
  const T* q = static_cast<const T*>(tok.q);
  const T* k = static_cast<const T*>(tok.k);
  T* qo = static_cast<T*>(tok.q_out);
  T* ko = static_cast<T*>(tok.k_out);
  // the token's angles once (head_dim <= 256: at most 128 / Vec::size chunks), then head by head so
  // that each head's input and output are read and written front to back
  constexpr int kMaxChunks = 128 / Vec::size;
  Vec cv[kMaxChunks], sv[kMaxChunks];
  const int nch = int((half + Vec::size - 1) / Vec::size);
  for (int j = 0; j < nch; ++j) {
    const int n = int(std::min<int64_t>(Vec::size, half - j * Vec::size));
    cv[j] = load_n(tok.cos + j * Vec::size, n);
    sv[j] = load_n(tok.sin + j * Vec::size, n);
    if (a.inverse) sv[j] = Vec::zero() - sv[j];
  }
  auto rotate = [&](const T* x, T* y) {
    for (int j = 0; j < nch; ++j) {
      const int64_t i = int64_t(j) * Vec::size;
      const int n = int(std::min<int64_t>(Vec::size, half - i));
      const Vec x1 = load_n(x + i, n), x2 = load_n(x + half + i, n);
      store_n(x1 * cv[j] - x2 * sv[j], y + i, n);
      store_n(x2 * cv[j] + x1 * sv[j], y + half + i, n);
    }
  };
  for (int64_t h = 0; h < a.q_heads; ++h) rotate(q + h * a.q_sh, qo + h * a.head_dim);
  for (int64_t h = 0; h < a.k_heads; ++h) rotate(k + h * a.k_sh, ko + h * a.head_dim);
}

// Interleaved layout: y = x * [c0 c0 c1 c1 ..] + swap_pairs(x) * [-s0 s0 -s1 s1 ..].
template <typename T>
void rotate_token_interleaved(const RopeArgs& a, const Token& tok) {
  const T* q = static_cast<const T*>(tok.q);
  const T* k = static_cast<const T*>(tok.k);
  T* qo = static_cast<T*>(tok.q_out);
  T* ko = static_cast<T*>(tok.k_out);
  for (int64_t j = 0; j < a.head_dim; j += Vec::size) {
    const int n = int(std::min<int64_t>(Vec::size, a.head_dim - j));  // even: head_dim is even
    const Vec c = load_pairs(tok.cos + j / 2, n / 2);
    const Vec s = negate_lanes(load_pairs(tok.sin + j / 2, n / 2), !a.inverse);
    auto rotate = [&](const T* x, T* y) {
      const Vec xv = load_n(x + j, n);
      store_n(xv * c + swap_pairs(xv) * s, y + j, n);
    };
    for (int64_t h = 0; h < a.q_heads; ++h) rotate(q + h * a.q_sh, qo + h * a.head_dim);
    for (int64_t h = 0; h < a.k_heads; ++h) rotate(k + h * a.k_sh, ko + h * a.head_dim);
  }
}

#endif  // !EXAONE_VEC_SCALAR

template <typename T>
int64_t apply_tokens(const RopeArgs& a, int64_t begin, int64_t end) {
  int64_t first_bad = -1;
  for (int64_t t = begin; t < end; ++t) {
    Token tok;
    if (!locate(a, t, sizeof(T), tok)) {
      if (first_bad < 0) first_bad = t;
      continue;
    }
#if defined(EXAONE_VEC_SCALAR)
    rotate_token_scalar<T>(a, tok);
#else
    if constexpr (std::is_same_v<T, double>) {
      rotate_token_scalar<T>(a, tok);
    } else if (a.interleaved) {
      rotate_token_interleaved<T>(a, tok);
    } else {
      rotate_token_half<T>(a, tok);
    }
#endif
  }
  return first_bad;
}

}  // namespace

int64_t rope_apply_tokens(const RopeArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case DType::kFloat32: return apply_tokens<float>(a, begin, end);
    case DType::kBFloat16: return apply_tokens<bf16>(a, begin, end);
    case DType::kFloat16: return apply_tokens<f16>(a, begin, end);
    case DType::kFloat64: return apply_tokens<double>(a, begin, end);
  }
  return -1;
}

}  // namespace exaone_ext::cpu::EXAONE_ISA
