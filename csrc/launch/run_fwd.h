// Launches one forward kernel instantiation. Included only by the generated instantiation files.
#pragma once

#include <cuda_runtime.h>

#include "collective/fwd_traits.h"
#include "kernel/flash_fwd_kernel_sm80.h"
#include "launch/fwd_launch.h"
#include "launch/launch_common.h"

namespace flash_attn2 {

template <DType kDType, int kHeadDim, MaskMode kMask, Modifiers kMods>
cudaError_t run_fwd(FwdParams const& params, cudaStream_t stream) {
  using Traits = FwdTraitsSm80<ElementOf<kDType>, kHeadDim, kMask, kMods>;
  return launch_flat<FlashFwdKernelSm80<Traits, kMask, kMods>>(params, stream);
}

template <DType kDType, int kHeadDim, MaskMode kMask, Modifiers kMods>
int fwd_smem_bytes() {
  return FwdTraitsSm80<ElementOf<kDType>, kHeadDim, kMask, kMods>::kSmemBytes;
}

}  // namespace flash_attn2
