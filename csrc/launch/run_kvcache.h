// Launches one KV-cache kernel instantiation (and the combine kernel of a split). Included only by the
// generated instantiation files.
#pragma once

#include <algorithm>
#include <cstdlib>

#include <cuda_runtime.h>

#include "collective/fwd_traits.h"
#include "kernel/flash_fwd_combine.h"
#include "kernel/flash_fwd_kernel_sm80.h"
#include "launch/fwd_launch.h"
#include "launch/launch_common.h"

namespace flash_attn2 {

// The KV-cache kernels always compile softcap and ALiBi (kAll: switched at run time; decoding is bound by
// the bytes of the cache, not by the score arithmetic), never dropout.
template <DType kDType, int kHeadDim, MaskMode kMask, bool kCompact = false>
using KVCacheTraits = FwdTraitsSm80<ElementOf<kDType>, kHeadDim, kMask, Modifiers::kAll, /*kKVCache=*/true, kCompact>;
template <DType kDType, int kHeadDim, MaskMode kMask, bool kCompact = false>
using KVCacheKernel = FlashFwdKernelSm80<KVCacheTraits<kDType, kHeadDim, kMask, kCompact>, kMask, Modifiers::kAll, true>;

constexpr int kCombineThreads = 128;

// Whether the current device gives a block smem_bytes of shared memory. FLASH_ATTN2_KVCACHE_SMEM_LIMIT (bytes)
// lowers the device's figure: the tests run the compact tiles on a GPU that would not need them with it.
inline bool kvcache_smem_fits(int smem_bytes) {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return true;  // the launch reports the problem
  }
  if (char const* limit = std::getenv("FLASH_ATTN2_KVCACHE_SMEM_LIMIT"); limit != nullptr && *limit != '\0') {
    optin = std::min(optin, std::atoi(limit));
  }
  return smem_bytes <= optin;
}

// Whether this (dtype, head dim, mask) runs its compact tiles on the current device: only where the ring
// needs more than the smallest GPUs have (otherwise no compact kernel is instantiated) and more than
// this one has.
template <DType kDType, int kHeadDim, MaskMode kMask>
bool kvcache_takes_compact() {
  if constexpr (KVCacheTraits<kDType, kHeadDim, kMask>::kSmemBytes > kSmallGpuSmemBytes) {
    return !kvcache_smem_fits(KVCacheTraits<kDType, kHeadDim, kMask>::kSmemBytes);
  } else {
    return false;
  }
}

template <class Kernel, class Element>
cudaError_t launch_kvcache(KVCacheParams const& params, cudaStream_t stream) {
  cudaError_t const err = launch_flat<Kernel>(params, stream);
  if (err != cudaSuccess || params.num_splits <= 1) { return err; }
  int64_t const rows = int64_t(params.batch) * params.num_heads * params.seqlen_q;
  if (rows > INT32_MAX) { return cudaErrorInvalidConfiguration; }
  kvcache_combine_kernel<Element, kCombineThreads><<<dim3(unsigned(rows)), kCombineThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

template <DType kDType, int kHeadDim, MaskMode kMask>
cudaError_t run_kvcache(KVCacheParams const& params, cudaStream_t stream) {
  if constexpr (KVCacheTraits<kDType, kHeadDim, kMask>::kSmemBytes > kSmallGpuSmemBytes) {
    if (kvcache_takes_compact<kDType, kHeadDim, kMask>()) {
      return launch_kvcache<KVCacheKernel<kDType, kHeadDim, kMask, true>, ElementOf<kDType>>(params, stream);
    }
  }
  return launch_kvcache<KVCacheKernel<kDType, kHeadDim, kMask>, ElementOf<kDType>>(params, stream);
}

template <class Traits, class Kernel>
KVCacheKernelInfo kvcache_info_of() {
  return {Traits::kSmemBytes, Traits::kBlockM, Traits::kBlockN, ctas_per_sm<Kernel, KVCacheParams>()};
}

// The tiles run_kvcache will launch on the current device.
template <DType kDType, int kHeadDim, MaskMode kMask>
KVCacheKernelInfo kvcache_kernel_info() {
  if constexpr (KVCacheTraits<kDType, kHeadDim, kMask>::kSmemBytes > kSmallGpuSmemBytes) {
    if (kvcache_takes_compact<kDType, kHeadDim, kMask>()) {
      return kvcache_info_of<KVCacheTraits<kDType, kHeadDim, kMask, true>, KVCacheKernel<kDType, kHeadDim, kMask, true>>();
    }
  }
  return kvcache_info_of<KVCacheTraits<kDType, kHeadDim, kMask>, KVCacheKernel<kDType, kHeadDim, kMask>>();
}

}  // namespace flash_attn2
