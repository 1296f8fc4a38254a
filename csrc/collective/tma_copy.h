// Hopper's tensor-map (TMA) tile loads and the shared-memory barriers they complete: one thread issues a
// whole (rows, 64-column) box of a 16-bit tensor into shared memory with the 128-byte swizzle (the byte
// pattern of Sm80Swizzle's 64-column atom); the copy engine zero-fills what lies outside the tensor and
// counts the bytes in on an mbarrier that the consumers wait on. sm_90+ only: elsewhere the functions
// trap, and callers keep them behind a run-time flag that the host sets only on such devices.
#pragma once

#include <cstdint>

#include <cuda.h>
#include <cute/config.hpp>

namespace flash_attn2 {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FLASH_ATTN2_TMA 1
#endif

// An mbarrier expecting `count` arrivals per phase, visible to the copy engine and the CTA's threads
// once the caller's __syncthreads follows.
CUTE_DEVICE void mbarrier_init(uint64_t* bar, int count) {
#ifdef FLASH_ATTN2_TMA
  uint32_t const b = uint32_t(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(b), "r"(count) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#else
  __trap();
#endif
}

// The issuing thread's arrival, announcing `bytes` that the phase's copies will deliver.
CUTE_DEVICE void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef FLASH_ATTN2_TMA
  uint32_t const b = uint32_t(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(bytes) : "memory");
#else
  __trap();
#endif
}

// Waits until the barrier's phase of parity `phase` has completed (its copies have landed).
CUTE_DEVICE void mbarrier_wait(uint64_t* bar, uint32_t phase) {
#ifdef FLASH_ATTN2_TMA
  uint32_t const b = uint32_t(__cvta_generic_to_shared(bar));
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(b),
      "r"(phase)
      : "memory");
#else
  __trap();
#endif
}

// The box of `map` at coordinates (c0, c1, c2, c3), innermost first, into shared memory at `smem`
// (1024-byte aligned for the 128-byte swizzle), completing on `bar`.
CUTE_DEVICE void tma_load_4d(void* smem, CUtensorMap const* map, uint64_t* bar, int c0, int c1, int c2, int c3) {
#ifdef FLASH_ATTN2_TMA
  uint32_t const s = uint32_t(__cvta_generic_to_shared(smem));
  uint32_t const b = uint32_t(__cvta_generic_to_shared(bar));
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];" ::"r"(s),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(b), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
#else
  __trap();
#endif
}

// `bytes` contiguous bytes (a multiple of 16, both addresses 16-byte aligned) from global memory into shared
// memory at `smem`, completing on `bar` like a box: the rows' statistics that come with a Q and dO tile.
CUTE_DEVICE void bulk_load_1d(void* smem, void const* gmem, uint32_t bytes, uint64_t* bar) {
#ifdef FLASH_ATTN2_TMA
  uint32_t const s = uint32_t(__cvta_generic_to_shared(smem));
  uint32_t const b = uint32_t(__cvta_generic_to_shared(bar));
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(s),
               "l"(gmem), "r"(bytes), "r"(b)
               : "memory");
#else
  __trap();
#endif
}

}  // namespace flash_attn2
