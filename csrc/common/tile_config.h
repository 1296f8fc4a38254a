// The one table of forward tile sizes. Nothing else restates these numbers: traits derive from them.
#pragma once

namespace flash_attn2 {

struct FwdTile {
  int block_m;    // query rows per CTA
  int block_n;    // key rows per main-loop step
  int num_warps;  // Q is split across warps along M; 16 rows per warp per MMA
  int min_blocks_per_sm = 1;  // occupancy target: caps registers at 64K / (threads * this)
};

// Reasons per row. Shared memory is Q (block_m x d) + K and V (block_n x d each), 2 bytes per element.
// Registers dominate: each thread holds block_m*d/threads fp32 of O plus block_m*block_n/threads of S.
constexpr FwdTile fwd_tile(int head_dim) {
  switch (head_dim) {
    // Small d: loads are cheap relative to the S tile, so a wide key step amortises the softmax.
    // 24 KB smem; several CTAs fit per SM.
    case 32: return {128, 128, 4};
    // 128x128: S and O each take 64 fp32 registers per thread; 48 KB smem.
    case 64: return {128, 64, 4};
    // d=96 uses a 32-column swizzle atom; 128x64 keeps O (96 regs) + S (64 regs) under 255.
    case 96: return {128, 64, 4};
    // O takes 128 registers per thread: a 64-key step keeps S at 64 registers without spills. 64 KB smem.
    case 128: return {128, 64, 4};
    // O would need 192 registers with 4 warps: 8 warps halve it. 80 KB smem.
    case 192: return {128, 64, 8};
    // 8 warps: 128 O registers per thread. 128 KB smem: fits A100 (163 KB) and H100 (227 KB), not sm86/89 (99 KB).
    case 256: return {128, 64, 8};
    default: return {0, 0, 0};
  }
}

// Head dims with a compiled forward kernel. Any d <= 256 that is a multiple of 8 runs on the smallest
// of these that is >= d, with the extra columns predicated off.
inline constexpr int kFwdHeadDims[] = {32, 64, 96, 128, 192, 256};

}  // namespace flash_attn2
