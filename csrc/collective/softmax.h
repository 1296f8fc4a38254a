// Online softmax over key blocks, in registers. Scores arrive raw (unscaled); the softmax scale is
// folded into the exponent: exp(scale * (s - max)) = exp2(s * scale_log2 - max * scale_log2) with
// scale_log2 = scale * log2(e), one FFMA and one MUFU.EX2 per score.
#pragma once

#include <cmath>

#include <cute/tensor.hpp>

#include "collective/utils.h"

namespace flash_attn2 {

using namespace cute;

template <int kRows>
struct OnlineSoftmax {
  // Per-thread rows; the running max is quad-uniform, the running sum is this thread's partial sum
  // (summed across the quad once, at the end).
  Tensor<ArrayEngine<float, kRows>, Layout<Shape<Int<kRows>>>> row_max;
  Tensor<ArrayEngine<float, kRows>, Layout<Shape<Int<kRows>>>> row_sum;
  float scale_log2;

  CUTE_DEVICE explicit OnlineSoftmax(float softmax_scale_log2) : scale_log2(softmax_scale_log2) {
    fill(row_max, -INFINITY);
    clear(row_sum);
  }

  // Rescaling O costs one multiply per accumulator (head_dim / 4 per row per thread): as many as the
  // exponentials. The running max only has to bound the scores well enough that exp2 cannot overflow,
  // so it is raised only when some row of the warp grows by more than kRescaleThreshold (in log2 units);
  // otherwise the stale max stays the shift. Exact either way: P <= 2^kRescaleThreshold fits fp16 and
  // bf16, and the sum and the output use the same shift.
  static constexpr float kRescaleThreshold = 8.f;

  // Takes one block of raw scores acc_s (MMA, MMA_M, MMA_N); leaves exp'd unnormalised probabilities
  // in acc_s and rescales the output accumulator acc_o (MMA, MMA_M, MMA_K) when the max moved.
  template <class TensorS, class TensorO>
  CUTE_DEVICE void update(TensorS& acc_s, TensorO& acc_o) {
    Tensor scores = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));  // (rows, cols)
    Tensor out = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));     // (rows, head_dim cols)
    static_assert(decltype(size<0>(scores))::value == kRows, "row count mismatch");
    float new_max[kRows];
    bool grows = false;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      new_max[r] = row_max(r);
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) { new_max[r] = fmaxf(new_max[r], scores(r, c)); }
      new_max[r] = quad_allreduce_max(new_max[r]);
      // A row at -inf (no visible key yet) always takes the new max.
      grows |= row_max(r) == -INFINITY || (new_max[r] - row_max(r)) * scale_log2 > kRescaleThreshold;
    }
    if (__any_sync(0xffffffff, grows)) {  // warp-uniform: the multiplies are skipped for the whole warp
      keep_branch();
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        // -inf guard: a row that has seen only masked keys keeps max = -inf; shifting by 0 instead keeps
        // exp2(-inf - shift) = 0 rather than exp2(-inf + inf) = NaN.
        float const shift = new_max[r] == -INFINITY ? 0.f : new_max[r] * scale_log2;
        float const correction = exp2_approx(row_max(r) * scale_log2 - shift);
        row_max(r) = new_max[r];
        row_sum(r) *= correction;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(out); ++c) { out(r, c) *= correction; }
      }
    }
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float const shift = row_max(r) == -INFINITY ? 0.f : row_max(r) * scale_log2;
      float block_sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        scores(r, c) = exp2_approx(scores(r, c) * scale_log2 - shift);
        block_sum += scores(r, c);
      }
      row_sum(r) += block_sum;
    }
  }

  // Normalises acc_o and returns each row's natural-log logsumexp of the scaled scores.
  // A row that saw no key has sum 0: its output stays exactly 0 and its lse is +inf (flash-attn's
  // convention, which also makes the backward's exp(s - lse) vanish for it).
  // out_scale multiplies every output (dropout's 1 / (1 - p); 1 otherwise).
  template <class TensorO>
  CUTE_DEVICE auto finalize(TensorO& acc_o, float softmax_scale, float out_scale = 1.f) {
    Tensor out = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
    Tensor lse = make_tensor<float>(Shape<Int<kRows>>{});
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float const sum = quad_allreduce_sum(row_sum(r));
      bool const empty = sum == 0.f;
      float const inv_sum = empty ? 0.f : out_scale / sum;
      lse(r) = empty ? INFINITY : row_max(r) * softmax_scale + logf(sum);
      CUTE_UNROLL
      for (int c = 0; c < size<1>(out); ++c) { out(r, c) *= inv_sum; }
    }
    return lse;
  }
};

}  // namespace flash_attn2
