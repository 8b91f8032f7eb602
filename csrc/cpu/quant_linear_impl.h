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
#pragma once
#include <algorithm>
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

// 32 int8 weights from p as kNV float vectors, in order.
inline void load_block8(const int8_t* p, Vec* w) {
#if defined(EXAONE_VEC_AVX512)
  for (int v = 0; v < 2; ++v)
    w[v] = {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * v))))};
#elif defined(EXAONE_VEC_AVX2)
  for (int v = 0; v < 4; ++v)
    w[v] = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * v))))};
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

void quant_dequant_rows(const QuantLinearArgs& a, int64_t begin, int64_t end, void* out, DType out_dtype) {
  switch (out_dtype) {
    case DType::kBFloat16: return dequant(a, begin, end, static_cast<bf16*>(out));
    case DType::kFloat16: return dequant(a, begin, end, static_cast<f16*>(out));
    default: return dequant(a, begin, end, static_cast<float*>(out));
  }
}

}  // namespace exaone_ext::cpu::EXAONE_ISA
