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

constexpr int kCombineThreads = 128;

// Whether the current device gives a block smem_bytes of shared memory. FLASH_ATTN2_KVCACHE_SMEM_LIMIT (bytes)
// lowers the device's figure: the tests run the compact tiles on a GPU that would not need them with it.
inline bool kvcache_smem_fits(int smem_bytes) {
  int optin = 0;
  if (current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, optin) != cudaSuccess) {
    (void)cudaGetLastError();
    return true;  // the launch reports the problem
  }
  if (char const* limit = std::getenv("FLASH_ATTN2_KVCACHE_SMEM_LIMIT"); limit != nullptr && *limit != '\0') {
    optin = std::min(optin, std::atoi(limit));
  }
  return smem_bytes <= optin;
}

// Calls fn with the traits of the tiles this (dtype, head dim, mask) runs on the current device: the
// compact ones where the ring needs more than the smallest GPUs have (only then is a compact kernel
// instantiated) and more than this one has, else the ring. Traits are empty structs: fn takes a value.
template <DType kDType, int kHeadDim, MaskMode kMask, class Fn>
auto with_kvcache_tiles(Fn&& fn) {
  using Ring = KVCacheTraits<kDType, kHeadDim, kMask>;
  if constexpr (Ring::kSmemBytes > kSmallGpuSmemBytes) {
    if (!kvcache_smem_fits(Ring::kSmemBytes)) { return fn(KVCacheTraits<kDType, kHeadDim, kMask, true>{}); }
  }
  return fn(Ring{});
}

template <MaskMode kMask, class Traits>
using KVCacheKernelOf = FlashFwdKernelSm80<Traits, kMask, Modifiers::kAll, /*kKVCache=*/true>;

template <DType kDType, int kHeadDim, MaskMode kMask>
cudaError_t run_kvcache(KVCacheParams const& params, cudaStream_t stream) {
  return with_kvcache_tiles<kDType, kHeadDim, kMask>([&](auto traits) {
    using Kernel = KVCacheKernelOf<kMask, decltype(traits)>;
    // Both launches overlap the start of each with the end of the kernel before it (launch_dependent).
    cudaError_t const err = launch_flat<Kernel, KVCacheParams, /*kDependent=*/true>(params, stream);
    // With split tickets the attention kernel's last split CTA of each tile merged the splits itself.
    if (err != cudaSuccess || params.num_splits <= 1 || params.split_tickets != nullptr) { return err; }
    int64_t const rows = int64_t(params.batch) * params.num_heads * params.seqlen_q;
    if (rows > INT32_MAX) { return cudaErrorInvalidConfiguration; }
    return launch_dependent(&kvcache_combine_kernel<ElementOf<kDType>, kCombineThreads>, dim3(unsigned(rows)),
                            kCombineThreads, 0, stream, params);
  });
}

// The tiles run_kvcache will launch on the current device.
template <DType kDType, int kHeadDim, MaskMode kMask>
KVCacheKernelInfo kvcache_kernel_info() {
  return with_kvcache_tiles<kDType, kHeadDim, kMask>([](auto traits) {
    using Traits = decltype(traits);
    return KVCacheKernelInfo{Traits::kSmemBytes, Traits::kBlockM, Traits::kBlockN,
                             ctas_per_sm<KVCacheKernelOf<kMask, Traits>, KVCacheParams>()};
  });
}

}  // namespace flash_attn2
