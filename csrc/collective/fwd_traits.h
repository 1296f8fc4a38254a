// Every CuTe type of the sm80 (mma.sync) forward kernel, derived from (Element, kHeadDim) and the tile table.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "collective/sm80_layouts.h"
#include "common/tile_config.h"

// FLASH_ATTN2_KVCACHE_EVICT_FIRST=1 (setup.py sets it from the build variable of that name): the KV-cache kernels'
// loads carry an L2 evict-first policy (Sm80CpAsyncEvictFirstZfill). An A/B switch until measured.
#ifndef FLASH_ATTN2_KVCACHE_EVICT_FIRST
#define FLASH_ATTN2_KVCACHE_EVICT_FIRST 0
#endif

namespace flash_attn2 {

using namespace cute;

template <class Element>
using Sm80MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                       MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                       MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;

// kCompact (KV-cache only): kvcache_tile's compact row, for GPUs with 99 KB of shared memory per block.
template <class Element_, int kHeadDim_, MaskMode kMask, Modifiers kMods = Modifiers::kPlain, bool kKVCache = false,
          bool kCompact = false>
struct FwdTraitsSm80 {
  using Element = Element_;
  static_assert(std::is_same_v<Element, cutlass::half_t> || std::is_same_v<Element, cutlass::bfloat16_t>,
                "fp16 and bf16 only");

  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kKVCache || !kCompact, "compact tiles are KV-cache tiles");
  static constexpr KVCacheTile kCacheTile = kvcache_tile(kHeadDim, kCompact);
  static constexpr FwdTile kTile = kKVCache ? FwdTile{kCacheTile.block_m, kCacheTile.block_n, kCacheTile.num_warps}
                                            : fwd_tile(kHeadDim, kMask, kMods);
  static_assert(kTile.block_m > 0, "no row in fwd_tile() / kvcache_tile() for this head dim");
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kNWarps = kTile.num_warps;
  static constexpr int kNThreads = kNWarps * 32;
  // K/V buffers: the forward alternates one K and one V buffer; the KV-cache kernels cycle `stages`.
  static constexpr int kStages = kKVCache ? kCacheTile.stages : 1;
  static_assert(kStages >= 1, "at least one K/V buffer");

  // Warps tile M; each warp owns 16-row slabs. The N extent 16 (two 8-wide atoms) lets one ldmatrix.x4
  // feed the B operand.
  using TiledMma = TiledMMA<Sm80MmaAtom<Element>, Layout<Shape<Int<kNWarps>, _1, _1>>,
                            Tile<Int<16 * kNWarps>, _16, _16>>;
  static_assert(kBlockM % (16 * kNWarps) == 0, "block_m must be a multiple of 16 rows per warp");
  static_assert(kBlockN % 16 == 0, "block_n must be a multiple of the 16-wide MMA N tile");
  static_assert(kHeadDim % 32 == 0, "head dim kernels are multiples of 32");

  using SmemLayoutQ = Sm80SmemTile<kBlockM, kHeadDim>;
  using SmemLayoutKV = Sm80SmemTile<kBlockN, kHeadDim>;
  // V viewed as (head_dim, block_n): the B operand of O += P V.
  using SmemLayoutVt = Sm80Transposed<SmemLayoutKV, kBlockN, kHeadDim>;
  using SmemLayoutVtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutVt{}));
  // The output tile is staged through Q's buffer: Q is dead once the last S = Q K^T is done.
  using SmemLayoutO = SmemLayoutQ;

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  using SmemCopyAtomO = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>;

  using GmemCopy = Sm80GmemCopy<Element, kHeadDim, kNThreads, kKVCache && FLASH_ATTN2_KVCACHE_EVICT_FIRST != 0>;
  using GmemTiledCopyQKV = typename GmemCopy::Load;
  using GmemTiledCopyO = typename GmemCopy::Store;
  static_assert(kBlockM % GmemCopy::kRowsPerPass == 0, "the Q copy must tile block_m");
  static_assert(kBlockN % GmemCopy::kRowsPerPass == 0, "the K/V copy must tile block_n");

  // Stage s of K (V) starts kStageElems elements after stage s - 1. The offset is a whole number of
  // swizzle periods (the swizzle permutes within 8 rows of an atom), so a stage's tile is the first
  // stage's layout on a shifted pointer.
  static constexpr int kStageElems = cosize_v<SmemLayoutKV>;
  static_assert(kStageElems % (8 * Sm80Swizzle<kHeadDim>::kAtomCols) == 0, "stages must start on a swizzle period");

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;   // also holds O in the epilogue
    cute::array_aligned<Element, kStageElems * kStages> k;
    cute::array_aligned<Element, kStageElems * kStages> v;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
};

}  // namespace flash_attn2
