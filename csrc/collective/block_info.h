// Where one (batch, head) pair's rows live, and how long its sequences are: the only place that knows
// the dense (batch, seqlen, ...) and the packed variable-length (total, ...) layouts apart.
#pragma once

#include <cute/config.hpp>

#include "flash_attn2/params.h"

namespace flash_attn2 {

struct FwdBlockInfo {
  int seqlen_q;
  int seqlen_k;
  int64_t q_offset, k_offset, v_offset, out_offset;  // elements
  int64_t lse_offset;                                  // elements of softmax_lse

  CUTE_DEVICE FwdBlockInfo(FwdParams const& p, int batch, int head) {
    // GQA/MQA: consecutive query heads share one KV head; no copy of K/V is ever made.
    int const head_k = head / (p.num_heads / p.num_heads_k);
    if (p.cu_seqlens_q == nullptr) {
      seqlen_q = p.seqlen_q;
      seqlen_k = p.seqlen_k;
      q_offset = batch * p.q_batch_stride + head * p.q_head_stride;
      k_offset = batch * p.k_batch_stride + head_k * p.k_head_stride;
      v_offset = batch * p.v_batch_stride + head_k * p.v_head_stride;
      out_offset = batch * p.out_batch_stride + head * p.out_head_stride;
      lse_offset = (int64_t(batch) * p.num_heads + head) * p.seqlen_q;
    } else {
      // Row offsets in 64 bits: a packed batch may hold more than 2^31 elements.
      int64_t const q_start = p.cu_seqlens_q[batch];
      int64_t const k_start = p.cu_seqlens_k[batch];
      // The true lengths; p.seqlen_q only sized the grid (a caller bound below a true length leaves the
      // rows past it unwritten, as in flash-attn: checking would need a host sync).
      seqlen_q = int(p.cu_seqlens_q[batch + 1] - q_start);
      seqlen_k = int(p.cu_seqlens_k[batch + 1] - k_start);
      q_offset = q_start * p.q_row_stride + head * p.q_head_stride;
      k_offset = k_start * p.k_row_stride + head_k * p.k_head_stride;
      v_offset = k_start * p.v_row_stride + head_k * p.v_head_stride;
      out_offset = q_start * p.out_row_stride + head * p.out_head_stride;
      lse_offset = head * p.total_q + q_start;
    }
  }
};

// The KV-cache view: q, out and lse as a dense batch; keys from the cache row of the sequence, after
// its left padding. For a paged cache k_offset / v_offset hold the head's offset only: the kernel looks
// each key's page up per row.
struct KVCacheBlockInfo : FwdBlockInfo {
  CUTE_DEVICE KVCacheBlockInfo(KVCacheParams const& p, int batch, int head)
      : FwdBlockInfo(static_cast<FwdParams const&>(p), batch, head) {
    int const head_k = head / (p.num_heads / p.num_heads_k);
    int const leftpad = p.cache_leftpad == nullptr ? 0 : max(p.cache_leftpad[batch], 0);
    // The append stops at the capacity (seqlen_k), so no key past it exists.
    int const end = min(p.cache_seqlens[batch] + p.seqlen_new, p.seqlen_k);
    seqlen_k = max(end - leftpad, 0);
    int64_t row = 0;  // the dense cache row; a paged cache's offsets start at the head
    if (p.block_table == nullptr) {
      int const picked = p.cache_batch_idx == nullptr ? batch : p.cache_batch_idx[batch];
      bool const valid = picked >= 0 && picked < p.cache_batch;
      if (!valid) { seqlen_k = 0; }  // a bad index attends to nothing
      row = valid ? picked : 0;
    }
    // leftpad is 0 for a paged cache (the dispatcher refuses cache_leftpad with a block table).
    k_offset = row * p.k_batch_stride + int64_t(leftpad) * p.k_row_stride + head_k * p.k_head_stride;
    v_offset = row * p.v_batch_stride + int64_t(leftpad) * p.v_row_stride + head_k * p.v_head_stride;
  }
};

// The backward's view: the forward's offsets plus those of dout (like out) and of dk, dv. dk and dv are
// indexed by the query head: with GQA they are per-query-head slices that the caller sums per group.
struct BwdBlockInfo : FwdBlockInfo {
  int64_t dout_offset, dk_offset, dv_offset;  // elements

  CUTE_DEVICE BwdBlockInfo(BwdParams const& p, int batch, int head) : FwdBlockInfo(p, batch, head) {
    if (p.cu_seqlens_q == nullptr) {
      dout_offset = batch * p.dout_batch_stride + head * p.dout_head_stride;
      dk_offset = batch * p.dk_batch_stride + head * p.dk_head_stride;
      dv_offset = batch * p.dv_batch_stride + head * p.dv_head_stride;
    } else {
      int64_t const q_start = p.cu_seqlens_q[batch];
      int64_t const k_start = p.cu_seqlens_k[batch];
      dout_offset = q_start * p.dout_row_stride + head * p.dout_head_stride;
      dk_offset = k_start * p.dk_row_stride + head * p.dk_head_stride;
      dv_offset = k_start * p.dv_row_stride + head * p.dv_head_stride;
    }
  }
};

}  // namespace flash_attn2
