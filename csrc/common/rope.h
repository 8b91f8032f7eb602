// Rotary position embedding math shared by the CPU and CUDA kernels: the (llama3-scaled) inverse
// frequencies, and the descriptions of a table call and of a fused q/k rotation call.
#pragma once
#include <cmath>
#include <cstdint>
#include "common/dtypes.h"

namespace exaone_ext {

// Frequencies of a RoPE table: inv_freq[i] = 1 / theta^(2i / head_dim), optionally rescaled by
// the llama3 rule (long wavelengths divided by `factor`, short ones kept, a smooth blend between).
struct RopeFreqs {
  int64_t head_dim;
  double theta;
  bool llama3;
  double factor, low_freq_factor, high_freq_factor, original_max_position;
};

// All in float64, in the order of operations of the plain-PyTorch reference, so that the tables
// rounded to float32 agree with it.
EXAONE_HD double rope_inv_freq(const RopeFreqs& f, int64_t i) {
  const double inv = 1.0 / pow(f.theta, double(2 * i) / double(f.head_dim));
  if (!f.llama3) return inv;
  const double wavelen = (2.0 * 3.141592653589793) / inv;
  const double long_wavelen = f.original_max_position / f.low_freq_factor;
  const double short_wavelen = f.original_max_position / f.high_freq_factor;
  if (wavelen >= short_wavelen && wavelen <= long_wavelen) {
    const double smooth = (f.original_max_position / wavelen - f.low_freq_factor) /
                          (f.high_freq_factor - f.low_freq_factor);
    return (1.0 - smooth) * inv / f.factor + smooth * inv;
  }
  return wavelen > long_wavelen ? inv / f.factor : inv;
}

// cos / sin tables [n_positions, head_dim / 2] (float32, contiguous) for the given int64 positions.
struct RopeTableArgs {
  RopeFreqs freqs;
  int64_t n_positions;
  const int64_t* positions;
  float* cos;
  float* sin;
};

// One fused rotation of q [batch, seq, q_heads, head_dim] and k [batch, seq, k_heads, head_dim]
// by the table rows selected by position_ids [batch, seq]. Strides in elements; the last dim of
// q, k, cos and sin is contiguous; the outputs are contiguous. `inverse` rotates by the negative
// angle (the backward: the rotation is orthogonal, so its gradient is the inverse rotation).
struct RopeArgs {
  DType dtype;
  int64_t batch, seq, q_heads, k_heads, head_dim;
  const void* q; int64_t q_sb, q_ss, q_sh;
  const void* k; int64_t k_sb, k_ss, k_sh;
  void* q_out;
  void* k_out;
  const float* cos; int64_t cos_stride;  // rows of the tables
  const float* sin; int64_t sin_stride;
  int64_t table_rows;
  const int64_t* pos; int64_t pos_sb, pos_ss;                          // pos_sb 0: one row for all batches
  bool interleaved;  // pairs (2i, 2i + 1) instead of rotate-half pairs (i, i + head_dim / 2)
  bool inverse;
};

// The rotation of one pair (a, b) by an angle with cosine c and sine s (s negated for the inverse).
template <typename A> EXAONE_HD void rope_rotate_pair(A a, A b, A c, A s, A& out_a, A& out_b) {
  out_a = a * c - b * s;
  out_b = b * c + a * s;
}

}  // namespace exaone_ext
