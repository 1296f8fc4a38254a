// What the forward and backward launchers share: the element type of a DType, and the __global__
// entry that runs a kernel functor on its dynamic shared memory.
#pragma once

#include <type_traits>

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

}  // namespace flash_attn2
