// The combine step of split-KV attention (flash-decoding): each split of a row's keys left its own
// normalised output O_s and log-sum-exp L_s (fp32); the row's attention over all its keys is
//   L = log(sum_s exp(L_s)),  O = sum_s exp(L_s - L) O_s,
// since exp(L_s - L) is the share of the row's softmax mass that split s holds. A split that saw no key
// has L_s = +inf (the kernels' empty-row convention) and weighs nothing; a row with no key at all gets
// O = 0 and L = +inf, as the unsplit kernel gives it.
#pragma once

#include <cmath>

#include <cute/config.hpp>

#include "flash_attn2/params.h"

namespace flash_attn2 {

// One CTA per (batch, head, query row), its threads across the head dim.
template <class Element>
__global__ void kvcache_combine_kernel(CUTE_GRID_CONSTANT KVCacheParams const p) {
  int64_t const row = blockIdx.x;  // ((batch * num_heads) + head) * seqlen_q + i
  int const i = int(row % p.seqlen_q);
  int const head = int(row / p.seqlen_q % p.num_heads);
  int const batch = int(row / p.seqlen_q / p.num_heads);
  int64_t const split_stride = int64_t(p.batch) * p.num_heads * p.seqlen_q;

  float lse_max = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) {
    float const l = p.lse_accum[s * split_stride + row];
    if (l != INFINITY) { lse_max = fmaxf(lse_max, l); }
  }
  float sum = 0.f;
  for (int s = 0; s < p.num_splits; ++s) {
    float const l = p.lse_accum[s * split_stride + row];
    if (l != INFINITY) { sum += expf(l - lse_max); }
  }
  bool const empty = sum == 0.f;
  float const lse = empty ? INFINITY : lse_max + logf(sum);

  Element* const out = static_cast<Element*>(p.out) + batch * p.out_batch_stride + i * p.out_row_stride +
                       head * p.out_head_stride;
  for (int col = threadIdx.x; col < p.head_dim; col += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      float const l = p.lse_accum[s * split_stride + row];
      if (l != INFINITY) { acc += expf(l - lse) * p.out_accum[(s * split_stride + row) * p.head_dim + col]; }
    }
    out[col] = Element(acc);
  }
  if (threadIdx.x == 0) { p.softmax_lse[row] = lse; }
}

}  // namespace flash_attn2
