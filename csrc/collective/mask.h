// Mask policies: which key blocks a query block must visit, which of those need per-element masking,
// and the masking itself. The main loop runs the masked blocks first (they hold the highest keys) and
// the rest without a predicate.
#pragma once

#include <cmath>

#include <cute/tensor.hpp>

#include "flash_attn2/params.h"

namespace flash_attn2 {

using namespace cute;

template <MaskMode kMode, int kBlockM, int kBlockN>
struct BlockMask {
  int seqlen_q;
  int seqlen_k;

  // Bottom-right alignment: row i sees keys j <= i + diagonal_offset.
  CUTE_DEVICE int diagonal_offset() const { return seqlen_k - seqlen_q; }

  // One past the last key block that some valid row of m_block can see (0: the block sees nothing).
  CUTE_DEVICE int n_block_end(int m_block) const {
    int end = ceil_div(seqlen_k, kBlockN);
    if constexpr (kMode == MaskMode::kCausal) {
      int const last_row = min((m_block + 1) * kBlockM, seqlen_q) - 1;
      int const keys_visible = last_row + diagonal_offset() + 1;  // keys [0, keys_visible)
      end = keys_visible <= 0 ? 0 : min(end, ceil_div(keys_visible, kBlockN));
    }
    return end;
  }

  // Key blocks below this are fully visible to every row of m_block: no per-element predicate.
  CUTE_DEVICE int n_block_unmasked_end(int m_block) const {
    int end = seqlen_k / kBlockN;  // a partial last block needs its tail masked
    if constexpr (kMode == MaskMode::kCausal) {
      int const keys_visible_to_first_row = m_block * kBlockM + diagonal_offset() + 1;
      end = keys_visible_to_first_row <= 0 ? 0 : min(end, keys_visible_to_first_row / kBlockN);
    }
    return end;
  }

  // The backward's view from a key block: the query blocks that see some key of n_block are
  // [m_block_begin, m_block_end); of those, [m_block_begin, m_block_masked_end) need the per-element
  // mask (every one of them when n_block is a partial last block: its zero-filled tail keys).
  CUTE_DEVICE int m_block_end() const { return ceil_div(seqlen_q, kBlockM); }
  CUTE_DEVICE int m_block_begin(int n_block) const {
    if constexpr (kMode == MaskMode::kCausal) {
      // Row i sees key n_block * kBlockN iff i >= n_block * kBlockN - diagonal_offset().
      return max(n_block * kBlockN - diagonal_offset(), 0) / kBlockM;
    }
    return 0;
  }
  CUTE_DEVICE int m_block_masked_end(int n_block) const {
    int const begin = m_block_begin(n_block);
    if ((n_block + 1) * kBlockN > seqlen_k) { return max(begin, m_block_end()); }
    if constexpr (kMode == MaskMode::kCausal) {
      // Rows i < (n_block + 1) * kBlockN - 1 - diagonal_offset() miss some key of the block.
      int const rows_masked = (n_block + 1) * kBlockN - 1 - diagonal_offset();
      int const end = rows_masked <= 0 ? 0 : ceil_div(rows_masked, kBlockM);
      return max(begin, min(end, m_block_end()));
    }
    return begin;
  }

  // Sets invisible scores to -inf. Coordinates of an MMA partition are affine in (thread, value):
  // coord(thread, i) = coord(thread, 0) + coord(0, i). So tScS0, thread 0's partition of an identity
  // tensor, gives compile-time offsets, and each score costs one compare of an immediate against a limit
  // computed once per block, instead of per-score coordinates held in registers across the main loop.
  // row_base/col_base: this thread's first (row, col) in the tile.
  template <class TensorS, class TensorC>
  CUTE_DEVICE void apply(TensorS& acc_s, TensorC const& tScS0, int row_base, int col_base, int m_block,
                         int n_block) const {
    CUTE_STATIC_ASSERT_V(size(acc_s) == size(tScS0));
    int const col_first = n_block * kBlockN + col_base;
    int const col_limit = seqlen_k - col_first;  // visible iff col offset < col_limit
    // causal: col_first + c <= m_block * kBlockM + row_base + r + diagonal_offset()
    int const diagonal_limit = m_block * kBlockM + row_base + diagonal_offset() - col_first;
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) {
      int const r = get<0>(tScS0(i));
      int const c = get<1>(tScS0(i));
      bool visible = c < col_limit;
      if constexpr (kMode == MaskMode::kCausal) { visible = visible && c - r <= diagonal_limit; }
      if (!visible) { acc_s(i) = -INFINITY; }
    }
  }
};

}  // namespace flash_attn2
