// The device-independent half of exaone_ext::linear: argument checks and the output shape.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace exaone_ext {
// Checks x [..., in] and weight [out, in] (same device and dtype); returns x's shape with the last
// dimension replaced by out.
std::vector<int64_t> check_linear(const at::Tensor& x, const at::Tensor& weight);

// Checks x [..., in] and weights [out_i, in] (at least one; same device and dtype as x); returns x's
// shape with the last dimension replaced by sum(out_i).
std::vector<int64_t> check_linear_cat(const at::Tensor& x, const std::vector<at::Tensor>& weights);

// Whether bfloat16 calls may use the AVX512-BF16 kernel (when built and the CPU has it); for tests
// and comparisons. Returns the previous setting.
bool set_linear_bf16_dot(bool enabled);
// Whether several rows of x against bfloat16 weights may take the AVX2 pair-order tiles
// (LinearArgs::x_pairs); for tests and comparisons. Returns the previous setting.
bool set_linear_bf16_pairs(bool enabled);
// Whether 16-64 rows of x against bfloat16 weights go through oneDNN's brgemm (AMX tiles where the
// CPU has them): 1 wherever brgemm works (AVX-512; the default), -1 where the CPU has AMX-BF16, 0
// never; returns the previous mode. linear_bf16_rows_engine: what such a call runs on, in words.
int set_linear_brgemm(int mode);
std::string linear_bf16_rows_engine();
// Rows of bfloat16 x that take brgemm (linear, and the quantized linears' dequantised tiles):
// [kBrgemmMinRows, kBrgemmMaxRows]. linear_brgemm_rows: whether m rows of k go through it now (the
// range, an even k, the switch and the CPU).
inline constexpr int64_t kBrgemmMinRows = 16;
inline constexpr int64_t kBrgemmMaxRows = 64;
// Where the CPU has AMX-BF16 the 16-bit-weight linear starts brgemm at kBrgemmMinRowsAmx rows (its
// tiles then beat the streaming kernel from 5-6 rows); the quantized linears keep kBrgemmMinRows.
inline constexpr int64_t kBrgemmMinRowsAmx = 6;
bool linear_brgemm_rows(int64_t m, int64_t k, int64_t min_rows = kBrgemmMinRows);
// The first row count of bfloat16 x that takes brgemm in ops.linear on this CPU.
int64_t linear_brgemm_min_rows();

// A 2-D weight whose rows have a unit last stride and do not overlap: as it is, else a contiguous copy.
inline at::Tensor weight_rows_of(const at::Tensor& t) {
  return t.stride(1) == 1 && t.stride(0) >= t.size(1) ? t : t.contiguous();
}

// Whether this CPU's library matmul (oneDNN) multiplies bfloat16 / float16 with instructions made for
// them (AVX512-BF16 or AMX-BF16; AVX512-FP16). Where it does not, it runs at a fraction of its
// float32 rate (a quarter on a Zen 3 core), and many-row products go through float32 tiles.
bool cpu_native_16bit_matmul(at::ScalarType dtype);

// The weight-streaming ops' work plan (linear, linear_cat, the quantized linears): each weight's
// output features cut into chunks of whole blocks of block_rows features (never across two
// weights), to be handed out to the threads one at a time, so that a thread delayed by the OS (a
// shared machine) leaves its share to the others. Chunk sizes shrink as the work runs out (a
// quarter of what is left per thread, between 128 KiB and 8 MiB of weight): large chunks first,
// since every chunk start costs a stream restart (its first block is not prefetched; on the
// lm_head, 524 MB, 256 KiB chunks read at 38 GB/s where 8 MiB ones read at 42-44 GB/s against a
// 1 GiB sum at 43-48 GB/s), and small ones last, so that the threads finish together (with equal
// chunks of a quarter of each thread's share, the projections of a layer, 13-73 MB, read 5-10%
// below the lm_head's rate; shrinking chunks took 2-8% of that back).
// weights: (output features, bytes per feature) of each weight in turn.
struct WeightChunk {
  int64_t weight, n0, n1;
};
std::vector<WeightChunk> stream_chunks(const std::vector<std::pair<int64_t, int64_t>>& weights, int64_t block_rows,
                                       int64_t threads);

// x2 [M, K] @ W.T -> [M, n] in x2's dtype, W never held whole: fill(n0, n1, tile) writes W's rows
// [n0, n1) into the first n1 - n0 rows of tile ([rows, K], x2's dtype, contiguous; about 8 MiB),
// and each tile goes through at::mm into its columns of the result. Used for quantized weights
// (dequantised a tile at a time) and for 16-bit weights in float32 where the CPU's 16-bit matmul is slow.
at::Tensor linear_tiled(const at::Tensor& x2, int64_t n,
                        const std::function<void(int64_t, int64_t, const at::Tensor&)>& fill);
}  // namespace exaone_ext
