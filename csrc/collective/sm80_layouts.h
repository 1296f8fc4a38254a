// Shared-memory tiles and global<->shared copies of the sm80 kernels, forward and backward.
#pragma once

#include <cute/tensor.hpp>

namespace flash_attn2 {

using namespace cute;

// A (rows, kCols) tile of 16-bit elements in shared memory is built from swizzled atoms of 8 rows x 64
// (or 32) columns: 8 rows x 128 B (64 B), so the 8 row addresses of one ldmatrix phase fall in
// different banks.
template <int kCols>
struct Sm80Swizzle {
  static constexpr int kAtomCols = kCols % 64 == 0 ? 64 : 32;
  using Atom = decltype(composition(Swizzle<kAtomCols == 32 ? 2 : 3, 3, 3>{},
                                    Layout<Shape<_8, Int<kAtomCols>>, Stride<Int<kAtomCols>, _1>>{}));
};
template <int kRows, int kCols>
using Sm80SmemTile = decltype(tile_to_shape(typename Sm80Swizzle<kCols>::Atom{}, Shape<Int<kRows>, Int<kCols>>{}));

// The (kCols, kRows) view of a (kRows, kCols) tile: an MMA operand whose reduction runs along the
// tile's rows, read with transposing ldmatrix (its register fragment comes from get_nonswizzle_portion).
template <class TileLayout, int kRows, int kCols>
using Sm80Transposed = decltype(composition(TileLayout{}, make_layout(Shape<Int<kCols>, Int<kRows>>{}, GenRowMajor{})));

// Global <-> shared copies of (rows, kHeadDim) tiles: 16-byte accesses, kThreadsPerRow threads covering
// one swizzle-atom row, so each pass moves kNThreads / kThreadsPerRow rows.
template <class Element, int kHeadDim, int kNThreads>
struct Sm80GmemCopy {
  static constexpr int kElemsPerAccess = sizeof(cute::uint128_t) / sizeof(Element);
  static_assert(kHeadDim % kElemsPerAccess == 0, "head dim must be a multiple of 8");
  static constexpr int kThreadsPerRow = Sm80Swizzle<kHeadDim>::kAtomCols / kElemsPerAccess;
  static_assert(kNThreads % kThreadsPerRow == 0, "threads must tile a row");
  static constexpr int kRowsPerPass = kNThreads / kThreadsPerRow;
  using ThreadLayout = Layout<Shape<Int<kRowsPerPass>, Int<kThreadsPerRow>>, Stride<Int<kThreadsPerRow>, _1>>;
  // CACHEGLOBAL: K and V tiles are re-read by other CTAs of the head, so keep them in L2, not L1. The
  // zero-fill form: a copy predicated false clears its 16 bytes (copy_tile<true> in copy.h).
  using Load = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>, Element>{},
                                        ThreadLayout{}, Layout<Shape<_1, Int<kElemsPerAccess>>>{}));
  using Store = decltype(make_tiled_copy(Copy_Atom<UniversalCopy<cute::uint128_t>, Element>{}, ThreadLayout{},
                                         Layout<Shape<_1, Int<kElemsPerAccess>>>{}));
};

}  // namespace flash_attn2
