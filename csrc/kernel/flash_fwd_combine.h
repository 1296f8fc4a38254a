// The combine step of split-KV attention (flash-decoding): each split of a row's keys left its own
// normalised output O_s and log-sum-exp L_s (fp32); the row's attention over all its keys is
//   L = log(sum_s exp(L_s)),  O = sum_s exp(L_s - L) O_s,
// since exp(L_s - L) is the share of the row's softmax mass that split s holds. A split that saw no key
// has L_s = +inf (the kernels' empty-row convention) and weighs nothing; a row with no key at all gets
// O = 0 and L = +inf, as the unsplit kernel gives it.
#pragma once

#include <cmath>
#include <cstdint>

#include <cute/config.hpp>

#include "common/grid_dependency.h"
#include "flash_attn2/flash_attn2.h"
#include "flash_attn2/params.h"

namespace flash_attn2 {

// Block-wide max / sum of one float per thread (kThreads a multiple of 32); every thread gets the result.
template <int kThreads, class Op>
__device__ float block_allreduce(float x, float* scratch, Op const& op) {
  CUTE_UNROLL
  for (int offset = 16; offset > 0; offset /= 2) { x = op(x, __shfl_xor_sync(0xffffffff, x, offset)); }
  if (threadIdx.x % 32 == 0) { scratch[threadIdx.x / 32] = x; }
  __syncthreads();
  x = scratch[0];
  CUTE_UNROLL
  for (int w = 1; w < kThreads / 32; ++w) { x = op(x, scratch[w]); }
  __syncthreads();  // scratch is free again
  return x;
}

// One CTA per (batch, head, query row), its threads across the splits for the lse and across the head
// dim for O. A decode step's rows are few (batch x heads), so the combine is latency-bound: the splits'
// lse are read in parallel (one load per thread, kept in shared memory as the splits' weights) and each
// thread's loop over the splits' partial outputs has independent loads, not a chain of dependent ones.
// num_splits <= kMaxKVCacheSplits (the dispatcher refuses more).
template <class Element, int kThreads>
__global__ void __launch_bounds__(kThreads) kvcache_combine_kernel(CUTE_GRID_CONSTANT KVCacheParams const p) {
  static_assert(kThreads % 32 == 0, "whole warps");
  __shared__ float weight[kMaxKVCacheSplits];  // lse of each split, then its weight exp(L_s - L)
  __shared__ float scratch[kThreads / 32];
  int64_t const row = blockIdx.x;  // ((batch * num_heads) + head) * seqlen_q + i
  int const i = int(row % p.seqlen_q);
  int const head = int(row / p.seqlen_q % p.num_heads);
  int const batch = int(row / p.seqlen_q / p.num_heads);
  int64_t const split_stride = int64_t(p.batch) * p.num_heads * p.seqlen_q;
  int const splits = p.num_splits;
  grid_dependency_wait();  // the attention kernel's partial outputs (run_kvcache launches us dependent)

  float local_max = -INFINITY;
  for (int s = threadIdx.x; s < splits; s += kThreads) {
    float const l = p.lse_accum[s * split_stride + row];
    weight[s] = l;
    if (l != INFINITY) { local_max = fmaxf(local_max, l); }
  }
  float const lse_max = block_allreduce<kThreads>(local_max, scratch, [](float a, float b) { return fmaxf(a, b); });
  float local_sum = 0.f;
  for (int s = threadIdx.x; s < splits; s += kThreads) {
    if (weight[s] != INFINITY) { local_sum += expf(weight[s] - lse_max); }
  }
  float const sum = block_allreduce<kThreads>(local_sum, scratch, [](float a, float b) { return a + b; });
  bool const empty = sum == 0.f;
  float const lse = empty ? INFINITY : lse_max + logf(sum);
  for (int s = threadIdx.x; s < splits; s += kThreads) {
    weight[s] = weight[s] == INFINITY || empty ? 0.f : expf(weight[s] - lse);
  }
  __syncthreads();

  Element* const out = static_cast<Element*>(p.out) + batch * p.out_batch_stride + i * p.out_row_stride +
                       head * p.out_head_stride;
  float const* const partial = p.out_accum + row * p.head_dim;
  int64_t const partial_stride = split_stride * p.head_dim;
  for (int col = threadIdx.x; col < p.head_dim; col += kThreads) {
    float acc = 0.f;
#pragma unroll 8
    for (int s = 0; s < splits; ++s) {
      float const w = weight[s];
      float const o = partial[s * partial_stride + col];
      acc += w != 0.f ? w * o : 0.f;  // a split without keys weighs nothing, whatever its slot holds
    }
    out[col] = Element(acc);
  }
  if (threadIdx.x == 0) { p.softmax_lse[row] = lse; }
}

// The same merge done by the split CTA that finishes a query tile last (KVCacheParams::split_tickets):
// one warp per row, lanes across the splits for the lse and across the head dim (4 columns each) for O.
// The partials come from other SMs: they are read through L2 (ld.global.cg), after the ticket's fence.
// row: the tile row's index into softmax_lse (and into each split's slice of the accumulators); out_row:
// its output row. weight: kMaxKVCacheSplits floats of shared memory for this warp. head_dim % 4 == 0.
template <class Element>
__device__ void combine_row_warp(KVCacheParams const& p, int64_t row, Element* out_row, float* weight) {
  constexpr int kPerLane = kMaxKVCacheSplits / 32;
  int const lane = threadIdx.x % 32;
  int const splits = p.num_splits;
  int64_t const split_stride = int64_t(p.batch) * p.num_heads * p.seqlen_q;
  float l[kPerLane];
  float local_max = -INFINITY;
  CUTE_UNROLL
  for (int j = 0; j < kPerLane; ++j) {
    int const s = lane + 32 * j;
    l[j] = s < splits ? __ldcg(p.lse_accum + s * split_stride + row) : INFINITY;
    if (l[j] != INFINITY) { local_max = fmaxf(local_max, l[j]); }
  }
  CUTE_UNROLL
  for (int offset = 16; offset > 0; offset /= 2) {
    local_max = fmaxf(local_max, __shfl_xor_sync(0xffffffff, local_max, offset));
  }
  float sum = 0.f;
  CUTE_UNROLL
  for (int j = 0; j < kPerLane; ++j) { sum += l[j] != INFINITY ? expf(l[j] - local_max) : 0.f; }
  CUTE_UNROLL
  for (int offset = 16; offset > 0; offset /= 2) { sum += __shfl_xor_sync(0xffffffff, sum, offset); }
  bool const empty = sum == 0.f;
  float const lse = empty ? INFINITY : local_max + logf(sum);
  CUTE_UNROLL
  for (int j = 0; j < kPerLane; ++j) {
    int const s = lane + 32 * j;
    if (s < splits) { weight[s] = l[j] == INFINITY || empty ? 0.f : expf(l[j] - lse); }
  }
  __syncwarp();
  float const* const partial = p.out_accum + row * p.head_dim;
  int64_t const partial_stride = split_stride * p.head_dim;
  for (int col = lane * 4; col < p.head_dim; col += 128) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int s = 0; s < splits; ++s) {
      float const w = weight[s];
      if (w != 0.f) {  // a split without keys weighs nothing, whatever its slot holds
        float4 const o = __ldcg(reinterpret_cast<float4 const*>(partial + s * partial_stride + col));
        acc.x += w * o.x, acc.y += w * o.y, acc.z += w * o.z, acc.w += w * o.w;
      }
    }
    out_row[col] = Element(acc.x);
    out_row[col + 1] = Element(acc.y);
    out_row[col + 2] = Element(acc.z);
    out_row[col + 3] = Element(acc.w);
  }
  if (lane == 0) { p.softmax_lse[row] = lse; }
  __syncwarp();  // weight is free again
}

}  // namespace flash_attn2
