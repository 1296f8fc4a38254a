// Shared-memory tiles and global<->shared copies of the sm80 kernels, forward and backward.
#pragma once

#include <type_traits>

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

// cp.async.cg with the zero fill (SM80_CP_ASYNC_CACHEGLOBAL_ZFILL) and an L2 evict-first policy: for bytes that
// are read once (a KV cache at decode time), so that they do not push other data, dirty lines included, out of L2.
template <class TS, class TD = TS>
struct Sm80CpAsyncEvictFirstZfill {
  using SRegisters = TS[1];
  using DRegisters = TD[1];
  static_assert(sizeof(TS) == 16 && sizeof(TD) == 16, "16-byte cp.async");
  CUTE_HOST_DEVICE static void copy(TS const& gmem_src, TD& smem_dst, bool pred) {
#if defined(CUTE_ARCH_CP_ASYNC_SM80_ENABLED)
    uint32_t const smem = cast_smem_ptr_to_uint(&smem_dst);
    int const src_size = pred ? 16 : 0;
    asm volatile(
        "{\n"
        ".reg .b64 policy;\n"
        "createpolicy.fractional.L2::evict_first.b64 policy, 1.0;\n"
        "cp.async.cg.shared.global.L2::cache_hint.L2::128B [%0], [%1], 16, %2, policy;\n"
        "}\n" ::"r"(smem),
        "l"(&gmem_src), "r"(src_size));
#else
    CUTE_INVALID_CONTROL_PATH("cp.async needs sm80");
#endif
  }
};

// Global <-> shared copies of (rows, kHeadDim) tiles: 16-byte accesses, kThreadsPerRow threads covering
// one swizzle-atom row, so each pass moves kNThreads / kThreadsPerRow rows.
// kEvictFirst: loads with Sm80CpAsyncEvictFirstZfill (the KV-cache kernels' K and V, each byte read once).
template <class Element, int kHeadDim, int kNThreads, bool kEvictFirst = false>
struct Sm80GmemCopy {
  static constexpr int kElemsPerAccess = sizeof(cute::uint128_t) / sizeof(Element);
  static_assert(kHeadDim % kElemsPerAccess == 0, "head dim must be a multiple of 8");
  static constexpr int kThreadsPerRow = Sm80Swizzle<kHeadDim>::kAtomCols / kElemsPerAccess;
  static_assert(kNThreads % kThreadsPerRow == 0, "threads must tile a row");
  static constexpr int kRowsPerPass = kNThreads / kThreadsPerRow;
  using ThreadLayout = Layout<Shape<Int<kRowsPerPass>, Int<kThreadsPerRow>>, Stride<Int<kThreadsPerRow>, _1>>;
  // CACHEGLOBAL: K and V tiles are re-read by other CTAs of the head, so keep them in L2, not L1. The
  // zero-fill form: a copy predicated false clears its 16 bytes (copy_tile<true> in copy.h).
  using LoadOp = std::conditional_t<kEvictFirst, Sm80CpAsyncEvictFirstZfill<cute::uint128_t>,
                                    SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>>;
  using Load = decltype(make_tiled_copy(Copy_Atom<LoadOp, Element>{}, ThreadLayout{},
                                        Layout<Shape<_1, Int<kElemsPerAccess>>>{}));
  using Store = decltype(make_tiled_copy(Copy_Atom<UniversalCopy<cute::uint128_t>, Element>{}, ThreadLayout{},
                                         Layout<Shape<_1, Int<kElemsPerAccess>>>{}));
};

}  // namespace flash_attn2

namespace cute {

// The zero-fill predicate of Sm80CpAsyncEvictFirstZfill, as CuTe's SM80_CP_ASYNC_CACHEGLOBAL_ZFILL has it:
// tiled_copy.with(pred) loads when pred is true and clears the 16 bytes when it is false.
template <class S, class D>
struct Copy_Traits<flash_attn2::Sm80CpAsyncEvictFirstZfill<S, D>> {
  using ThrID = Layout<_1>;
  using SrcLayout = Layout<Shape<_1, Int<sizeof_bits<S>::value>>>;
  using DstLayout = Layout<Shape<_1, Int<sizeof_bits<D>::value>>>;
  using RefLayout = SrcLayout;
  bool pred = true;
  CUTE_HOST_DEVICE constexpr Copy_Traits with(bool p) const { return {p}; }
  template <class TS, class SLayout, class TD, class DLayout>
  CUTE_HOST_DEVICE friend constexpr void copy_unpack(Copy_Traits const& traits, Tensor<TS, SLayout> const& src,
                                                     Tensor<TD, DLayout>& dst) {
    static_assert(is_gmem<TS>::value && is_smem<TD>::value, "cp.async: global to shared");
    Tensor rS = recast<S>(src);
    Tensor rD = recast<D>(dst);
    CUTE_STATIC_ASSERT_V(size(rS) == Int<1>{});
    CUTE_STATIC_ASSERT_V(size(rD) == Int<1>{});
    flash_attn2::Sm80CpAsyncEvictFirstZfill<S, D>::copy(rS[0], rD[0], traits.pred);
  }
};

}  // namespace cute
