// See torch/brgemm.h.
#include "torch/brgemm.h"

#include <ATen/Context.h>
#include <ATen/Functions.h>
#include <c10/util/BFloat16.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/isa.h"

namespace exaone_ext {

void brgemm_bf16(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                 const uint16_t* A, const uint16_t* B, float* C) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, reinterpret_cast<const at::BFloat16*>(A),
                              reinterpret_cast<const at::BFloat16*>(B), C, /*is_vnni=*/true);
}

void brgemm_release() { at::native::cpublas::brgemm_release(true); }

bool brgemm_works() {
  // Small integers: every sum is exact, so the result must equal the loops' bit for bit. Shapes: the
  // attention tiles (full, ragged, add into C, a strided A) and the decode linear's (output features
  // x a few rows, long K, A rows far apart).
  static const bool ok = [] {
    auto bf = [](float x) { uint32_t u; std::memcpy(&u, &x, 4); return uint16_t(u >> 16); };
    auto val = [](uint16_t h) { uint32_t u = uint32_t(h) << 16; float x; std::memcpy(&x, &u, 4); return x; };
    struct Case { int64_t M, N, K, lda, ldb, ldc; bool add; };
    const Case cases[] = {{64, 64, 80, 80, 64, 64, false}, {37, 80, 64, 64, 80, 80, true},
                          {3, 128, 18, 18, 128, 128, false}, {64, 16, 128, 256, 16, 16, true},
                          {64, 8, 640, 700, 8, 8, false},    {13, 3, 96, 96, 3, 3, false}};
    try {
      for (const Case& t : cases) {
        std::vector<uint16_t> a(size_t(t.M * t.lda)), b(size_t(t.K / 2 * t.ldb * 2));
        std::vector<float> c(size_t(t.M * t.ldc)), want(c.size());
        for (size_t i = 0; i < a.size(); ++i) a[i] = bf(float(int64_t(i * 7 % 5)) - 2.0f);
        for (size_t i = 0; i < b.size(); ++i) b[i] = bf(float(int64_t(i * 3 % 7)) - 3.0f);
        for (size_t i = 0; i < c.size(); ++i) c[i] = want[i] = float(int64_t(i % 3));
        for (int64_t i = 0; i < t.M; ++i)
          for (int64_t n = 0; n < t.N; ++n) {
            float sum = t.add ? want[size_t(i * t.ldc + n)] : 0.0f;
            for (int64_t k = 0; k < t.K; ++k)
              sum += val(a[size_t(i * t.lda + k)]) * val(b[size_t((k / 2) * 2 * t.ldb + 2 * n + k % 2)]);
            want[size_t(i * t.ldc + n)] = sum;
          }
        brgemm_bf16(t.M, t.N, t.K, t.lda, t.ldb, t.ldc, t.add, a.data(), b.data(), c.data());
        brgemm_release();
        if (c != want) return false;  // also: nothing written outside the N columns of each row
      }
      return true;
    } catch (...) {
      return false;
    }
  }();
  return ok;
}

bool cpu_amx_bf16() {
  static const bool amx = cpu::cpu_has("amx_bf16") && cpu::cpu_has("amx_tile");
  return amx;
}

bool brgemm_allowed(int mode, bool forward) {
  if (mode == 0 || cpu::active_isa() != cpu::Isa::kAvx512 || !cpu::avx512bf16_allowed()) return false;
  // Zen 5 (2 cores, seq 2048, causal; three runs of compare_attention.py): the forward on brgemm
  // 1.28-1.32x (d 80) and 1.14-1.19x (d 128) the kernels' own vdpbf16ps products; the backward
  // 0.91-1.14x, so it keeps its own.
  static const bool zen5_forward = cpu::cpu_is_amd() && cpu::cpu_x86_family() >= 26;
  if (mode < 0 && !cpu_amx_bf16() && !(forward && zen5_forward)) return false;
  return at::globalContext().userEnabledMkldnn() && brgemm_works();
}

at::Tensor brgemm_x_vnni(const at::Tensor& x2, int64_t& mp) {
  const int64_t m = x2.size(0), k = x2.size(1);
  mp = (m + kBrgemmRowAlign - 1) / kBrgemmRowAlign * kBrgemmRowAlign;
  return at::constant_pad_nd(x2, {0, 0, 0, mp - m}).view({mp, k / 2, 2}).permute({1, 0, 2}).contiguous();
}

void brgemm_features(const uint16_t* w, int64_t lda, int64_t nb, int64_t k, const uint16_t* x_vnni, int64_t m,
                     int64_t mp, float* c, uint16_t* y, int64_t y_stride) {
  for (int64_t k0 = 0; k0 < k; k0 += kBrgemmDepth)
    brgemm_bf16(nb, mp, std::min(kBrgemmDepth, k - k0), lda, mp, mp, k0 > 0, w + k0, x_vnni + k0 * mp, c);
  for (int64_t r = 0; r < m; ++r) {
    auto* out = reinterpret_cast<c10::BFloat16*>(y + r * y_stride);
    for (int64_t i = 0; i < nb; ++i) out[i] = c10::BFloat16(c[i * mp + r]);  // rounded to nearest even
  }
}

const char* brgemm_engine_name() { return cpu_amx_bf16() ? "oneDNN brgemm (AMX)" : "oneDNN brgemm (AVX-512)"; }

}  // namespace exaone_ext
