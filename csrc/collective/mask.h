// Mask policies: which key blocks a query block must visit, which of those need per-element masking,
// and the masking itself. The main loops run the masked blocks at either end of their range and the
// middle without a predicate.
#pragma once

#include <climits>
#include <cmath>

#include <cute/tensor.hpp>

#include "flash_attn2/params.h"

namespace flash_attn2 {

using namespace cute;

template <MaskMode kMode, int kBlockM, int kBlockN>
struct BlockMask {
  static constexpr bool kHasRight = kMode != MaskMode::kNone;  // keys past the diagonal (+ window) hidden
  static constexpr bool kHasLeft = kMode == MaskMode::kLocal;  // keys before the window hidden

  int seqlen_q;
  int seqlen_k;
  // Row i sees keys j with i + diagonal_offset - left <= j <= i + diagonal_offset + right. An
  // unbounded side is clamped to kUnbounded, which reaches past any sequence (lengths < 2^30 keep the
  // block arithmetic below in 32 bits).
  int left;
  int right;
  static constexpr int kUnbounded = 1 << 30;

  CUTE_HOST_DEVICE BlockMask(int seqlen_q_, int seqlen_k_, int window_left = -1, int window_right = -1)
      : seqlen_q(seqlen_q_), seqlen_k(seqlen_k_) {
    left = kHasLeft && window_left >= 0 ? min(window_left, kUnbounded) : kUnbounded;
    right = kMode == MaskMode::kCausal ? 0 : kHasRight && window_right >= 0 ? min(window_right, kUnbounded) : kUnbounded;
  }

  // Bottom-right alignment: the diagonal of row i is key i + diagonal_offset().
  CUTE_HOST_DEVICE int diagonal_offset() const { return seqlen_k - seqlen_q; }

  // The forward's view from a query block: key blocks [n_block_begin, n_block_end) hold keys that some
  // valid row of m_block sees; of those, [n_block_unmasked_begin, n_block_unmasked_end) are fully visible
  // to every row of m_block and run without a predicate.
  CUTE_HOST_DEVICE int last_row(int m_block) const { return min((m_block + 1) * kBlockM, seqlen_q) - 1; }
  CUTE_HOST_DEVICE int n_block_end(int m_block) const {
    int end = ceil_div(seqlen_k, kBlockN);
    if constexpr (kHasRight) {
      int64_t const keys_visible = int64_t(last_row(m_block)) + diagonal_offset() + right + 1;  // keys [0, it)
      end = keys_visible <= 0 ? 0 : int(min(int64_t(end), (keys_visible + kBlockN - 1) / kBlockN));
    }
    return end;
  }
  CUTE_HOST_DEVICE int n_block_begin(int m_block) const {
    if constexpr (kHasLeft) {
      int64_t const first_key = int64_t(m_block) * kBlockM + diagonal_offset() - left;
      return first_key <= 0 ? 0 : int(min(first_key / kBlockN, int64_t(INT_MAX)));
    }
    return 0;
  }
  // Key blocks below this are fully visible to the right of every row of m_block.
  CUTE_HOST_DEVICE int n_block_unmasked_end(int m_block) const {
    int end = seqlen_k / kBlockN;  // a partial last block needs its tail masked
    if constexpr (kHasRight) {
      int64_t const keys_visible_to_first_row = int64_t(m_block) * kBlockM + diagonal_offset() + right + 1;
      end = keys_visible_to_first_row <= 0 ? 0 : int(min(int64_t(end), keys_visible_to_first_row / kBlockN));
    }
    return end;
  }
  // Key blocks from this one up are fully visible to the left of every row of m_block.
  CUTE_HOST_DEVICE int n_block_unmasked_begin(int m_block) const {
    if constexpr (kHasLeft) {
      int64_t const first_key_of_last_row = int64_t(last_row(m_block)) + diagonal_offset() - left;
      return first_key_of_last_row <= 0 ? 0 : int(min((first_key_of_last_row + kBlockN - 1) / kBlockN, int64_t(INT_MAX)));
    }
    return 0;
  }

  // The backward's view from a key block: the query blocks that see some key of n_block are
  // [m_block_begin, m_block_end); of those, [m_block_unmasked_begin, m_block_unmasked_end) see every key
  // of the block and run without a predicate (none when n_block is a partial last block: its zero-filled
  // tail keys must be masked).
  CUTE_HOST_DEVICE int last_key(int n_block) const { return min((n_block + 1) * kBlockN, seqlen_k) - 1; }
  CUTE_HOST_DEVICE int m_blocks() const { return ceil_div(seqlen_q, kBlockM); }
  CUTE_HOST_DEVICE int m_block_begin(int n_block) const {
    if constexpr (kHasRight) {
      // Row i sees key n_block * kBlockN iff i >= n_block * kBlockN - diagonal_offset() - right.
      int64_t const first_row = int64_t(n_block) * kBlockN - diagonal_offset() - right;
      return first_row <= 0 ? 0 : int(min(first_row / kBlockM, int64_t(m_blocks())));
    }
    return 0;
  }
  CUTE_HOST_DEVICE int m_block_end(int n_block) const {
    if constexpr (kHasLeft) {
      // Row i sees the block's last key iff i <= last_key - diagonal_offset() + left.
      int64_t const rows = int64_t(last_key(n_block)) - diagonal_offset() + left + 1;  // rows [0, it)
      return rows <= 0 ? 0 : int(min((rows + kBlockM - 1) / kBlockM, int64_t(m_blocks())));
    }
    return m_blocks();
  }
  CUTE_HOST_DEVICE int m_block_unmasked_begin(int n_block) const {
    int const begin = m_block_begin(n_block);
    if ((n_block + 1) * kBlockN > seqlen_k) { return max(begin, m_blocks()); }
    if constexpr (kHasRight) {
      // Rows i < last_key - diagonal_offset() - right miss some key of the block.
      int64_t const rows_masked = int64_t(n_block + 1) * kBlockN - 1 - diagonal_offset() - right;
      int const end = rows_masked <= 0 ? 0 : int(min((rows_masked + kBlockM - 1) / kBlockM, int64_t(m_blocks())));
      return max(begin, end);
    }
    return begin;
  }
  CUTE_HOST_DEVICE int m_block_unmasked_end(int n_block) const {
    if constexpr (kHasLeft) {
      // Rows i > first_key - diagonal_offset() + left miss some key of the block.
      int64_t const rows_unmasked = int64_t(n_block) * kBlockN - diagonal_offset() + left + 1;  // rows [0, it)
      int const end = rows_unmasked <= 0 ? 0 : int(min(rows_unmasked / kBlockM, int64_t(m_blocks())));
      return max(end, m_block_unmasked_begin(n_block));
    }
    return m_blocks();
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
    // The diagonal of this thread's first row, relative to its first column: score (r, c) lies
    // c - r - diagonal columns right of its row's diagonal.
    int64_t const diagonal = int64_t(m_block) * kBlockM + row_base + diagonal_offset() - col_first;
    // Clamped to +-2^30: still beyond any tile offset, and the compares stay 32-bit.
    int const right_limit = int(max(min(diagonal + right, int64_t(kUnbounded)), -int64_t(kUnbounded)));
    int const left_limit = int(max(min(diagonal - left, int64_t(kUnbounded)), -int64_t(kUnbounded)));
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) {
      int const r = get<0>(tScS0(i));
      int const c = get<1>(tScS0(i));
      bool visible = c < col_limit;
      if constexpr (kHasRight) { visible = visible && c - r <= right_limit; }
      if constexpr (kHasLeft) { visible = visible && c - r >= left_limit; }
      if (!visible) { acc_s(i) = -INFINITY; }
    }
  }
};

}  // namespace flash_attn2
