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

  // Takes one block of raw scores acc_s (MMA, MMA_M, MMA_N); leaves exp'd unnormalised probabilities
  // in acc_s and rescales the output accumulator acc_o (MMA, MMA_M, MMA_K) to the new running max.
  template <class TensorS, class TensorO>
  CUTE_DEVICE void update(TensorS& acc_s, TensorO& acc_o) {
    Tensor scores = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));  // (rows, cols)
    Tensor out = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));     // (rows, head_dim cols)
    static_assert(decltype(size<0>(scores))::value == kRows, "row count mismatch");
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float new_max = row_max(r);
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) { new_max = fmaxf(new_max, scores(r, c)); }
      new_max = quad_allreduce_max(new_max);
      // -inf guard: a row that has seen only masked keys keeps max = -inf; shifting by 0 instead keeps
      // exp2(-inf - shift) = 0 rather than exp2(-inf + inf) = NaN.
      float const shift = new_max == -INFINITY ? 0.f : new_max * scale_log2;
      float const correction = exp2_approx(row_max(r) * scale_log2 - shift);
      row_max(r) = new_max;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(out); ++c) { out(r, c) *= correction; }
      float block_sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        scores(r, c) = exp2_approx(scores(r, c) * scale_log2 - shift);
        block_sum += scores(r, c);
      }
      row_sum(r) = row_sum(r) * correction + block_sum;
    }
  }

  // Normalises acc_o and returns each row's natural-log logsumexp of the scaled scores.
  // A row that saw no key has sum 0: its output stays exactly 0 and its lse is +inf (flash-attn's
  // convention, which also makes the backward's exp(s - lse) vanish for it).
  template <class TensorO>
  CUTE_DEVICE auto finalize(TensorO& acc_o, float softmax_scale) {
    Tensor out = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
    Tensor lse = make_tensor<float>(Shape<Int<kRows>>{});
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float const sum = quad_allreduce_sum(row_sum(r));
      bool const empty = sum == 0.f;
      float const inv_sum = empty ? 0.f : 1.f / sum;
      lse(r) = empty ? INFINITY : row_max(r) * softmax_scale + logf(sum);
      CUTE_UNROLL
      for (int c = 0; c < size<1>(out); ++c) { out(r, c) *= inv_sum; }
    }
    return lse;
  }
};

}  // namespace flash_attn2
