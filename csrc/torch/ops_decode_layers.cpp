// exaone_ext::decode_layers: the decoder layers of a forward against a KV cache (a decode step, or
// a chunk of a prompt) on the CPU in one call. Each layer is the same sequence of CPU kernels the
// model's Python blocks call through the dispatcher (rms_norm, the q/k/v projections in one
// linear_cat, apply_rope, flash_attn_kvcache writing k/v into the cache, the output projection,
// add_rms_norm, the gate/up projections, swiglu_fused, the down projection and the residual add),
// with the same arguments in the same order: the results are bit for bit the same. What it saves is
// the dispatcher and Python between them (some 100-200 us a layer on a 2-core machine against a
// step of a few ms). CPU only: on a GPU a CUDA graph of the decode step does this job.
//
// weights: per layer, ln_1's weight, ln_2's weight, then the tensors of four projection groups in
// the order q/k/v, out, gate/up, down. layout: per layer and group, three ints: the kind (0 dense:
// `count` weights; 8 int8: `count` qweights then `count` scales; 4 int4: `count` qweights, scales,
// zeros), the count, and int4's group size. eps: ln_1's and ln_2's epsilon per layer.
#include <ATen/ops/add.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "torch/common.h"
#include "torch/cpu_ops.h"

namespace exaone_ext {
namespace {

constexpr const char* kOp = "decode_layers";
constexpr int64_t kGroups = 4;  // q/k/v, out, gate/up, down

struct Projection {
  int64_t kind = 0, count = 0, group = 0;
  std::vector<at::Tensor> a, b, c;  // weights / qweights; scales; zeros
};

at::Tensor project(const at::Tensor& x, const Projection& p) {
  switch (p.kind) {
    case 0: return p.count == 1 ? linear_cpu(x, p.a[0]) : linear_cat_cpu(x, p.a);
    case 8: return p.count == 1 ? linear_int8_cpu(x, p.a[0], p.b[0]) : linear_int8_cat_cpu(x, p.a, p.b);
    default:
      return p.count == 1 ? linear_int4_cpu(x, p.a[0], p.b[0], p.c[0], p.group)
                          : linear_int4_cat_cpu(x, p.a, p.b, p.c, p.group);
  }
}

at::Tensor decode_layers_cpu(const at::Tensor& h_in, at::TensorList weights, at::IntArrayRef layout,
                             at::ArrayRef<double> eps, at::TensorList k_caches, at::TensorList v_caches,
                             const at::Tensor& cache_seqlens, int64_t cache_seqlens_max, const at::Tensor& cos,
                             const at::Tensor& sin, const at::Tensor& position_ids, int64_t position_ids_max,
                             int64_t num_heads, int64_t num_kv_heads, double softmax_scale) {
  const int64_t layers = int64_t(k_caches.size());
  TORCH_CHECK_VALUE(int64_t(v_caches.size()) == layers, "exaone_ext.", kOp, ": 'v_caches' must hold as many tensors "
                    "as 'k_caches' (", layers, "), got ", v_caches.size());
  TORCH_CHECK_VALUE(int64_t(layout.size()) == 3 * kGroups * layers, "exaone_ext.", kOp, ": 'layout' must hold ",
                    3 * kGroups, " ints per layer (", 3 * kGroups * layers, " for ", layers, " layers), got ",
                    layout.size());
  TORCH_CHECK_VALUE(int64_t(eps.size()) == 2 * layers, "exaone_ext.", kOp, ": 'eps' must hold 2 values per layer (",
                    2 * layers, "), got ", eps.size());
  TORCH_CHECK_VALUE(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0, "exaone_ext.", kOp,
                    ": 'num_heads' must be a positive multiple of 'num_kv_heads', got ", num_heads, " and ",
                    num_kv_heads);
  TORCH_CHECK_VALUE(h_in.dim() == 3, "exaone_ext.", kOp, ": 'h' must be [batch, seq, hidden], got shape ",
                    shape_str(h_in.sizes()));
  // the whole layout (and the tensor count it implies) is checked before any layer runs: nothing
  // is written into a cache for a call that is going to fail on its arguments
  int64_t need = 2 * layers;
  for (int64_t i = 0; i < kGroups * layers; ++i) {
    const int64_t kind = layout[3 * i], count = layout[3 * i + 1];
    TORCH_CHECK_VALUE(kind == 0 || kind == 8 || kind == 4, "exaone_ext.", kOp, ": layout entry ", i,
                      ": kind must be 0 (dense), 8 (int8) or 4 (int4), got ", kind);
    TORCH_CHECK_VALUE(count > 0, "exaone_ext.", kOp, ": layout entry ", i, ": count must be positive, got ", count);
    need += count * (kind == 0 ? 1 : kind == 8 ? 2 : 3);
  }
  TORCH_CHECK_VALUE(int64_t(weights.size()) == need, "exaone_ext.", kOp, ": 'layout' describes ", need,
                    " weight tensors, 'weights' holds ", weights.size());
  const int64_t b = h_in.size(0), s = h_in.size(1), hq = num_heads, hk = num_kv_heads;
  const std::optional<int64_t> pos_max = position_ids_max >= 0 ? std::optional<int64_t>(position_ids_max) : std::nullopt;
  size_t w = 0;
  at::Tensor h = h_in;
  std::vector<Projection> proj(kGroups);
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor& ln1 = weights[w++];
    const at::Tensor& ln2 = weights[w++];
    for (int64_t g = 0; g < kGroups; ++g) {
      Projection& p = proj[g];
      const int64_t* e = layout.data() + 3 * (l * kGroups + g);
      p.kind = e[0], p.count = e[1], p.group = e[2];
      p.a.assign(weights.begin() + w, weights.begin() + w + p.count);
      w += p.count;
      if (p.kind != 0) {
        p.b.assign(weights.begin() + w, weights.begin() + w + p.count);
        w += p.count;
      }
      if (p.kind == 4) {
        p.c.assign(weights.begin() + w, weights.begin() + w + p.count);
        w += p.count;
      }
    }
    // attention: h + out_proj(attention(rope(q), rope(k), v over the cache))
    const at::Tensor x = std::get<0>(rms_norm_cpu(h, ln1, eps[2 * l]));
    const at::Tensor qkv = project(x, proj[0]);
    TORCH_CHECK_VALUE(qkv.size(-1) % (hq + 2 * hk) == 0, "exaone_ext.", kOp, ": layer ", l, ": the q/k/v projections "
                      "give ", qkv.size(-1), " features, not a multiple of num_heads + 2 * num_kv_heads (", hq + 2 * hk, ")");
    const int64_t hd = qkv.size(-1) / (hq + 2 * hk);
    const std::vector<at::Tensor> parts = qkv.view({b, s, hq + 2 * hk, hd}).split_with_sizes({hq, hk, hk}, 2);
    auto [q, k] = apply_rope_cpu(parts[0], parts[1], cos, sin, position_ids, false, pos_max);
    const at::Tensor out = flash_attn_kvcache_cpu(q, k_caches[l], v_caches[l], cache_seqlens, k, parts[2], true,
                                                  softmax_scale, cache_seqlens_max);
    const at::Tensor a = project(out.reshape({b, s, hq * hd}), proj[1]);
    // MLP: h + down(swiglu(gate/up(rms_norm(h))))
    auto [y, h2, rstd] = add_rms_norm_cpu(a, h, ln2, eps[2 * l + 1]);
    (void)rstd;
    const at::Tensor m = swiglu_fused_cpu(project(y, proj[2]));
    h = at::add(h2, project(m, proj[3]));
  }
  return h;
}

}  // namespace
}  // namespace exaone_ext

TORCH_LIBRARY_FRAGMENT(exaone_ext, m) {
  m.def("decode_layers(Tensor h, Tensor[] weights, int[] layout, float[] eps, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, "
        "Tensor cache_seqlens, int cache_seqlens_max, Tensor cos, Tensor sin, Tensor position_ids, "
        "int position_ids_max, int num_heads, int num_kv_heads, float softmax_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(exaone_ext, CPU, m) { m.impl("decode_layers", &exaone_ext::decode_layers_cpu); }
