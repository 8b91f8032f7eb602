// Cross-entropy over rows of logits, shared by the CPU and CUDA kernels of linear_cross_entropy.
#pragma once
#include <cstdint>
#include "common/dtypes.h"

namespace exaone_ext {

// One call over `rows` rows of `vocab` logits (a chunk of tokens; the logits come from a matmul in
// the torch layer). Per row r with target t = targets[r]:
//   forward (from_lse false): lse[r] = log(sum_j exp(x_j)), loss[r] = lse[r] - x_t;
//   backward (from_lse true): lse[r] is read instead of computed;
//   write_grad: the row is overwritten in place by (softmax(x) - onehot(t)) * scale_r, with
//               scale_r = row_scale[r * row_scale_stride] (1 when row_scale is null).
// A row whose target equals ignore_index has loss 0 and a zero gradient row. A target outside
// [0, vocab) (the CPU torch layer refuses those before the call; CUDA does not look, to avoid a
// synchronisation) gives a NaN loss and a NaN gradient row, never an out-of-bounds read.
// loss, lse and row_scale hold the accumulation type: double for float64 logits, else float.
struct CrossEntropyArgs {
  DType dtype;
  int64_t rows, vocab;
  void* logits; int64_t logits_stride;
  const int64_t* targets;
  int64_t ignore_index;
  void* loss;                 // [rows], may be null (backward)
  void* lse;                  // [rows]
  const void* row_scale;      // may be null
  int64_t row_scale_stride;   // 0 broadcasts one scale to every row
  bool from_lse;
  bool write_grad;
};

// What a row's target means for its loss and gradient.
enum class TargetKind : int { kValid = 0, kIgnored = 1, kOutOfRange = 2 };

EXAONE_HD TargetKind target_kind(int64_t t, int64_t ignore_index, int64_t vocab) {
  if (t == ignore_index) return TargetKind::kIgnored;
  return (t >= 0 && t < vocab) ? TargetKind::kValid : TargetKind::kOutOfRange;
}

}  // namespace exaone_ext
