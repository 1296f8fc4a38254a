// flash_attn2: the torch-free C++ API. Link flash_attn2::flash_attn2 (or flash_attn2::flash_attn2_static)
// and include this header; a consumer needs the CUDA runtime and nothing of CUTLASS, CuTe or torch.
//
//   flash_attn2::FwdParams p;            // raw device pointers, element strides, sizes (params.h)
//   ... fill p; allocate out like q and softmax_lse with fwd_lse_bytes(p) ...
//   flash_attn2::Status s = flash_attn2::fwd(p, stream);
//   if (!s.ok()) { std::fprintf(stderr, "%s\n", s.message.c_str()); }
//
//   flash_attn2::BwdParams b;            // the forward's fields + dout, dq, dk, dv, deterministic
//   ... fill b; b.workspace = a buffer of bwd_workspace_bytes(b) bytes ...
//   s = flash_attn2::bwd(b, stream);     // under GQA, sum dk/dv over each group of query heads
//
// Errors come back as a Status with a message; the library never exits the process.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime.h>

#include "flash_attn2/params.h"

namespace flash_attn2 {

inline constexpr char kVersion[] = "0.1.0";

// The most key splits fwd_kvcache takes (num_splits): the combine kernel keeps one weight per split in
// shared memory.
inline constexpr int kMaxKVCacheSplits = 256;

// The most query rows (after GQA packing) whose splits the attention kernel combines itself, given
// KVCacheParams::split_tickets: one warp merges a row, so many rows would serialise.
inline constexpr int kFusedCombineMaxRows = 16;

// An error status with a message; empty on success.
struct Status {
  std::string message;
  bool ok() const { return message.empty(); }
};

// Forward attention: out = softmax(q k^T * softmax_scale) v per (batch, head), with the mask of p.mask
// (and p.window_left/right for MaskMode::kLocal) and the score modifiers of p (softcap, alibi_slopes,
// dropout_p with rng_state; params.h).
//   q:   (batch, seqlen_q, num_heads, head_dim)      p.q,   strides q_*_stride, head-dim stride 1
//   k,v: (batch, seqlen_k, num_heads_k, head_dim)    p.k/v, strides k_*/v_*_stride
//   out: (batch, seqlen_q, num_heads, head_dim)      p.out, caller-allocated, same dtype as q
//   Variable-length batches: set cu_seqlens_q/_k (params.h); q, k, v, out are then packed along rows.
//   softmax_lse: fp32 (batch, num_heads, seqlen_q), or (num_heads, total_q) with cu_seqlens,
//        contiguous, caller-allocated (fwd_lse_bytes):
//        natural-log logsumexp of the scaled scores per row; +inf for a row that sees no key
//        (its out row is 0). A backward pass reads it.
// Requirements (checked; a violation returns an error): fp16 or bf16; head_dim a multiple of 8 and
// <= 256, and a kernel for it built (built_kernels()); num_heads % num_heads_k == 0; every pointer
// 16-byte aligned and every batch/row/head stride a multiple of 8 elements; softmax_scale > 0.
// Launches on `stream` and returns without synchronising; launch errors are reported, errors inside
// the kernel surface at the next synchronisation as usual in CUDA.
Status fwd(FwdParams const& params, cudaStream_t stream);

// Bytes of softmax_lse that fwd writes: batch * num_heads * seqlen_q floats (num_heads * total_q with
// cu_seqlens).
inline size_t fwd_lse_bytes(FwdParams const& p) {
  size_t const rows = p.cu_seqlens_q != nullptr ? size_t(p.total_q) : size_t(p.batch) * size_t(p.seqlen_q);
  return size_t(p.num_heads) * rows * sizeof(float);
}

// Scratch memory fwd needs besides q, k, v, out and softmax_lse: none (0), for every shape. Kept as a
// function so callers that size buffers up front need no change when a variant starts to need one.
inline size_t fwd_workspace_bytes(FwdParams const&) { return 0; }

// Backward attention: dq, dk, dv from dout and the forward's q, k, v, out and softmax_lse (BwdParams).
//   dq like q; dk, dv like k, v, except under GQA (num_heads_k < num_heads): then (batch, seqlen_k,
//   num_heads, head_dim), one slice per query head, and the caller sums each group of
//   num_heads / num_heads_k consecutive heads into the gradient of the shared kv head.
//   workspace: bwd_workspace_bytes(p) bytes, 256-byte aligned (fp32 row sums and dq accumulators).
// With p.deterministic the gradients are bitwise reproducible (no floating-point atomics; the
// workspace is larger). Requirements as for fwd, for every operand including dout, dq, dk, dv.
Status bwd(BwdParams const& params, cudaStream_t stream);

// Bytes of workspace bwd needs for these params (0 if they are invalid: bwd then says why). Reads the
// current device's SM count, so query it with the device current that will run bwd.
size_t bwd_workspace_bytes(BwdParams const& params);

// Attention over a KV cache (forward only; see KVCacheParams). params.num_splits >= 1 (resolve 0 with
// kvcache_num_splits first); above 1 it needs out_accum and lse_accum of kvcache_out_accum_floats and
// kvcache_lse_accum_floats elements.
Status fwd_kvcache(KVCacheParams const& params, cudaStream_t stream);

// The number of splits of the key blocks fwd_kvcache will use: params.num_splits when > 0, else a
// heuristic that fills the GPU's SMs (from the kernel's tile, the SM count and the grid) and never makes
// a split shorter than two key blocks. 1 when no kernel fits (fwd_kvcache then says why).
int kvcache_num_splits(KVCacheParams const& params);

// fp32 elements of out_accum and of lse_accum for params.num_splits (0 when it is 1).
size_t kvcache_out_accum_floats(KVCacheParams const& params);
size_t kvcache_lse_accum_floats(KVCacheParams const& params);

// int32 tickets of KVCacheParams::split_tickets for these params: 0 where the kernel would not take them
// (num_splits 1, more than kFusedCombineMaxRows query rows, a head dim not a multiple of 4).
size_t kvcache_split_tickets(KVCacheParams const& params);

// Appends new keys/values to a KV cache in place and rotates q (see KVCacheAppendParams).
Status kvcache_append(KVCacheAppendParams const& params, cudaStream_t stream);

// The compiled kernels, one per line:
// "<fwd|bwd|kvcache> <fp16|bf16> <head dim> <none|causal|local> <plain|softcap|alibi|mod>" (the modifier
// family, Modifiers in params.h: "mod" is kAll, softcap, ALiBi and dropout in any combination; the KV-cache
// kernels are all "mod", without dropout).
std::string built_kernels();

// The dropout keep mask fwd and bwd apply for p's dropout_p, rng_state, sizes and cu_seqlens: keep[b][h][i][j]
// = 1 where score (i, j) of (batch b, head h) is kept, as uint8 (batch, num_heads, seqlen_q, seqlen_k),
// contiguous, caller-allocated (with cu_seqlens, seqlen_q/k are the bounds and entries past a sequence
// are 0). For tests and debugging: it is N x N.
Status dropout_mask(FwdParams const& params, uint8_t* keep, cudaStream_t stream);

}  // namespace flash_attn2
