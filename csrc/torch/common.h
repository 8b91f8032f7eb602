// Shared helpers of the torch layer: dtype mapping and argument checks whose messages name the
// op, the argument, what was expected and what was given. Checks raise ValueError / TypeError
// (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) so a bad input is a Python exception, never a crash.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>
#include <vector>

#include "common/dtypes.h"
#include "cpu/isa.h"

namespace exaone_ext {

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << s;
  return o.str();
}

// Maps a tensor's dtype to a kernel DType; float64 only where allowed (CPU, for gradcheck).
inline DType kernel_dtype(const at::Tensor& t, const char* op, const char* arg, bool allow_double) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kDouble:
      if (allow_double) return DType::kFloat64;
      [[fallthrough]];
    default:
      TORCH_CHECK_TYPE(false, "exaone_ext.", op, ": '", arg, "' must be float32, bfloat16 or float16",
                       allow_double ? " (or float64 on CPU)" : "", ", got ", t.scalar_type());
  }
  return DType::kFloat32;
}

// Runs check() (an argument check of a single-weight op) for one weight of a list op: an error it
// raises is raised again with the same exception type, its first line's `single` prefix (e.g.
// "exaone_ext.linear: ") replaced by `where` (e.g. "exaone_ext.linear_cat: weights[1]: ").
template <typename F>
auto checked_for(const std::string& single, const std::string& where, F&& check) {
  const auto renamed = [&](const c10::Error& e) {
    std::string msg = e.msg();
    msg = msg.substr(0, msg.find('\n'));
    if (msg.rfind(single, 0) == 0) msg = msg.substr(single.size());
    return where + msg;
  };
  try {
    return check();
  } catch (const c10::TypeError& e) {
    TORCH_CHECK_TYPE(false, renamed(e));
  } catch (const c10::Error& e) {
    TORCH_CHECK_VALUE(false, renamed(e));
  }
}

inline void check_defined(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_VALUE(t.defined(), "exaone_ext.", op, ": '", arg, "' is an undefined tensor");
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                             const char* ref_arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "exaone_ext.", op, ": '", arg,
                   "' must have the same dtype as '", ref_arg, "' (", ref.scalar_type(), "), got ",
                   t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                              const char* ref_arg) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "exaone_ext.", op, ": '", arg, "' must be on the same device as '",
                    ref_arg, "' (", ref.device(), "), got ", t.device());
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                             const char* ref_arg) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "exaone_ext.", op, ": '", arg, "' must have the same shape as '",
                    ref_arg, "' ", shape_str(ref.sizes()), ", got ", shape_str(t.sizes()));
}

// t pairs element by element with ref: defined, on ref's device, of ref's dtype and shape.
inline void check_matches(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                          const char* ref_arg) {
  check_defined(t, op, arg);
  check_same_device(t, ref, op, arg, ref_arg);
  check_same_dtype(t, ref, op, arg, ref_arg);
  check_same_shape(t, ref, op, arg, ref_arg);
}

inline void check_dim_at_least(const at::Tensor& t, int64_t n, const char* op, const char* arg) {
  TORCH_CHECK_VALUE(t.dim() >= n, "exaone_ext.", op, ": '", arg, "' must have at least ", n,
                    " dimension(s), got shape ", shape_str(t.sizes()));
}

inline void check_dim(const at::Tensor& t, int64_t n, const char* op, const char* arg, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == n, "exaone_ext.", op, ": '", arg, "' must be ", n, "-dimensional ", layout,
                    ", got shape ", shape_str(t.sizes()));
}

// A view of t as [rows, cols] with a row stride, without copying when the layout allows
// (last dim contiguous and the leading dims collapsible into one stride); otherwise a contiguous copy.
struct Rows {
  at::Tensor tensor;  // keeps the storage alive
  int64_t rows = 0, cols = 0, stride = 0;
  const void* data() const { return tensor.const_data_ptr(); }
};

inline Rows as_rows(const at::Tensor& t) {
  Rows r;
  r.cols = t.dim() == 0 ? 1 : t.size(-1);
  r.rows = r.cols == 0 ? 0 : t.numel() / r.cols;
  bool ok = t.dim() >= 1 && (t.stride(-1) == 1 || r.cols <= 1);
  int64_t stride = t.dim() >= 2 ? t.stride(-2) : r.cols;
  // leading dims must form one arithmetic progression of rows
  int64_t expect = stride;
  for (int64_t d = t.dim() - 2; ok && d >= 0; --d) {
    if (t.size(d) != 1 && t.stride(d) != expect) ok = false;
    expect *= t.size(d);
  }
  if (t.dim() >= 2 && stride < r.cols && r.rows > 1) ok = false;
  r.tensor = ok ? t : t.contiguous();
  r.stride = ok ? (t.dim() >= 2 ? stride : r.cols) : r.cols;
  if (r.rows <= 1) r.stride = r.cols;
  return r;
}

// Rows per task so that a task touches at least ~32K elements (the parallel grain).
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

// A small contiguous CPU tensor as float32 for a kernel to read: bfloat16 widened by a loop into a
// per-thread buffer (a decode step's x or a norm's weight, a few KiB, where at::to's dispatch costs
// more than the copy: a few microseconds a call, several calls per layer per step), float32 as is;
// the pointer lives until this thread's next call (the op's own: its kernels run inside it).
// Anything else (another dtype, not contiguous, not on the CPU) goes through at::to, held in keep.
inline const float* float32_view(const at::Tensor& t, at::Tensor& keep) {
  if (t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == at::kBFloat16) {
    thread_local std::vector<float> buf;
    const int64_t n = t.numel();
    buf.resize(size_t(n));
    const auto* v = static_cast<const uint16_t*>(t.const_data_ptr());
    for (int64_t i = 0; i < n; ++i) buf[size_t(i)] = float_from_bits(uint32_t(v[i]) << 16);
    return buf.data();
  }
  keep = t.to(at::kFloat).contiguous();
  return keep.const_data_ptr<float>();
}

}  // namespace exaone_ext
