// Where one (batch, head) pair's rows live, and how long its sequences are.
// The dense layout today; variable-length batches will read per-batch offsets here and nowhere else.
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
    seqlen_q = p.seqlen_q;
    seqlen_k = p.seqlen_k;
    q_offset = batch * p.q_batch_stride + head * p.q_head_stride;
    k_offset = batch * p.k_batch_stride + head_k * p.k_head_stride;
    v_offset = batch * p.v_batch_stride + head_k * p.v_head_stride;
    out_offset = batch * p.out_batch_stride + head * p.out_head_stride;
    lse_offset = (int64_t(batch) * p.num_heads + head) * p.seqlen_q;
  }
};

}  // namespace flash_attn2
