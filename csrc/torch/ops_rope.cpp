// exaone_ext::rope_cos_sin, apply_rope and apply_rope_backward: schemas, checks, and the CPU kernels.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>

#include "cpu/rope.h"
#include "torch/common.h"
#include "torch/cpu_ops.h"
#include "torch/output.h"
#include "torch/rope.h"

namespace exaone_ext {
namespace {

// A view whose last dimension is contiguous (the kernels' requirement), copying only when needed.
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

void check_table(const at::Tensor& t, const at::Tensor& q, int64_t half, const char* op, const char* arg,
                 const char* q_arg) {
  check_defined(t, op, arg);
  check_same_device(t, q, op, arg, q_arg);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "exaone_ext.", op, ": '", arg,
                   "' must be a float32 table from rope_cos_sin, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == half, "exaone_ext.", op, ": '", arg,
                    "' must have shape [max_position, head_dim / 2 = ", half, "], got ", shape_str(t.sizes()));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> apply_rope_impl(const at::Tensor& q_in, const at::Tensor& k_in,
                                                   const at::Tensor& cos_in, const at::Tensor& sin_in,
                                                   const at::Tensor& position_ids, bool interleaved, bool inverse,
                                                   std::optional<int64_t> position_ids_max, const RopeRunner& run) {
  const char* op = inverse ? "apply_rope_backward" : "apply_rope";
  const char* qa = inverse ? "grad_q" : "q";
  const char* ka = inverse ? "grad_k" : "k";
  check_defined(q_in, op, qa);
  check_defined(k_in, op, ka);
  check_dim(q_in, 4, op, qa, "[batch, seq, q_heads, head_dim]");
  check_dim(k_in, 4, op, ka, "[batch, seq, kv_heads, head_dim]");
  check_same_device(k_in, q_in, op, ka, qa);
  const DType dt = kernel_dtype(q_in, op, qa, q_in.is_cpu());
  check_same_dtype(k_in, q_in, op, ka, qa);
  const int64_t batch = q_in.size(0), seq = q_in.size(1), head_dim = q_in.size(3);
  TORCH_CHECK_VALUE(k_in.size(0) == batch && k_in.size(1) == seq, "exaone_ext.", op, ": '", ka,
                    "' must have the batch and seq dims of '", qa, "' [", batch, ", ", seq, "], got shape ",
                    shape_str(k_in.sizes()));
  TORCH_CHECK_VALUE(k_in.size(3) == head_dim, "exaone_ext.", op, ": '", ka, "' must have the head_dim of '", qa,
                    "' (", head_dim, "), got shape ", shape_str(k_in.sizes()));
  TORCH_CHECK_VALUE(head_dim % 2 == 0, "exaone_ext.", op, ": head_dim (the last dimension of '", qa,
                    "') must be even, got ", head_dim);
  const int64_t half = head_dim / 2;
  check_table(cos_in, q_in, half, op, "cos", qa);
  check_table(sin_in, q_in, half, op, "sin", qa);
  check_same_shape(sin_in, cos_in, op, "sin", "cos");
  check_defined(position_ids, op, "position_ids");
  check_same_device(position_ids, q_in, op, "position_ids", qa);
  TORCH_CHECK_TYPE(position_ids.scalar_type() == at::kLong, "exaone_ext.", op,
                   ": 'position_ids' must be int64, got ", position_ids.scalar_type());
  TORCH_CHECK_VALUE(position_ids.dim() == 2 && position_ids.size(1) == seq &&
                        (position_ids.size(0) == batch || position_ids.size(0) == 1),
                    "exaone_ext.", op, ": 'position_ids' must have shape [batch, seq] = [", batch, ", ", seq,
                    "] (or [1, seq] shared by the batch), got ", shape_str(position_ids.sizes()));

  if (position_ids_max) {
    TORCH_CHECK_VALUE(*position_ids_max >= 0 && *position_ids_max < cos_in.size(0), "exaone_ext.", op,
                      ": 'position_ids_max' must lie in the cos/sin table of ", cos_in.size(0),
                      " positions (0 to ", cos_in.size(0) - 1, "), got ", *position_ids_max);
  }

  at::Tensor q_out = empty_output(q_in.sizes(), q_in.options());
  at::Tensor k_out = empty_output(k_in.sizes(), k_in.options());
  const int64_t q_heads = q_in.size(2), k_heads = k_in.size(2);
  if (batch * seq == 0 || q_heads + k_heads == 0 || head_dim == 0) return {q_out, k_out};

  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in);
  const at::Tensor cos = last_dim_contiguous(cos_in), sin = last_dim_contiguous(sin_in);
  RopeArgs a{dt, batch, seq, q_heads, k_heads, head_dim,
             q.const_data_ptr(), q.stride(0), q.stride(1), q.stride(2),
             k.const_data_ptr(), k.stride(0), k.stride(1), k.stride(2),
             q_out.data_ptr(), k_out.data_ptr(),
             cos.const_data_ptr<float>(), cos.stride(0), sin.const_data_ptr<float>(), sin.stride(0), cos.size(0),
             position_ids.const_data_ptr<int64_t>(), position_ids.size(0) == 1 ? 0 : position_ids.stride(0),
             position_ids.stride(1), interleaved, inverse};
  if (const std::optional<int64_t> bad = run(a, !position_ids_max.has_value())) {
    TORCH_CHECK_VALUE(false, "exaone_ext.", op, ": 'position_ids' holds position ", *bad,
                      ", outside the cos/sin table of ", a.table_rows, " positions (valid: 0 to ",
                      a.table_rows - 1, ")");
  }
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor> rope_cos_sin_impl(const at::Tensor& positions, int64_t head_dim, double theta,
                                                     bool llama3, double factor, double low_freq_factor,
                                                     double high_freq_factor, double original_max_position,
                                                     const RopeTableRunner& run) {
  const char* op = "rope_cos_sin";
  check_defined(positions, op, "positions");
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong, "exaone_ext.rope_cos_sin: 'positions' must be int64, got ",
                   positions.scalar_type());
  check_dim(positions, 1, op, "positions", "[n_positions]");
  TORCH_CHECK_VALUE(head_dim > 0 && head_dim % 2 == 0,
                    "exaone_ext.rope_cos_sin: 'head_dim' must be a positive even number, got ", head_dim);
  TORCH_CHECK_VALUE(theta > 0, "exaone_ext.rope_cos_sin: 'theta' must be positive, got ", theta);
  if (llama3) {
    TORCH_CHECK_VALUE(factor > 0, "exaone_ext.rope_cos_sin: llama3 'factor' must be positive, got ", factor);
    TORCH_CHECK_VALUE(low_freq_factor > 0 && high_freq_factor > low_freq_factor,
                      "exaone_ext.rope_cos_sin: llama3 needs 0 < 'low_freq_factor' < 'high_freq_factor', got ",
                      low_freq_factor, " and ", high_freq_factor);
    TORCH_CHECK_VALUE(original_max_position > 0,
                      "exaone_ext.rope_cos_sin: llama3 'original_max_position_embeddings' must be positive, got ",
                      original_max_position);
  }
  const int64_t n = positions.size(0);
  at::Tensor cos = at::empty({n, head_dim / 2}, positions.options().dtype(at::kFloat));
  at::Tensor sin = at::empty({n, head_dim / 2}, positions.options().dtype(at::kFloat));
  if (n == 0) return {cos, sin};
  const at::Tensor pos = positions.contiguous();
  run(RopeTableArgs{RopeFreqs{head_dim, theta, llama3, factor, low_freq_factor, high_freq_factor,
                              original_max_position},
                    n, pos.const_data_ptr<int64_t>(), cos.data_ptr<float>(), sin.data_ptr<float>()});
  return {cos, sin};
}

namespace {

// The CPU checks every position as it goes (free): a bound from the caller changes nothing here.
std::optional<int64_t> run_cpu(const RopeArgs& a, bool /*read_back*/) {
  const int64_t tokens = a.batch * a.seq;
  const int64_t per_token = (a.q_heads + a.k_heads) * a.head_dim;
  std::atomic<int64_t> first_bad{-1};
  at::parallel_for(0, tokens, std::max<int64_t>(1, 32768 / std::max<int64_t>(per_token, 1)),
                   [&](int64_t b, int64_t e) {
                     const int64_t bad = a.dtype == DType::kFloat64 ? cpu::scalar::rope_apply_tokens(a, b, e)
                                                                    : EXAONE_CPU_DISPATCH(rope_apply_tokens, a, b, e);
                     if (bad >= 0) {
                       int64_t expected = -1;
                       first_bad.compare_exchange_strong(expected, bad);
                     }
                   });
  const int64_t t = first_bad.load();
  if (t < 0) return std::nullopt;
  const int64_t b = t / a.seq, s = t - b * a.seq;
  return a.pos[b * a.pos_sb + s * a.pos_ss];
}

void run_cpu_tables(const RopeTableArgs& a) {
  at::parallel_for(0, a.n_positions, std::max<int64_t>(1, 4096 / std::max<int64_t>(a.freqs.head_dim, 1)),
                   [&](int64_t b, int64_t e) { cpu::rope_tables(a, b, e); });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> apply_rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                  const at::Tensor& sin, const at::Tensor& position_ids,
                                                  bool interleaved, std::optional<int64_t> position_ids_max) {
  return apply_rope_impl(q, k, cos, sin, position_ids, interleaved, false, position_ids_max, run_cpu);
}

std::tuple<at::Tensor, at::Tensor> apply_rope_backward_cpu(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                           const at::Tensor& cos, const at::Tensor& sin,
                                                           const at::Tensor& position_ids, bool interleaved,
                                                           std::optional<int64_t> position_ids_max) {
  return apply_rope_impl(grad_q, grad_k, cos, sin, position_ids, interleaved, true, position_ids_max, run_cpu);
}

namespace {

std::tuple<at::Tensor, at::Tensor> rope_cos_sin_cpu(const at::Tensor& positions, int64_t head_dim, double theta,
                                                    bool llama3, double factor, double low_freq_factor,
                                                    double high_freq_factor, double original_max_position) {
  return rope_cos_sin_impl(positions, head_dim, theta, llama3, factor, low_freq_factor, high_freq_factor,
                           original_max_position, run_cpu_tables);
}

}  // namespace
}  // namespace exaone_ext

TORCH_LIBRARY_FRAGMENT(exaone_ext, m) {
  m.def("rope_cos_sin(Tensor positions, int head_dim, float theta, bool llama3, float factor, "
        "float low_freq_factor, float high_freq_factor, float original_max_position) -> (Tensor, Tensor)");
  m.def("apply_rope(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor position_ids, bool interleaved=False, "
        "int? position_ids_max=None) -> (Tensor, Tensor)");
  m.def("apply_rope_backward(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin, Tensor position_ids, "
        "bool interleaved=False, int? position_ids_max=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(exaone_ext, CPU, m) {
  m.impl("rope_cos_sin", &exaone_ext::rope_cos_sin_cpu);
  m.impl("apply_rope", &exaone_ext::apply_rope_cpu);
  m.impl("apply_rope_backward", &exaone_ext::apply_rope_backward_cpu);
}
