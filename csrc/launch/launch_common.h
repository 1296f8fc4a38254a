// What the forward and backward launchers share: the element type of a DType, and the __global__
// entry that runs a kernel functor on its dynamic shared memory.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>
#include <cute/config.hpp>
#include <cutlass/numeric_types.h>

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

// Launches Kernel on its flat grid of Kernel::num_blocks(params) CTAs.
template <class Kernel, class Params>
cudaError_t launch_flat(Params const& params, cudaStream_t stream) {
  if (cudaError_t const err = opt_in_smem<Kernel, Params>(); err != cudaSuccess) { return err; }
  int64_t const blocks = Kernel::num_blocks(params);
  if (blocks > INT32_MAX) { return cudaErrorInvalidConfiguration; }
  device_kernel<Kernel, Params><<<dim3(unsigned(blocks)), Kernel::kNThreads, Kernel::kSmemBytes, stream>>>(params);
  return cudaGetLastError();
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
