// Warp-level GEMM over a CTA tile with the shared->register loads of k-slice k+1 issued before the MMAs
// of slice k, so ldmatrix latency hides behind tensor-core work.
#pragma once

#include <cute/tensor.hpp>

namespace flash_attn2 {

using namespace cute;

template <class Acc, class FragA, class FragB, class LoadSlice, class TiledMma>
CUTE_DEVICE void gemm_pipelined(Acc& acc, FragA const& tCrA, FragB const& tCrB, LoadSlice&& load_slice,
                                TiledMma const& tiled_mma) {
  constexpr int kSlices = decltype(size<2>(tCrA))::value;
  static_assert(kSlices == decltype(size<2>(tCrB))::value, "A and B disagree on MMA_K");
  load_slice(Int<0>{});
  CUTE_UNROLL
  for (int k = 0; k < kSlices; ++k) {
    if (k + 1 < kSlices) { load_slice(k + 1); }
    cute::gemm(tiled_mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

// acc += A B with both operands in shared memory.
// tCrA/tCrB: MMA fragments; tCsA/tCsB: the same operands partitioned by the ldmatrix tiled copies.
template <class Acc, class FragA, class FragB, class SmemA, class SmemB, class TiledMma, class CopyA,
          class CopyB>
CUTE_DEVICE void gemm_ss(Acc& acc, FragA& tCrA, FragB& tCrB, SmemA const& tCsA, SmemB const& tCsB,
                         TiledMma const& tiled_mma, CopyA const& copy_a, CopyB const& copy_b, int thread_idx) {
  auto thr_copy_a = copy_a.get_thread_slice(thread_idx);
  auto thr_copy_b = copy_b.get_thread_slice(thread_idx);
  Tensor tCrA_view = thr_copy_a.retile_D(tCrA);  // (CPY, MMA_M, MMA_K)
  Tensor tCrB_view = thr_copy_b.retile_D(tCrB);  // (CPY, MMA_N, MMA_K)
  CUTE_STATIC_ASSERT_V(size<1>(tCsA) == size<1>(tCrA_view));
  CUTE_STATIC_ASSERT_V(size<1>(tCsB) == size<1>(tCrB_view));
  gemm_pipelined(acc, tCrA, tCrB, [&](auto k) {
    copy(copy_a, tCsA(_, _, k), tCrA_view(_, _, k));
    copy(copy_b, tCsB(_, _, k), tCrB_view(_, _, k));
  }, tiled_mma);
}

// acc += A B with A already in registers (P in O += P V).
template <class Acc, class FragA, class FragB, class SmemB, class TiledMma, class CopyB>
CUTE_DEVICE void gemm_rs(Acc& acc, FragA const& tCrA, FragB& tCrB, SmemB const& tCsB,
                         TiledMma const& tiled_mma, CopyB const& copy_b, int thread_idx) {
  auto thr_copy_b = copy_b.get_thread_slice(thread_idx);
  Tensor tCrB_view = thr_copy_b.retile_D(tCrB);  // (CPY, MMA_N, MMA_K)
  CUTE_STATIC_ASSERT_V(size<1>(tCsB) == size<1>(tCrB_view));
  gemm_pipelined(acc, tCrA, tCrB, [&](auto k) { copy(copy_b, tCsB(_, _, k), tCrB_view(_, _, k)); },
                 tiled_mma);
}

}  // namespace flash_attn2
