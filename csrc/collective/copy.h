// Predicated tile copies between global and shared memory.
#pragma once

#include <cute/tensor.hpp>

namespace flash_attn2 {

using namespace cute;

// Copies a thread's (CPY, CPY_ROWS, CPY_COLS) partition. Rows >= max_rows and columns >= max_cols
// (tile-local coordinates read from `identity`, the same partition of an identity tensor) are outside
// the source or destination tensor. Head dims are multiples of 8, so a 16-byte vector is either wholly in
// or wholly out.
//  - kZeroFill (the loads of Q, K, V, dO, by the cp.async zero-fill atom Sm80GmemCopy::Load): such a vector
//    is cleared, since garbage (possibly NaN) in a K or V tile would leak into every row through 0 * NaN,
//    by its own cp.async (source size 0: nothing is read) rather than by a shared store beside it. A full
//    tile then issues only the copies, without predicated-off stores and without the padding ptxas puts
//    before a predicated cp.async (PERF_LOG b9).
//  - otherwise (the stores of dK, dV, O) it is skipped.
template <bool kZeroFill, class TiledCopy, class TensorS, class TensorD, class TensorC>
CUTE_DEVICE void copy_tile(TiledCopy const& tiled_copy, TensorS const& src, TensorD&& dst,
                           TensorC const& identity, int max_rows, int max_cols) {
  CUTE_STATIC_ASSERT_V(rank(src) == Int<3>{});
  CUTE_STATIC_ASSERT_V(size<1>(src) == size<1>(dst));
  CUTE_STATIC_ASSERT_V(size<2>(src) == size<2>(dst));
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    bool const row_in = get<0>(identity(0, m, 0)) < max_rows;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(src); ++k) {
      bool const in = row_in && get<1>(identity(0, m, k)) < max_cols;
      if constexpr (kZeroFill) {
        copy(tiled_copy.with(in), src(_, m, k), dst(_, m, k));
      } else if (in) {
        copy(tiled_copy, src(_, m, k), dst(_, m, k));
      }
    }
  }
}

// copy_tile<true> for a tile whose rows live at unrelated addresses (a paged KV cache): the thread's m-th
// row (of its CPY_ROWS) starts at row_ptr(m), or is outside the source when that is nullptr. Indexing by
// the thread's row slot lets a caller look the addresses up ahead of time, one register per slot.
// src_like is the same thread's partition of any strided tile with this tile's column layout: its
// per-access (CPY) layout shapes every copy, and its (valid, unread) address stands in as the source of
// a zero-filled vector. tiled_copy must be the zero-fill atom (Sm80GmemCopy::Load).
template <class TiledCopy, class TensorS, class TensorD, class TensorC, class RowPtr>
CUTE_DEVICE void copy_rows(TiledCopy const& tiled_copy, TensorS const& src_like, TensorD&& dst, TensorC const& identity,
                           RowPtr const& row_ptr, int max_cols) {
  CUTE_STATIC_ASSERT_V(rank(src_like) == Int<3>{});
  CUTE_STATIC_ASSERT_V(size<1>(src_like) == size<1>(dst));
  CUTE_STATIC_ASSERT_V(size<2>(src_like) == size<2>(dst));
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src_like); ++m) {
    auto const* const row = row_ptr(m);
    CUTE_UNROLL
    for (int k = 0; k < size<2>(src_like); ++k) {
      int const col = get<1>(identity(0, m, k));
      bool const in = row != nullptr && col < max_cols;
      auto const* const src = in ? row + col : raw_pointer_cast(src_like(_, m, k).data());
      copy(tiled_copy.with(in), make_tensor(make_gmem_ptr(src), src_like(_, m, k).layout()), dst(_, m, k));
    }
  }
}

}  // namespace flash_attn2
