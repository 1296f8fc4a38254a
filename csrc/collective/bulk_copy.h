// Hopper's bulk (TMA) copies without a tensor map: one thread hands the copy engine a contiguous run
// of shared memory and a global address; the engine does the work, off the issuing warp's memory pipe.
// sm_90+ only: elsewhere the functions trap, and callers keep them behind a run-time flag that the host
// sets only on such devices.
#pragma once

#include <cstdint>

#include <cute/config.hpp>

namespace flash_attn2 {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FLASH_ATTN2_BULK_COPY 1
#endif

// gmem[i] += smem[i] for `bytes` bytes of fp32 (a multiple of 16, both addresses 16-byte aligned),
// each element added atomically in L2, as red.global.add.f32 would.
CUTE_DEVICE void bulk_reduce_add_f32(float* gmem, float const* smem, int bytes) {
#ifdef FLASH_ATTN2_BULK_COPY
  uint32_t const s = uint32_t(__cvta_generic_to_shared(smem));
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
               :
               : "l"(gmem), "r"(s), "r"(bytes)
               : "memory");
#else
  __trap();
#endif
}

// gmem[i] = smem[i] for `bytes` bytes (a multiple of 16, both addresses 16-byte aligned): a plain bulk copy,
// for the first write of an accumulator tile that nothing was added to yet.
CUTE_DEVICE void bulk_store(float* gmem, float const* smem, int bytes) {
#ifdef FLASH_ATTN2_BULK_COPY
  uint32_t const s = uint32_t(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
               :
               : "l"(gmem), "r"(s), "r"(bytes)
               : "memory");
#else
  __trap();
#endif
}

// Closes the issuing thread's bulk copies so far into one group.
CUTE_DEVICE void bulk_commit() {
#ifdef FLASH_ATTN2_BULK_COPY
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
#endif
}

// Waits until the issuing thread's groups but the newest kPending have read their shared memory
// (the buffer may be rewritten; the global writes may still be in flight).
template <int kPending>
CUTE_DEVICE void bulk_wait_read() {
#ifdef FLASH_ATTN2_BULK_COPY
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kPending) : "memory");
#endif
}

// Waits until the issuing thread's bulk copies are complete, their global writes included.
CUTE_DEVICE void bulk_wait_all() {
#ifdef FLASH_ATTN2_BULK_COPY
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
#endif
}

// Turns between CTAs (the ordered deterministic dQ of the backward). wait_turn spins until *counter ==
// turn, then orders the caller's later bulk copies after what the CTAs of the earlier turns completed;
// pass_turn, after bulk_wait_all, publishes this thread's completed bulk writes and then adds 1. A counter
// that never reaches `turn` (a scheduling bug) traps after about 2^26 polls (seconds) instead of hanging.
CUTE_DEVICE void wait_turn(int const* counter, int turn) {
#ifdef FLASH_ATTN2_BULK_COPY
  for (int polls = 0;; ++polls) {
    int value;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(value) : "l"(counter) : "memory");
    if (value == turn) { break; }
    if (polls >= (1 << 26)) { __trap(); }
  }
  asm volatile("fence.proxy.async.global;" ::: "memory");
#else
  __trap();
#endif
}
CUTE_DEVICE void pass_turn(int* counter) {
#ifdef FLASH_ATTN2_BULK_COPY
  asm volatile("fence.proxy.async.global;" ::: "memory");
  asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(counter) : "memory");
#else
  __trap();
#endif
}

// Orders this thread's earlier generic-proxy writes to shared memory before later bulk copies that
// read it (with a barrier between the writers and the issuing thread).
CUTE_DEVICE void fence_shared_for_bulk() {
#ifdef FLASH_ATTN2_BULK_COPY
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

}  // namespace flash_attn2
