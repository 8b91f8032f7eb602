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
#include <type_traits>

#include "cpu/attention.h"
#include "cpu/vec.h"

namespace exaone_ext::cpu::EXAONE_ISA {
namespace {

constexpr int W = Vec::size;
#if defined(EXAONE_VEC_AVX512)
constexpr int kR = 6, kNV = 4;  // 24 accumulators + 4 B vectors + 1 broadcast of 32 registers
#elif defined(EXAONE_VEC_AVX2)
constexpr int kR = 4, kNV = 2;  // 8 accumulators of 16 registers
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

// Masks keys at or beyond each column's end: S[j][c] = fill for kb + j >= cend[c].
template <typename A>
inline void mask_cols(A* S, int64_t nk, int64_t Mp, int64_t M, const int64_t* cend, int64_t kb, A fill) {
  for (int64_t c = 0; c < M; ++c) {
    const int64_t first = std::max<int64_t>(0, cend[c] - kb);
    for (int64_t j = first; j < nk; ++j) S[j * Mp + c] = fill;
  }
}

inline char* align64(void* p) {
  const uintptr_t u = reinterpret_cast<uintptr_t>(p);
  return reinterpret_cast<char*>((u + 63) & ~uintptr_t(63));
}

// Bump allocator over the scratch space (64-byte aligned pieces).
struct Carve {
  char* p;
  template <typename X> X* take(int64_t n) {
    X* r = reinterpret_cast<X*>(p);
    p = align64(p + n * int64_t(sizeof(X)));
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
  const int64_t bq = attn_block_q(g);
  const int64_t mp_max = round_up(bq * g, lanes<A>());

  Carve cv{align64(scratch)};
  A* Qt = cv.take<A>(d * mp_max);
  A* O = cv.take<A>(mp_max * d);
  A* St = cv.take<A>(BK * mp_max);
  A* Kf = cv.take<A>(BK * d);
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
  const A scale = A(p.scale);

  for (int64_t qs = q_begin; qs < q_end; qs += bq) {
    const int64_t qe = std::min(qs + bq, q_end), M = (qe - qs) * g, Mp = round_up(M, lanes<A>());
    int64_t kmax = k_begin, kmin = k_end;
    for (int64_t c = 0; c < M; ++c) {
      const int64_t i = qs + c / g;
      const int64_t e = std::min(p.causal ? causal_key_end(i, len_q, len_k) : len_k, k_end);
      cend[c] = e;
      kmax = std::max(kmax, e);
      kmin = std::min(kmin, e);
      const T* qr = qbase + i * p.q_row_stride + (c % g) * p.q_head_stride;
      for (int64_t x = 0; x < d; ++x) Qt[x * Mp + c] = A(to_float(qr[x])) * scale;
    }
    for (int64_t c = M; c < Mp; ++c) {
      cend[c] = 0;
      for (int64_t x = 0; x < d; ++x) Qt[x * Mp + c] = 0;
    }
    for (int64_t c = 0; c < Mp; ++c) { m[c] = -INFINITY; l[c] = 0; }
    std::fill(O, O + M * d, A(0));

    for (int64_t kb = k_begin; kb < kmax; kb += BK) {
      const int64_t nk = std::min(BK, kmax - kb);
      const A* kt;
      int64_t kld;
      if constexpr (std::is_same_v<T, A>) {
        kt = kbase + kb * p.k_row_stride;
        kld = p.k_row_stride;
      } else {
        for (int64_t j = 0; j < nk; ++j) load_row(Kf + j * d, kbase + (kb + j) * p.k_row_stride, d, A(1));
        kt = Kf;
        kld = d;
      }
      gemm(St, Mp, kt, kld, 1, Qt, Mp, nk, Mp, d, false);  // S^T = K . (scale Q)^T
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
      gemm(O, d, St, 1, Mp, vbase + kb * p.v_row_stride, p.v_row_stride, M, d, nk, true);
    }

    for (int64_t c = 0; c < M; ++c) {
      const int64_t i = qs + c / g, head = kvh * g + c % g;
      const A inv = l[c] > 0 ? A(1) / l[c] : A(0);
      const float lse = l[c] > 0 ? float(m[c] + std::log(l[c])) : -INFINITY;
      if (part_out) {
        const int64_t r = (b * p.seq_q + i) * hq + head;
        store_row(part_out + r * d, O + c * d, d, inv);
        part_lse[r] = lse;
      } else {
        T* o = static_cast<T*>(p.out) + b * p.o_batch_stride + (sr.q_start + i) * p.o_row_stride +
               head * p.o_head_stride;
        store_row(o, O + c * d, d, inv);
        if (p.lse) p.lse[b * p.lse_batch_stride + head * p.lse_head_stride + sr.q_start + i] = lse;
      }
    }
  }
}

// ---- backward --------------------------------------------------------------------------------------

template <typename T>
void bwd_keys(const AttnBwdParams& bp, const void* dsum_v, void* dq_acc_v, int64_t b, int64_t kvh, int64_t kb_first,
              int64_t kb_step, void* scratch) {
  using A = acc_t<T>;
  const AttnParams& p = bp.fwd;
  const SeqRange sr = seq_range(p, b);
  const int64_t g = p.group(), d = p.head_dim, hq = p.q_heads;
  const int64_t len_q = sr.len_q, len_k = sr.len_k;
  const int64_t bq = attn_block_q(g);
  const int64_t mp_max = round_up(bq * g, lanes<A>());

  Carve cv{align64(scratch)};
  A* Qf = cv.take<A>(mp_max * d);
  A* Qt = cv.take<A>(d * mp_max);
  A* dOf = cv.take<A>(mp_max * d);
  A* dOt = cv.take<A>(d * mp_max);
  A* dQ = cv.take<A>(mp_max * d);
  A* St = cv.take<A>(BK * mp_max);
  A* dPt = cv.take<A>(BK * mp_max);
  A* Kf = cv.take<A>(BK * d);
  A* Vf = cv.take<A>(BK * d);
  A* dK = cv.take<A>(BK * d);
  A* dV = cv.take<A>(BK * d);
  A* lse_c = cv.take<A>(mp_max);
  A* D_c = cv.take<A>(mp_max);
  int64_t* cend = cv.take<int64_t>(mp_max);

  const A* dsum = static_cast<const A*>(dsum_v);
  A* dq_acc = static_cast<A*>(dq_acc_v);
  const int64_t row0 = p.cu_seqlens_q ? sr.q_start : b * p.seq_q;  // first row of the sequence in dq_acc
  const T* qbase = static_cast<const T*>(p.q) + b * p.q_batch_stride + sr.q_start * p.q_row_stride +
                   kvh * g * p.q_head_stride;
  const T* dobase = static_cast<const T*>(bp.dout) + b * bp.do_batch_stride + sr.q_start * bp.do_row_stride +
                    kvh * g * bp.do_head_stride;
  const T* kbase = static_cast<const T*>(p.k) + b * p.k_batch_stride + sr.k_start * p.k_row_stride +
                   kvh * p.k_head_stride;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_batch_stride + sr.k_start * p.v_row_stride +
                   kvh * p.v_head_stride;
  T* dkbase = static_cast<T*>(bp.dk) + b * bp.dk_batch_stride + sr.k_start * bp.dk_row_stride +
              kvh * bp.dk_head_stride;
  T* dvbase = static_cast<T*>(bp.dv) + b * bp.dv_batch_stride + sr.k_start * bp.dv_row_stride +
              kvh * bp.dv_head_stride;
  const float* lse = p.lse + b * p.lse_batch_stride + sr.q_start;
  const A scale = A(p.scale);
  const int64_t nkb = (len_k + BK - 1) / BK;

  for (int64_t kbi = kb_first; kbi < nkb; kbi += kb_step) {
    const int64_t kb = kbi * BK, nk = std::min(BK, len_k - kb);
    for (int64_t j = 0; j < nk; ++j) {
      load_row(Kf + j * d, kbase + (kb + j) * p.k_row_stride, d, A(1));
      load_row(Vf + j * d, vbase + (kb + j) * p.v_row_stride, d, A(1));
    }
    std::fill(dK, dK + nk * d, A(0));
    std::fill(dV, dV + nk * d, A(0));
    const int64_t q_first = p.causal ? std::clamp<int64_t>(kb - len_k + len_q, 0, len_q) : 0;

    for (int64_t qs = q_first; qs < len_q; qs += bq) {
      const int64_t qe = std::min(qs + bq, len_q), M = (qe - qs) * g, Mp = round_up(M, lanes<A>());
      int64_t kmin = kb + nk;
      for (int64_t c = 0; c < M; ++c) {
        const int64_t i = qs + c / g, h = c % g, head = kvh * g + h;
        cend[c] = p.causal ? causal_key_end(i, len_q, len_k) : len_k;
        kmin = std::min(kmin, cend[c]);
        lse_c[c] = A(lse[head * p.lse_head_stride + i]);
        D_c[c] = dsum[(row0 + i) * hq + head];
        const T* qr = qbase + i * p.q_row_stride + h * p.q_head_stride;
        const T* dr = dobase + i * bp.do_row_stride + h * bp.do_head_stride;
        load_row(Qf + c * d, qr, d, A(1));
        load_row(dOf + c * d, dr, d, A(1));
        for (int64_t x = 0; x < d; ++x) {
          Qt[x * Mp + c] = Qf[c * d + x];
          dOt[x * Mp + c] = dOf[c * d + x];
        }
      }
      for (int64_t c = M; c < Mp; ++c) {
        lse_c[c] = 0;
        D_c[c] = 0;
        for (int64_t x = 0; x < d; ++x) Qt[x * Mp + c] = dOt[x * Mp + c] = 0;
      }
      gemm(St, Mp, Kf, d, 1, Qt, Mp, nk, Mp, d, false);  // S^T (unscaled)
      exp_cols(St, nk, Mp, scale, lse_c, static_cast<A*>(nullptr));  // P^T = exp(scale S^T - lse)
      if (kb + nk > kmin) mask_cols(St, nk, Mp, M, cend, kb, A(0));
      gemm(dPt, Mp, Vf, d, 1, dOt, Mp, nk, Mp, d, false);  // dP^T = V . dO^T
      grad_scores(dPt, St, nk, Mp, D_c);                    // dS^T
      gemm(dV, d, St, Mp, 1, dOf, d, nk, d, M, true);       // dV += P^T . dO
      gemm(dK, d, dPt, Mp, 1, Qf, d, nk, d, M, true);       // dK += dS^T . Q
      gemm(dQ, d, dPt, 1, Mp, Kf, d, M, d, nk, false);      // dQ tile = dS . K
      for (int64_t c = 0; c < M; ++c) {
        const int64_t i = qs + c / g, head = kvh * g + c % g;
        add_row(dq_acc + ((row0 + i) * hq + head) * d, dQ + c * d, d, scale);
      }
    }
    for (int64_t j = 0; j < nk; ++j) {
      store_row(dkbase + (kb + j) * bp.dk_row_stride, dK + j * d, d, scale);
      store_row(dvbase + (kb + j) * bp.dv_row_stride, dV + j * d, d, A(1));
    }
  }
}

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
      break;  // float64 is routed to the portable variant by the caller
#endif
  }
}

template <typename T> struct Fwd {
  template <typename... Args> static void run(Args&&... args) { fwd_block<T>(args...); }
};
template <typename T> struct Bwd {
  template <typename... Args> static void run(Args&&... args) { bwd_keys<T>(args...); }
};

}  // namespace

void attn_fwd_block(const AttnParams& p, int64_t b, int64_t kv_head, int64_t q_begin, int64_t q_end, int64_t k_begin,
                    int64_t k_end, float* part_out, float* part_lse, void* scratch) {
  by_dtype<Fwd>(p.dtype, p, b, kv_head, q_begin, q_end, k_begin, k_end, part_out, part_lse, scratch);
}

void attn_bwd_keys(const AttnBwdParams& p, const void* dsum, void* dq_acc, int64_t b, int64_t kv_head,
                   int64_t kb_first, int64_t kb_step, void* scratch) {
  by_dtype<Bwd>(p.fwd.dtype, p, dsum, dq_acc, b, kv_head, kb_first, kb_step, scratch);
}

}  // namespace exaone_ext::cpu::EXAONE_ISA
