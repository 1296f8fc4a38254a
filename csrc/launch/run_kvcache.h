// Launches one KV-cache kernel instantiation (and the combine kernel of a split). Included only by the
// generated instantiation files.
#pragma once

#include <cuda_runtime.h>

#include "collective/fwd_traits.h"
#include "kernel/flash_fwd_combine.h"
#include "kernel/flash_fwd_kernel_sm80.h"
#include "launch/fwd_launch.h"
#include "launch/launch_common.h"

namespace flash_attn2 {

// The KV-cache kernels always compile softcap and ALiBi (kAll: switched at run time; decoding is bound by
// the bytes of the cache, not by the score arithmetic), never dropout.
template <DType kDType, int kHeadDim, MaskMode kMask>
using KVCacheTraits = FwdTraitsSm80<ElementOf<kDType>, kHeadDim, kMask, Modifiers::kAll, /*kKVCache=*/true>;

constexpr int kCombineThreads = 128;

template <DType kDType, int kHeadDim, MaskMode kMask>
cudaError_t run_kvcache(KVCacheParams const& params, cudaStream_t stream) {
  using Kernel = FlashFwdKernelSm80<KVCacheTraits<kDType, kHeadDim, kMask>, kMask, Modifiers::kAll, true>;
  cudaError_t const err = launch_flat<Kernel>(params, stream);
  if (err != cudaSuccess || params.num_splits <= 1) { return err; }
  int64_t const rows = int64_t(params.batch) * params.num_heads * params.seqlen_q;
  if (rows > INT32_MAX) { return cudaErrorInvalidConfiguration; }
  kvcache_combine_kernel<ElementOf<kDType>, kCombineThreads><<<dim3(unsigned(rows)), kCombineThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

template <DType kDType, int kHeadDim, MaskMode kMask>
KVCacheKernelInfo kvcache_kernel_info() {
  using Traits = KVCacheTraits<kDType, kHeadDim, kMask>;
  using Kernel = FlashFwdKernelSm80<Traits, kMask, Modifiers::kAll, true>;
  return {Traits::kSmemBytes, Traits::kBlockM, Traits::kBlockN, ctas_per_sm<Kernel, KVCacheParams>()};
}

}  // namespace flash_attn2
