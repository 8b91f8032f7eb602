// exaone_ext::swiglu, swiglu_fused and their backwards: schemas, checks, and the CPU kernels.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/swiglu.h"
#include "torch/common.h"
#include "torch/cpu_ops.h"
#include "torch/output.h"
#include "torch/swiglu.h"

namespace exaone_ext {
namespace {

DType check_pair(const at::Tensor& gate, const at::Tensor& up, const char* op) {
  check_defined(gate, op, "gate");
  check_defined(up, op, "up");
  check_dim_at_least(gate, 1, op, "gate");
  check_same_device(up, gate, op, "up", "gate");
  const DType dt = kernel_dtype(gate, op, "gate", gate.is_cpu());
  check_same_dtype(up, gate, op, "up", "gate");
  check_same_shape(up, gate, op, "up", "gate");
  return dt;
}

DType check_fused(const at::Tensor& gate_up, const char* op) {
  check_defined(gate_up, op, "gate_up");
  check_dim_at_least(gate_up, 1, op, "gate_up");
  const DType dt = kernel_dtype(gate_up, op, "gate_up", gate_up.is_cpu());
  TORCH_CHECK_VALUE(gate_up.size(-1) % 2 == 0, "exaone_ext.", op,
                    ": the last dimension of 'gate_up' holds gate then up and must be even, got shape ",
                    shape_str(gate_up.sizes()));
  return dt;
}

const void* offset(const void* p, int64_t elems, size_t elem_size) {
  return static_cast<const char*>(p) + elems * int64_t(elem_size);
}

}  // namespace

at::Tensor swiglu_impl(const at::Tensor& gate, const at::Tensor& up, const SwigluRunner& run) {
  const DType dt = check_pair(gate, up, "swiglu");
  Rows g = as_rows(gate), u = as_rows(up);
  at::Tensor out = empty_output(gate.sizes(), gate.options());
  run(SwigluArgs{dt, g.rows, g.cols, g.data(), g.stride, u.data(), u.stride, nullptr, 0,
                 out.data_ptr(), g.cols, nullptr, 0});
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_impl(const at::Tensor& grad, const at::Tensor& gate,
                                                        const at::Tensor& up, const SwigluRunner& run) {
  const DType dt = check_pair(gate, up, "swiglu_backward");
  check_matches(grad, gate, "swiglu_backward", "grad", "gate");
  Rows g = as_rows(gate), u = as_rows(up), dy = as_rows(grad);
  at::Tensor dgate = empty_output(gate.sizes(), gate.options());
  at::Tensor dup = empty_output(gate.sizes(), gate.options());
  run(SwigluArgs{dt, g.rows, g.cols, g.data(), g.stride, u.data(), u.stride, dy.data(), dy.stride,
                 dgate.data_ptr(), g.cols, dup.data_ptr(), g.cols});
  return {dgate, dup};
}

at::Tensor swiglu_fused_impl(const at::Tensor& gate_up, const SwigluRunner& run) {
  const DType dt = check_fused(gate_up, "swiglu_fused");
  Rows gu = as_rows(gate_up);
  const int64_t half = gu.cols / 2;
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() = half;
  at::Tensor out = empty_output(shape, gate_up.options());
  run(SwigluArgs{dt, gu.rows, half, gu.data(), gu.stride, offset(gu.data(), half, gate_up.element_size()),
                 gu.stride, nullptr, 0, out.data_ptr(), half, nullptr, 0});
  return out;
}

at::Tensor swiglu_fused_backward_impl(const at::Tensor& grad, const at::Tensor& gate_up, const SwigluRunner& run) {
  const DType dt = check_fused(gate_up, "swiglu_fused_backward");
  check_same_device(grad, gate_up, "swiglu_fused_backward", "grad", "gate_up");
  check_same_dtype(grad, gate_up, "swiglu_fused_backward", "grad", "gate_up");
  std::vector<int64_t> expect(gate_up.sizes().begin(), gate_up.sizes().end());
  expect.back() /= 2;
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef(expect), "exaone_ext.swiglu_fused_backward: 'grad' must have shape ",
                    shape_str(expect), " ('gate_up' with its last dimension halved), got ", shape_str(grad.sizes()));
  Rows gu = as_rows(gate_up), dy = as_rows(grad);
  const int64_t half = gu.cols / 2;
  at::Tensor dgu = empty_output(gate_up.sizes(), gate_up.options());
  const size_t es = gate_up.element_size();
  run(SwigluArgs{dt, gu.rows, half, gu.data(), gu.stride, offset(gu.data(), half, es), gu.stride, dy.data(),
                 dy.stride, dgu.data_ptr(), gu.cols, const_cast<void*>(offset(dgu.data_ptr(), half, es)), gu.cols});
  return dgu;
}

namespace {

void run_cpu(const SwigluArgs& a, bool backward) {
  at::parallel_for(0, a.rows, row_grain(a.cols), [&](int64_t b, int64_t e) {
    if (a.dtype == DType::kFloat64) {
      backward ? cpu::scalar::swiglu_backward_rows(a, b, e) : cpu::scalar::swiglu_forward_rows(a, b, e);
    } else if (backward) {
      EXAONE_CPU_DISPATCH_BF16(swiglu_backward_rows, a, b, e);
    } else {
      EXAONE_CPU_DISPATCH_BF16(swiglu_forward_rows, a, b, e);
    }
  });
}

const SwigluRunner kCpuForward = [](const SwigluArgs& a) { run_cpu(a, false); };
const SwigluRunner kCpuBackward = [](const SwigluArgs& a) { run_cpu(a, true); };

}  // namespace

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up) { return swiglu_impl(gate, up, kCpuForward); }
std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad, const at::Tensor& gate,
                                                       const at::Tensor& up) {
  return swiglu_backward_impl(grad, gate, up, kCpuBackward);
}
at::Tensor swiglu_fused_cpu(const at::Tensor& gate_up) { return swiglu_fused_impl(gate_up, kCpuForward); }

namespace {

at::Tensor swiglu_fused_backward_cpu(const at::Tensor& grad, const at::Tensor& gate_up) {
  return swiglu_fused_backward_impl(grad, gate_up, kCpuBackward);
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
