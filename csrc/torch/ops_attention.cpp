// exaone_ext flash-attention ops: schemas and the CPU implementations. The checks, allocations and
// parameter filling live in torch/attention.cpp (shared with the CUDA registration); here the work
// is cut into items and spread over ATen's threads, then the ISA-dispatched kernels run.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "cpu/attention.h"
#include "torch/attention.h"
#include "torch/brgemm.h"
#include "torch/common.h"
#include "torch/cpu_ops.h"

namespace exaone_ext {
namespace {

// ---- the bfloat16 tile products: the kernels' own, or oneDNN's brgemm (torch/brgemm.h) -----------
// -1: the default (on where the CPU has AMX-BF16; the forward also on AMD Zen 5+: torch/brgemm.h),
// 0: off, 1: on wherever brgemm works.
std::atomic<int> g_brgemm{-1};

bool brgemm_on(bool forward) { return brgemm_allowed(g_brgemm.load(std::memory_order_relaxed), forward); }

// The engine for p's bf16 tile products (null: the kernels' own), chosen once per call.
void set_bf16_engine(AttnParams& p, bool forward) {
  p.bf16_gemm = p.dtype == DType::kBFloat16 && brgemm_on(forward) ? &brgemm_bf16 : nullptr;
}

// Runs n items over ATen's threads, each thread pulling the next item (the caller orders them so
// that the cheap ones come last). The result never depends on which thread ran an item. A thread
// that ran brgemm hands back its hardware context (AMX tile configuration) when done.
std::atomic<bool> g_poison_scratch{false};

template <typename F>
void run_items(int64_t n, int64_t scratch_bytes, const F& f, bool brgemm = false) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  const bool poison = g_poison_scratch.load(std::memory_order_relaxed);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::unique_ptr<char[]> scratch(new char[scratch_bytes]);
    // all-ones bytes are NaN in float, bfloat16 and float64: a read of scratch the kernel never
    // wrote then shows in the result instead of passing with whatever the allocator left there
    if (poison) std::memset(scratch.get(), 0xff, size_t(scratch_bytes));
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) f(t, scratch.get());
    if (brgemm) brgemm_release();
  });
}

void fwd_kernel(const AttnParams& p, int64_t b, int64_t kvh, int64_t q0, int64_t q1, int64_t k0, int64_t k1,
                float* part_out, float* part_lse, void* scratch) {
  if (p.dtype == DType::kFloat64) {
    cpu::scalar::attn_fwd_block(p, b, kvh, q0, q1, k0, k1, part_out, part_lse, scratch);
  } else {
    EXAONE_CPU_DISPATCH(attn_fwd_block, p, b, kvh, q0, q1, k0, k1, part_out, part_lse, scratch);
  }
}

// The rows of one head of k / v (and q / dout) are kv_heads * head_dim elements apart in the
// [.., seq, heads, head_dim] layout: tiles read from there alias in the cache sets and defeat the
// prefetchers, and every query block reads them again. A head-major copy ([.., heads, seq, d], one
// pass over the tensor, negligible next to the O(seq^2) work) makes every tile contiguous.
at::Tensor heads_major(const at::Tensor& t) { return t.transpose(-2, -3).contiguous(); }

void point_at(const at::Tensor& t, bool dense, const void*& ptr, int64_t& bs, int64_t& rs, int64_t& hs) {
  ptr = t.const_data_ptr();
  bs = dense ? t.stride(0) : 0;
  rs = t.stride(-2);
  hs = t.stride(-3);
}

// Head-major copies of k and v (v_too false: k only; the forward's O^T path reads V^T, and its
// narrow blocks the few V rows they need in place), kept alive by the returned tensors, with p
// pointing at them.
std::pair<at::Tensor, at::Tensor> use_heads_major_kv(AttnParams& p, const at::Tensor& k, const at::Tensor& v,
                                                     bool v_too = true) {
  if (p.kv_heads <= 1 || k.numel() == 0) return {};
  const bool dense = k.dim() == 4;
  at::Tensor kh = heads_major(k), vh;
  point_at(kh, dense, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  if (v_too) {
    vh = heads_major(v);
    point_at(vh, dense, p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  }
  return {kh, vh};
}

// With brgemm on bfloat16 (set_bf16_engine first): v transposed per kv head for the forward's wide
// blocks (AttnParams::vt), [.., kv_heads, head_dim, keys] with keys contiguous; the rows are padded
// so that they are not a multiple of 4 KiB apart (the product reads head_dim of them at once, which
// would all fall in the same cache sets). One pass over v, next to the O(seq^2) products.
// `keys`: the leading keys of v that are read (a KV cache's filled rows), -1 all.
at::Tensor use_transposed_v(AttnParams& p, const at::Tensor& v, int64_t keys = -1) {
  if (!p.bf16_gemm || p.dtype != DType::kBFloat16 || v.numel() == 0) return {};
  const bool dense = v.dim() == 4;
  keys = keys < 0 ? v.size(-3) : std::min(keys, v.size(-3));
  if (keys == 0) return {};
  const int64_t padded = (keys + 63) / 64 * 64 + 32;
  const int64_t batch = dense ? v.size(0) : 1, d = p.head_dim;
  at::Tensor vt = dense ? at::empty({batch, p.kv_heads, d, padded}, v.options())
                        : at::empty({p.kv_heads, d, padded}, v.options());
  p.vt = vt.const_data_ptr();
  p.vt_batch_stride = dense ? vt.stride(0) : 0;
  p.vt_head_stride = vt.stride(-3);
  p.vt_dim_stride = vt.stride(-2);
  // Transposed in tiles of 32 keys x head_dim (a tile of v rows stays in L1 while its columns are
  // written out as 64-byte runs): at::copy_ of the permuted view gathers one element per cache line
  // of v, several times slower at head dim 128.
  const uint16_t* src = static_cast<const uint16_t*>(v.const_data_ptr());
  uint16_t* dst = static_cast<uint16_t*>(vt.data_ptr());
  const int64_t vbs = dense ? v.stride(0) : 0, vrs = v.stride(-3), vhs = v.stride(-2);
  constexpr int64_t kTile = 32;
  const int64_t tiles = (keys + kTile - 1) / kTile, heads = batch * p.kv_heads;
  at::parallel_for(0, heads * tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / tiles, j0 = t % tiles * kTile, b = bh / p.kv_heads, h = bh % p.kv_heads;
      const int64_t nj = std::min(kTile, keys - j0);
      const uint16_t* s = src + b * vbs + h * vhs + j0 * vrs;
      uint16_t* o = dst + b * p.vt_batch_stride + h * p.vt_head_stride + j0;
      for (int64_t x = 0; x < d; ++x)
        for (int64_t j = 0; j < nj; ++j) o[x * p.vt_dim_stride + j] = s[j * vrs + x];
    }
  });
  return vt;
}

// Query positions from which a KV-cache call (chunked prefill) transposes V for the O^T path.
constexpr int64_t kVtMinQueries = 64;

struct FwdItem {
  int64_t b, kvh, q0, q1, k0, k1, split;
  double cost;
};

// Sequence lengths (len_q, len_k) of every sequence, read on the host.
std::vector<std::pair<int64_t, int64_t>> seq_lengths(const AttnParams& p, int64_t batch) {
  std::vector<std::pair<int64_t, int64_t>> out(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const SeqRange r = seq_range(p, b);
    out[b] = {r.len_q, r.len_k};
  }
  return out;
}

// Forward over (sequence, kv head, query block[, key split]). With nsplit > 1 the key range is cut
// into nsplit parts whose partial results go to part_out / part_lse (split s at offset s * part_size).
void run_fwd(AttnParams p, int64_t batch, int64_t nsplit, int64_t split_keys, float* part_out,
             float* part_lse, int64_t part_size) {
  if (batch == 0 || p.q_heads == 0) return;
  set_bf16_engine(p, true);
  if (!p.bf16_gemm) p.vt = nullptr;
  const int64_t g = p.group(), bq = cpu::attn_block_q(g);
  const auto lens = seq_lengths(p, batch);
  std::vector<FwdItem> items;
  for (int64_t b = 0; b < batch; ++b) {
    const auto [lq, lk] = lens[b];
    for (int64_t q0 = 0; q0 < lq; q0 += bq) {
      const int64_t q1 = std::min(q0 + bq, lq);
      const int64_t kend = p.causal ? causal_key_end(q1 - 1, lq, lk) : lk;
      for (int64_t s = 0; s < nsplit; ++s) {
        const int64_t k0 = nsplit > 1 ? s * split_keys : 0, k1 = nsplit > 1 ? (s + 1) * split_keys : lk;
        const double cost = double(q1 - q0) * double(std::max<int64_t>(0, std::min(k1, kend) - k0) + 16);
        for (int64_t h = 0; h < p.kv_heads; ++h) items.push_back({b, h, q0, q1, k0, k1, s, cost});
      }
    }
  }
  // The items of one (sequence, kv head) run one after another, longest first: the threads then
  // share that head's keys and values while they are in cache (item by item across all heads, each
  // item found its K / V evicted by the other heads': one thread on a causal 2048 forward ran at
  // 51 against 67 GFLOP/s). Heads with the most work go first, so the last items are the cheapest.
  std::vector<double> head_cost(size_t(batch * p.kv_heads), 0.0);
  for (const FwdItem& it : items) head_cost[size_t(it.b * p.kv_heads + it.kvh)] += it.cost;
  std::stable_sort(items.begin(), items.end(), [&](const FwdItem& a, const FwdItem& b) {
    const size_t ga = size_t(a.b * p.kv_heads + a.kvh), gb = size_t(b.b * p.kv_heads + b.kvh);
    if (ga != gb) return head_cost[ga] != head_cost[gb] ? head_cost[ga] > head_cost[gb] : ga < gb;
    return a.cost > b.cost;
  });
  run_items(int64_t(items.size()), cpu::attn_scratch_bytes(g, p.head_dim), [&](int64_t t, void* scratch) {
    const FwdItem& it = items[t];
    float* po = part_out ? part_out + it.split * part_size * p.head_dim : nullptr;
    float* pl = part_out ? part_lse + it.split * part_size : nullptr;
    fwd_kernel(p, it.b, it.kvh, it.q0, it.q1, it.k0, it.k1, po, pl, scratch);
  }, p.bf16_gemm != nullptr);
}

// Backward: items (sequence, kv head, split); split s owns query blocks s, s + nsplit, ... (writes
// their dq) and adds its share of dK / dV into its own float accumulators [nsplit, kv_heads, rows_k, d];
// the accumulators are summed in split order afterwards (deterministic, no atomics).
void run_bwd(AttnBwdParams bp, int64_t batch, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& dout, const at::Tensor& out, at::Tensor& dk, at::Tensor& dv) {
  set_bf16_engine(bp.fwd, false);
  const AttnParams& p = bp.fwd;
  if (batch == 0 || p.q_heads == 0 || dout.numel() == 0 || dk.numel() == 0) return;
  const auto keep_kv = use_heads_major_kv(bp.fwd, k, v);
  const bool dbl = p.dtype == DType::kFloat64;
  const auto acc = dbl ? at::kDouble : at::kFloat;
  const int64_t rows_k = dk.numel() / (p.kv_heads * p.head_dim);
  const int64_t g = p.group(), bq = cpu::attn_block_q(g);
  const auto lens = seq_lengths(p, batch);
  int64_t pairs = 0, max_blocks = 1;
  for (const auto& [lq, lk] : lens) {
    if (lq > 0 && lk > 0) pairs += p.kv_heads;
    max_blocks = std::max(max_blocks, (lq + bq - 1) / bq);
  }
  const int64_t threads = at::get_num_threads();
  const int64_t want = pairs >= 2 * threads ? 1 : (2 * threads + pairs - 1) / std::max<int64_t>(pairs, 1);
  const int64_t nsplit = std::clamp<int64_t>(want, 1, max_blocks);
  const auto acc_opts = dk.options().dtype(acc);
  at::Tensor dk_acc = at::zeros({nsplit, p.kv_heads, rows_k, p.head_dim}, acc_opts);
  at::Tensor dv_acc = at::zeros({nsplit, p.kv_heads, rows_k, p.head_dim}, acc_opts);
  struct Item { int64_t b, kvh, s; double cost; };
  std::vector<Item> items;
  for (int64_t b = 0; b < batch; ++b) {
    const auto [lq, lk] = lens[b];
    if (lq == 0 || lk == 0) continue;
    for (int64_t h = 0; h < p.kv_heads; ++h)
      for (int64_t s = 0; s < nsplit; ++s) items.push_back({b, h, s, double(lq) * double(lk)});
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  char* dk_base = static_cast<char*>(dk_acc.data_ptr());
  char* dv_base = static_cast<char*>(dv_acc.data_ptr());
  const int64_t slab = rows_k * p.head_dim * dk_acc.element_size();  // one (split, kv head)
  run_items(int64_t(items.size()), cpu::attn_scratch_bytes(g, p.head_dim), [&](int64_t t, void* scratch) {
    const Item& it = items[t];
    const int64_t off = (it.s * p.kv_heads + it.kvh) * slab;
    if (dbl) {
      cpu::scalar::attn_bwd_rows(bp, dk_base + off, dv_base + off, it.b, it.kvh, it.s, nsplit, scratch);
    } else {
      EXAONE_CPU_DISPATCH(attn_bwd_rows, bp, dk_base + off, dv_base + off, it.b, it.kvh, it.s, nsplit, scratch);
    }
  }, p.bf16_gemm != nullptr);
  // [kv_heads, rows_k, d] -> [rows_k, kv_heads, d] -> the shape of dk / dv
  auto finish = [&](at::Tensor& acc_t, at::Tensor& grad, double mul) {
    const at::Tensor total = (nsplit == 1 ? acc_t[0] : acc_t.sum(0)).permute({1, 0, 2});
    at::Tensor view = grad.view({rows_k, p.kv_heads, p.head_dim});  // grad is contiguous
    if (mul != 1.0) {
      at::mul_out(view, total, at::scalar_tensor(mul, total.options()));  // one pass: scale, transpose, cast
    } else {
      view.copy_(total);
    }
  };
  finish(dk_acc, dk, dbl ? p.scale_f64 : double(p.scale));
  finish(dv_acc, dv, 1.0);
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      bool causal, double softmax_scale) {
  at::Tensor out, lse;
  AttnParams p = prepare_flash_attn_fwd(q, k, v, causal, softmax_scale, out, lse);
  set_bf16_engine(p, true);
  const at::Tensor keep_vt = use_transposed_v(p, v);
  const auto keep = use_heads_major_kv(p, k, v, /*v_too=*/!p.vt);
  run_fwd(p, p.batch, 1, 0, nullptr, nullptr, 0);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> flash_attn_varlen_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                             const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                             int64_t max_seqlen_k, bool causal, double softmax_scale) {
  at::Tensor out, lse;
  VarlenOffsets offsets;
  AttnParams p = prepare_flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                               causal, softmax_scale, out, lse, offsets);
  set_bf16_engine(p, true);
  const at::Tensor keep_vt = use_transposed_v(p, v);
  const auto keep = use_heads_major_kv(p, k, v, /*v_too=*/!p.vt);
  run_fwd(p, p.batch, 1, 0, nullptr, nullptr, 0);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_cpu(const at::Tensor& dout, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  bool causal, double softmax_scale) {
  at::Tensor dq, dk, dv;
  const AttnBwdParams bp = prepare_flash_attn_bwd(dout, q, k, v, out, lse, causal, softmax_scale, dq, dk, dv);
  run_bwd(bp, bp.fwd.batch, q, k, v, dout, out, dk, dv);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_varlen_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double softmax_scale) {
  at::Tensor dq, dk, dv;
  VarlenOffsets offsets;
  const AttnBwdParams bp = prepare_flash_attn_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                         max_seqlen_q, max_seqlen_k, causal, softmax_scale, dq, dk, dv,
                                                         offsets);
  run_bwd(bp, bp.fwd.batch, q, k, v, dout, out, dk, dv);
  return {dq, dk, dv};
}

// Split-KV combine (both kv-cache paths) by SplitLse (common/attention.h), from float partials
// part_out [nsplit][rows][d] and part_lse [nsplit][rows]. out is fresh and contiguous
// [batch, seq_q, q_heads, d] = [rows, d].
void combine_splits(const float* part_out, const float* part_lse, int64_t nsplit, int64_t rows, int64_t d,
                    at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "combine_splits", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      std::vector<float> acc(static_cast<size_t>(d));
      for (int64_t r = r0; r < r1; ++r) {
        const SplitLse c = SplitLse::of(part_lse + r, static_cast<int>(nsplit), rows);
        std::fill(acc.begin(), acc.end(), c.init());
        if (c.any())
          for (int64_t sp = 0; sp < nsplit; ++sp) {
            const float w = c.weight(part_lse[sp * rows + r]);
            const float* src = part_out + (sp * rows + r) * d;
            for (int64_t x = 0; x < d; ++x) acc[x] += w * src[x];
          }
        for (int64_t x = 0; x < d; ++x) o[r * d + x] = static_cast<scalar_t>(acc[x]);
      }
    });
  });
}

// The decode kernels (cpu/attention.h, attn_decode*): few query rows per kv head, read the cache
// once over all kv heads per item. AVX512-BF16 for bfloat16 where the CPU has it and avx512 is
// active; AVX2 + FMA for float32 / bfloat16 / float16 on any CPU with avx2 or avx512 active.
// set_attn_decode(false) leaves every call to the general kernel (tests, comparisons).
std::atomic<bool> g_decode{true};
std::atomic<bool> g_decode_thread_ranges{true};

using DecodeFn = void (*)(const AttnParams&, int64_t, int64_t, int64_t, float*, float*, void*);
struct DecodeKernel {
  DecodeFn fn = nullptr;
  int64_t scratch = 0;
};

DecodeKernel decode_kernel(const AttnParams& p) {
  if (!g_decode.load(std::memory_order_relaxed) || !cpu::attn_decode_rows_ok(p.seq_q, p.group())) return {};
#if defined(EXAONE_HAVE_AVX512BF16)
  if (cpu::avx512bf16_allowed() && cpu::active_isa() == cpu::Isa::kAvx512 && p.dtype == DType::kBFloat16 && p.head_dim % 16 == 0 &&
      p.k_row_stride % 2 == 0 && p.v_row_stride % 2 == 0 && p.k_head_stride % 2 == 0 && p.v_head_stride % 2 == 0)
    return {cpu::avx512bf16::attn_decode, cpu::attn_decode_scratch_bytes(p)};
#endif
#if defined(EXAONE_HAVE_AVX2)
  if (cpu::active_isa() >= cpu::Isa::kAvx2 && cpu::attn_decode_avx2_ok(p))
    return {cpu::avx2::attn_decode, cpu::attn_decode_avx2_scratch_bytes(p)};
#endif
  return {};
}

// Items (sequence, key range), each over all kv heads. Ranges are multiples of the kernel's key
// block, about 8 per thread over the longest sequence (so a delayed thread's share is small) and at
// least 256 keys, or one per thread for caches too short for that (see kDecodeMinRangeElems); with
// more than one range per sequence the partial rows are combined with their LSEs.
//
// kDecodeMinRangeElems: the least cache a range of its own must hold (keys x kv heads x head dim)
// for a second thread to pay for the partial rows and their combination. Measured on a 2-core Zen 2
// (AVX2), batch 1, bf16, one range against two: 32 q / 8 kv heads, head dim 80, 161 cached keys
// 58 -> 44 us, 201 keys 68 -> 53, 257 keys 94 -> 66, while 97 and 129 keys (a last range of 33) were
// no faster: 64 keys of 8 x 80. With 2 kv heads a step of a 30-layer model was slower split at 200
// keys (the same rule in keys), which the rule in elements leaves to one thread there.
constexpr int64_t kDecodeMinRangeElems = 64 * 8 * 80;
void run_decode(const AttnParams& p, const DecodeKernel& kernel, at::Tensor& out) {
  const int64_t batch = p.batch, threads = at::get_num_threads();
  int64_t max_len = 0;
  for (int64_t b = 0; b < batch; ++b) max_len = std::max<int64_t>(max_len, p.cache_seqlens[b]);
  constexpr int64_t blk = cpu::kAttnDecodeBlockKeys;
  const int64_t want = std::max<int64_t>(1, (8 * threads + batch - 1) / batch);
  auto blocks_of = [&](int64_t keys) { return std::max<int64_t>(blk, (keys + blk - 1) / blk * blk); };
  int64_t range = blocks_of(std::max<int64_t>(256, (max_len + want - 1) / want));
  int64_t nsplit = std::max<int64_t>(1, (max_len + range - 1) / range);
  // Fewer ranges than threads (a short cache, a small batch): one range per thread instead, where the
  // last still holds kDecodeMinRangeElems. Either way a sequence's ranges are of equal length (to
  // the key block), where 257 keys used to be cut into 256 + 1.
  const int64_t per = (threads + batch - 1) / batch;
  const int64_t last = max_len - (per - 1) * blocks_of((max_len + per - 1) / per);
  if (nsplit < per && last * p.kv_heads * p.head_dim >= kDecodeMinRangeElems &&
      g_decode_thread_ranges.load(std::memory_order_relaxed))
    nsplit = per;
  range = blocks_of((max_len + nsplit - 1) / nsplit);
  nsplit = std::max<int64_t>(1, (max_len + range - 1) / range);
  const int64_t rows = batch * p.seq_q * p.q_heads, d = p.head_dim;
  if (nsplit == 1) {
    run_items(batch, kernel.scratch, [&](int64_t b, void* s) { kernel.fn(p, b, 0, max_len, nullptr, nullptr, s); });
    return;
  }
  std::vector<float> part_out(static_cast<size_t>(nsplit * rows * d)), part_lse(static_cast<size_t>(nsplit * rows));
  // split-major items: concurrent threads read neighbouring stretches of the same sequence
  run_items(nsplit * batch, kernel.scratch, [&](int64_t t, void* s) {
    const int64_t sp = t / batch, b = t % batch;
    kernel.fn(p, b, sp * range, (sp + 1) * range, part_out.data() + sp * rows * d, part_lse.data() + sp * rows, s);
  });
  combine_splits(part_out.data(), part_lse.data(), nsplit, rows, d, out);
}

}  // namespace

at::Tensor flash_attn_kvcache_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                                  const std::optional<at::Tensor>& v_new, bool causal, double softmax_scale,
                                  std::optional<int64_t> cache_seqlens_max) {
  at::Tensor out, lens;
  AttnParams p = prepare_flash_attn_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal,
                                            softmax_scale, cache_seqlens_max, out, lens);
  const int64_t batch = p.batch;
  if (batch == 0 || p.seq_q == 0) return out;
  if (const DecodeKernel kernel = decode_kernel(p); kernel.fn) {
    run_decode(p, kernel, out);
    return out;
  }
  // Split-KV ("flash-decoding"): long caches are cut into key ranges of kSplitKeys; every
  // (sequence, kv head, query block, range) is an item, and items of one range run next to each
  // other (heads innermost) so that concurrent threads stream neighbouring cache memory, whatever
  // the number of sequences and heads. The partial results are combined with their LSEs. The
  // partial buffers are capped at ~32 MiB (long chunked prefills split less: they are compute-bound
  // and have enough query blocks to share out).
  constexpr int64_t kSplitKeys = 512;
  int64_t max_len = 0;
  for (int64_t b = 0; b < batch; ++b) max_len = std::max<int64_t>(max_len, p.cache_seqlens[b]);
  // A chunked prefill (many query rows against the cache) takes the forward's O^T path on brgemm
  // like a dense call: V^T of the filled rows, one pass over them, against seq_q times as much work.
  at::Tensor keep_vt;
  if (p.seq_q >= kVtMinQueries) {
    set_bf16_engine(p, true);
    keep_vt = use_transposed_v(p, v_cache, max_len);
  }
  const int64_t part_floats = batch * p.seq_q * p.q_heads * (p.head_dim + 1);
  const int64_t max_splits = std::max<int64_t>(1, (int64_t(32) << 20) / 4 / std::max<int64_t>(part_floats, 1));
  int64_t nsplit = std::min((max_len + kSplitKeys - 1) / kSplitKeys, max_splits);
  if (p.dtype == DType::kFloat64) nsplit = 1;  // float64 (tests) stays exact: partials are float
  if (nsplit <= 1) {  // 0 when every row is empty: each query row then sees no key (zeros)
    run_fwd(p, batch, 1, 0, nullptr, nullptr, 0);
    return out;
  }
  const int64_t split_keys = ((max_len + nsplit - 1) / nsplit + cpu::kAttnBlockK - 1) / cpu::kAttnBlockK * cpu::kAttnBlockK;
  nsplit = (max_len + split_keys - 1) / split_keys;
  const auto fopts = q.options().dtype(at::kFloat);
  at::Tensor part_out = at::empty({nsplit, batch, p.seq_q, p.q_heads, p.head_dim}, fopts);
  at::Tensor part_lse = at::empty({nsplit, batch, p.seq_q, p.q_heads}, fopts);
  const int64_t rows = batch * p.seq_q * p.q_heads;
  run_fwd(p, batch, nsplit, split_keys, part_out.data_ptr<float>(), part_lse.data_ptr<float>(), rows);
  combine_splits(part_out.data_ptr<float>(), part_lse.data_ptr<float>(), nsplit, rows, p.head_dim, out);
  return out;
}

bool set_attn_decode(bool enabled) { return g_decode.exchange(enabled); }
bool set_attn_decode_thread_ranges(bool enabled) { return g_decode_thread_ranges.exchange(enabled); }

bool set_attn_poison_scratch(bool enabled) { return g_poison_scratch.exchange(enabled); }

int set_attn_brgemm(int mode) { return g_brgemm.exchange(brgemm_mode(mode)); }

std::string attn_bf16_products() {
  const bool fwd = brgemm_on(true), bwd = brgemm_on(false);
  if (fwd && bwd) return brgemm_engine_name();
  if (fwd) return std::string(brgemm_engine_name()) + " forward, avx512bf16 backward";
#if defined(EXAONE_HAVE_AVX512)
  if (cpu::active_isa() == cpu::Isa::kAvx512 && cpu::avx512bf16_allowed()) return "avx512bf16";
#endif
  return "float32";
}

std::string attn_decode_kernels() {
  if (!g_decode.load()) return "general (decode kernels off)";
  std::string bf16 = "general", other = "general";
#if defined(EXAONE_HAVE_AVX2)
  if (cpu::active_isa() >= cpu::Isa::kAvx2) bf16 = other = "avx2";
#endif
#if defined(EXAONE_HAVE_AVX512BF16)
  if (cpu::avx512bf16_allowed() && cpu::active_isa() == cpu::Isa::kAvx512) bf16 = "avx512bf16";
#endif
  return "bfloat16: " + bf16 + ", float32 / float16: " + other;
}
}  // namespace exaone_ext

TORCH_LIBRARY_FRAGMENT(exaone_ext, m) {
  m.def("flash_attn_fwd(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale) -> (Tensor out, Tensor lse)");
  m.def(
      "flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
      "float softmax_scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "flash_attn_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, bool causal, float softmax_scale) -> (Tensor out, Tensor lse)");
  m.def(
      "flash_attn_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, "
      "float softmax_scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "flash_attn_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, "
      "Tensor? k_new, Tensor? v_new, bool causal, float softmax_scale, int? cache_seqlens_max=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(exaone_ext, CPU, m) {
  m.impl("flash_attn_fwd", &exaone_ext::flash_attn_fwd_cpu);
  m.impl("flash_attn_bwd", &exaone_ext::flash_attn_bwd_cpu);
  m.impl("flash_attn_varlen_fwd", &exaone_ext::flash_attn_varlen_fwd_cpu);
  m.impl("flash_attn_varlen_bwd", &exaone_ext::flash_attn_varlen_bwd_cpu);
  m.impl("flash_attn_kvcache", &exaone_ext::flash_attn_kvcache_cpu);
}
