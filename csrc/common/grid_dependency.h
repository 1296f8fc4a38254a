// Programmatic dependent launch (sm_90+), for the decode path's chain of small kernels (append, attention,
// combine): a kernel launched with launch_dependent (launch/launch_common.h) may start while the kernel
// before it in the stream is still running, once every CTA of that one has called
// grid_launch_dependents() (or exited). It must call grid_dependency_wait() before it touches memory the
// earlier kernel writes or reads: the wait returns when that kernel has completed and its writes are
// visible. What it saves is the launch latency and the ramp of the later kernel's CTAs, a few
// microseconds of a decode step that takes 10-30. Both are no-ops before sm_90 and when the launch had no
// programmatic dependency.
#pragma once

namespace flash_attn2 {

__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace flash_attn2
