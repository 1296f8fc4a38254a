// Every CuTe type of the sm80 (mma.sync) backward kernel, derived from (Element, kHeadDim) and the
// backward tile table. Shares the MMA atom, swizzle atoms and copy atoms with the forward.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "collective/fwd_traits.h"
#include "common/tile_config.h"

namespace flash_attn2 {

using namespace cute;

template <class Element_, int kHeadDim_>
struct BwdTraitsSm80 {
  using Element = Element_;
  static_assert(std::is_same_v<Element, cutlass::half_t> || std::is_same_v<Element, cutlass::bfloat16_t>,
                "fp16 and bf16 only");

  static constexpr int kHeadDim = kHeadDim_;
  static constexpr BwdTile kTile = bwd_tile(kHeadDim);
  static_assert(kTile.block_m > 0, "no row in bwd_tile() for this head dim");
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kNWarps = kTile.num_warps;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kStages = kTile.stages;
  static_assert(kStages == 1 || kStages == 2, "one or two Q/dO buffers");

  // Three tiled MMAs, one per output shape; each warp grid is (warps along rows, warps along columns).
  // The column extent 16 per warp lets one ldmatrix.x4 feed two 8-wide B atoms.
  template <int kWarpsRows>
  using WarpTiledMma = TiledMMA<Sm80MmaAtom<Element>, Layout<Shape<Int<kWarpsRows>, Int<kNWarps / kWarpsRows>, _1>>,
                                Tile<Int<16 * kWarpsRows>, Int<16 * (kNWarps / kWarpsRows)>, _16>>;
  using TiledMmaSdP = WarpTiledMma<kTile.warps_m_sdp>;  // (kBlockM, kBlockN) = (kBlockM, d) x (kBlockN, d)^T
  using TiledMmadKV = WarpTiledMma<kTile.warps_n_dkv>;  // (kBlockN, d) += (kBlockN, kBlockM) x (d, kBlockM)^T
  using TiledMmadQ = WarpTiledMma<kTile.warps_m_dq>;    // (kBlockM, d) = (kBlockM, kBlockN) x (d, kBlockN)^T
  static_assert(kBlockM % (16 * kTile.warps_m_sdp) == 0 && kBlockN % (16 * (kNWarps / kTile.warps_m_sdp)) == 0);
  static_assert(kBlockN % (16 * kTile.warps_n_dkv) == 0 && kHeadDim % (16 * (kNWarps / kTile.warps_n_dkv)) == 0);
  static_assert(kBlockM % (16 * kTile.warps_m_dq) == 0 && kHeadDim % (16 * (kNWarps / kTile.warps_m_dq)) == 0);

  // (rows, kHeadDim) tiles of Q, dO, K, V, as in the forward.
  using SmemLayoutQ = Sm80SmemTile<kBlockM, kHeadDim>;
  using SmemLayoutKV = Sm80SmemTile<kBlockN, kHeadDim>;
  // Transposed views, the B operands whose reduction runs along the rows: Q^T and dO^T (d, kBlockM) for
  // dK and dV, K^T (d, kBlockN) for dQ.
  using SmemLayoutQt = Sm80Transposed<SmemLayoutQ, kBlockM, kHeadDim>;
  using SmemLayoutQtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutQt{}));
  using SmemLayoutKt = Sm80Transposed<SmemLayoutKV, kBlockN, kHeadDim>;
  using SmemLayoutKtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutKt{}));
  // P and dS (kBlockM, kBlockN), and their transposes (kBlockN, kBlockM), the A operands of dV and dK.
  using SmemLayoutPdS = Sm80SmemTile<kBlockM, kBlockN>;
  using SmemLayoutPdSt = Sm80Transposed<SmemLayoutPdS, kBlockM, kBlockN>;
  using SmemLayoutPdStNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutPdSt{}));

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  using SmemCopyAtomStore = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<32>, Element>;  // accumulator pairs

  using GmemCopy = Sm80GmemCopy<Element, kHeadDim, kNThreads>;
  using GmemTiledCopyLoad = typename GmemCopy::Load;
  using GmemTiledCopyStore = typename GmemCopy::Store;
  static_assert(kBlockM % GmemCopy::kRowsPerPass == 0, "the Q copy must tile block_m");
  static_assert(kBlockN % GmemCopy::kRowsPerPass == 0, "the K/V copy must tile block_n");

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutQ> * kStages> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutQ> * kStages> dout;
    cute::array_aligned<Element, cosize_v<SmemLayoutKV>> k;  // also stages dK in the epilogue
    cute::array_aligned<Element, cosize_v<SmemLayoutKV>> v;  // also stages dV in the epilogue
    cute::array_aligned<Element, cosize_v<SmemLayoutPdS>> p;
    cute::array_aligned<Element, cosize_v<SmemLayoutPdS>> ds;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  // The dQ staging tile of the Hopper path (fp32, the accumulator's layout), after SharedStorage. Only
  // where the CTA holds an SM alone anyway: at hdim 32 the 16 KB would halve the CTAs per SM.
  static constexpr int kDqSmemOffset = (kSmemBytes + 127) / 128 * 128;
  static constexpr int kDqSmemBytes = kBlockM * kHeadDim * int(sizeof(float));
  static constexpr int kBulkDqSmemBytes = kDqSmemOffset + kDqSmemBytes;  // the whole block's, on that path
  // The deterministic kernel's TMA loads of Q and dO (BwdKernelParams::tma_qdo): an mbarrier per stage after
  // the staging tile; 64-column boxes, so only where the tiles are built of 64-column swizzle atoms, and for
  // now only at the head dims where it was tested and measured on a GPU (64, 128; PERF_LOG b24): hdim 192
  // keeps cp.async until its TMA kernel has run the tests.
  static constexpr int kTmaBarrierOffset = kBulkDqSmemBytes;
  // Then, per stage, the query block's lse and rowsum(dO o O) (kBlockM fp32 each), which arrive on the
  // stage's mbarrier with its Q and dO: the step reads them from shared memory, not from DRAM (PERF_LOG b25).
  static constexpr int kTmaRowsOffset = (kTmaBarrierOffset + kStages * int(sizeof(uint64_t)) + 15) / 16 * 16;
  static constexpr int kTmaSmemBytes = kTmaRowsOffset + kStages * 2 * kBlockM * int(sizeof(float));
  static constexpr bool kTmaQdOCapable =
      Sm80Swizzle<kHeadDim>::kAtomCols == 64 && (kHeadDim == 64 || kHeadDim == 128);
  static constexpr bool kBulkDqWorthIt = kSmemBytes > kTwoCtasPerSmSmemBytes;
};

}  // namespace flash_attn2
