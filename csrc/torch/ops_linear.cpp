// exaone_ext::linear (y = x @ weight.T, no bias): schema, checks, and the CPU implementation.
//
// Few rows (decode) are bound by reading the weight: the weight-streaming kernels of cpu/linear.h
// read it once, split over threads by output features. Many rows (prefill) are bound by arithmetic:
// they go to at::matmul (oneDNN), which blocks for cache reuse.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "cpu/linear.h"
#include "torch/common.h"
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

namespace {

// Up to this many rows of x the weight-streaming kernel is used; above it at::matmul. Measured at the
// 2.4B shapes (benchmarks/bench_linear.py, single-thread CPU time): with AVX512-BF16 dot products, and
// for float32 / float16, streaming is ahead of oneDNN through 16 rows and level near 24; bfloat16 through
// convert + FMA is level at 8 rows and behind at 16.
constexpr int64_t kStreamMaxRows = 16;
constexpr int64_t kStreamMaxRowsBf16Fma = 8;

std::atomic<bool> g_bf16_dot{true};

bool bf16_dot_available() {
#if defined(EXAONE_HAVE_AVX512BF16)
  static const bool has = cpu::cpu_has("avx512bf16");
  return has && cpu::active_isa() == cpu::Isa::kAvx512 && g_bf16_dot.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight) {
  const std::vector<int64_t> out_shape = check_linear(x, weight);
  const DType dt = kernel_dtype(x, "linear", "x", true);
  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t M = K ? x.numel() / K : [&] {
    int64_t m = 1;
    for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
    return m;
  }();
  if (M == 0 || N == 0 || K == 0) return at::zeros(out_shape, x.options());
  const bool dot = dt == DType::kBFloat16 && bf16_dot_available();
  const int64_t max_rows = dt == DType::kBFloat16 && !dot ? kStreamMaxRowsBf16Fma : kStreamMaxRows;
  if (M > max_rows) return at::matmul(x, weight.t()).reshape(out_shape);

  const at::Tensor w = weight.stride(1) == 1 && weight.stride(0) >= K ? weight : weight.contiguous();
  // x is small: converted once to the kernel's input type (float32, float64 as is, bf16 as is for dot)
  const at::ScalarType xt = dot ? at::kBFloat16 : (dt == DType::kFloat64 ? at::kDouble : at::kFloat);
  const at::Tensor xk = x.reshape({M, K}).to(xt).contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const LinearArgs a{dt, M, K, N, xk.const_data_ptr(), K, w.const_data_ptr(), w.stride(0), y.data_ptr(), N};

  // Chunks of whole blocks of output features (~256 KiB of weight each) handed out to the threads
  // one at a time, so that a thread delayed by the OS (a shared machine) leaves its share to the others.
  const int64_t blocks = (N + kLinearRowBlock - 1) / kLinearRowBlock;
  const int64_t block_bytes = kLinearRowBlock * K * int64_t(w.element_size());
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 18) / block_bytes);
  const int64_t chunks = (blocks + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  const auto run = [&](int64_t c) {
    const int64_t n0 = c * chunk * kLinearRowBlock, n1 = std::min(N, (c + 1) * chunk * kLinearRowBlock);
    if (dt == DType::kFloat64) {
      cpu::scalar::linear_rows(a, n0, n1);
#if defined(EXAONE_HAVE_AVX512BF16)
    } else if (dot) {
      cpu::avx512bf16::linear_rows(a, n0, n1);
#endif
    } else {
      EXAONE_CPU_DISPATCH(linear_rows, a, n0, n1);
    }
  };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), chunks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      run(c);
    }
  });
  return y.view(out_shape);
}

}  // namespace

bool set_linear_bf16_dot(bool enabled) { return g_bf16_dot.exchange(enabled); }

}  // namespace exaone_ext

TORCH_LIBRARY_FRAGMENT(exaone_ext, m) {
  m.def("linear(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(exaone_ext, CPU, m) {
  m.impl("linear", &exaone_ext::linear_cpu);
}
