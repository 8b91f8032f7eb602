// Checks, allocation and parameter filling of the flash-attention ops (see torch/attention.h).
#include "torch/attention.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <cstring>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/core/List.h>
#include <ATen/ops/index_put.h>

#include <cmath>
#include <vector>

#include "cpu/attention.h"
#include "torch/common.h"

namespace exaone_ext {
namespace {

// q / k / v: rank, device, dtype, shapes, heads, head dim, last dim contiguous.
// rank 4 (dense / cache: [batch, seq, heads, head_dim]) or 3 (varlen: [tokens, heads, head_dim]).
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op, int64_t rank,
               const char* k_name = "k", const char* v_name = "v") {
  const char* layout = rank == 4 ? "[batch, seq, heads, head_dim]" : "[total_tokens, heads, head_dim]";
  check_defined(q, op, "q");
  check_defined(k, op, k_name);
  check_defined(v, op, v_name);
  check_dim(q, rank, op, "q", layout);
  check_dim(k, rank, op, k_name, layout);
  check_dim(v, rank, op, v_name, layout);
  check_same_device(k, q, op, k_name, "q");
  check_same_device(v, q, op, v_name, "q");
  kernel_dtype(q, op, "q", q.is_cpu());
  check_same_dtype(k, q, op, k_name, "q");
  check_same_dtype(v, q, op, v_name, "q");
  check_same_shape(v, k, op, v_name, k_name);
  if (rank == 4) {
    TORCH_CHECK_VALUE(k.size(0) == q.size(0), "exaone_ext.", op, ": '", k_name, "' must have the batch size of 'q' (",
                      q.size(0), "), got shape ", shape_str(k.sizes()));
  }
  const int64_t hq = q.size(-2), hk = k.size(-2), d = q.size(-1);
  TORCH_CHECK_VALUE(hk > 0 && hq % hk == 0, "exaone_ext.", op, ": the q heads (", hq,
                    ") must be a multiple of the kv heads (", hk, ") of '", k_name, "'");
  TORCH_CHECK_VALUE(attn_head_dim_supported(d), "exaone_ext.", op,
                    ": head_dim must be one of ", kAttnHeadDimsText, ", got ", d, " ('q' shape ",
                    shape_str(q.sizes()), ")");
  TORCH_CHECK_VALUE(k.size(-1) == d, "exaone_ext.", op, ": '", k_name, "' must have the head_dim of 'q' (", d,
                    "), got shape ", shape_str(k.sizes()));
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, k_name}, std::pair{&v, v_name}}) {
    // an empty tensor has nothing to read: its strides do not matter
    TORCH_CHECK_VALUE(t->stride(-1) == 1 || t->numel() == 0, "exaone_ext.", op, ": '", name,
                      "' must have a contiguous last dimension (stride 1), got strides ", shape_str(t->strides()));
  }
}

void check_scale(double scale, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(scale), "exaone_ext.", op, ": 'softmax_scale' must be finite, got ", scale);
}

// Shared part of the params: sizes, dtype, pointers and strides of q, k, v, out.
AttnParams fill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, bool causal,
                double scale, const char* op) {
  AttnParams p;
  p.dtype = kernel_dtype(q, op, "q", q.is_cpu());
  const bool dense = q.dim() == 4;
  p.batch = dense ? q.size(0) : 0;
  p.seq_q = dense ? q.size(1) : 0;
  p.seq_k = dense ? k.size(1) : 0;
  p.q_heads = q.size(-2);
  p.kv_heads = k.size(-2);
  p.head_dim = q.size(-1);
  p.causal = causal;
  p.scale = float(scale);
  p.scale_f64 = scale;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.out = out.defined() ? const_cast<void*>(out.const_data_ptr()) : nullptr;
  auto strides = [&](const at::Tensor& t, int64_t& bs, int64_t& rs, int64_t& hs) {
    bs = dense ? t.stride(0) : 0;
    rs = t.stride(-3);
    hs = t.stride(-2);
  };
  strides(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  strides(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  strides(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  if (out.defined()) strides(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  return p;
}

// Validates cu_seqlens (int32 [batch + 1], non-decreasing, within [0, total], each length <= max_len)
// on the host. Returns true when the sequences cover all `total` rows.
bool check_cu_seqlens(const at::Tensor& cu, const at::Tensor& q, const char* op, const char* name, int64_t total,
                      int64_t max_len, const char* max_name) {
  check_defined(cu, op, name);
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "exaone_ext.", op, ": '", name, "' must be int32, got ",
                   cu.scalar_type());
  check_dim(cu, 1, op, name, "[batch + 1]");
  TORCH_CHECK_VALUE(cu.size(0) >= 1, "exaone_ext.", op, ": '", name, "' must hold at least one offset, got shape ",
                    shape_str(cu.sizes()));
  check_same_device(cu, q, op, name, "q");
  TORCH_CHECK_VALUE(max_len >= 0, "exaone_ext.", op, ": '", max_name, "' must be >= 0, got ", max_len);
  // A device tensor is copied to the host here (one small synchronising copy).
  const at::Tensor h = cu.is_cpu() ? cu.contiguous() : cu.to(at::kCPU).contiguous();
  const int32_t* x = h.const_data_ptr<int32_t>();
  const int64_t n = h.size(0);
  TORCH_CHECK_VALUE(x[0] >= 0 && x[0] <= total, "exaone_ext.", op, ": '", name, "'[0] = ", x[0],
                    " is out of range [0, ", total, "]");
  for (int64_t i = 0; i + 1 < n; ++i) {
    TORCH_CHECK_VALUE(x[i + 1] >= x[i], "exaone_ext.", op, ": '", name, "' must be non-decreasing, but [", i + 1,
                      "] = ", x[i + 1], " < [", i, "] = ", x[i]);
    TORCH_CHECK_VALUE(x[i + 1] <= total, "exaone_ext.", op, ": '", name, "'[", i + 1, "] = ", x[i + 1],
                      " is out of range: the packed tensor has ", total, " rows");
    TORCH_CHECK_VALUE(x[i + 1] - x[i] <= max_len, "exaone_ext.", op, ": sequence ", i, " has length ",
                      x[i + 1] - x[i], " (from '", name, "'), more than ", max_name, " = ", max_len);
  }
  return x[0] == 0 && x[n - 1] == total;
}

void check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_q, const at::Tensor& cu_k,
                  int64_t max_q, int64_t max_k, const char* op, bool& covers_q, bool& covers_k) {
  covers_q = check_cu_seqlens(cu_q, q, op, "cu_seqlens_q", q.size(0), max_q, "max_seqlen_q");
  covers_k = check_cu_seqlens(cu_k, q, op, "cu_seqlens_k", k.size(0), max_k, "max_seqlen_k");
  TORCH_CHECK_VALUE(cu_q.size(0) == cu_k.size(0), "exaone_ext.", op,
                    ": 'cu_seqlens_q' and 'cu_seqlens_k' must have the same length (batch + 1), got ",
                    cu_q.size(0), " and ", cu_k.size(0));
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name, const char* ref_name) {
  check_matches(t, ref, op, name, ref_name);
  TORCH_CHECK_VALUE(t.stride(-1) == 1 || t.numel() == 0, "exaone_ext.", op, ": '", name,
                    "' must have a contiguous last dimension (stride 1), got strides ", shape_str(t.strides()));
}

void check_lse(const at::Tensor& lse, const at::Tensor& q, at::IntArrayRef shape, const char* op) {
  check_defined(lse, op, "lse");
  check_same_device(lse, q, op, "lse", "q");
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "exaone_ext.", op, ": 'lse' must be float32, got ",
                   lse.scalar_type());
  TORCH_CHECK_VALUE(lse.sizes() == shape, "exaone_ext.", op, ": 'lse' must have shape ", shape_str(shape), ", got ",
                    shape_str(lse.sizes()));
  TORCH_CHECK_VALUE(lse.is_contiguous(), "exaone_ext.", op, ": 'lse' must be contiguous");
}

AttnBwdParams fill_bwd(const AttnParams& fwd, const at::Tensor& dout, const at::Tensor& dq, const at::Tensor& dk,
                       const at::Tensor& dv) {
  AttnBwdParams bp;
  bp.fwd = fwd;
  const bool dense = dout.dim() == 4;
  auto strides = [&](const at::Tensor& t, int64_t& bs, int64_t& rs, int64_t& hs) {
    bs = dense ? t.stride(0) : 0;
    rs = t.stride(-3);
    hs = t.stride(-2);
  };
  bp.dout = dout.const_data_ptr();
  strides(dout, bp.do_batch_stride, bp.do_row_stride, bp.do_head_stride);
  bp.dq = dq.data_ptr();
  bp.dk = dk.data_ptr();
  bp.dv = dv.data_ptr();
  strides(dq, bp.dq_batch_stride, bp.dq_row_stride, bp.dq_head_stride);
  strides(dk, bp.dk_batch_stride, bp.dk_row_stride, bp.dk_head_stride);
  strides(dv, bp.dv_batch_stride, bp.dv_row_stride, bp.dv_head_stride);
  return bp;
}

}  // namespace

AttnParams prepare_flash_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                  double softmax_scale, at::Tensor& out, at::Tensor& lse) {
  const char* op = "flash_attn_fwd";
  check_qkv(q, k, v, op, 4);
  check_scale(softmax_scale, op);
  out = at::empty(q.sizes(), q.options());
  lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  AttnParams p = fill(q, k, v, out, causal, softmax_scale, op);
  p.lse = lse.data_ptr<float>();
  p.lse_batch_stride = q.size(2) * q.size(1);
  p.lse_head_stride = q.size(1);
  return p;
}

// Packed sequences: batch and maximal lengths from the (already checked) cu_seqlens. The kernels
// index the offsets densely, so a strided view (e.g. every other element) is copied first; the
// copies live in `offsets`, which the caller keeps alive while the kernels run.
static void set_varlen(AttnParams& p, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                       int64_t max_seqlen_k, VarlenOffsets& offsets) {
  offsets.cu_q = cu_seqlens_q.contiguous();
  offsets.cu_k = cu_seqlens_k.contiguous();
  p.batch = cu_seqlens_q.size(0) - 1;
  p.seq_q = max_seqlen_q;
  p.seq_k = max_seqlen_k;
  p.cu_seqlens_q = offsets.cu_q.const_data_ptr<int32_t>();
  p.cu_seqlens_k = offsets.cu_k.const_data_ptr<int32_t>();
}

AttnParams prepare_flash_attn_varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                         int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                         double softmax_scale, at::Tensor& out, at::Tensor& lse,
                                         VarlenOffsets& offsets) {
  const char* op = "flash_attn_varlen_fwd";
  check_qkv(q, k, v, op, 3);
  check_scale(softmax_scale, op);
  bool covers_q, covers_k;
  check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, op, covers_q, covers_k);
  const auto lse_opts = q.options().dtype(at::kFloat);
  out = covers_q ? at::empty(q.sizes(), q.options()) : at::zeros(q.sizes(), q.options());
  lse = covers_q ? at::empty({q.size(1), q.size(0)}, lse_opts) : at::full({q.size(1), q.size(0)}, -INFINITY, lse_opts);
  AttnParams p = fill(q, k, v, out, causal, softmax_scale, op);
  set_varlen(p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, offsets);
  p.lse = lse.data_ptr<float>();
  p.lse_batch_stride = 0;
  p.lse_head_stride = q.size(0);
  return p;
}

AttnBwdParams prepare_flash_attn_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool causal,
                                     double softmax_scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const char* op = "flash_attn_bwd";
  check_qkv(q, k, v, op, 4);
  check_scale(softmax_scale, op);
  check_like(dout, q, op, "dout", "q");
  check_like(out, q, op, "out", "q");
  check_lse(lse, q, {q.size(0), q.size(2), q.size(1)}, op);
  dq = at::zeros(q.sizes(), q.options());
  dk = at::zeros(k.sizes(), k.options());
  dv = at::zeros(v.sizes(), v.options());
  AttnParams p = fill(q, k, v, out, causal, softmax_scale, op);
  p.lse = const_cast<float*>(lse.const_data_ptr<float>());
  p.lse_batch_stride = q.size(2) * q.size(1);
  p.lse_head_stride = q.size(1);
  return fill_bwd(p, dout, dq, dk, dv);
}

AttnBwdParams prepare_flash_attn_varlen_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                            int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                            double softmax_scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                                            VarlenOffsets& offsets) {
  const char* op = "flash_attn_varlen_bwd";
  check_qkv(q, k, v, op, 3);
  check_scale(softmax_scale, op);
  check_like(dout, q, op, "dout", "q");
  check_like(out, q, op, "out", "q");
  check_lse(lse, q, {q.size(1), q.size(0)}, op);
  bool covers_q, covers_k;
  check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, op, covers_q, covers_k);
  dq = at::zeros(q.sizes(), q.options());
  dk = at::zeros(k.sizes(), k.options());
  dv = at::zeros(v.sizes(), v.options());
  AttnParams p = fill(q, k, v, out, causal, softmax_scale, op);
  set_varlen(p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, offsets);
  p.lse = const_cast<float*>(lse.const_data_ptr<float>());
  p.lse_batch_stride = 0;
  p.lse_head_stride = q.size(0);
  return fill_bwd(p, dout, dq, dk, dv);
}

AttnParams prepare_flash_attn_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                                      const std::optional<at::Tensor>& v_new, bool causal, double softmax_scale,
                                      std::optional<int64_t> cache_seqlens_max, at::Tensor& out,
                                      at::Tensor& seqlens_after) {
  const char* op = "flash_attn_kvcache";
  check_qkv(q, k_cache, v_cache, op, 4, "k_cache", "v_cache");
  check_scale(softmax_scale, op);
  const int64_t batch = q.size(0), max_seq = k_cache.size(1);
  check_defined(cache_seqlens, op, "cache_seqlens");
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt, "exaone_ext.", op,
                   ": 'cache_seqlens' must be int32, got ", cache_seqlens.scalar_type());
  check_same_device(cache_seqlens, q, op, "cache_seqlens", "q");
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == batch, "exaone_ext.", op,
                    ": 'cache_seqlens' must have shape [batch] = [", batch, "], got ",
                    shape_str(cache_seqlens.sizes()));
  const bool has_k = k_new.has_value() && k_new->defined(), has_v = v_new.has_value() && v_new->defined();
  TORCH_CHECK_VALUE(has_k == has_v, "exaone_ext.", op, ": 'k_new' and 'v_new' must be given together");
  int64_t s_new = 0;
  if (has_k) {
    const at::Tensor& kn = *k_new;
    const at::Tensor& vn = *v_new;
    check_dim(kn, 4, op, "k_new", "[batch, seq_new, kv_heads, head_dim]");
    check_same_device(kn, q, op, "k_new", "q");
    check_same_dtype(kn, q, op, "k_new", "q");
    check_same_device(vn, q, op, "v_new", "q");
    check_same_dtype(vn, q, op, "v_new", "q");
    check_same_shape(vn, kn, op, "v_new", "k_new");
    TORCH_CHECK_VALUE(kn.size(0) == batch && kn.size(2) == k_cache.size(2) && kn.size(3) == k_cache.size(3),
                      "exaone_ext.", op, ": 'k_new' must have shape [", batch, ", seq_new, ", k_cache.size(2), ", ",
                      k_cache.size(3), "] (batch of 'q', heads and head_dim of 'k_cache'), got ",
                      shape_str(kn.sizes()));
    s_new = kn.size(1);
  }
  const auto plus_new = [&] {
    return has_k ? " plus the new tokens (" + std::to_string(s_new) + ")" : std::string();
  };
  if (cache_seqlens_max) {
    const int64_t m = *cache_seqlens_max;
    TORCH_CHECK_VALUE(m >= 0, "exaone_ext.", op, ": 'cache_seqlens_max' must be >= 0, got ", m);
    TORCH_CHECK_VALUE(m + s_new <= max_seq, "exaone_ext.", op, ": 'cache_seqlens_max' = ", m, plus_new(),
                      " exceeds max_seq = ", max_seq, " of 'k_cache'");
  }
  // Lengths are read on the host (a device-to-host copy for CUDA tensors) unless CUDA has the
  // caller's bound; then only the kernels read them, clamped to [0, max_seq] (common/attention.h).
  const bool on_host = q.is_cpu() || !cache_seqlens_max;
  at::Tensor lens;
  const int32_t* l = nullptr;
  if (on_host) {
    lens = cache_seqlens.to(at::kCPU).contiguous();
    l = lens.const_data_ptr<int32_t>();
  }
  for (int64_t b = 0; on_host && b < batch; ++b) {
    TORCH_CHECK_VALUE(l[b] >= 0, "exaone_ext.", op, ": 'cache_seqlens'[", b, "] = ", l[b], " is negative");
    TORCH_CHECK_VALUE(int64_t(l[b]) + s_new <= max_seq, "exaone_ext.", op, ": 'cache_seqlens'[", b, "] = ", l[b],
                      plus_new(), " exceeds max_seq = ", max_seq, " of 'k_cache'");
    TORCH_CHECK_VALUE(!cache_seqlens_max || l[b] <= *cache_seqlens_max, "exaone_ext.", op, ": 'cache_seqlens'[", b,
                      "] = ", l[b], " is above 'cache_seqlens_max' = ", cache_seqlens_max.value_or(0));
  }
  if (has_k && s_new > 0 && batch > 0 && q.is_cpu()) {
    // CPU: row by row (a decode step writes one row per sequence; index_put_ costs more than that)
    const int64_t es = q.element_size(), hk = k_cache.size(2), d = k_cache.size(3);
    for (const auto& [cache, fresh] : {std::pair{&k_cache, &*k_new}, std::pair{&v_cache, &*v_new}}) {
      const at::Tensor& c = *cache;
      const at::Tensor& f = *fresh;
      char* cp = static_cast<char*>(c.data_ptr());
      const char* fp = static_cast<const char*>(f.const_data_ptr());
      const bool whole = c.stride(3) == 1 && f.stride(3) == 1 && c.stride(2) == d && f.stride(2) == d;
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t t = 0; t < s_new; ++t) {
          char* dst = cp + (b * c.stride(0) + (l[b] + t) * c.stride(1)) * es;
          const char* src = fp + (b * f.stride(0) + t * f.stride(1)) * es;
          if (whole) {
            std::memcpy(dst, src, hk * d * es);
          } else {
            for (int64_t h = 0; h < hk; ++h)
              for (int64_t x = 0; x < d; ++x)
                std::memcpy(dst + (h * c.stride(2) + x * c.stride(3)) * es, src + (h * f.stride(2) + x * f.stride(3)) * es, es);
          }
        }
    }
  } else if (has_k && s_new > 0 && batch > 0) {
    const auto idx_opts = cache_seqlens.options().dtype(at::kLong);
    at::Tensor pos = cache_seqlens.to(at::kLong).unsqueeze(1) + at::arange(s_new, idx_opts).unsqueeze(0);
    if (!on_host) pos.clamp_(0, max_seq - 1);  // unchecked lengths: never a write outside the caches
    const at::Tensor row = at::arange(batch, idx_opts).unsqueeze(1).expand({batch, s_new});
    k_cache.index_put_(c10::List<std::optional<at::Tensor>>({row, pos}), *k_new);
    v_cache.index_put_(c10::List<std::optional<at::Tensor>>({row, pos}), *v_new);
  }
  if (q.is_cpu()) {
    seqlens_after = at::empty({batch}, cache_seqlens.options().dtype(at::kInt));
    int32_t* la = seqlens_after.data_ptr<int32_t>();
    for (int64_t b = 0; b < batch; ++b) la[b] = int32_t(l[b] + s_new);
  } else {
    seqlens_after = (cache_seqlens + s_new).to(at::kInt).contiguous();
  }
  out = at::empty(q.sizes(), q.options());
  AttnParams p = fill(q, k_cache, v_cache, out, causal, softmax_scale, op);
  p.cache_seqlens = seqlens_after.const_data_ptr<int32_t>();
  return p;
}

}  // namespace exaone_ext
