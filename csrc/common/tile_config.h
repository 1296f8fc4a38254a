// The one table of forward tile sizes. Nothing else restates these numbers: traits derive from them.
#pragma once

#include "flash_attn2/params.h"

namespace flash_attn2 {

struct FwdTile {
  int block_m;    // query rows per CTA
  int block_n;    // key rows per main-loop step
  int num_warps;  // Q is split across warps along M; 16 rows per warp per MMA
};

// Reasons per row, measured on an H200 (bf16, 16k tokens per batch, width 2048; benchmarks/PERF_LOG.md).
// Shared memory is Q (block_m x d) + K and V (block_n x d each), 2 bytes per element. Registers decide:
// each thread holds block_m * d / threads fp32 of O plus block_m * block_n / threads of S, and a tile
// that makes ptxas spill loses more than its larger key step gains.
// Causal and sliding-window (kLocal) kernels share a row unless it says otherwise.
// mods: the kAll family (softcap, ALiBi and dropout compiled in) holds their parameters and the Philox
// state in registers too; the one-modifier families (kSoftcap, kAlibi) take the plain tiles unless a row
// says otherwise.
constexpr FwdTile fwd_tile(int head_dim, MaskMode mask, Modifiers mods = Modifiers::kPlain) {
  bool const all_mods = mods == Modifiers::kAll;  // the family with dropout
  switch (head_dim) {
    // Small d: loads are cheap relative to the S tile, so a wide key step amortises the softmax.
    // 24 KB smem. (Spills 28 B; not yet measured against narrower tiles.)
    case 32: return {128, 128, 4};
    // Non-causal: 128x128 beat 128x64 by 6% at 1k and 2% at 4k despite ~180 B of spills.
    // Causal: 128x64 (no spills) beat 128x128 by 2-3% at first (its diagonal steps are narrower); since the
    // O rescale is a real branch (keep_branch) 128x128 is ahead: ours / sdpa_flash at 1k-16k, bf16 1.02 /
    // 0.98 / 1.00 / 1.02 / 1.02 against 1.00 / 0.97 / 0.99 / 1.00 / 1.01 (fp16 1.01-1.06 against 0.98-1.02).
    // A sliding window keeps 128x64 (not measured at 128x128).
    // With the modifiers (kAll) 128x128 spilled 576 B (ptxas), 128x64 180 B; softcap 232 B, ALiBi 316 B:
    // every modifier family takes 128x64.
    case 64:
      return mask == MaskMode::kLocal || mods != Modifiers::kPlain ? FwdTile{128, 64, 4} : FwdTile{128, 128, 4};
    // d=96 uses a 32-column swizzle atom; 128x64 keeps O (96 regs) + S (64 regs) without spills.
    case 96: return {128, 64, 4};
    // O takes 128 registers per thread. 128x64 beat 128x32 (no spills) by 5-10% at 1k-16k, and 8 warps
    // (128x64, 128x128) or 64x64 by 10-15%. 64 KB smem: 2 CTAs per SM.
    // With the modifiers (kAll), 128x64 spilled 480-648 B (ptxas) and ran 2.1x the plain kernel's time on
    // an H200 (4k, bf16); 128x32 spills 64-80 B, as little as the plain 128x64. softcap and ALiBi alone:
    // 128x64 spills 40-64 B.
    case 128: return all_mods ? FwdTile{128, 32, 4} : FwdTile{128, 64, 4};
    // O would need 192 registers with 4 warps: 8 warps halve it. 80 KB smem.
    case 192: return {128, 64, 8};
    // 8 warps: 128 O registers per thread. 128 KB smem: fits A100 (163 KB) and H100 (227 KB), not sm86/89 (99 KB).
    // 64x64 with 4 warps (2 CTAs/SM) was 5% faster only at causal 1k, 5-8% slower elsewhere.
    case 256: return {128, 64, 8};
    default: return {0, 0, 0};
  }
}

// The KV-cache kernels (decode: a few query rows against a long cache, bound by the bytes of K and V).
// 64 query rows (GQA decode packs a group's heads into them; warps whose 16 rows are all padding skip
// the math), and `stages` K/V buffers: stages - 1 key blocks stream in while one is computed on, so
// each SM keeps (stages - 1) * ctas_per_sm * 2 * block_n * d * 2 bytes of loads in flight. The FA2
// forward's alternation (one K or V tile in flight per CTA) read at 74-78% of copy bandwidth on an
// H200 (PERF_LOG d2). Shared memory is 64 x d (Q) + stages * 2 * block_n * d, 2 bytes each; the rows
// fit an A100's 163 KB (an H100 takes two CTAs of <= 113 KB per SM).
// compact: the tiles for GPUs with 99 KB of shared memory per block (sm86, sm89, sm120), two stages:
// instantiated beside the ring wherever the ring needs more (see run_kvcache), not measured for speed.
struct KVCacheTile {
  int block_m;
  int block_n;
  int num_warps;
  int stages;
};
constexpr KVCacheTile kvcache_tile(int head_dim, bool compact = false) {
  switch (head_dim) {
    // 52 KB / 104 KB: two or more CTAs per SM with 64 KB of loads in flight each. compact: 36 / 72 KB.
    case 32:
    case 64: return compact ? KVCacheTile{64, 128, 4, 2} : KVCacheTile{64, 128, 4, 3};
    // 84 KB / 112 KB: two CTAs per SM on an H100, 32 KB (hdim 128) per key block, two blocks in flight.
    // compact: 60 / 80 KB.
    case 96:
    case 128: return compact ? KVCacheTile{64, 64, 4, 2} : KVCacheTile{64, 64, 4, 3};
    // 120 KB / 160 KB: one CTA per SM, one block in flight while one is computed on. compact: 72 / 96 KB.
    case 192:
    case 256: return compact ? KVCacheTile{64, 32, 4, 2} : KVCacheTile{64, 64, 4, 2};
    default: return {0, 0, 0, 0};
  }
}

// The opt-in shared memory per block of the smallest GPUs the sm80 kernels run on (sm86, sm89, sm120).
constexpr int kSmallGpuSmemBytes = 99 * 1024;
// The most a block may take for two to share an H100/H200 SM (228 KB, 1 KB reserved per block).
constexpr int kTwoCtasPerSmSmemBytes = 113 * 1024;

struct BwdTile {
  int block_m;     // query rows per main-loop step
  int block_n;     // key rows per CTA (their dK and dV stay in registers for the whole loop)
  int num_warps;
  int warps_m_sdp;  // warps along M for S = Q K^T and dP = dO V^T (the rest go along N)
  int warps_n_dkv;  // warps along N for dV += P^T dO and dK += dS^T Q (the rest along the head dim)
  int warps_m_dq;   // warps along M for dQ = dS K (the rest along the head dim)
  int stages;       // Q and dO buffers: 2 prefetches the next query block under this one's math
};

// Shared memory is stages * (Q + dO) (block_m x d each) + K + V (block_n x d each) + P + dS (block_m x
// block_n each), 2 bytes per element; every row fits an A100's 163 KB (the H100 has 227 KB). Registers:
// dK and dV take 2 * block_n * d / threads fp32 for the whole loop, S and dP 2 * block_m * block_n /
// threads while dS is formed, dQ block_m * d / threads after them.
constexpr BwdTile bwd_tile(int head_dim) {
  switch (head_dim) {
    // 112 KB. Small d: a wide 128 x 128 step amortises the softmax recomputation.
    case 32: return {128, 128, 8, 4, 4, 4, 2};
    // 160 KB. dK + dV 64 regs, S + dP 128.
    case 64: return {128, 128, 8, 4, 4, 4, 2};
    // 128 KB; d = 96 uses the 32-column swizzle atom.
    case 96: return {64, 128, 8, 2, 4, 4, 2};
    // 160 KB. dK + dV 128 regs, S + dP 64.
    case 128: return {64, 128, 8, 2, 4, 2, 2};
    // 160 KB.
    case 192: return {64, 64, 8, 4, 2, 2, 2};
    // 144 KB with one stage (two would need 208 KB). dK + dV take 128 regs.
    case 256: return {64, 64, 8, 4, 2, 2, 1};
    default: return {0, 0, 0, 0, 0, 0, 0};
  }
}

}  // namespace flash_attn2
