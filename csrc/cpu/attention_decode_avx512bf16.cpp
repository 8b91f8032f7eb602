// Decode attention for bfloat16 caches on AVX512-BF16 (see cpu/attention.h, attn_decode_*).
//
// A decode step (or a short chunked prefill) has a handful of query rows per kv head and a long
// cache, so it is bound by reading the cache once. The general kernel (attention_impl.h) works on
// one kv head at a time, which walks each head's rows kv_heads * head_dim elements apart; here one
// work item takes a range of keys of one sequence and goes through it block by block, every kv head
// within each block, so the item reads one contiguous stretch of the cache (prefetched a block ahead
// into L2) and keeps each head's softmax state and output in its scratch.
//
// Per (block of kBlockKeys keys, kv head): the rows of the group (R = seq_q * group <= 8, padded to
// RP in {1, 2, 4, 8}) against the keys, KJ = 16 / RP keys at a time:
//   - scores: 16 accumulators acc[j][r] of vdpbf16ps along head_dim (32 bf16 products each), reduced
//     together into one vector whose lane j * RP + r holds dot(q_r, k_j): no per-score horizontal sum;
//   - the softmax runs on those vectors (16 scores each, none wasted); the running max and sum are
//     kept "lane-replicated" (lane L holds row L % RP's value);
//   - probabilities rounded to bf16 (as a cast does) and arranged in pairs of consecutive keys, V read
//     in place and interleaved by pairs of rows, O += P . V by vdpbf16ps.
#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/attention.h"
#include "cpu/attention.h"

namespace exaone_ext::cpu::avx512bf16 {
namespace {

constexpr int64_t BK = kAttnDecodeBlockKeys;
constexpr int64_t kMaxHeadDim = 256;

inline char* align64(char* p) { return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63)); }

// exp(x) for x <= 0: n = round(x / ln 2), r = x - n ln 2 in two steps, a degree-6 polynomial on
// |r| <= ln 2 / 2, then 2^n by scalef; exactly 0 below -103 (where exp is under float's smallest
// normal anyway) and for -inf, so masked keys and rows that have seen no key contribute nothing.
// NaN stays NaN (max returns its second operand when one is NaN; the mask keeps unordered lanes):
// a NaN score must reach the output as it does in plain attention.
inline __m512 exp_nonpos(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.3981999507e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-103.f), _CMP_NLE_UQ), _mm512_scalef_ps(p, n));
}

// Sums of 16 vectors at once: lane i of the result is the sum of the lanes of v[kSlot[i]].
constexpr int kSlot[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
inline __m512 reduce16(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], 0x88), _mm512_shuffle_f32x4(w[i], w[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[i], x[i + 2], 0x44), _mm512_shuffle_ps(x[i], x[i + 2], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
}

// Combines the lanes of one row (L % RP equal) by max or sum, leaving the result in each of them.
template <int RP, bool Max>
inline __m512 across_keys(__m512 v) {
#pragma GCC unroll 4
  for (int step = RP; step < 16; step *= 2) {
    const __m512i idx = _mm512_xor_si512(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(step));
    const __m512 o = _mm512_permutexvar_ps(idx, v);
    v = Max ? _mm512_max_ps(v, o) : _mm512_add_ps(v, o);
  }
  return v;
}

inline uint16_t to_bf16_bits(float f) { return from_float<bf16>(f).bits; }

struct Layout {
  int64_t R, dq, hk;  // rows per head, q row length (head_dim rounded up to 32), kv heads
  uint16_t* Qb;       // [hk][RP][dq] unscaled bf16 rows of q, zero padded
  float* O;           // [hk][R][d] unnormalised outputs
  float* m;           // [hk][16] lane-replicated running max
  float* l;           // [hk][16] per-lane running sums
  float* St;          // [BK * RP] scores of one block, lane order j * RP + r per KJ keys
  uint32_t* Pp;       // [BK / 2][RP] bf16 probability pairs (keys 2q, 2q + 1)
};

template <int RP>
Layout carve(const AttnParams& p, void* scratch) {
  Layout L;
  L.R = p.seq_q * p.group();
  L.dq = (p.head_dim + 31) / 32 * 32;
  L.hk = p.kv_heads;
  char* c = align64(static_cast<char*>(scratch));
  auto take = [&](int64_t bytes) { char* r = c; c = align64(c + bytes); return r; };
  L.Qb = reinterpret_cast<uint16_t*>(take(L.hk * RP * L.dq * 2));
  L.O = reinterpret_cast<float*>(take(L.hk * L.R * p.head_dim * 4));
  L.m = reinterpret_cast<float*>(take(L.hk * 16 * 4));
  L.l = reinterpret_cast<float*>(take(L.hk * 16 * 4));
  L.St = reinterpret_cast<float*>(take(BK * RP * 4));
  L.Pp = reinterpret_cast<uint32_t*>(take(BK / 2 * RP * 4));
  return L;
}

// Every 64-byte line of `rows` rows of d bf16, ld elements apart, into L2.
inline void prefetch_rows(const uint16_t* base, int64_t ld, int64_t rows, int64_t d) {
  for (int64_t j = 0; j < rows; ++j) {
    const uintptr_t first = reinterpret_cast<uintptr_t>(base + j * ld) >> 6;
    const uintptr_t last = reinterpret_cast<uintptr_t>(base + j * ld + d - 1) >> 6;
    for (uintptr_t line = first; line <= last; ++line) _mm_prefetch(reinterpret_cast<const char*>(line << 6), _MM_HINT_T1);
  }
}

template <int RP>
__attribute__((noinline)) void item(const AttnParams& p, int64_t b, int64_t k_begin, int64_t k_end, float* part_out,
                                    float* part_lse, void* scratch) {
  constexpr int KJ = 16 / RP;
  const Layout L = carve<RP>(p, scratch);
  const SeqRange sr = seq_range(p, b);
  const int64_t g = p.group(), d = p.head_dim, hk = p.kv_heads, R = L.R, dq = L.dq;
  const uint16_t* Kc = static_cast<const uint16_t*>(p.k) + b * p.k_batch_stride + sr.k_start * p.k_row_stride;
  const uint16_t* Vc = static_cast<const uint16_t*>(p.v) + b * p.v_batch_stride + sr.k_start * p.v_row_stride;
  const int64_t ldk = p.k_row_stride, ldv = p.v_row_stride;
  int32_t cend[8];
  const int64_t kmax = attn_decode_key_ends(p, sr, k_begin, k_end, cend);
  alignas(64) int32_t lims[16];
  attn_decode_lane_limits(cend, R, RP, 16, lims);
  const __m512i lim = _mm512_load_si512(lims);

  for (int64_t h = 0; h < hk; ++h) {
    uint16_t* qh = L.Qb + h * RP * dq;
    std::memset(qh, 0, RP * dq * 2);
    for (int64_t c = 0; c < R; ++c) {
      const uint16_t* qr = static_cast<const uint16_t*>(p.q) + b * p.q_batch_stride +
                           (sr.q_start + c / g) * p.q_row_stride + (h * g + c % g) * p.q_head_stride;
      std::memcpy(qh + c * dq, qr, d * 2);
    }
    std::fill(L.O + h * R * d, L.O + (h + 1) * R * d, 0.f);
    _mm512_storeu_ps(L.m + h * 16, _mm512_set1_ps(-INFINITY));
    _mm512_storeu_ps(L.l + h * 16, _mm512_setzero_ps());
  }
  const __m512 scale = _mm512_set1_ps(p.scale);
  const __mmask32 tail = d % 32 ? __mmask32((1u << (d % 32)) - 1u) : ~__mmask32(0);
  const int64_t nfull = d / 32, nch = (d + 31) / 32;
  // pairs of consecutive keys of a row: halfword 2 * ((j / 2) * RP + r) + j % 2 <- lane j * RP + r
  alignas(32) uint16_t pidx[16];
  for (int lane = 0; lane < 16; ++lane) {
    const int r = lane % RP, j = lane / RP;
    pidx[2 * ((j / 2) * RP + r) + j % 2] = uint16_t(lane);
  }
  const __m256i pair_idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(pidx));

  for (int64_t kb = k_begin; kb < kmax; kb += BK) {
    const int64_t nk = std::min(BK, kmax - kb);
    const int64_t nk_next = std::min(BK, kmax - kb - nk);
    for (int64_t h = 0; h < hk; ++h) {
      const uint16_t* K = Kc + kb * ldk + h * p.k_head_stride;
      const uint16_t* V = Vc + kb * ldv + h * p.v_head_stride;
      // the same head's rows of the next block, fetched into L2 a few rows at a time in step with the
      // work (K during the scores, V during the first pass of P . V), never in one burst that would
      // stall on the core's miss buffers
      const uint16_t* Kn = nk_next > 0 ? K + BK * ldk : nullptr;
      const uint16_t* Vn = nk_next > 0 ? V + BK * ldv : nullptr;
      const uint16_t* qh = L.Qb + h * RP * dq;
      // ---- scores, KJ keys per vector; keys past nk reuse the last row (masked below)
      __m512 bmax = _mm512_set1_ps(-INFINITY);
      for (int64_t kk = 0; kk < nk; kk += KJ) {
        if (Kn && kk < nk_next) prefetch_rows(Kn + kk * ldk, ldk, std::min<int64_t>(KJ, nk_next - kk), d);
        const uint16_t* kr[KJ];
#pragma GCC unroll 16
        for (int j = 0; j < KJ; ++j) kr[j] = K + std::min<int64_t>(kk + j, nk - 1) * ldk;
        __m512 acc[KJ * RP];
#pragma GCC unroll 16
        for (int a = 0; a < KJ * RP; ++a) acc[a] = _mm512_setzero_ps();
        for (int64_t ch = 0; ch < nch; ++ch) {
          const __mmask32 mk = ch < nfull ? ~__mmask32(0) : tail;
          __m512bh qv[RP];
#pragma GCC unroll 8
          for (int r = 0; r < RP; ++r) qv[r] = (__m512bh)_mm512_loadu_si512(qh + r * dq + ch * 32);
#pragma GCC unroll 16
          for (int j = 0; j < KJ; ++j) {
            const __m512bh kv = (__m512bh)_mm512_maskz_loadu_epi16(mk, kr[j] + ch * 32);
#pragma GCC unroll 8
            for (int r = 0; r < RP; ++r) acc[j * RP + r] = _mm512_dpbf16_ps(acc[j * RP + r], qv[r], kv);
          }
        }
        __m512 v[16];
#pragma GCC unroll 16
        for (int a = 0; a < 16; ++a) v[kSlot[a]] = acc[a];
        __m512 s = _mm512_mul_ps(reduce16(v), scale);
        const __mmask16 ok = _mm512_cmplt_epi32_mask(_mm512_set1_epi32(int32_t(kb + kk)), lim);
        s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), ok, s);
        _mm512_storeu_ps(L.St + kk * RP, s);
        bmax = _mm512_max_ps(bmax, s);
      }
      // ---- online softmax on the lane-replicated statistics
      const __m512 m_old = _mm512_loadu_ps(L.m + h * 16);
      const __m512 m_new = _mm512_max_ps(m_old, across_keys<RP, true>(bmax));
      // a row that has seen no visible key yet keeps m = -inf and subtracts 0
      const __m512 mu = _mm512_mask_mov_ps(m_new, _mm512_cmp_ps_mask(m_new, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ),
                                           _mm512_setzero_ps());
      const __m512 alpha = exp_nonpos(_mm512_sub_ps(m_old, mu));
      _mm512_storeu_ps(L.m + h * 16, m_new);
      __m512 lsum = _mm512_mul_ps(_mm512_loadu_ps(L.l + h * 16), alpha);
      for (int64_t kk = 0; kk < nk; kk += KJ) {
        const __m512 s = _mm512_loadu_ps(L.St + kk * RP);
        // masked keys: exp(-inf - mu) = 0 exactly
        const __m512 pr = exp_nonpos(_mm512_sub_ps(s, mu));
        lsum = _mm512_add_ps(lsum, pr);
        const __m256i pb = (__m256i)_mm512_cvtneps_pbh(pr);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(L.Pp + (kk / 2) * RP), _mm256_permutexvar_epi16(pair_idx, pb));
      }
      _mm512_storeu_ps(L.l + h * 16, lsum);
      // ---- O = alpha * O + P . V. V rows j, j + 1 are interleaved 16-bit-wise by unpacklo / unpackhi
      // (cheap in-lane shuffles), which pairs them up in a permuted order of head_dim positions: O is
      // kept in that order (see vpos) and put back in order when the rows are written out.
      alignas(64) float al[16];
      _mm512_store_ps(al, alpha);
      float* Oh = L.O + h * R * d;
      const int64_t npairs = (nk + 1) / 2;
      int64_t c0 = 0;
      for (; c0 + 32 <= d; c0 += 32) {
        __m512 lo[8], hi[8];
#pragma GCC unroll 8
        for (int r = 0; r < RP; ++r)
          if (r < R) {
            const __m512 a = _mm512_set1_ps(al[r]);
            lo[r] = _mm512_mul_ps(_mm512_loadu_ps(Oh + r * d + c0), a);
            hi[r] = _mm512_mul_ps(_mm512_loadu_ps(Oh + r * d + c0 + 16), a);
          }
        for (int64_t q = 0; q < npairs; ++q) {
          if (c0 == 0 && Vn && 2 * q < nk_next) prefetch_rows(Vn + 2 * q * ldv, ldv, std::min<int64_t>(2, nk_next - 2 * q), d);
          const uint16_t* v0 = V + 2 * q * ldv + c0;
          const __m512i x0 = _mm512_loadu_si512(v0);
          const __m512i x1 = 2 * q + 1 < nk ? _mm512_loadu_si512(v0 + ldv) : _mm512_setzero_si512();
          const __m512bh vlo = (__m512bh)_mm512_unpacklo_epi16(x0, x1), vhi = (__m512bh)_mm512_unpackhi_epi16(x0, x1);
          const uint32_t* pq = L.Pp + q * RP;
#pragma GCC unroll 8
          for (int r = 0; r < RP; ++r)
            if (r < R) {
              const __m512bh pb = (__m512bh)_mm512_set1_epi32(int32_t(pq[r]));
              lo[r] = _mm512_dpbf16_ps(lo[r], pb, vlo);
              hi[r] = _mm512_dpbf16_ps(hi[r], pb, vhi);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < RP; ++r)
          if (r < R) {
            _mm512_storeu_ps(Oh + r * d + c0, lo[r]);
            _mm512_storeu_ps(Oh + r * d + c0 + 16, hi[r]);
          }
      }
      if (c0 < d) {  // the last 16 positions (head_dim % 32 == 16)
        __m512 o[8];
#pragma GCC unroll 8
        for (int r = 0; r < RP; ++r)
          if (r < R) o[r] = _mm512_mul_ps(_mm512_loadu_ps(Oh + r * d + c0), _mm512_set1_ps(al[r]));
        for (int64_t q = 0; q < npairs; ++q) {
          const uint16_t* v0 = V + 2 * q * ldv + c0;
          const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0));
          const __m256i x1 = 2 * q + 1 < nk ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + ldv))
                                            : _mm256_setzero_si256();
          const __m512bh vp = (__m512bh)_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_unpacklo_epi16(x0, x1)),
                                                           _mm256_unpackhi_epi16(x0, x1), 1);
          const uint32_t* pq = L.Pp + q * RP;
#pragma GCC unroll 8
          for (int r = 0; r < RP; ++r)
            if (r < R) o[r] = _mm512_dpbf16_ps(o[r], (__m512bh)_mm512_set1_epi32(int32_t(pq[r])), vp);
        }
#pragma GCC unroll 8
        for (int r = 0; r < RP; ++r)
          if (r < R) _mm512_storeu_ps(Oh + r * d + c0, o[r]);
      }
    }
  }

  // ---- outputs: normalised rows (final, or a split's partial) and the LSE. Within each chunk of w = 32
  // (or a last 16) positions, unpacklo's lane t holds position 8 (t / 4) + t % 4 and unpackhi's
  // 8 (t / 4) + 4 + t % 4; they are stored at t and w / 2 + t.
  int16_t vpos[kMaxHeadDim];
  for (int64_t c = 0; c < d; c += 32) {
    const int64_t half = std::min<int64_t>(32, d - c) / 2;
    for (int64_t t = 0; t < half; ++t) {
      vpos[c + 8 * (t / 4) + t % 4] = int16_t(c + t);
      vpos[c + 8 * (t / 4) + 4 + t % 4] = int16_t(c + half + t);
    }
  }
  for (int64_t h = 0; h < hk; ++h) {
    alignas(64) float lt[16], mt[16];
    _mm512_store_ps(lt, across_keys<RP, false>(_mm512_loadu_ps(L.l + h * 16)));
    _mm512_store_ps(mt, _mm512_loadu_ps(L.m + h * 16));
    uint16_t* out = static_cast<uint16_t*>(p.out);
    attn_decode_write_rows(p, b, sr, h, L.O + h * R * d, lt, mt, part_out, part_lse,
                           [&vpos](int64_t x) { return vpos[x]; },
                           [out](int64_t at, float v) { out[at] = to_bf16_bits(v); });
  }
}

}  // namespace

void attn_decode(const AttnParams& p, int64_t b, int64_t k_begin, int64_t k_end, float* part_out, float* part_lse,
                 void* scratch) {
  switch (attn_decode_padded_rows(p)) {
    case 1: return item<1>(p, b, k_begin, k_end, part_out, part_lse, scratch);
    case 2: return item<2>(p, b, k_begin, k_end, part_out, part_lse, scratch);
    case 4: return item<4>(p, b, k_begin, k_end, part_out, part_lse, scratch);
    default: return item<8>(p, b, k_begin, k_end, part_out, part_lse, scratch);
  }
}

}  // namespace exaone_ext::cpu::avx512bf16
