// Plain parameter structs shared by every layer below the torch API.
// No torch and no CuTe types here: installed as part of the torch-free C++ library (<flash_attn2/params.h>).
#pragma once

#include <cstdint>

namespace flash_attn2 {

// Element type of q, k, v and out. The accumulators are always fp32.
enum class DType : int { kFp16 = 0, kBf16 = 1 };

// Which keys a query row may see. Mutually exclusive modes are one enum, not a soup of bools.
//   kNone:   every key.
//   kCausal: key j is visible to row i iff j <= i + seqlen_k - seqlen_q (bottom-right aligned).
//   kLocal:  sliding window: key j is visible to row i iff
//            i + seqlen_k - seqlen_q - window_left <= j <= i + seqlen_k - seqlen_q + window_right,
//            a negative window side being unbounded (causal with a window: window_right = 0).
enum class MaskMode : int { kNone = 0, kCausal = 1, kLocal = 2 };

// Which score modifiers a kernel family compiles in (a compile-time axis, like the mask):
//   kPlain:   none.
//   kSoftcap: logit softcapping alone, always on.
//   kAlibi:   ALiBi alone, always on.
//   kAll:     softcap, ALiBi and dropout, each switched at run time: any combination (dropout included).
// The one-modifier families exist because a run-time switch costs what it guards: the compiler turns the
// branches into predicated code, so a kernel that can drop out pays for Philox on every score even with
// dropout off, and one that can softcap pays for tanh.
enum class Modifiers : int { kPlain = 0, kSoftcap = 1, kAlibi = 2, kAll = 3 };

// Forward attention on dense (batch, seqlen, heads, head_dim) tensors.
// Strides are in elements; the head_dim stride is 1 for every tensor.
struct FwdParams {
  void const* __restrict__ q = nullptr;
  void const* __restrict__ k = nullptr;
  void const* __restrict__ v = nullptr;
  void* __restrict__ out = nullptr;
  // (batch, num_heads, seqlen_q) fp32, contiguous: natural-log logsumexp of the scaled scores.
  float* __restrict__ softmax_lse = nullptr;

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;

  int batch = 0;
  int seqlen_q = 0;
  int seqlen_k = 0;
  int num_heads = 0;
  int num_heads_k = 0;  // num_heads % num_heads_k == 0 (MQA/GQA)
  int head_dim = 0;     // the real head dim, a multiple of 8, <= the kernel's kHeadDim

  float softmax_scale = 0.f;

  // Variable-length batches (optional; both or neither). With cu_seqlens_q / cu_seqlens_k (device int32,
  // batch + 1 non-decreasing entries from 0), q and out are packed (total_q, num_heads, head_dim) and
  // k, v (total_k, num_heads_k, head_dim): sequence b owns rows [cu_seqlens[b], cu_seqlens[b + 1]).
  // seqlen_q then must be >= every q length (it sizes the grid; rows past it are not computed), seqlen_k
  // is not used by the kernel, the batch strides are unused, and softmax_lse is (num_heads, total_q).
  int const* __restrict__ cu_seqlens_q = nullptr;
  int const* __restrict__ cu_seqlens_k = nullptr;
  int64_t total_q = 0;  // rows of the packed q, with cu_seqlens

  DType dtype = DType::kBf16;
  MaskMode mask = MaskMode::kNone;
  // kLocal only: the window's extent to the left and right of the diagonal; -1 is unbounded.
  int window_left = -1;
  int window_right = -1;

  // Score modifiers, each off at its default. They run on the kernels built with modifiers (the plain
  // kernels serve calls that use none of them).
  // Logit softcapping: the scaled score z becomes softcap * tanh(z / softcap). 0 is off.
  float softcap = 0.f;
  // ALiBi: -slope * |i + seqlen_k - seqlen_q - j| is added to the (softcapped) scaled score. fp32 device
  // pointer; slope of (batch b, head h) = alibi_slopes[b * alibi_slopes_batch_stride + h] (stride 0:
  // one slope per head for every batch). nullptr is off.
  float const* __restrict__ alibi_slopes = nullptr;
  int64_t alibi_slopes_batch_stride = 0;
  // Dropout on the probabilities: each is kept with probability 1 - dropout_p and scaled by
  // 1 / (1 - dropout_p). The keep mask is a Philox4x32-10 stream keyed by rng_state[0] (the seed) at a
  // counter made of the score's coordinates and rng_state[1] (the offset), so the backward pass regenerates the same
  // mask from the same rng_state: a device pointer to 2 uint64, read by the kernels (never by the host,
  // so a CUDA graph can replay a step with a new seed). 0 is off.
  float dropout_p = 0.f;
  uint64_t const* __restrict__ rng_state = nullptr;

  // The kernel family a call needs: the one-modifier family of its only modifier, kAll for dropout or
  // for several at once. A kAll kernel also serves kSoftcap and kAlibi calls (see serves()).
  Modifiers modifiers() const {
    bool const capped = softcap > 0.f, biased = alibi_slopes != nullptr;
    if (dropout_p > 0.f || (capped && biased)) { return Modifiers::kAll; }
    return capped ? Modifiers::kSoftcap : biased ? Modifiers::kAlibi : Modifiers::kPlain;
  }
};

// Whether a kernel of family `kernel` runs a call that needs family `call`.
constexpr bool serves(Modifiers kernel, Modifiers call) {
  return kernel == call || (kernel == Modifiers::kAll && call != Modifiers::kPlain);
}

// Attention over a KV cache (flash_attn_with_kvcache), forward only. The FwdParams part describes q, out,
// softmax_lse and the caches as k and v: dense caches (cache_batch, seqlen_k, num_heads_k, head_dim) with
// their strides, or paged caches (num_pages, page_size, num_heads_k, head_dim) whose k/v_batch_stride is
// the page stride. seqlen_k is the capacity of one sequence (dense: the cache's rows; paged: pages per
// sequence * page_size). Sequence b attends to keys [leftpad[b], cache_seqlens[b] + seqlen_new) of its
// cache row; the new keys were written there before the kernel runs (kvcache_append). Every index read
// from device memory is range-checked: an out-of-range one reads nothing (zeros), never past a buffer.
struct KVCacheParams : FwdParams {
  int const* __restrict__ cache_seqlens = nullptr;    // (batch,) keys before the append; required
  int seqlen_new = 0;                                  // keys appended by this call
  int const* __restrict__ cache_batch_idx = nullptr;  // (batch,) cache row of each sequence; null: b
  int cache_batch = 0;                                 // rows of a dense cache (the bound for cache_batch_idx)
  int const* __restrict__ cache_leftpad = nullptr;    // (batch,) first valid cache row; null: 0
  int const* __restrict__ block_table = nullptr;      // (batch, max_pages) page of each block; null: dense
  int64_t block_table_batch_stride = 0;
  int max_pages = 0;   // block_table's columns
  int page_size = 0;   // rows per page, a multiple of 16
  int num_pages = 0;   // pages in the cache (the bound for block_table entries)

  // Split-KV (flash-decoding): the key blocks of each query tile are divided into num_splits contiguous
  // ranges run by separate CTAs; with num_splits > 1 each writes its normalised partial output and lse
  // to out_accum (num_splits, batch, num_heads, seqlen_q, head_dim) and lse_accum (num_splits, batch,
  // num_heads, seqlen_q), fp32, and a combine kernel merges them into out and softmax_lse.
  int num_splits = 1;
  float* __restrict__ out_accum = nullptr;
  float* __restrict__ lse_accum = nullptr;
  // Optional, for num_splits > 1 with few query rows (seqlen_q <= kFusedCombineMaxRows: decoding): int32
  // zeros, kvcache_split_tickets(*this) of them (kvcache_append can zero them: its zero_ints). Each split
  // CTA of a query tile takes a ticket when its partials are written; the last one merges them, so no
  // combine kernel runs. null, or more rows: the combine kernel. The tickets are left nonzero.
  int* __restrict__ split_tickets = nullptr;
};

// Writes new keys and values into a KV cache in place (flash_attn_with_kvcache's k, v), applying rotary
// embeddings to the keys, and optionally rotates q into q_rotated. The cache is described as in
// KVCacheParams (dense or paged, cache_batch_idx, cache_leftpad); new row i of sequence b goes to cache row
// cache_seqlens[b] + i. Rows at or past the capacity, and pages or cache rows whose index is out of range,
// are not written (nothing outside the cache is ever touched).
// Rotary (rotary_dim > 0): position t rotates pairs of the first rotary_dim features by the angles whose
// cosines and sines are rotary_cos/sin[t] (seqlen_ro, rotary_dim / 2): interleaved pairs (2j, 2j + 1),
// else GPT-NeoX halves (j, j + rotary_dim / 2). New key i sits at t = cache_seqlens[b] - leftpad[b] + i;
// query i at that t too when q_positions_advance (causal or local attention), else all at i = 0.
struct KVCacheAppendParams {
  DType dtype = DType::kBf16;
  int batch = 0;
  int seqlen_new = 0;  // rows of k_new / v_new (0: no append)
  int seqlen_q = 0;    // rows of q to rotate (0: none)
  int num_heads = 0;
  int num_heads_k = 0;
  int head_dim = 0;

  void* __restrict__ k_cache = nullptr;
  void* __restrict__ v_cache = nullptr;
  int64_t k_cache_batch_stride = 0, k_cache_row_stride = 0, k_cache_head_stride = 0;  // batch: page when paged
  int64_t v_cache_batch_stride = 0, v_cache_row_stride = 0, v_cache_head_stride = 0;
  int capacity = 0;     // rows per sequence: dense s_cache, paged max_pages * page_size
  int cache_batch = 0;  // rows of a dense cache
  int const* __restrict__ cache_seqlens = nullptr;  // (batch,), required
  int const* __restrict__ cache_batch_idx = nullptr;
  int const* __restrict__ cache_leftpad = nullptr;
  int const* __restrict__ block_table = nullptr;
  int64_t block_table_batch_stride = 0;
  int page_size = 0;
  int num_pages = 0;

  void const* __restrict__ k_new = nullptr;  // (batch, seqlen_new, num_heads_k, head_dim)
  void const* __restrict__ v_new = nullptr;
  int64_t k_new_batch_stride = 0, k_new_row_stride = 0, k_new_head_stride = 0;
  int64_t v_new_batch_stride = 0, v_new_row_stride = 0, v_new_head_stride = 0;

  void const* __restrict__ q = nullptr;  // (batch, seqlen_q, num_heads, head_dim)
  void* __restrict__ q_rotated = nullptr;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t q_rotated_batch_stride = 0, q_rotated_row_stride = 0, q_rotated_head_stride = 0;

  void const* __restrict__ rotary_cos = nullptr;  // (seqlen_ro, rotary_dim / 2), q's dtype, contiguous
  void const* __restrict__ rotary_sin = nullptr;
  int rotary_dim = 0;  // 0: no rotary
  int seqlen_ro = 0;
  bool rotary_interleaved = true;
  bool q_positions_advance = false;

  // Optional: zero_count int32 set to 0 by the same launch (the tickets of the fwd_kvcache that follows:
  // KVCacheParams::split_tickets), which saves the decode step a memset.
  int* __restrict__ zero_ints = nullptr;
  int zero_count = 0;
};

// Backward attention: the forward's inputs (FwdParams part: q, k, v, out, softmax_lse, strides, sizes,
// cu_seqlens, mask) plus the output gradient and the three input gradients.
struct BwdParams : FwdParams {
  void const* __restrict__ dout = nullptr;  // like out
  void* __restrict__ dq = nullptr;          // like q
  // dk, dv: (batch, seqlen_k, num_heads, head_dim) when num_heads_k < num_heads (one slice per query
  // head; the caller sums each group of num_heads / num_heads_k heads), else like k and v.
  void* __restrict__ dk = nullptr;
  void* __restrict__ dv = nullptr;
  int64_t dout_batch_stride = 0, dout_row_stride = 0, dout_head_stride = 0;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;
  // Scratch of bwd_workspace_bytes(*this) bytes, 256-byte aligned, contents irrelevant.
  void* __restrict__ workspace = nullptr;
  // Bitwise reproducible gradients: no floating-point atomics.
  bool deterministic = false;
};

}  // namespace flash_attn2
