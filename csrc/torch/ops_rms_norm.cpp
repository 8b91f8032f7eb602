// exaone_ext::rms_norm, add_rms_norm and rms_norm_backward: schemas, checks, and the CPU kernels.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/rms_norm.h"
#include "torch/common.h"
#include "torch/cpu_ops.h"
#include "torch/output.h"
#include "torch/rms_norm.h"

namespace exaone_ext {
namespace {

// Checks x and weight; returns the kernel dtype of x.
DType check_x_weight(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_defined(x, op, "x");
  check_defined(weight, op, "weight");
  check_dim_at_least(x, 1, op, "x");
  check_same_device(weight, x, op, "weight", "x");
  const DType dt = kernel_dtype(x, op, "x", x.is_cpu());
  const auto wt = weight.scalar_type();
  const bool w_ok = wt == at::kFloat || wt == at::kBFloat16 || wt == at::kHalf ||
                    (wt == at::kDouble && dt == DType::kFloat64);
  TORCH_CHECK_TYPE(w_ok, "exaone_ext.", op, ": 'weight' must be float32, bfloat16 or float16 (float64 only with a "
                   "float64 'x'), got ", wt);
  TORCH_CHECK_VALUE(x.size(-1) > 0, "exaone_ext.", op, ": the last dimension of 'x' (hidden) must not be empty, got shape ",
                    shape_str(x.sizes()));
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(-1), "exaone_ext.", op,
                    ": 'weight' must have shape [", x.size(-1), "] (the last dimension of 'x'), got ",
                    shape_str(weight.sizes()));
  return dt;
}

void check_eps(double eps, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "exaone_ext.", op, ": 'eps' must be a finite number > 0, got ", eps);
}

at::ScalarType acc_dtype(DType dt) { return dt == DType::kFloat64 ? at::kDouble : at::kFloat; }

std::vector<int64_t> row_shape(const at::Tensor& x) { return {x.sizes().begin(), x.sizes().end() - 1}; }

// weight as the contiguous float32 (float64) vector the kernels read (float32_view: a contiguous
// bfloat16 CPU weight without at::to)
const void* weight_acc(const at::Tensor& weight, DType dt, at::Tensor& keep) {
  if (acc_dtype(dt) == at::kFloat) return float32_view(weight, keep);
  keep = weight.to(acc_dtype(dt)).contiguous();
  return keep.const_data_ptr();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_impl(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                 const RmsNormRunner& run) {
  const DType dt = check_x_weight(x, weight, "rms_norm");
  check_eps(eps, "rms_norm");
  at::Tensor y = empty_output(x.sizes(), x.options());
  at::Tensor rstd = at::empty(row_shape(x), x.options().dtype(acc_dtype(dt)));
  if (x.numel() == 0) return {y, rstd};
  Rows xr = as_rows(x);
  at::Tensor w_keep;
  const void* w = weight_acc(weight, dt, w_keep);
  run(RmsNormArgs{dt, xr.rows, xr.cols, eps, xr.data(), xr.stride, nullptr, 0, w, y.data_ptr(),
                  nullptr, rstd.data_ptr()});
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_impl(const at::Tensor& x, const at::Tensor& residual,
                                                                 const at::Tensor& weight, double eps,
                                                                 const RmsNormRunner& run) {
  const char* op = "add_rms_norm";
  const DType dt = check_x_weight(x, weight, op);
  check_matches(residual, x, op, "residual", "x");
  check_eps(eps, op);
  at::Tensor y = empty_output(x.sizes(), x.options());
  at::Tensor h = empty_output(x.sizes(), x.options());
  at::Tensor rstd = at::empty(row_shape(x), x.options().dtype(acc_dtype(dt)));
  if (x.numel() == 0) return {y, h, rstd};
  Rows xr = as_rows(x), rr = as_rows(residual);
  at::Tensor w_keep;
  const void* w = weight_acc(weight, dt, w_keep);
  run(RmsNormArgs{dt, xr.rows, xr.cols, eps, xr.data(), xr.stride, rr.data(), rr.stride, w,
                  y.data_ptr(), h.data_ptr(), rstd.data_ptr()});
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_impl(const at::Tensor& dy, const at::Tensor& x,
                                                          const at::Tensor& weight, const at::Tensor& rstd,
                                                          const std::optional<at::Tensor>& dh, int64_t max_chunks,
                                                          const RmsNormBackwardRunner& run) {
  const char* op = "rms_norm_backward";
  const DType dt = check_x_weight(x, weight, op);
  check_matches(dy, x, op, "dy", "x");
  check_defined(rstd, op, "rstd");
  check_same_device(rstd, x, op, "rstd", "x");
  TORCH_CHECK_TYPE(rstd.scalar_type() == acc_dtype(dt), "exaone_ext.", op, ": 'rstd' must be ", dt == DType::kFloat64 ? "float64" : "float32",
                   " (as returned by the forward), got ", rstd.scalar_type());
  TORCH_CHECK_VALUE(rstd.sizes() == at::IntArrayRef(row_shape(x)), "exaone_ext.", op, ": 'rstd' must have shape ",
                    shape_str(row_shape(x)), " ('x' without its last dimension), got ", shape_str(rstd.sizes()));
  const bool has_dh = dh.has_value() && dh->defined();
  if (has_dh) check_matches(*dh, x, op, "dh", "x");
  at::Tensor dx = empty_output(x.sizes(), x.options());
  if (x.numel() == 0) return {dx, at::zeros(weight.sizes(), weight.options())};
  Rows dyr = as_rows(dy), xr = as_rows(x);
  Rows dhr = has_dh ? as_rows(*dh) : Rows{};
  at::Tensor w_keep;
  const void* w = weight_acc(weight, dt, w_keep);
  at::Tensor rs = rstd.contiguous();
  int64_t chunks = 0, chunk_rows = 1;
  rms_norm_chunking(xr.rows, max_chunks, chunks, chunk_rows);
  auto acc_opts = x.options().dtype(acc_dtype(dt));
  at::Tensor partial = at::empty({chunks, xr.cols}, acc_opts);
  at::Tensor dw = at::empty({xr.cols}, acc_opts);
  run(RmsNormBackwardArgs{dt, xr.rows, xr.cols, dyr.data(), dyr.stride, xr.data(), xr.stride, w,
                          rs.const_data_ptr(), has_dh ? dhr.data() : nullptr, has_dh ? dhr.stride : 0, dx.data_ptr(),
                          partial.data_ptr(), dw.data_ptr(), chunks, chunk_rows});
  return {dx, dw.to(weight.scalar_type())};
}

namespace {

// At most this many row chunks in the weight-gradient sum on CPU (enough parallel tasks for any
// core count in use, few enough that the partial rows stay small beside the data).
constexpr int64_t kCpuMaxChunks = 64;

void run_forward_cpu(const RmsNormArgs& a) {
  at::parallel_for(0, a.rows, row_grain(a.cols), [&](int64_t b, int64_t e) {
    if (a.dtype == DType::kFloat64) {
      cpu::scalar::rms_norm_forward_rows(a, b, e);
    } else {
      EXAONE_CPU_DISPATCH_BF16(rms_norm_forward_rows, a, b, e);
    }
  });
}

void run_backward_cpu(const RmsNormBackwardArgs& a) {
  const bool f64 = a.dtype == DType::kFloat64;
  at::parallel_for(0, a.chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      if (f64) {
        cpu::scalar::rms_norm_backward_chunk(a, c);
      } else {
        EXAONE_CPU_DISPATCH_BF16(rms_norm_backward_chunk, a, c);
      }
    }
  });
  // columns are independent and each one adds its chunks in order: any split is deterministic
  const int64_t grain = std::max<int64_t>(64, 32768 / std::max<int64_t>(a.chunks, 1));
  at::parallel_for(0, a.cols, grain, [&](int64_t b, int64_t e) {
    if (f64) {
      cpu::scalar::rms_norm_reduce_dw(a, b, e);
    } else {
      EXAONE_CPU_DISPATCH_BF16(rms_norm_reduce_dw, a, b, e);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return rms_norm_impl(x, weight, eps, run_forward_cpu);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                                const at::Tensor& weight, double eps) {
  return add_rms_norm_impl(x, residual, weight, eps, run_forward_cpu);
}
namespace {

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                         const at::Tensor& weight, const at::Tensor& rstd,
                                                         const std::optional<at::Tensor>& dh) {
  return rms_norm_backward_impl(dy, x, weight, rstd, dh, kCpuMaxChunks, run_backward_cpu);
}

}  // namespace
}  // namespace exaone_ext

TORCH_LIBRARY_FRAGMENT(exaone_ext, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor y, Tensor h, Tensor rstd)");
  m.def("rms_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor? dh) -> (Tensor dx, Tensor dweight)");
}

TORCH_LIBRARY_IMPL(exaone_ext, CPU, m) {
  m.impl("rms_norm", &exaone_ext::rms_norm_cpu);
  m.impl("add_rms_norm", &exaone_ext::add_rms_norm_cpu);
  m.impl("rms_norm_backward", &exaone_ext::rms_norm_backward_cpu);
}
