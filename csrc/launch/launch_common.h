// What the forward and backward launchers share: the element type of a DType, and the __global__
// entry that runs a kernel functor on its dynamic shared memory.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>
#include <cute/config.hpp>
#include <cutlass/numeric_types.h>

#include "common/grid_dependency.h"
#include "flash_attn2/params.h"

namespace flash_attn2 {

template <DType kDType>
using ElementOf = std::conditional_t<kDType == DType::kFp16, cutlass::half_t, cutlass::bfloat16_t>;

// One CTA of Kernel (a functor with kNThreads and operator()(Params const&, char* smem)); one CTA per SM
// is what every tile is sized for.
template <class Kernel, class Params>
__global__ void __launch_bounds__(Kernel::kNThreads, 1) device_kernel(CUTE_GRID_CONSTANT Params const params) {
  extern __shared__ __align__(128) char smem_buf[];
  Kernel{}(params, smem_buf);
}

// The current device's value of attr, for the launchers' run-time choices (dispatch.cpp, host-only C++,
// has its own device_attribute with a Status).
inline cudaError_t current_device_attribute(cudaDeviceAttr attr, int& value) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) { err = cudaDeviceGetAttribute(&value, attr, device); }
  return err;
}

// Opts Kernel in to more than the default 48 KB of dynamic shared memory where its tile needs it.
template <class Kernel, class Params>
cudaError_t opt_in_smem() {
  constexpr int kDefaultSmemLimit = 48 * 1024;  // above this a kernel must opt in
  if constexpr (Kernel::kSmemBytes > kDefaultSmemLimit) {
    return cudaFuncSetAttribute(&device_kernel<Kernel, Params>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                Kernel::kSmemBytes);
  }
  return cudaSuccess;
}

// Launches kernel with a programmatic dependency on the kernel before it in the stream where the device has
// them (sm_90+; common/grid_dependency.h: the kernel must call grid_dependency_wait() before its first
// access to memory), else as an ordinary launch.
template <class... Args>
cudaError_t launch_dependent(void (*kernel)(Args...), dim3 grid, int threads, int smem_bytes, cudaStream_t stream,
                             Args const&... args) {
  int major = 0;
  if (cudaError_t const err = current_device_attribute(cudaDevAttrComputeCapabilityMajor, major);
      err != cudaSuccess) {
    return err;
  }
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(unsigned(threads));
  config.dynamicSmemBytes = size_t(smem_bytes);
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = major >= 9 ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

// Launches Kernel on its flat grid of Kernel::num_blocks(params) CTAs; kDependent: through launch_dependent.
template <class Kernel, class Params, bool kDependent = false>
cudaError_t launch_flat(Params const& params, cudaStream_t stream) {
  if (cudaError_t const err = opt_in_smem<Kernel, Params>(); err != cudaSuccess) { return err; }
  int64_t const blocks = Kernel::num_blocks(params);
  if (blocks > INT32_MAX) { return cudaErrorInvalidConfiguration; }
  if constexpr (kDependent) {
    return launch_dependent(&device_kernel<Kernel, Params>, dim3(unsigned(blocks)), Kernel::kNThreads,
                            Kernel::kSmemBytes, stream, params);
  } else {
    device_kernel<Kernel, Params><<<dim3(unsigned(blocks)), Kernel::kNThreads, Kernel::kSmemBytes, stream>>>(params);
    return cudaGetLastError();
  }
}

// How many CTAs of Kernel one SM of the current device holds (at least 1): the KV-cache split heuristic
// sizes its grid by it. Computed once per process (the first caller's device; on a host with mixed GPU
// models the others get a split count that may fill their waves less well, never a wrong result).
template <class Kernel, class Params>
int ctas_per_sm() {
  static int const cached = [] {
    int n = 0;
    if (opt_in_smem<Kernel, Params>() != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, &device_kernel<Kernel, Params>, Kernel::kNThreads,
                                                      Kernel::kSmemBytes) != cudaSuccess) {
      (void)cudaGetLastError();
      return 1;
    }
    return n > 0 ? n : 1;
  }();
  return cached;
}

}  // namespace flash_attn2
