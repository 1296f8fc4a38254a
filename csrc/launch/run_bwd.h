// Launches one backward instantiation: preprocess, dQ accumulator reset, main kernel, postprocess.
// Included only by the generated instantiation files.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <cuda_runtime.h>

#include "collective/bwd_traits.h"
#include "kernel/flash_bwd_kernel_sm80.h"
#include "kernel/flash_bwd_prepost.h"
#include "launch/fwd_launch.h"
#include "launch/launch_common.h"
#include "launch/tma_desc.h"

namespace flash_attn2 {

// Whether the current device runs the backward's bulk-reduction dQ path (BwdKernelParams::bulk_dq): sm_90
// or newer with smem_bytes of shared memory per block, unless FLASH_ATTN2_BWD_DQ=atomic.
inline bool bulk_dq_available(int smem_bytes) {
  if (char const* mode = std::getenv("FLASH_ATTN2_BWD_DQ"); mode != nullptr && std::strcmp(mode, "atomic") == 0) {
    return false;
  }
  int major = 0, optin = 0;
  if (current_device_attribute(cudaDevAttrComputeCapabilityMajor, major) != cudaSuccess ||
      current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, optin) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return major >= 9 && smem_bytes <= optin;
}

// The main kernel's launch (its shared memory opt-in, then the grid).
template <class Kernel>
cudaError_t launch_bwd_main(BwdKernelParams const& kp, int smem_bytes, cudaStream_t stream) {
  auto kernel = &device_kernel<Kernel, BwdKernelParams>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) { return err; }
  int64_t const blocks = int64_t(kp.num_splits) * kp.num_heads * kp.batch;
  if (blocks > INT32_MAX) { return cudaErrorInvalidConfiguration; }
  if (blocks > 0) {
    kernel<<<dim3(unsigned(blocks)), Kernel::kNThreads, smem_bytes, stream>>>(kp);
    err = cudaGetLastError();
  }
  return err;
}

template <DType kDType, int kHeadDim, MaskMode kMask, Modifiers kMods>
cudaError_t run_bwd(BwdKernelParams const& params, cudaStream_t stream) {
  using Element = ElementOf<kDType>;
  using Traits = BwdTraitsSm80<Element, kHeadDim>;
  using Kernel = FlashBwdKernelSm80<Traits, kMask, kMods>;
  using Rows = RowGroups<kHeadDim>;
  // params.bulk_dq is the dispatcher's copy of bwd_kernel_info's: the workspace was planned for it, and the
  // postprocess reads dq_accum in the layout the main kernel's path wrote it in.
  BwdKernelParams kp = params;
  // Deterministic calls of the plain family with two Q/dO stages take the deterministic kernel
  // (FlashBwdKernelSm80's kDeterministic): a second kernel of each such instantiation rather than run-time
  // switches in one, which cost the default kernels registers. Its options (BwdKernelParams), set here
  // because the dQ memset below depends on them:
  //  - early_loads: with private dQ slices it issues the next Q and dO at a step's start (PERF_LOG b13, bf16
  //    hdim 64 / 128: deterministic / default backward time 1.12-1.32x -> 1.05-1.19x); the ordered mode
  //    (dq_turns) keeps the default placement, its one accumulator staying in L2 as the atomic mode's does
  //    (FLASH_ATTN2_BWD_DET_LOADS=early for A/B).
  //  - det_serpentine where a split is a whole head (PERF_LOG b23), and without a mask also with several
  //    splits per head (PERF_LOG b25, once lse and dsum came with the TMA tiles; under a causal mask the
  //    rotated walk stays better there); FLASH_ATTN2_BWD_DET_WALK=serpentine|rotate forces either.
  //  - dq_store_first (FLASH_ATTN2_BWD_DET_STORE=add turns it off, for A/B): needs the bulk path (a tile's
  //    first write is a plain bulk copy) and no left window edge (the first key block of a split sees every
  //    query block its later ones do). Not for packed batches: rows of q past cu_seqlens_q's last offset
  //    belong to no sequence, and only the memset gives them their zero gradient.
  // The modifier families and one-stage tiles keep one kernel for both, with private slices.
  constexpr bool kDetKernel = kMods == Modifiers::kPlain && Traits::kStages == 2;
  if (kDetKernel && params.deterministic) {
    if (params.dq_turns == nullptr) {
      char const* walk = std::getenv("FLASH_ATTN2_BWD_DET_WALK");
      char const* store = std::getenv("FLASH_ATTN2_BWD_DET_STORE");
      kp.early_loads = true;
      kp.det_serpentine = walk == nullptr ? params.num_splits == 1 || kMask == MaskMode::kNone
                                          : std::strcmp(walk, "rotate") != 0;
      kp.dq_store_first = kp.bulk_dq && kMask != MaskMode::kLocal && params.cu_seqlens_q == nullptr &&
                          (store == nullptr || std::strcmp(store, "add") != 0);
      // tma_qdo: on the bulk path (sm_90) for fixed-length batches (a packed batch's box would run into the
      // next sequence's rows instead of zeros), where the strides allow; FLASH_ATTN2_BWD_DET_TMA=0 turns it
      // off (A/B).
      // The rows' lse and dsum come with each tile by 1-d bulk copies, which need 16-byte aligned runs of
      // a multiple of 16 bytes: seqlen_q % 4 == 0 (a head's rows start at a multiple of seqlen_q) and an
      // aligned softmax_lse (dsum is the workspace's, aligned).
      char const* tma = std::getenv("FLASH_ATTN2_BWD_DET_TMA");
      if (Traits::kTmaQdOCapable && kp.bulk_dq && params.cu_seqlens_q == nullptr && params.seqlen_q % 4 == 0 &&
          reinterpret_cast<uintptr_t>(params.softmax_lse) % 16 == 0 &&
          (tma == nullptr || std::strcmp(tma, "0") != 0) && bulk_dq_available(Traits::kTmaSmemBytes)) {
        constexpr bool kBf16 = kDType == DType::kBf16;
        kp.tma_qdo = encode_rows_map(&kp.tma_q, kBf16, params.q, params.batch, params.seqlen_q, params.num_heads,
                                     params.head_dim, params.q_batch_stride, params.q_row_stride, params.q_head_stride,
                                     64, Traits::kBlockM) &&
                     encode_rows_map(&kp.tma_dout, kBf16, params.dout, params.batch, params.seqlen_q, params.num_heads,
                                     params.head_dim, params.dout_batch_stride, params.dout_row_stride,
                                     params.dout_head_stride, 64, Traits::kBlockM);
      }
    } else {
      char const* loads = std::getenv("FLASH_ATTN2_BWD_DET_LOADS");
      kp.early_loads = loads != nullptr && std::strcmp(loads, "early") == 0;
    }
  }

  if (params.lse_rows > 0) {
    int64_t const blocks = Rows::num_blocks(params.lse_rows);
    if (blocks > INT32_MAX) { return cudaErrorInvalidConfiguration; }
    bwd_preprocess_kernel<Element, kHeadDim><<<dim3(unsigned(blocks)), Rows::kThreads, 0, stream>>>(params);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) { return err; }
    if (!kp.dq_store_first) {
      err = cudaMemsetAsync(params.dq_accum, 0,
                            size_t(params.num_accum_slices) * size_t(params.lse_rows) * kHeadDim * sizeof(float), stream);
      if (err != cudaSuccess) { return err; }
    }
    if (params.dq_turns != nullptr) {
      err = cudaMemsetAsync(params.dq_turns, 0,
                            size_t(params.batch) * params.num_heads * params.num_accum_slices * params.dq_turn_blocks *
                                sizeof(int),
                            stream);
      if (err != cudaSuccess) { return err; }
    }
  }

  int const smem_bytes = kp.tma_qdo ? Traits::kTmaSmemBytes : kp.bulk_dq ? Traits::kBulkDqSmemBytes : Kernel::kSmemBytes;
  cudaError_t err = cudaSuccess;
  if constexpr (kDetKernel) {
    if (params.deterministic) {
      // Where the tiles cannot take TMA, the "TMA" kernel is the cp.async one (and kp.tma_qdo is false).
      using TmaKernel = FlashBwdKernelSm80<Traits, kMask, kMods, true, Traits::kTmaQdOCapable>;
      err = kp.tma_qdo ? launch_bwd_main<TmaKernel>(kp, smem_bytes, stream)
                       : launch_bwd_main<FlashBwdKernelSm80<Traits, kMask, kMods, true>>(kp, smem_bytes, stream);
    } else if (char const* which = std::getenv("FLASH_ATTN2_BWD_KERNEL"); which != nullptr && std::strcmp(which, "det") == 0) {
      err = launch_bwd_main<FlashBwdKernelSm80<Traits, kMask, kMods, true>>(kp, smem_bytes, stream);  // A/B only
    } else {
      err = launch_bwd_main<Kernel>(kp, smem_bytes, stream);
    }
  } else {
    err = launch_bwd_main<Kernel>(kp, smem_bytes, stream);
  }
  if (err != cudaSuccess) { return err; }

  if (params.lse_rows > 0) {
    bwd_postprocess_kernel<Element, kHeadDim>
        <<<dim3(unsigned(Rows::num_blocks(params.lse_rows))), Rows::kThreads, 0, stream>>>(kp);
    err = cudaGetLastError();
  }
  return err;
}

template <DType kDType, int kHeadDim, MaskMode kMask, Modifiers kMods>
BwdKernelInfo bwd_kernel_info() {
  using Traits = BwdTraitsSm80<ElementOf<kDType>, kHeadDim>;
  bool const bulk_dq = Traits::kBulkDqWorthIt && bulk_dq_available(Traits::kBulkDqSmemBytes);
  bool const ordered_dq = bulk_dq && kMods == Modifiers::kPlain && Traits::kStages == 2;
  return {Traits::kSmemBytes, Traits::kBlockM, Traits::kBlockN, Traits::kHeadDim, bulk_dq, ordered_dq};
}

}  // namespace flash_attn2
