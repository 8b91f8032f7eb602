// exaone_ext::linear (y = x @ weight.T, no bias) and linear_cat (y = x @ cat(weights).T, e.g. the q,
// k and v projections in one call, without concatenating the weights): schemas, checks, and the CPU
// implementation.
//
// Few rows (decode) are bound by reading the weight: the weight-streaming kernels of cpu/linear.h
// read it once, split over threads by output features. Many rows (prefill) are bound by arithmetic:
// they go to at::matmul (oneDNN), which blocks for cache reuse.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "cpu/linear.h"
#include "torch/brgemm.h"
#include "torch/common.h"
#include "torch/cpu_ops.h"
#include "torch/linear.h"

namespace exaone_ext {

std::vector<int64_t> check_linear(const at::Tensor& x, const at::Tensor& weight) {
  constexpr const char* op = "linear";
  check_defined(x, op, "x");
  check_defined(weight, op, "weight");
  check_dim_at_least(x, 1, op, "x");
  check_dim(weight, 2, op, "weight", "[out_features, in_features]");
  check_same_device(weight, x, op, "weight", "x");
  kernel_dtype(x, op, "x", x.is_cpu());
  check_same_dtype(weight, x, op, "weight", "x");
  TORCH_CHECK_VALUE(x.size(-1) == weight.size(1), "exaone_ext.linear: the last dimension of 'x' (shape ",
                    shape_str(x.sizes()), ") must equal in_features of 'weight' (shape ", shape_str(weight.sizes()),
                    "), got ", x.size(-1), " != ", weight.size(1));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = weight.size(0);
  return shape;
}

std::vector<int64_t> check_linear_cat(const at::Tensor& x, const std::vector<at::Tensor>& weights) {
  TORCH_CHECK_VALUE(!weights.empty(), "exaone_ext.linear_cat: 'weights' must hold at least one weight, got none");
  std::vector<int64_t> shape;
  int64_t total = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    // check_linear's message, saying which weight of the list is wrong
    shape = checked_for("exaone_ext.linear: ", "exaone_ext.linear_cat: weights[" + std::to_string(i) + "]: ",
                        [&] { return check_linear(x, weights[i]); });
    total += weights[i].size(0);
  }
  shape.back() = total;
  return shape;
}

namespace {

// Up to this many rows of x the weight-streaming kernel is used; above it at::matmul. Measured at the
// 2.4B shapes (benchmarks/bench_linear.py, single-thread CPU time): with AVX512-BF16 dot products, and
// for float32 / float16, streaming is ahead of oneDNN through 16 rows and level near 24; bfloat16
// through convert + FMA is level at 8 rows and behind at 16 against oneDNN's native bf16 (an AMX
// Xeon). Where oneDNN has no instructions for a 16-bit type (bf16 on Zen 3 / AVX2: a quarter of its
// float32 rate), streaming is 3-4x ahead of it at 16 rows and level with float32 tiles
// (linear_tiled) near 64 (2560 <-> 7168 and 2560 -> 102400, two threads).
constexpr int64_t kStreamMaxRows = 16;
constexpr int64_t kStreamMaxRowsBf16Fma = 8;
constexpr int64_t kStreamMaxRowsNonNative = 64;

std::atomic<bool> g_bf16_dot{true};
std::atomic<bool> g_bf16_pairs{true};
// Rows of x against bfloat16 weights through oneDNN's brgemm (torch/brgemm.h): 1 wherever brgemm
// works (the default), -1 only where the CPU has AMX-BF16, 0 never.
std::atomic<int> g_linear_brgemm{1};

// Against the streaming kernel brgemm (torch/brgemm.h; on a Zen 4, its AVX-512 code, 2 threads,
// the 2.4B shapes) is 0.6-0.85x at 2-10 rows, mixed at 12-15 and 1.1-1.25x at 16; against
// at::matmul level at 17, 1.1-1.45x at 24-48, 1.1-1.2x at 64 and level at 65-256. Hence
// [kBrgemmMinRows, kBrgemmMaxRows] (torch/linear.h). On an Intel Xeon with AMX (2 cores, the same shapes) brgemm's tiles against the streaming
// kernel: 0.75-0.84x at 2 rows, 0.94-1.03x at 4, 1.06-1.36x at 6, 1.26-1.69x at 8, 1.74-2.46x at
// 12; there the range starts at kBrgemmMinRowsAmx (linear_brgemm_min_rows).

// Output features [n0, n1) of a (bfloat16 weight and y) for its a.m rows through brgemm; x_vnni is
// x^T in pairs padded to mp rows, c scratch of kBrgemmFeatures * mp floats.
void linear_rows_brgemm(const LinearArgs& a, const uint16_t* x_vnni, int64_t mp, int64_t n0, int64_t n1, float* c) {
  const auto* w = static_cast<const uint16_t*>(a.w);
  auto* y = static_cast<uint16_t*>(a.y);
  for (int64_t b = n0; b < n1; b += kBrgemmFeatures)
    brgemm_features(w + b * a.w_stride, a.w_stride, std::min(kBrgemmFeatures, n1 - b), a.k, x_vnni, a.m, mp, c,
                    y + b, a.y_stride);
}

bool bf16_dot_available() {
#if defined(EXAONE_HAVE_AVX512BF16)
  static const bool has = cpu::cpu_has("avx512bf16");
  return has && cpu::active_isa() == cpu::Isa::kAvx512 && g_bf16_dot.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

// y = x @ cat(weights).T: the weights one after the other in y's columns, in one parallel pass.
at::Tensor linear_cpu_impl(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                           const std::vector<int64_t>& out_shape) {
  const DType dt = kernel_dtype(x, "linear", "x", true);
  const int64_t K = weights[0].size(1);
  int64_t N = 0;
  for (const at::Tensor& w : weights) N += w.size(0);
  const int64_t M = K ? x.numel() / K : [&] {
    int64_t m = 1;
    for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
    return m;
  }();
  if (M == 0 || N == 0 || K == 0) return at::zeros(out_shape, x.options());
  const bool dot = dt == DType::kBFloat16 && bf16_dot_available();
  const bool half = dt == DType::kBFloat16 || dt == DType::kFloat16;
  const bool native = half && cpu_native_16bit_matmul(x.scalar_type());
  const int64_t max_rows = half && !native ? kStreamMaxRowsNonNative
                           : dt == DType::kBFloat16 && !dot ? kStreamMaxRowsBf16Fma : kStreamMaxRows;
  const bool use_brgemm = dt == DType::kBFloat16 && linear_brgemm_rows(M, K, linear_brgemm_min_rows());
  if (M > max_rows && !use_brgemm) {
    if (half && !native) {
      // float32 GEMMs over float32 tiles of the weight (converted ~8 MiB at a time), rounded once
      const at::Tensor x32 = x.reshape({M, K}).to(at::kFloat);
      std::vector<at::Tensor> parts;
      for (const at::Tensor& w : weights)
        parts.push_back(linear_tiled(x32, w.size(0), [&](int64_t n0, int64_t n1, const at::Tensor& tile) {
          tile.narrow(0, 0, n1 - n0).copy_(w.narrow(0, n0, n1 - n0));
        }));
      return (parts.size() == 1 ? parts[0] : at::cat(parts, -1)).to(x.scalar_type()).reshape(out_shape);
    }
    if (weights.size() == 1) return at::matmul(x, weights[0].t()).reshape(out_shape);
    std::vector<at::Tensor> parts;
    for (const at::Tensor& w : weights) parts.push_back(at::matmul(x, w.t()));
    return at::cat(parts, -1).reshape(out_shape);
  }

  // x is small: converted once to the kernel's input type (float32, float64 as is, bf16 as is for dot)
  const at::ScalarType xt = dot ? at::kBFloat16 : (dt == DType::kFloat64 ? at::kDouble : at::kFloat);
  const at::Tensor xk = x.reshape({M, K}).to(xt).contiguous();
  // Several rows against bfloat16 weights on the AVX2 variant: x also in its pair order (see
  // LinearArgs::x_pairs), made once here rather than by every chunk.
  at::Tensor x_pairs;
  constexpr int64_t G = kLinearPairGroupAvx2;
  if (dt == DType::kBFloat16 && !dot && M >= 2 && K >= G && cpu::active_isa() == cpu::Isa::kAvx2 &&
      g_bf16_pairs.load(std::memory_order_relaxed)) {
    const int64_t kp = K / G * G;
    x_pairs = xk.narrow(1, 0, kp).view({M, kp / G, G / 2, 2}).transpose(2, 3).contiguous().view({M, kp});
  }
  // Several bfloat16 rows through brgemm (AMX tiles where the CPU has them): x^T in VNNI pairs.
  at::Tensor x_vnni;
  int64_t mp = 0;
  if (use_brgemm) x_vnni = brgemm_x_vnni(x.reshape({M, K}), mp);
  const auto* xv = x_vnni.defined() ? static_cast<const uint16_t*>(x_vnni.const_data_ptr()) : nullptr;
  at::Tensor y = at::empty({M, N}, x.options());
  // One LinearArgs per weight, writing its columns of y; chunks of them handed out in turn (stream_chunks).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<at::Tensor> ws;
  std::vector<LinearArgs> args;
  std::vector<std::pair<int64_t, int64_t>> sizes;
  int64_t col = 0;
  for (const at::Tensor& weight : weights) {
    const at::Tensor w = weight_rows_of(weight);
    const int64_t n = w.size(0);
    args.push_back(LinearArgs{dt, M, K, n, xk.const_data_ptr(), K, w.const_data_ptr(), w.stride(0),
                              static_cast<char*>(y.data_ptr()) + col * y.element_size(), N,
                              x_pairs.defined() ? x_pairs.const_data_ptr<float>() : nullptr,
                              x_pairs.defined() ? G : 0});
    sizes.emplace_back(n, K * int64_t(w.element_size()));
    ws.push_back(w);
    col += n;
  }
  const std::vector<WeightChunk> chunks = stream_chunks(sizes, kLinearRowBlock, threads);
  std::atomic<int64_t> next{0};
  thread_local std::vector<float> brgemm_c;  // brgemm's C: kBrgemmFeatures x mp
  const auto run = [&](const WeightChunk& c) {
    const LinearArgs& a = args[c.weight];
    if (xv) {
      linear_rows_brgemm(a, xv, mp, c.n0, c.n1, brgemm_c.data());
    } else if (dt == DType::kFloat64) {
      cpu::scalar::linear_rows(a, c.n0, c.n1);
#if defined(EXAONE_HAVE_AVX512BF16)
    } else if (dot) {
      cpu::avx512bf16::linear_rows(a, c.n0, c.n1);
#endif
    } else {
      EXAONE_CPU_DISPATCH(linear_rows, a, c.n0, c.n1);
    }
  };
  const int64_t n_chunks = int64_t(chunks.size());
  const int64_t workers = std::min<int64_t>(threads, n_chunks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    if (xv && brgemm_c.size() < size_t(kBrgemmFeatures * mp)) brgemm_c.resize(size_t(kBrgemmFeatures * mp));
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < n_chunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      run(chunks[c]);
    }
    if (xv) brgemm_release();
  });
  return y.view(out_shape);
}

}  // namespace

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight) {
  return linear_cpu_impl(x, {weight}, check_linear(x, weight));
}

at::Tensor linear_cat_cpu(const at::Tensor& x, at::TensorList weights) {
  const std::vector<at::Tensor> ws(weights.begin(), weights.end());
  return linear_cpu_impl(x, ws, check_linear_cat(x, ws));
}

bool set_linear_bf16_dot(bool enabled) { return g_bf16_dot.exchange(enabled); }
bool set_linear_bf16_pairs(bool enabled) { return g_bf16_pairs.exchange(enabled); }
int set_linear_brgemm(int mode) { return g_linear_brgemm.exchange(brgemm_mode(mode)); }

int64_t linear_brgemm_min_rows() { return cpu_amx_bf16() ? kBrgemmMinRowsAmx : kBrgemmMinRows; }

bool linear_brgemm_rows(int64_t m, int64_t k, int64_t min_rows) {
  return m >= min_rows && m <= kBrgemmMaxRows && k % 2 == 0 &&
         brgemm_allowed(g_linear_brgemm.load(std::memory_order_relaxed));
}

std::string linear_bf16_rows_engine() {
  if (brgemm_allowed(g_linear_brgemm.load())) return brgemm_engine_name();
  if (bf16_dot_available()) return "avx512bf16";
  return cpu::isa_name(cpu::active_isa());
}

std::vector<WeightChunk> stream_chunks(const std::vector<std::pair<int64_t, int64_t>>& weights, int64_t block_rows,
                                       int64_t threads) {
  std::vector<WeightChunk> chunks;
  int64_t remaining = 0;
  for (const auto& [n, row_bytes] : weights) remaining += n * row_bytes;
  for (size_t w = 0; w < weights.size(); ++w) {
    const auto [n, row_bytes] = weights[w];
    const int64_t block_bytes = std::max<int64_t>(1, block_rows * row_bytes);
    for (int64_t n0 = 0; n0 < n;) {
      const int64_t bytes = std::clamp<int64_t>(remaining / (4 * threads), int64_t(128) << 10, int64_t(8) << 20);
      const int64_t n1 = std::min(n, n0 + std::max<int64_t>(1, bytes / block_bytes) * block_rows);
      chunks.push_back({int64_t(w), n0, n1});
      remaining -= (n1 - n0) * row_bytes;
      n0 = n1;
    }
  }
  return chunks;
}

bool cpu_native_16bit_matmul(at::ScalarType dtype) {
  static const bool bf16 = cpu::cpu_has("avx512bf16") || cpu::cpu_has("amx_bf16");
  static const bool f16 = cpu::cpu_has("avx512fp16");
  return dtype == at::kBFloat16 ? bf16 : dtype == at::kHalf ? f16 : true;
}

at::Tensor linear_tiled(const at::Tensor& x2, int64_t n,
                        const std::function<void(int64_t, int64_t, const at::Tensor&)>& fill) {
  const int64_t M = x2.size(0), K = x2.size(1);
  at::Tensor y = at::empty({M, n}, x2.options());
  // ~8 MiB tiles (a multiple of 64 rows): large enough for the matmul to reach its rate, small
  // beside the weight.
  const int64_t tile_rows = std::min(n, std::max<int64_t>(64, ((int64_t(8) << 20) / std::max<int64_t>(1, K * x2.element_size())) / 64 * 64));
  // The tile's memory is kept per calling thread from one call to the next: a fresh 8 MiB block is
  // mapped anew by the allocator on every call (glibc), and its page faults cost as much as the
  // dequantisation (Zen 5, 2 threads, 256 x 7168 -> 2560 int4: 0.75x of bf16 with a fresh tile,
  // 0.87x with the pages kept).
  thread_local at::Tensor kept;
  const int64_t need = tile_rows * K * x2.element_size();
  if (!kept.defined() || kept.numel() < need) kept = at::empty({need}, x2.options().dtype(at::kByte));
  at::Tensor tile = kept.narrow(0, 0, need).view(x2.scalar_type()).view({tile_rows, K});
  for (int64_t n0 = 0; n0 < n; n0 += tile_rows) {
    const int64_t n1 = std::min(n, n0 + tile_rows);
    fill(n0, n1, tile);
    at::Tensor out = y.narrow(1, n0, n1 - n0);
    at::mm_out(out, x2, tile.narrow(0, 0, n1 - n0).t());
  }
  return y;
}

}  // namespace exaone_ext

TORCH_LIBRARY_FRAGMENT(exaone_ext, m) {
  m.def("linear(Tensor x, Tensor weight) -> Tensor");
  m.def("linear_cat(Tensor x, Tensor[] weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(exaone_ext, CPU, m) {
  m.impl("linear", &exaone_ext::linear_cpu);
  m.impl("linear_cat", &exaone_ext::linear_cat_cpu);
}
