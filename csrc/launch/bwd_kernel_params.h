// What the backward kernels see besides the caller's BwdParams: the dispatcher's carving of the
// workspace and its choice of splits. Not installed (internal to the library).
#pragma once

#include <cstdint>

#include <cuda.h>
#include <cute/config.hpp>

#include "common/tile_config.h"
#include "flash_attn2/params.h"

namespace flash_attn2 {

struct BwdKernelParams : BwdParams {
  // Per query row, in softmax_lse's layout ((batch, heads, seqlen_q), or (heads, total_q) packed):
  // rowsum(dout * out), written by the preprocess kernel.
  float* __restrict__ dsum = nullptr;
  // num_accum_slices x lse_rows x (the kernel's head dim) fp32: the unscaled dQ sums. Without determinism one
  // slice that every key block adds to atomically. Deterministic, either one slice per split, each written
  // by one CTA only and summed in a fixed order by the postprocess kernel, or (ordered: dq_turns set) one
  // slice that the key blocks add to in a fixed order.
  float* __restrict__ dq_accum = nullptr;
  int64_t lse_rows = 0;       // batch * num_heads * seqlen_q, or num_heads * total_q
  int num_splits = 1;         // CTAs per (batch, head); each takes every num_splits-th key block (zigzag)
  int num_accum_slices = 1;   // private slices: num_splits; ordered (dq_turns): its chains; else 1
  // Deterministic with bulk_dq: int32 zeros, one per (batch, head, chain, query block of the backward's
  // tile), ((batch * num_heads + head) * num_accum_slices + chain) * dq_turn_blocks + m_block. Key block n
  // is in chain n % num_accum_slices and adds into that slice. A counter counts the key blocks of its chain
  // whose dQ additions to that query block are complete; key block n adds its own when the count equals
  // its rank among the chain's key blocks that see the query block (lower key blocks first: their CTAs are
  // launched first, so a CTA only ever waits for CTAs that are running or done).
  int* __restrict__ dq_turns = nullptr;
  int dq_turn_blocks = 0;     // ceil(seqlen_q / the backward's block_m)
  // The deterministic kernel's placement of the next query block's loads (FlashBwdKernelSm80's
  // kDeterministic; set by the launcher).
  bool early_loads = false;
  // The deterministic kernel with private slices (set by the launcher):
  //  - det_serpentine: a split walks its key blocks' query blocks from the last down, then from the first up,
  //    alternately, so that each key block starts on the query blocks (Q, dO, dQ slice tiles) its split
  //    touched last, which are still in L2; else the rotated order of the default kernel.
  //  - dq_store_first: the split's first key block (which, without a left window edge, sees every query
  //    block any of its later ones sees) stores its dQ tiles instead of adding them and zeroes the slice's
  //    rows it does not see, so that the slices need no memset (nor their first read from DRAM).
  bool det_serpentine = false;
  bool dq_store_first = false;
  // The deterministic kernel on sm_90 (set by the launcher where the tensors allow it): Q and dO tiles
  // load through these tensor maps ((head_dim, seqlen_q, num_heads, batch), boxes of (64, block_m) with
  // the 128-byte swizzle) by one thread, completing on an mbarrier per stage, instead of per-thread
  // cp.async copies that queue in front of the GEMMs' ldmatrix while they wait on DRAM.
  bool tma_qdo = false;
  CUtensorMap tma_q = {};
  CUtensorMap tma_dout = {};
  // sm_90+: each CTA stages dQ in shared memory and adds it with bulk reductions (the dispatcher sets it
  // from BwdKernelInfo::bulk_dq: where the device has the shared memory, unless FLASH_ATTN2_BWD_DQ=atomic).
  bool bulk_dq = false;
};

// dq_accum's layout: row-major (rows, kHeadDim) fp32, rows numbered within their slice. The atomic path
// keeps it plain. With bulk_dq, column c of row r sits at r * kHeadDim + dq_accum_col<kHeadDim>(r, c), the
// layout of the shared staging tile that the bulk reduction copies as one run:
//  - within each group of 2^(k+1) columns, column bit k moves to bit 1 (bits 1..k-1 up by one), where 2^k
//    is the column step between a thread's neighbouring dQ MMA fragments (8 x the warps along the head
//    dim): a thread's two column pairs (c, c + 1) and (c + 2^k, c + 2^k + 1) of one row become one 16-byte
//    chunk, one 128-bit store instead of two 64-bit ones;
//  - bit 4 flips with the row's parity, so the two rows of a quarter warp's stores hit different banks.
// Column pairs (2j, 2j + 1) stay adjacent, which the postprocess reads.
constexpr int dq_pair_bit_of(int head_dim) {
  BwdTile const tile = bwd_tile(head_dim);
  int bit = 0;
  while ((1 << bit) < 8 * (tile.num_warps / tile.warps_m_dq)) { ++bit; }
  return bit;
}
template <int kHeadDim>
inline constexpr int kDqPairBit = dq_pair_bit_of(kHeadDim);
template <int kHeadDim>
CUTE_HOST_DEVICE constexpr int dq_accum_perm(int col) {
  constexpr int k = kDqPairBit<kHeadDim>;
  static_assert(k >= 4 && kHeadDim % (2 << k) == 0, "the permuted groups must tile the head dim");
  constexpr int kLow = (2 << k) - 1;  // bits 0..k
  int const low = col & kLow;
  return (col & ~kLow) | (low & 1) | (((low >> k) & 1) << 1) | (((low >> 1) & ((1 << (k - 1)) - 1)) << 2);
}
// Compile-time check of the above: a bijection of [0, kHeadDim) that keeps column pairs adjacent and puts
// a thread's second pair (c + 2^k) right after its first (asserted in the backward kernel).
template <int kHeadDim>
constexpr bool dq_accum_perm_is_valid() {
  constexpr int k = kDqPairBit<kHeadDim>;
  bool seen[kHeadDim] = {};
  for (int c = 0; c < kHeadDim; ++c) {
    int const pos = dq_accum_perm<kHeadDim>(c);
    if (pos < 0 || pos >= kHeadDim || seen[pos]) { return false; }
    seen[pos] = true;
    if (c % 2 == 1 && pos != dq_accum_perm<kHeadDim>(c - 1) + 1) { return false; }
    if (c % 2 == 0 && ((c >> k) & 1) == 0 &&
        (pos % 4 != 0 || dq_accum_perm<kHeadDim>(c + (1 << k)) != pos + 2)) { return false; }
  }
  return true;
}
CUTE_HOST_DEVICE constexpr int dq_accum_row_flip(int64_t row) { return int(row & 1) << 4; }
template <int kHeadDim>
CUTE_HOST_DEVICE constexpr int dq_accum_col(int64_t row, int col) {
  return dq_accum_perm<kHeadDim>(col) ^ dq_accum_row_flip(row);
}

}  // namespace flash_attn2
