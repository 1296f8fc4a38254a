// What the backward kernels see besides the caller's BwdParams: the dispatcher's carving of the
// workspace and its choice of splits. Not installed (internal to the library).
#pragma once

#include <cstdint>

#include <cute/config.hpp>

#include "flash_attn2/params.h"

namespace flash_attn2 {

struct BwdKernelParams : BwdParams {
  // Per query row, in softmax_lse's layout ((batch, heads, seqlen_q), or (heads, total_q) packed):
  // rowsum(dout * out), written by the preprocess kernel.
  float* __restrict__ dsum = nullptr;
  // num_accum_slices x lse_rows x (the kernel's head dim) fp32: the unscaled dQ sums. Without determinism one
  // slice that every key block adds to atomically; with it, one slice per split, each written by one
  // CTA only, summed in a fixed order by the postprocess kernel.
  float* __restrict__ dq_accum = nullptr;
  int64_t lse_rows = 0;       // batch * num_heads * seqlen_q, or num_heads * total_q
  int num_splits = 1;         // CTAs per (batch, head); each takes every num_splits-th key block (zigzag)
  int num_accum_slices = 1;   // num_splits when deterministic, else 1
  // sm_90+: each CTA stages dQ in shared memory and adds it with bulk reductions (the launcher sets it
  // where the device has the shared memory; FLASH_ATTN2_BWD_DQ=atomic keeps the atomics).
  bool bulk_dq = false;
};

// dq_accum's layout: row-major (rows, kHeadDim) fp32; with bulk_dq each row's 8-column chunks are permuted,
// column c of row r (numbered within its slice) at r * kHeadDim + (c ^ dq_accum_swizzle(r)). The XOR
// (bits 3-4 from r mod 4) lets 8 consecutive rows' stores of an MMA fragment into a staging tile of this
// same layout hit every shared memory bank, and keeps each 8-float chunk contiguous for the postprocess.
CUTE_HOST_DEVICE constexpr int dq_accum_swizzle(int64_t row) { return int(row & 3) << 3; }

}  // namespace flash_attn2
