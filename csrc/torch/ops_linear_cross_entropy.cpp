// exaone_ext::linear_cross_entropy and its backward: schemas, checks, the chunk loop, CPU kernels.
//
// The [N, V] logits never exist at once: a buffer of chunk_size rows is reused for every chunk
// (logits, then softmax - onehot written over them by the kernel), and the weight gradient is
// accumulated chunk by chunk (in float32 for 16-bit weights when there is more than one chunk,
// through a block of at most kWeightBlock vocabulary rows so that no second [V, D] 16-bit
// temporary is needed).
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/cross_entropy.h"
#include "torch/common.h"
#include "torch/linear_cross_entropy.h"

namespace exaone_ext {
namespace {

constexpr int64_t kWeightBlock = 8192;

// logits [c, V] = h @ weight.T. On the CPU in blocks of kLogitsBlock vocabulary rows, each product
// written straight into its columns of the chunk's buffer: the library matmul reached 66-86 GFLOP/s
// on a whole [320, 512] x [512, 102400] product and 102-131 GFLOP/s on the same product in blocks of
// 1024 rows of the weight (2-core Zen 3, float32, alternated). Elsewhere one matmul.
constexpr int64_t kLogitsBlock = 1024;

void logits_out(at::Tensor& logits, const at::Tensor& h, const at::Tensor& weight) {
  const int64_t vocab = weight.size(0);
  if (!h.is_cpu() || vocab <= kLogitsBlock) {
    at::mm_out(logits, h, weight.t());
    return;
  }
  for (int64_t v0 = 0; v0 < vocab; v0 += kLogitsBlock) {
    const int64_t len = std::min(kLogitsBlock, vocab - v0);
    at::Tensor part = logits.narrow(1, v0, len);
    at::mm_out(part, h, weight.narrow(0, v0, len).t());
  }
}

DType check_args(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                 int64_t chunk_size, const char* op) {
  check_defined(hidden, op, "hidden");
  check_defined(weight, op, "weight");
  check_defined(targets, op, "targets");
  check_dim(hidden, 2, op, "hidden", "[tokens, hidden_size]");
  check_dim(weight, 2, op, "weight", "[vocab, hidden_size]");
  check_same_device(weight, hidden, op, "weight", "hidden");
  check_same_device(targets, hidden, op, "targets", "hidden");
  const DType dt = kernel_dtype(hidden, op, "hidden", hidden.is_cpu());
  check_same_dtype(weight, hidden, op, "weight", "hidden");
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), "exaone_ext.", op, ": 'weight' must be [vocab, ",
                    hidden.size(1), "] to match 'hidden' ", shape_str(hidden.sizes()), ", got ",
                    shape_str(weight.sizes()));
  TORCH_CHECK_VALUE(weight.size(0) >= 1, "exaone_ext.", op,
                    ": 'weight' must have at least one row (one per vocabulary entry), got shape ",
                    shape_str(weight.sizes()));
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, "exaone_ext.", op, ": 'targets' must be int64, got ",
                   targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == hidden.size(0), "exaone_ext.", op,
                    ": 'targets' must be [", hidden.size(0), "] (one per row of 'hidden'), got shape ",
                    shape_str(targets.sizes()));
  TORCH_CHECK_VALUE(chunk_size >= 1, "exaone_ext.", op, ": 'chunk_size' must be a positive number of tokens, got ",
                    chunk_size);
  return dt;
}

// On the CPU every target is checked before any work (a pass over N integers). On CUDA the check
// would cost a device-to-host copy and a synchronisation per call, so it is not made there: the
// kernel gives an out-of-range target a NaN loss and NaN gradients instead (see cross_entropy.h).
void check_targets_on_host(const at::Tensor& t, int64_t ignore_index, int64_t vocab, const char* op) {
  if (!t.is_cpu()) return;
  const int64_t* p = t.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK_VALUE(target_kind(p[i], ignore_index, vocab) != TargetKind::kOutOfRange, "exaone_ext.", op,
                      ": 'targets' must be in [0, ", vocab, ") (the rows of 'weight') or equal ignore_index (",
                      ignore_index, "), got ", p[i], " at position ", i);
  }
}

void* at_row(const at::Tensor& t, int64_t row) {
  return static_cast<char*>(t.data_ptr()) + row * t.stride(0) * int64_t(t.element_size());
}

// The gradients of one call, accumulated chunk by chunk from each chunk's softmax - onehot.
struct ChunkGrads {
  at::Tensor grad_hidden, grad_weight, weight_acc, block;
  const at::Tensor& weight;
  bool want_hidden, want_weight, single_chunk;

  ChunkGrads(const at::Tensor& hidden, const at::Tensor& w, bool gh, bool gw, int64_t chunk)
      : weight(w), want_hidden(gh), want_weight(gw), single_chunk(hidden.size(0) <= chunk) {
    const auto opts = hidden.options();
    grad_hidden = gh ? at::empty(hidden.sizes(), opts) : at::empty({0}, opts);
    const bool low = hidden.scalar_type() == at::kBFloat16 || hidden.scalar_type() == at::kHalf;
    if (gw && low && !single_chunk) {
      weight_acc = at::zeros(w.sizes(), opts.dtype(at::kFloat));
      block = at::empty({std::min<int64_t>(kWeightBlock, w.size(0)), w.size(1)}, opts);
    } else if (gw) {
      // the first chunk writes it (no pass of zeros over [V, D] first); zeros only without tokens
      grad_weight = hidden.size(0) ? at::empty(w.sizes(), opts) : at::zeros(w.sizes(), opts);
    } else {
      grad_weight = at::empty({0}, opts);
    }
  }

  // g: [c, V] softmax - onehot of the chunk starting at token `begin`; h: its [c, D] hidden rows.
  void add(const at::Tensor& g, const at::Tensor& h, int64_t begin) {
    if (want_hidden) {
      at::Tensor rows = grad_hidden.narrow(0, begin, g.size(0));
      at::mm_out(rows, g, weight);
    }
    if (!want_weight) return;
    if (!weight_acc.defined()) {
      if (begin == 0) at::mm_out(grad_weight, g.t(), h);
      else grad_weight.addmm_(g.t(), h);
      return;
    }
    const int64_t vocab = weight.size(0);
    for (int64_t v0 = 0; v0 < vocab; v0 += block.size(0)) {
      const int64_t len = std::min(block.size(0), vocab - v0);
      at::Tensor part = block.narrow(0, 0, len);
      at::mm_out(part, g.narrow(1, v0, len).t(), h);
      weight_acc.narrow(0, v0, len).add_(part);
    }
  }

  at::Tensor weight_result() { return weight_acc.defined() ? weight_acc.to(weight.scalar_type()) : grad_weight; }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_impl(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, int64_t ignore_index,
    int64_t reduction, int64_t chunk_size, bool grad_hidden, bool grad_weight, const CrossEntropyRunner& run) {
  const char* op = "linear_cross_entropy";
  const DType dt = check_args(hidden, weight, targets, chunk_size, op);
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, "exaone_ext.", op,
                    ": 'reduction' must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  const at::Tensor t = targets.contiguous();
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  check_targets_on_host(t, ignore_index, vocab, op);
  const auto acc = hidden.options().dtype(dt == DType::kFloat64 ? at::kDouble : at::kFloat);
  at::Tensor lse = at::empty({n}, acc), loss = at::empty({n}, acc);
  const int64_t chunk = std::max<int64_t>(1, std::min(chunk_size, n));
  ChunkGrads grads(hidden, weight, grad_hidden, grad_weight, chunk);
  at::Tensor buf = at::empty({n ? chunk : 0, vocab}, hidden.options());
  for (int64_t s = 0; s < n; s += chunk) {
    const int64_t c = std::min(chunk, n - s);
    at::Tensor h = hidden.narrow(0, s, c), logits = buf.narrow(0, 0, c);
    logits_out(logits, h, weight);
    run(CrossEntropyArgs{dt, c, vocab, logits.data_ptr(), vocab, t.const_data_ptr<int64_t>() + s, ignore_index,
                         at_row(loss, s), at_row(lse, s), nullptr, 0, false, grad_hidden || grad_weight});
    if (grad_hidden || grad_weight) grads.add(logits, h, s);
  }
  at::Tensor out = loss;
  if (reduction == 2) out = loss.sum();
  if (reduction == 1) out = loss.sum().div(t.ne(ignore_index).sum().clamp_min(1));
  return {out, lse, grads.grad_hidden, grads.weight_result()};
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_backward_impl(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const at::Tensor& lse, int64_t ignore_index, int64_t chunk_size, bool grad_hidden, bool grad_weight,
    const CrossEntropyRunner& run) {
  const char* op = "linear_cross_entropy_backward";
  const DType dt = check_args(hidden, weight, targets, chunk_size, op);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const auto acc_type = dt == DType::kFloat64 ? at::kDouble : at::kFloat;
  check_defined(grad_loss, op, "grad_loss");
  check_defined(lse, op, "lse");
  check_same_device(grad_loss, hidden, op, "grad_loss", "hidden");
  check_same_device(lse, hidden, op, "lse", "hidden");
  TORCH_CHECK_VALUE(grad_loss.dim() == 0 || (grad_loss.dim() == 1 && grad_loss.size(0) == n), "exaone_ext.", op,
                    ": 'grad_loss' must be [", n, "] or 0-dimensional, got shape ", shape_str(grad_loss.sizes()));
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == n, "exaone_ext.", op, ": 'lse' must be [", n,
                    "], got shape ", shape_str(lse.sizes()));
  TORCH_CHECK_TYPE(lse.scalar_type() == acc_type, "exaone_ext.", op, ": 'lse' must be ", acc_type, ", got ",
                   lse.scalar_type());
  const at::Tensor t = targets.contiguous();
  check_targets_on_host(t, ignore_index, vocab, op);
  const at::Tensor scale = grad_loss.to(acc_type).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const int64_t chunk = std::max<int64_t>(1, std::min(chunk_size, n));
  ChunkGrads grads(hidden, weight, grad_hidden, grad_weight, chunk);
  if (!grad_hidden && !grad_weight) return {grads.grad_hidden, grads.grad_weight};
  at::Tensor buf = at::empty({n ? chunk : 0, vocab}, hidden.options());
  const size_t esz = scale.element_size();
  for (int64_t s = 0; s < n; s += chunk) {
    const int64_t c = std::min(chunk, n - s);
    at::Tensor h = hidden.narrow(0, s, c), logits = buf.narrow(0, 0, c);
    logits_out(logits, h, weight);
    const void* sc = scale.dim() ? static_cast<const char*>(scale.const_data_ptr()) + s * int64_t(esz)
                                 : scale.const_data_ptr();
    run(CrossEntropyArgs{dt, c, vocab, logits.data_ptr(), vocab, t.const_data_ptr<int64_t>() + s, ignore_index,
                         nullptr, at_row(lse_c, s), sc, scale.dim() ? 1 : 0, true, true});
    grads.add(logits, h, s);
  }
  return {grads.grad_hidden, grads.weight_result()};
}

namespace {

void run_cpu(const CrossEntropyArgs& a) {
  at::parallel_for(0, a.rows, row_grain(a.vocab), [&](int64_t b, int64_t e) {
    if (a.dtype == DType::kFloat64) {
      cpu::scalar::cross_entropy_rows(a, b, e);
    } else {
      EXAONE_CPU_DISPATCH(cross_entropy_rows, a, b, e);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, int64_t ignore_index,
    int64_t reduction, int64_t chunk_size, bool grad_hidden, bool grad_weight) {
  return linear_cross_entropy_impl(hidden, weight, targets, ignore_index, reduction, chunk_size, grad_hidden,
                                   grad_weight, run_cpu);
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const at::Tensor& lse, int64_t ignore_index, int64_t chunk_size, bool grad_hidden, bool grad_weight) {
  return linear_cross_entropy_backward_impl(grad_loss, hidden, weight, targets, lse, ignore_index, chunk_size,
                                            grad_hidden, grad_weight, run_cpu);
}

}  // namespace
}  // namespace exaone_ext

TORCH_LIBRARY_FRAGMENT(exaone_ext, m) {
  m.def("linear_cross_entropy(Tensor hidden, Tensor weight, Tensor targets, int ignore_index, int reduction, "
        "int chunk_size, bool grad_hidden, bool grad_weight) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_cross_entropy_backward(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor targets, Tensor lse, "
        "int ignore_index, int chunk_size, bool grad_hidden, bool grad_weight) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(exaone_ext, CPU, m) {
  m.impl("linear_cross_entropy", &exaone_ext::linear_cross_entropy_cpu);
  m.impl("linear_cross_entropy_backward", &exaone_ext::linear_cross_entropy_backward_cpu);
}
