// exaone_ext::swiglu, swiglu_fused and their backwards: schemas, checks and the CPU kernels.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "cpu/swiglu.h"
#include "torch/common.h"
#include "torch/swiglu.h"

namespace exaone_ext {

void check_swiglu(const at::Tensor& gate, const at::Tensor& up, const char* op) {
  check_defined(gate, op, "gate");
  check_defined(up, op, "up");
  check_dim_at_least(gate, 1, op, "gate");
  check_same_device(up, gate, op, "up", "gate");
  kernel_dtype(gate, op, "gate", gate.is_cpu());
  check_same_dtype(up, gate, op, "up", "gate");
  check_same_shape(up, gate, op, "up", "gate");
}

void check_swiglu_fused(const at::Tensor& gate_up, const char* op) {
  check_defined(gate_up, op, "gate_up");
  check_dim_at_least(gate_up, 1, op, "gate_up");
  kernel_dtype(gate_up, op, "gate_up", gate_up.is_cpu());
  TORCH_CHECK_VALUE(gate_up.size(-1) % 2 == 0, "exaone_ext.", op,
                    ": the last dimension of 'gate_up' holds gate then up and must be even, got shape ",
                    shape_str(gate_up.sizes()));
}

namespace {

cpu::SwigluArgs make_args(DType dt, int64_t cols) {
  cpu::SwigluArgs a{};
  a.dtype = dt;
  a.cols = cols;
  return a;
}

void run_cpu(bool backward, const cpu::SwigluArgs& a, int64_t rows) {
  at::parallel_for(0, rows, row_grain(a.cols), [&](int64_t b, int64_t e) {
    if (a.dtype == DType::kFloat64) {
      backward ? cpu::scalar::swiglu_backward_rows(a, b, e) : cpu::scalar::swiglu_forward_rows(a, b, e);
    } else if (backward) {
      EXAONE_CPU_DISPATCH(swiglu_backward_rows, a, b, e);
    } else {
      EXAONE_CPU_DISPATCH(swiglu_forward_rows, a, b, e);
    }
  });
}

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu(gate, up, "swiglu");
  Rows g = as_rows(gate), u = as_rows(up);
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  auto a = make_args(kernel_dtype(gate, "swiglu", "gate", true), g.cols);
  a.gate = g.data(); a.gate_stride = g.stride;
  a.up = u.data(); a.up_stride = u.stride;
  a.out = out.data_ptr(); a.out_stride = g.cols;
  run_cpu(false, a, g.rows);
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad, const at::Tensor& gate,
                                                       const at::Tensor& up) {
  check_swiglu(gate, up, "swiglu_backward");
  check_same_shape(grad, gate, "swiglu_backward", "grad", "gate");
  check_same_dtype(grad, gate, "swiglu_backward", "grad", "gate");
  Rows g = as_rows(gate), u = as_rows(up), dy = as_rows(grad);
  at::Tensor dgate = at::empty(gate.sizes(), gate.options());
  at::Tensor dup = at::empty(gate.sizes(), gate.options());
  auto a = make_args(kernel_dtype(gate, "swiglu_backward", "gate", true), g.cols);
  a.gate = g.data(); a.gate_stride = g.stride;
  a.up = u.data(); a.up_stride = u.stride;
  a.dy = dy.data(); a.dy_stride = dy.stride;
  a.out = dgate.data_ptr(); a.out_stride = g.cols;
  a.out2 = dup.data_ptr(); a.out2_stride = g.cols;
  run_cpu(true, a, g.rows);
  return {dgate, dup};
}

at::Tensor swiglu_fused_cpu(const at::Tensor& gate_up) {
  check_swiglu_fused(gate_up, "swiglu_fused");
  Rows gu = as_rows(gate_up);
  const int64_t half = gu.cols / 2;
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() = half;
  at::Tensor out = at::empty(shape, gate_up.options());
  auto a = make_args(kernel_dtype(gate_up, "swiglu_fused", "gate_up", true), half);
  a.gate = gu.data(); a.gate_stride = gu.stride;
  a.up = static_cast<const char*>(gu.data()) + half * gate_up.element_size(); a.up_stride = gu.stride;
  a.out = out.data_ptr(); a.out_stride = half;
  run_cpu(false, a, gu.rows);
  return out;
}

at::Tensor swiglu_fused_backward_cpu(const at::Tensor& grad, const at::Tensor& gate_up) {
  check_swiglu_fused(gate_up, "swiglu_fused_backward");
  check_same_dtype(grad, gate_up, "swiglu_fused_backward", "grad", "gate_up");
  Rows gu = as_rows(gate_up), dy = as_rows(grad);
  const int64_t half = gu.cols / 2;
  TORCH_CHECK_VALUE(dy.cols == half && dy.rows == gu.rows, "exaone_ext.swiglu_fused_backward: 'grad' must have shape ",
                    "of 'gate_up' with the last dimension halved, got ", shape_str(grad.sizes()), " for 'gate_up' ",
                    shape_str(gate_up.sizes()));
  at::Tensor dgu = at::empty(gate_up.sizes(), gate_up.options());
  const size_t es = gate_up.element_size();
  auto a = make_args(kernel_dtype(gate_up, "swiglu_fused_backward", "gate_up", true), half);
  a.gate = gu.data(); a.gate_stride = gu.stride;
  a.up = static_cast<const char*>(gu.data()) + half * es; a.up_stride = gu.stride;
  a.dy = dy.data(); a.dy_stride = dy.stride;
  a.out = dgu.data_ptr(); a.out_stride = gu.cols;
  a.out2 = static_cast<char*>(dgu.data_ptr()) + half * es; a.out2_stride = gu.cols;
  run_cpu(true, a, gu.rows);
  return dgu;
}

}  // namespace
}  // namespace exaone_ext

TORCH_LIBRARY_FRAGMENT(exaone_ext, m) {
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("swiglu_fused(Tensor gate_up) -> Tensor");
  m.def("swiglu_fused_backward(Tensor grad, Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(exaone_ext, CPU, m) {
  m.impl("swiglu", &exaone_ext::swiglu_cpu);
  m.impl("swiglu_backward", &exaone_ext::swiglu_backward_cpu);
  m.impl("swiglu_fused", &exaone_ext::swiglu_fused_cpu);
  m.impl("swiglu_fused_backward", &exaone_ext::swiglu_fused_backward_cpu);
}
