// RoPE cos / sin tables: float64 angles position * inv_freq, cos and sin in float64, rounded once
// to float32 (the precision of the plain-PyTorch reference). Portable code: a table is built once.
#include <cmath>
#include <vector>

#include "cpu/rope.h"

namespace exaone_ext::cpu {

void rope_tables(const RopeTableArgs& a, int64_t begin, int64_t end) {
  const int64_t half = a.freqs.head_dim / 2;
  std::vector<double> inv_freq(half);
  for (int64_t i = 0; i < half; ++i) inv_freq[i] = rope_inv_freq(a.freqs, i);
  for (int64_t r = begin; r < end; ++r) {
    const double p = double(a.positions[r]);
    float* c = a.cos + r * half;
    float* s = a.sin + r * half;
    for (int64_t i = 0; i < half; ++i) {
      const double angle = p * inv_freq[i];
      c[i] = float(std::cos(angle));
      s[i] = float(std::sin(angle));
    }
  }
}

}  // namespace exaone_ext::cpu
