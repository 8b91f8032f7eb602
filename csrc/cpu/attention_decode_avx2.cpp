// Decode attention on AVX2 + FMA for float32, bfloat16 and float16 caches (see cpu/attention.h,
// attn_decode_*): the CPUs without AVX512-BF16, and the caches that kernel does not take.
//
// Same plan as the AVX512-BF16 kernel (cpu/attention_decode_avx512bf16.cpp): one work item is
// (sequence b, keys [k_begin, k_end)) over all kv heads, walked block by block of
// kAttnDecodeAvx2BlockKeys keys, every kv head within each block, so that the item reads one
// contiguous stretch of the cache (the next block's stretch prefetched into L2 a few lines at a time,
// in memory order) and keeps each head's softmax state and float output in its scratch. The arithmetic is float32 throughout (q, the scores, the
// probabilities and the output); nothing is rounded to 16 bits before the output is written.
//
// Per (block, kv head), the R = seq_q * group <= 8 rows of the group (padded to RP in {1, 2, 4, 8}):
//   - scores, KJ = 8 / RP keys at a time: 8 accumulators acc[j * RP + r] along head_dim, reduced
//     together by one horizontal-add tree into a vector whose lane j * RP + r is dot(q_r, k_j);
//   - the softmax runs on those vectors; the running max and sum are kept lane-replicated (lane L
//     holds row L % RP's value), and the probabilities are stored in the same order, which is
//     P[key][row];
//   - O_r = alpha_r O_r + sum_j P[j][r] V_j, a few vectors of head_dim per pass, V widened once per
//     vector and used for every row.
// bfloat16 rows are widened 16 at a time by one 32-byte load: a shift gives the even elements and an
// AND the odd ones. q, O and the dot products use that order inside each group of 16 positions
// (pos() below); the output rows are put back in order when written.
#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/attention.h"
#include "cpu/attention.h"
#include "cpu/vec.h"

namespace exaone_ext::cpu::avx2 {
namespace {

constexpr int64_t BK = kAttnDecodeAvx2BlockKeys;

inline char* align64(char* p) { return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63)); }

// Vector u (8 floats) of a row of T, and the pair of vectors 2 ch, 2 ch + 1 (16 positions).
template <typename T> struct Row;
template <> struct Row<float> {
  static __m256 load(const float* row, int64_t u) { return _mm256_loadu_ps(row + 8 * u); }
  static void load2(const float* row, int64_t ch, __m256& a, __m256& b) {
    a = _mm256_loadu_ps(row + 16 * ch);
    b = _mm256_loadu_ps(row + 16 * ch + 8);
  }
  static int64_t pos(int64_t x) { return x; }
};
template <> struct Row<f16> {
  static __m256 load(const f16* row, int64_t u) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 8 * u)));
  }
  static void load2(const f16* row, int64_t ch, __m256& a, __m256& b) {
    a = load(row, 2 * ch);
    b = load(row, 2 * ch + 1);
  }
  static int64_t pos(int64_t x) { return x; }
};
template <> struct Row<bf16> {
  static __m256 even(__m256i w) { return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)); }
  static __m256 odd(__m256i w) { return _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(int(0xFFFF0000u)))); }
  static __m256i raw(const bf16* row, int64_t ch) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * ch)); }
  static __m256 load(const bf16* row, int64_t u) { return u % 2 ? odd(raw(row, u / 2)) : even(raw(row, u / 2)); }
  static void load2(const bf16* row, int64_t ch, __m256& a, __m256& b) {
    const __m256i w = raw(row, ch);
    a = even(w);
    b = odd(w);
  }
  // element x of a row sits at this position of the vectors: even ones first in each group of 16
  static int64_t pos(int64_t x) { return (x & ~int64_t(15)) + ((x & 1) << 3) + ((x & 15) >> 1); }
};

// NU vectors of a row starting at vector u0 (u0 and NU even when NU > 1).
template <typename T, int NU>
inline void load_vecs(const T* row, int64_t u0, __m256* out) {
  if constexpr (NU == 1) {
    out[0] = Row<T>::load(row, u0);
  } else {
#pragma GCC unroll 8
    for (int n = 0; n < NU; n += 2) Row<T>::load2(row, (u0 + n) / 2, out[n], out[n + 1]);
  }
}

// Lane i of the result: the sum of the lanes of v[i].
inline __m256 reduce8(const __m256* v) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Combines the lanes of one row (L % RP equal) by max or sum, leaving the result in each of them.
template <int RP, bool Max>
inline __m256 across_keys(__m256 v) {
#pragma GCC unroll 4
  for (int step = RP; step < 8; step *= 2) {
    const __m256i idx = _mm256_xor_si256(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(step));
    const __m256 o = _mm256_permutevar8x32_ps(v, idx);
    v = Max ? _mm256_max_ps(v, o) : _mm256_add_ps(v, o);
  }
  return v;
}

inline __m256 vexp8(__m256 x) { return vexp(Vec{x}).v; }

struct Layout {
  float* Q;  // [hk][RP][d] q rows in float, in pos() order, zero padded
  float* O;  // [hk][R][d] unnormalised outputs, in pos() order
  float* m;  // [hk][8] lane-replicated running max
  float* l;  // [hk][8] per-lane running sums
  float* S;  // [BK * RP] scores of one block, then their probabilities: S[key * RP + row]
};

Layout carve(const AttnParams& p, int64_t RP, void* scratch) {
  const int64_t R = p.seq_q * p.group(), d = p.head_dim, hk = p.kv_heads;
  Layout L;
  char* c = align64(static_cast<char*>(scratch));
  auto take = [&](int64_t floats) { float* r = reinterpret_cast<float*>(c); c = align64(c + floats * 4); return r; };
  L.Q = take(hk * RP * d);
  L.O = take(hk * R * d);
  L.m = take(hk * 8);
  L.l = take(hk * 8);
  L.S = take(BK * RP);
  return L;
}

// Fetches a stretch of memory into L2 a few lines per step(), spread over the work of one
// (block, kv head) so that the misses never come in one burst.
struct Stream {
  const char* next = nullptr;
  const char* end = nullptr;
  int64_t per_step = 0;
  void start(const void* b, const void* e, int64_t steps) {
    next = static_cast<const char*>(b);
    end = static_cast<const char*>(e);
    per_step = end > next ? ((end - next) / 64 + steps) / steps : 0;
  }
  void step() {
    for (int64_t i = 0; i < per_step && next < end; ++i, next += 64) _mm_prefetch(next, _MM_HINT_T1);
  }
};

// O_r[u0 .. u0 + NU) = alpha_r O_r + sum_j P[j][r] V_j over the nk keys of the block, rows r < R
// (all RP rows when Full). With vs set, its stretch is fetched meanwhile.
template <typename T, int RP, bool Full, int NU>
inline void pv_pass(const T* V, int64_t ldv, int64_t nk, const float* P, const float* al, float* Oh, int64_t d,
                    int64_t R, int64_t u0, Stream* vs) {
  __m256 acc[RP][NU];
#pragma GCC unroll 8
  for (int r = 0; r < RP; ++r)
    if (Full || r < R) {
      const __m256 a = _mm256_set1_ps(al[r]);
#pragma GCC unroll 8
      for (int n = 0; n < NU; ++n) acc[r][n] = _mm256_mul_ps(_mm256_loadu_ps(Oh + r * d + (u0 + n) * 8), a);
    }
  for (int64_t j = 0; j < nk; ++j) {
    if (vs) vs->step();
    __m256 vv[NU];
    load_vecs<T, NU>(V + j * ldv, u0, vv);
#pragma GCC unroll 8
    for (int r = 0; r < RP; ++r)
      if (Full || r < R) {
        const __m256 pj = _mm256_broadcast_ss(P + j * RP + r);
#pragma GCC unroll 8
        for (int n = 0; n < NU; ++n) acc[r][n] = _mm256_fmadd_ps(pj, vv[n], acc[r][n]);
      }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RP; ++r)
    if (Full || r < R) {
#pragma GCC unroll 8
      for (int n = 0; n < NU; ++n) _mm256_storeu_ps(Oh + r * d + (u0 + n) * 8, acc[r][n]);
    }
}

template <typename T, int RP, bool Full>
__attribute__((noinline)) void item(const AttnParams& p, int64_t b, int64_t k_begin, int64_t k_end, float* part_out,
                                    float* part_lse, void* scratch) {
  constexpr int KJ = 8 / RP;
  // vectors of head_dim per P . V pass: RP * NU accumulators, NU widened V vectors and a broadcast
  constexpr int NU = RP >= 8 ? 1 : RP == 4 ? 2 : 4;
  const Layout L = carve(p, RP, scratch);
  const SeqRange sr = seq_range(p, b);
  const int64_t g = p.group(), d = p.head_dim, hk = p.kv_heads, R = p.seq_q * g;
  const int64_t nch = d / 16, nv = d / 8;
  const T* Kc = static_cast<const T*>(p.k) + b * p.k_batch_stride + sr.k_start * p.k_row_stride;
  const T* Vc = static_cast<const T*>(p.v) + b * p.v_batch_stride + sr.k_start * p.v_row_stride;
  const int64_t ldk = p.k_row_stride, ldv = p.v_row_stride;
  int32_t cend[8];
  const int64_t kmax = attn_decode_key_ends(p, sr, k_begin, k_end, cend);
  alignas(32) int32_t lims[8];
  attn_decode_lane_limits(cend, R, RP, 8, lims);
  const __m256i lim = _mm256_load_si256(reinterpret_cast<const __m256i*>(lims));

  for (int64_t h = 0; h < hk; ++h) {
    float* qh = L.Q + h * RP * d;
    std::fill(qh, qh + RP * d, 0.f);
    for (int64_t c = 0; c < R; ++c) {
      const T* qr = static_cast<const T*>(p.q) + b * p.q_batch_stride + (sr.q_start + c / g) * p.q_row_stride +
                    (h * g + c % g) * p.q_head_stride;
      for (int64_t x = 0; x < d; ++x) qh[c * d + Row<T>::pos(x)] = to_float(qr[x]);
    }
    std::fill(L.O + h * R * d, L.O + (h + 1) * R * d, 0.f);
    _mm256_storeu_ps(L.m + h * 8, _mm256_set1_ps(-INFINITY));
    _mm256_storeu_ps(L.l + h * 8, _mm256_setzero_ps());
  }
  const __m256 scale = _mm256_set1_ps(p.scale);
  // the rows of a block and all their heads make one stretch of memory (the usual [.., seq, heads, d]
  // cache): prefetched as such; other layouts are left to the hardware
  const bool contiguous = p.k_head_stride == d && ldk == hk * d && p.v_head_stride == d && ldv == hk * d;

  for (int64_t kb = k_begin; kb < kmax; kb += BK) {
    const int64_t nk = std::min(BK, kmax - kb);
    const int64_t nk_next = std::min(BK, kmax - kb - nk);
    for (int64_t h = 0; h < hk; ++h) {
      const T* K = Kc + kb * ldk + h * p.k_head_stride;
      const T* V = Vc + kb * ldv + h * p.v_head_stride;
      const float* qh = L.Q + h * RP * d;
      // this head's share (1 / hk) of the stretch of the cache the next block covers, K during the
      // scores and V during the first pass of P . V
      Stream ks, vs;
      if (nk_next > 0 && contiguous) {
        const char* k0 = reinterpret_cast<const char*>(Kc + (kb + BK) * ldk);
        const char* v0 = reinterpret_cast<const char*>(Vc + (kb + BK) * ldv);
        const int64_t kbytes = nk_next * ldk * int64_t(sizeof(T)), vbytes = nk_next * ldv * int64_t(sizeof(T));
        ks.start(k0 + kbytes * h / hk, k0 + kbytes * (h + 1) / hk, (nk + KJ - 1) / KJ);
        vs.start(v0 + vbytes * h / hk, v0 + vbytes * (h + 1) / hk, nk);
      }
      // ---- scores, KJ keys per vector; keys past nk reuse the last row (masked below)
      __m256 bmax = _mm256_set1_ps(-INFINITY);
      for (int64_t kk = 0; kk < nk; kk += KJ) {
        ks.step();
        const T* kr[KJ];
#pragma GCC unroll 8
        for (int j = 0; j < KJ; ++j) kr[j] = K + std::min<int64_t>(kk + j, nk - 1) * ldk;
        __m256 acc[8];
#pragma GCC unroll 8
        for (int a = 0; a < 8; ++a) acc[a] = _mm256_setzero_ps();
        for (int64_t ch = 0; ch < nch; ++ch) {
#pragma GCC unroll 8
          for (int j = 0; j < KJ; ++j) {
            __m256 ke, ko;
            Row<T>::load2(kr[j], ch, ke, ko);
#pragma GCC unroll 8
            for (int r = 0; r < RP; ++r)
              if (Full || r < R) {
                const float* q = qh + r * d + ch * 16;
                acc[j * RP + r] = _mm256_fmadd_ps(_mm256_loadu_ps(q), ke, acc[j * RP + r]);
                acc[j * RP + r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8), ko, acc[j * RP + r]);
              }
          }
        }
        __m256 s = _mm256_mul_ps(reduce8(acc), scale);
        const __m256 ok = _mm256_castsi256_ps(_mm256_cmpgt_epi32(lim, _mm256_set1_epi32(int32_t(kb + kk))));
        s = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), s, ok);
        _mm256_storeu_ps(L.S + kk * RP, s);
        bmax = _mm256_max_ps(bmax, s);
      }
      // ---- online softmax on the lane-replicated statistics
      const __m256 m_old = _mm256_loadu_ps(L.m + h * 8);
      const __m256 m_new = _mm256_max_ps(m_old, across_keys<RP, true>(bmax));
      // a row that has seen no visible key yet keeps m = -inf and subtracts 0
      const __m256 mu = _mm256_blendv_ps(m_new, _mm256_setzero_ps(),
                                         _mm256_cmp_ps(m_new, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ));
      const __m256 alpha = vexp8(_mm256_sub_ps(m_old, mu));
      _mm256_storeu_ps(L.m + h * 8, m_new);
      __m256 lsum = _mm256_mul_ps(_mm256_loadu_ps(L.l + h * 8), alpha);
      for (int64_t kk = 0; kk < nk; kk += KJ) {
        // masked keys: exp(-inf - mu) = 0 exactly
        const __m256 pr = vexp8(_mm256_sub_ps(_mm256_loadu_ps(L.S + kk * RP), mu));
        lsum = _mm256_add_ps(lsum, pr);
        _mm256_storeu_ps(L.S + kk * RP, pr);
      }
      _mm256_storeu_ps(L.l + h * 8, lsum);
      // ---- O = alpha * O + P . V
      alignas(32) float al[8];
      _mm256_store_ps(al, alpha);
      float* Oh = L.O + h * R * d;
      int64_t u0 = 0;
      for (; u0 + NU <= nv; u0 += NU) pv_pass<T, RP, Full, NU>(V, ldv, nk, L.S, al, Oh, d, R, u0, u0 == 0 ? &vs : nullptr);
      for (; u0 < nv; u0 += 2) pv_pass<T, RP, Full, 2>(V, ldv, nk, L.S, al, Oh, d, R, u0, nullptr);
    }
  }

  // ---- outputs: normalised rows (final, or a split's partial) and the LSE
  for (int64_t h = 0; h < hk; ++h) {
    alignas(32) float lt[8], mt[8];
    _mm256_store_ps(lt, across_keys<RP, false>(_mm256_loadu_ps(L.l + h * 8)));
    _mm256_store_ps(mt, _mm256_loadu_ps(L.m + h * 8));
    T* out = static_cast<T*>(p.out);
    attn_decode_write_rows(p, b, sr, h, L.O + h * R * d, lt, mt, part_out, part_lse, Row<T>::pos,
                           [out](int64_t at, float v) { out[at] = from_float<T>(v); });
  }
}

template <typename T>
void run(const AttnParams& p, int64_t b, int64_t k_begin, int64_t k_end, float* part_out, float* part_lse,
         void* scratch) {
  const int64_t rows = p.seq_q * p.group();
  switch (attn_decode_padded_rows(p)) {
    case 1: return item<T, 1, true>(p, b, k_begin, k_end, part_out, part_lse, scratch);
    case 2: return item<T, 2, true>(p, b, k_begin, k_end, part_out, part_lse, scratch);
    case 4:
      if (rows == 4) return item<T, 4, true>(p, b, k_begin, k_end, part_out, part_lse, scratch);
      return item<T, 4, false>(p, b, k_begin, k_end, part_out, part_lse, scratch);
    default:
      if (rows == 8) return item<T, 8, true>(p, b, k_begin, k_end, part_out, part_lse, scratch);
      return item<T, 8, false>(p, b, k_begin, k_end, part_out, part_lse, scratch);
  }
}

}  // namespace

void attn_decode(const AttnParams& p, int64_t b, int64_t k_begin, int64_t k_end, float* part_out, float* part_lse,
                 void* scratch) {
  switch (p.dtype) {
    case DType::kFloat32: return run<float>(p, b, k_begin, k_end, part_out, part_lse, scratch);
    case DType::kBFloat16: return run<bf16>(p, b, k_begin, k_end, part_out, part_lse, scratch);
    case DType::kFloat16: return run<f16>(p, b, k_begin, k_end, part_out, part_lse, scratch);
    default: return;  // float64 never takes this kernel (attn_decode_avx2_ok)
  }
}

}  // namespace exaone_ext::cpu::avx2
