// Launches one forward kernel instantiation. Included only by the generated instantiation files.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "collective/fwd_traits.h"
#include "kernel/flash_fwd_kernel_sm80.h"
#include "launch/fwd_launch.h"
#include "launch/launch_common.h"

namespace flash_attn2 {

template <DType kDType, int kHeadDim, MaskMode kMask, bool kModifiers>
cudaError_t run_fwd(FwdParams const& params, cudaStream_t stream) {
  using Traits = FwdTraitsSm80<ElementOf<kDType>, kHeadDim, kMask, kModifiers>;
  using Kernel = FlashFwdKernelSm80<Traits, kMask, kModifiers>;
  auto kernel = &device_kernel<Kernel, FwdParams>;
  constexpr int kDefaultSmemLimit = 48 * 1024;  // above this a kernel must opt in
  if constexpr (Kernel::kSmemBytes > kDefaultSmemLimit) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kernel::kSmemBytes);
    if (err != cudaSuccess) { return err; }
  }
  int64_t const blocks = Kernel::num_blocks(params);
  if (blocks > INT32_MAX) { return cudaErrorInvalidConfiguration; }
  kernel<<<dim3(unsigned(blocks)), Kernel::kNThreads, Kernel::kSmemBytes, stream>>>(params);
  return cudaGetLastError();
}

template <DType kDType, int kHeadDim, MaskMode kMask, bool kModifiers>
int fwd_smem_bytes() {
  return FwdTraitsSm80<ElementOf<kDType>, kHeadDim, kMask, kModifiers>::kSmemBytes;
}

}  // namespace flash_attn2
