// exaone_ext::linear_int8 and linear_int4: y = x @ dequantise(weight).T with the weight kept
// quantized (layouts in cpu/quant_linear.h). Schemas, checks and the CPU implementation.
//
// Few rows (decode) are bound by reading the weight: the kernels of cpu/quant_linear.h stream the
// quantized bytes once, split over threads by output features, as linear does for 16-bit weights.
// Many rows (prefill) are bound by arithmetic: tiles of the weight are dequantised into x's dtype
// and multiplied by at::mm, so no dequantised copy of the whole weight is ever made.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cpu/quant_linear.h"
#include "torch/brgemm.h"
#include "torch/common.h"
#include "torch/cpu_ops.h"
#include "torch/quant.h"

namespace exaone_ext {
namespace {

void check_x(const at::Tensor& x, const char* op) {
  check_defined(x, op, "x");
  check_dim_at_least(x, 1, op, "x");
  kernel_dtype(x, op, "x", false);
}

void check_scales_dtype(const at::Tensor& s, const at::Tensor& x, const char* op) {
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat || s.scalar_type() == x.scalar_type(), "exaone_ext.", op,
                   ": 'scales' must be float32 or x's dtype (", x.scalar_type(), "), got ", s.scalar_type());
}

void check_shape(const at::Tensor& t, at::IntArrayRef want, const char* op, const char* arg, const char* layout) {
  TORCH_CHECK_VALUE(t.sizes() == want, "exaone_ext.", op, ": '", arg, "' must have shape ", layout, " = ",
                    shape_str(want), ", got ", shape_str(t.sizes()));
}

}  // namespace

std::vector<int64_t> check_linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  constexpr const char* op = "linear_int8";
  check_x(x, op);
  check_defined(qweight, op, "qweight");
  check_defined(scales, op, "scales");
  check_dim(qweight, 2, op, "qweight", "[out_features, in_features]");
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kChar, "exaone_ext.linear_int8: 'qweight' must be int8, got ",
                   qweight.scalar_type());
  check_same_device(qweight, x, op, "qweight", "x");
  check_same_device(scales, x, op, "scales", "x");
  check_scales_dtype(scales, x, op);
  TORCH_CHECK_VALUE(x.size(-1) == qweight.size(1), "exaone_ext.linear_int8: the last dimension of 'x' (shape ",
                    shape_str(x.sizes()), ") must equal in_features of 'qweight' (shape ",
                    shape_str(qweight.sizes()), "), got ", x.size(-1), " != ", qweight.size(1));
  check_shape(scales, {qweight.size(0)}, op, "scales", "[out_features]");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = qweight.size(0);
  return shape;
}

std::vector<int64_t> check_linear_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                       const at::Tensor& zeros, int64_t group_size) {
  constexpr const char* op = "linear_int4";
  check_x(x, op);
  check_defined(qweight, op, "qweight");
  check_defined(scales, op, "scales");
  check_defined(zeros, op, "zeros");
  check_dim(qweight, 2, op, "qweight", "[out_features, in_features / 2]");
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kByte,
                   "exaone_ext.linear_int4: 'qweight' must be uint8 (two 4-bit values a byte), got ",
                   qweight.scalar_type());
  TORCH_CHECK_TYPE(zeros.scalar_type() == at::kByte, "exaone_ext.linear_int4: 'zeros' must be uint8, got ",
                   zeros.scalar_type());
  check_same_device(qweight, x, op, "qweight", "x");
  check_same_device(scales, x, op, "scales", "x");
  check_same_device(zeros, x, op, "zeros", "x");
  check_scales_dtype(scales, x, op);
  const int64_t in = x.size(-1);
  TORCH_CHECK_VALUE(group_size > 0 && group_size % 32 == 0,
                    "exaone_ext.linear_int4: 'group_size' must be a positive multiple of 32, got ", group_size);
  TORCH_CHECK_VALUE(in % group_size == 0, "exaone_ext.linear_int4: in_features (the last dimension of 'x', ", in,
                    ") must be a multiple of group_size (", group_size, ")");
  TORCH_CHECK_VALUE(2 * qweight.size(1) == in, "exaone_ext.linear_int4: 'qweight' must have in_features / 2 = ",
                    in / 2, " columns (shape [out_features, in_features / 2]), got shape ",
                    shape_str(qweight.sizes()), " for x of shape ", shape_str(x.sizes()));
  const int64_t out = qweight.size(0), groups = in / group_size;
  check_shape(scales, {out, groups}, op, "scales", "[out_features, in_features / group_size]");
  check_shape(zeros, {out, groups}, op, "zeros", "[out_features, in_features / group_size]");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  return shape;
}

namespace {

// A per-weight check of a cat op: the single op's message, naming the weight's place in the lists.
template <typename F>
auto named_check(const char* op, size_t i, F&& check) {
  const std::string single(op, std::strlen(op) - 4);  // "linear_int8_cat" -> "linear_int8"
  return checked_for("exaone_ext." + single + ": ",
                     std::string("exaone_ext.") + op + ": weight " + std::to_string(i) + " of the lists: ", check);
}

void check_lists(const char* op, std::initializer_list<std::pair<const char*, size_t>> lists) {
  const auto& first = *lists.begin();
  TORCH_CHECK_VALUE(first.second > 0, "exaone_ext.", op, ": '", first.first, "' must hold at least one tensor, got none");
  for (const auto& l : lists)
    TORCH_CHECK_VALUE(l.second == first.second, "exaone_ext.", op, ": '", l.first, "' must hold as many tensors as '",
                      first.first, "' (", first.second, "), got ", l.second);
}

}  // namespace

std::vector<int64_t> check_linear_int8_cat(const at::Tensor& x, at::TensorList qweights, at::TensorList scales) {
  constexpr const char* op = "linear_int8_cat";
  check_lists(op, {{"qweights", qweights.size()}, {"scales", scales.size()}});
  std::vector<int64_t> shape;
  int64_t total = 0;
  for (size_t i = 0; i < qweights.size(); ++i) {
    shape = named_check(op, i, [&] { return check_linear_int8(x, qweights[i], scales[i]); });
    total += qweights[i].size(0);
  }
  shape.back() = total;
  return shape;
}

std::vector<int64_t> check_linear_int4_cat(const at::Tensor& x, at::TensorList qweights, at::TensorList scales,
                                           at::TensorList zeros, int64_t group_size) {
  constexpr const char* op = "linear_int4_cat";
  check_lists(op, {{"qweights", qweights.size()}, {"scales", scales.size()}, {"zeros", zeros.size()}});
  std::vector<int64_t> shape;
  int64_t total = 0;
  for (size_t i = 0; i < qweights.size(); ++i) {
    shape = named_check(op, i, [&] { return check_linear_int4(x, qweights[i], scales[i], zeros[i], group_size); });
    total += qweights[i].size(0);
  }
  shape.back() = total;
  return shape;
}

namespace {

std::atomic<bool> g_int_dot{true};
std::atomic<bool> g_row_stream{true};  // QuantLinearArgs::row_stream for one row of x
std::atomic<int64_t> g_prefetch_ahead[2] = {-1, -1};  // int8, int4; -1: the CPU's default

int64_t default_prefetch_ahead(int64_t bits) {
  // AMD without AVX-512 (Zen 2 / Zen 3): int8 1.07-1.15x at 1 KiB against 4 KiB, and a cliff from
  // 1.5 KiB on; Intel, and int4 everywhere, as fast or faster 1.5-4 KiB ahead. Zen 5 (AVX-512):
  // 4 KiB as fast as 8-16 KiB and faster than 0.5-2 KiB (one row of 2560 -> 14336, alternated:
  // int8 55.9 / 49.5 / 44.1 GB/s at 4 / 2 / 1 KiB, int4 37.5 / 37.1 / 36.2); Zen 4 not measured.
  static const bool near = cpu::cpu_is_amd() && !cpu::cpu_has("avx512f");
  return bits == 8 && near ? 1024 : 4096;
}

std::atomic<int64_t>& prefetch_slot(int64_t bits, const char* fn) {
  if (bits != 8 && bits != 4)
    throw std::invalid_argument(std::string(fn) + ": bits must be 8 (int8) or 4 (int4), got " + std::to_string(bits));
  return g_prefetch_ahead[bits == 8 ? 0 : 1];
}

}  // namespace

bool set_quant_int_dot(bool enabled) { return g_int_dot.exchange(enabled); }
bool set_quant_row_stream(bool enabled) { return g_row_stream.exchange(enabled); }

int64_t quant_prefetch_ahead(int64_t bits) {
  const int64_t v = prefetch_slot(bits, "quant_prefetch_ahead").load(std::memory_order_relaxed);
  return v < 0 ? default_prefetch_ahead(bits) : v;
}

int64_t set_quant_prefetch_ahead(int64_t bits, int64_t bytes) {
  std::atomic<int64_t>& slot = prefetch_slot(bits, "_set_quant_prefetch_ahead");
  if (bytes < -1 || bytes > (int64_t(1) << 20))
    throw std::invalid_argument("_set_quant_prefetch_ahead: bytes must be in 0..1048576 (or -1 for this CPU's "
                                "default), got " + std::to_string(bytes));
  const int64_t before = quant_prefetch_ahead(bits);
  slot.store(bytes, std::memory_order_relaxed);
  return before;
}

namespace {

// y = x @ cat(W_i).T for M rows of bfloat16 x through brgemm on tiles of kBrgemmFeatures dequantised
// weight rows (see quant_linear_cpu). Figures (Zen 4, AVX-512 brgemm, 2 threads): README "Quantized
// weights".
at::Tensor quant_linear_brgemm(const at::Tensor& x, const std::vector<QuantLinearArgs>& bases, int64_t M, int64_t N,
                               const std::vector<int64_t>& out_shape) {
  const int64_t K = bases[0].k;
  int64_t mp = 0;
  const at::Tensor x_vnni = brgemm_x_vnni(x.reshape({M, K}), mp);
  const auto* xv = static_cast<const uint16_t*>(x_vnni.const_data_ptr());
  at::Tensor y = at::empty({M, N}, x.options());
  auto* y0 = static_cast<uint16_t*>(y.data_ptr());
  struct Block { int64_t weight, n0, col; };
  std::vector<Block> blocks;
  int64_t col = 0;
  for (size_t w = 0; w < bases.size(); ++w) {
    for (int64_t n0 = 0; n0 < bases[w].n; n0 += kBrgemmFeatures) blocks.push_back({int64_t(w), n0, col + n0});
    col += bases[w].n;
  }
  const int64_t n_blocks = int64_t(blocks.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(std::max<int64_t>(1, at::get_num_threads()), n_blocks), 1, [&](int64_t, int64_t) {
    thread_local std::vector<uint16_t> tile;  // kBrgemmFeatures dequantised rows, bfloat16
    thread_local std::vector<float> c;        // brgemm's C: kBrgemmFeatures x mp
    if (tile.size() < size_t(kBrgemmFeatures * K)) tile.resize(size_t(kBrgemmFeatures * K));
    if (c.size() < size_t(kBrgemmFeatures * mp)) c.resize(size_t(kBrgemmFeatures * mp));
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n_blocks;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      const Block& b = blocks[i];
      const QuantLinearArgs& a = bases[b.weight];
      const int64_t nb = std::min(kBrgemmFeatures, a.n - b.n0);
      EXAONE_CPU_DISPATCH(quant_dequant_rows, a, b.n0, b.n0 + nb, tile.data(), DType::kBFloat16);
      brgemm_features(tile.data(), K, nb, K, xv, M, mp, c.data(), y0 + b.col, N);
    }
    brgemm_release();
  });
  return y.view(out_shape);
}

// y = x @ cat(W_i).T for the weights described by bases (pointers to q, scales, zeros filled in;
// the same bits and group), each into its own columns of y, in one parallel pass: x is converted
// (and for the integer paths quantized) once, and chunks of every weight go to the threads in turn.
at::Tensor quant_linear_cpu(const at::Tensor& x, std::vector<QuantLinearArgs> bases, const std::vector<int64_t>& out_shape) {
  const char* op = bases[0].bits == 8 ? "linear_int8" : "linear_int4";
  const int64_t K = bases[0].k;
  int64_t N = 0;
  for (const QuantLinearArgs& b : bases) N += b.n;
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  if (M == 0 || N == 0 || K == 0) return at::zeros(out_shape, x.options());
  const DType y_dtype = kernel_dtype(x, op, "x", false);
  for (QuantLinearArgs& b : bases) {
    b.m = M;
    b.y_dtype = y_dtype;
  }

  // 16-64 rows of bfloat16 x where brgemm runs (linear_brgemm_rows, as for 16-bit weights): each
  // thread expands kBrgemmFeatures weight rows at a time into a bfloat16 tile in its own cache and
  // multiplies it by brgemm (tile as A, x^T in VNNI pairs as B), so no dequantised tile goes through
  // memory and oneDNN reorders nothing.
  if (y_dtype == DType::kBFloat16 && linear_brgemm_rows(M, K)) return quant_linear_brgemm(x, bases, M, N, out_shape);

  // where the CPU's 16-bit matmul is slow (no instructions for x's type), 16-bit x streams through
  // kQuantStreamMaxRowsNonNative rows and the tiles above are float32
  const bool f32 = y_dtype != DType::kFloat32 && !cpu_native_16bit_matmul(x.scalar_type());
  if (M > (f32 ? kQuantStreamMaxRowsNonNative : kQuantStreamMaxRows)) {
    const DType tile_dtype = f32 ? DType::kFloat32 : y_dtype;
    const at::Tensor x2 = f32 ? x.reshape({M, K}).to(at::kFloat) : x.reshape({M, K});
    std::vector<at::Tensor> parts;
    for (const QuantLinearArgs& base : bases) {
      const int64_t row_bytes = base.q_stride;
      parts.push_back(linear_tiled(x2, base.n, [&](int64_t n0, int64_t n1, const at::Tensor& tile) {
        char* out = static_cast<char*>(tile.data_ptr());
        const int64_t es = tile.element_size();
        at::parallel_for(n0, n1, std::max<int64_t>(1, (int64_t(256) << 10) / std::max<int64_t>(1, row_bytes)),
                         [&](int64_t b, int64_t e) {
                           EXAONE_CPU_DISPATCH(quant_dequant_rows, base, b, e, out + (b - n0) * K * es, tile_dtype);
                         });
      }));
    }
    at::Tensor y = parts.size() == 1 ? parts[0] : at::cat(parts, -1);
    return (f32 ? y.to(x.scalar_type()) : y).view(out_shape);
  }

  at::Tensor xk;
  at::Tensor y = at::empty({M, N}, x.options());
  QuantLinearArgs a = bases[0];
  a.x = float32_view(x.reshape({M, K}), xk);  // contiguous bf16: no at::to (torch/common.h)
  a.x_stride = K;
  // 16-bit x: x as 15-bit integers per group / block (cpu/quant_linear.h) where the variant has
  // integer multiply-adds, which keep up with memory where widening the weights to float32 does
  // not (AVX2, one row: int4 1.6-1.8x, int8 1.1-1.4x). int8 above 4 rows keeps the float path, whose
  // 3-row tiles hold x in registers (Zen 3, 2560 -> 102400 at 6 / 8 rows: 0.96x / 0.92x otherwise).
  at::Tensor xq;
  const bool int_dot = y_dtype != DType::kFloat32 && g_int_dot.load(std::memory_order_relaxed);
  if (a.bits == 8 && int_dot && M <= kX8IntMaxRows) {
    const int64_t blocks = (K + kX8Block - 1) / kX8Block;
    xq = at::empty({M * (2 * K + 4 * blocks)}, x.options().dtype(at::kChar));
    auto* xw = reinterpret_cast<int16_t*>(xq.data_ptr<int8_t>());
    auto* xs = reinterpret_cast<float*>(xw + M * K);
    if (EXAONE_CPU_DISPATCH(quant_prepare_x8, a, xw, xs)) {
      a.xw = xw;
      a.xs = xs;
    }
  }
  if (a.bits == 4 && int_dot) {
    const int64_t groups = K / a.group;
    xq = at::empty({M * (2 * K + 8 * groups)}, x.options().dtype(at::kChar));
    int8_t* parts = xq.data_ptr<int8_t>();
    auto* xs = reinterpret_cast<float*>(parts + M * 2 * K);
    auto* xsum = reinterpret_cast<int32_t*>(xs + M * groups);
    if (EXAONE_CPU_DISPATCH(quant_prepare_x4, a, parts, xs, xsum)) {
      a.xq = parts;
      a.xs = xs;
      a.xsum = xsum;
    }
  }
  // One QuantLinearArgs per weight, writing its columns of y; chunks of them handed out in turn
  // (stream_chunks, as for linear).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<QuantLinearArgs> args;
  std::vector<std::pair<int64_t, int64_t>> sizes;
  const int64_t prefetch_ahead = quant_prefetch_ahead(a.bits);  // every weight has the same bits
  int64_t col = 0;
  for (const QuantLinearArgs& base : bases) {
    QuantLinearArgs w = base;
    w.x = a.x, w.x_stride = a.x_stride, w.xw = a.xw, w.xq = a.xq, w.xs = a.xs, w.xsum = a.xsum;
    w.row_stream = M == 1 && g_row_stream.load(std::memory_order_relaxed);
    w.prefetch_ahead = prefetch_ahead;
    w.y = static_cast<char*>(y.data_ptr()) + col * y.element_size();
    w.y_stride = N;
    args.push_back(w);
    sizes.emplace_back(w.n, w.q_stride);
    col += w.n;
  }
  const std::vector<WeightChunk> chunks = stream_chunks(sizes, kQuantRowBlock, threads);
  std::atomic<int64_t> next{0};
  const int64_t n_chunks = int64_t(chunks.size());
  const bool vnni = cpu::avx512vnni_active();  // the integer paths on vpdpbusd / vpdpwssd
  at::parallel_for(0, std::min(threads, n_chunks), 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < n_chunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      const WeightChunk& ch = chunks[c];
#if defined(EXAONE_HAVE_AVX512VNNI)
      if (vnni) {
        cpu::avx512vnni::quant_linear_rows(args[ch.weight], ch.n0, ch.n1);
        continue;
      }
#endif
      EXAONE_CPU_DISPATCH(quant_linear_rows, args[ch.weight], ch.n0, ch.n1);
    }
  });
  (void)vnni;
  return y.view(out_shape);
}

}  // namespace

at::Tensor linear_int8_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  const std::vector<int64_t> shape = check_linear_int8(x, qweight, scales);
  QuantLinearArgs a{};
  const QuantWeightTensors keep = fill_quant_weight(a, 8, qweight, scales, at::Tensor(), qweight.size(1), 0, "linear_int8");
  return quant_linear_cpu(x, {a}, shape);
}

at::Tensor linear_int4_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t group_size) {
  const std::vector<int64_t> shape = check_linear_int4(x, qweight, scales, zeros, group_size);
  QuantLinearArgs a{};
  const QuantWeightTensors keep = fill_quant_weight(a, 4, qweight, scales, zeros, x.size(-1), group_size, "linear_int4");
  return quant_linear_cpu(x, {a}, shape);
}

at::Tensor linear_int8_cat_cpu(const at::Tensor& x, at::TensorList qweights, at::TensorList scales) {
  const std::vector<int64_t> shape = check_linear_int8_cat(x, qweights, scales);
  std::vector<QuantLinearArgs> args(qweights.size());
  std::vector<QuantWeightTensors> keep;
  for (size_t i = 0; i < qweights.size(); ++i)
    keep.push_back(fill_quant_weight(args[i], 8, qweights[i], scales[i], at::Tensor(), x.size(-1), 0, "linear_int8_cat"));
  return quant_linear_cpu(x, std::move(args), shape);
}

at::Tensor linear_int4_cat_cpu(const at::Tensor& x, at::TensorList qweights, at::TensorList scales,
                               at::TensorList zeros, int64_t group_size) {
  const std::vector<int64_t> shape = check_linear_int4_cat(x, qweights, scales, zeros, group_size);
  std::vector<QuantLinearArgs> args(qweights.size());
  std::vector<QuantWeightTensors> keep;
  for (size_t i = 0; i < qweights.size(); ++i)
    keep.push_back(fill_quant_weight(args[i], 4, qweights[i], scales[i], zeros[i], x.size(-1), group_size,
                                     "linear_int4_cat"));
  return quant_linear_cpu(x, std::move(args), shape);
}

}  // namespace exaone_ext

TORCH_LIBRARY_FRAGMENT(exaone_ext, m) {
  m.def("linear_int8(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size=128) -> Tensor");
  m.def("linear_int8_cat(Tensor x, Tensor[] qweights, Tensor[] scales) -> Tensor");
  m.def("linear_int4_cat(Tensor x, Tensor[] qweights, Tensor[] scales, Tensor[] zeros, int group_size=128) -> Tensor");
}

TORCH_LIBRARY_IMPL(exaone_ext, CPU, m) {
  m.impl("linear_int8", &exaone_ext::linear_int8_cpu);
  m.impl("linear_int4", &exaone_ext::linear_int4_cpu);
  m.impl("linear_int8_cat", &exaone_ext::linear_int8_cat_cpu);
  m.impl("linear_int4_cat", &exaone_ext::linear_int4_cat_cpu);
}
