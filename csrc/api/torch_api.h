// The torch-facing forward and backward: tensors in, tensors out. The only layer (with bindings.cpp) that sees torch.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace flash_attn2 {


// q (b, s_q, h, d), k/v (b, s_k, h_k, d), CUDA fp16/bf16, d % 8 == 0, d <= 256, stride(-1) == 1.
// Returns out (b, s_q, h, d) contiguous and softmax_lse (b, h, s_q) fp32.
// Window and modifiers, flash-attn's conventions: window sides -1 = unbounded (causal sets the right side
// to 0); softcap 0 and dropout_p 0 are off; alibi_slopes fp32 (h,) or (b, h); rng_state int64 (2,)
// (seed, offset) on q's device, required when dropout_p > 0 (the backward must get the same one).
// Variable-length: with cu_seqlens_q/k (int32 (b + 1,)), q is (total_q, h, d), k/v (total_k, h_k, d),
// max_seqlen_q >= every q length; out is (total_q, h, d) and softmax_lse (h, total_q).
std::tuple<at::Tensor, at::Tensor> mha_fwd(at::Tensor const& q, at::Tensor const& k, at::Tensor const& v,
                                           double softmax_scale, bool causal,
                                           std::optional<at::Tensor> const& cu_seqlens_q,
                                           std::optional<at::Tensor> const& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k, int64_t window_left, int64_t window_right, double softcap,
                                           std::optional<at::Tensor> const& alibi_slopes, double dropout_p,
                                           std::optional<at::Tensor> const& rng_state);

// Gradients of mha_fwd: dout like out, and the forward's q, k, v, out, softmax_lse and arguments.
// Returns dq, dk, dv with q's, k's and v's shapes (contiguous). deterministic: bitwise reproducible.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mha_bwd(at::Tensor const& dout, at::Tensor const& q,
                                                       at::Tensor const& k, at::Tensor const& v,
                                                       at::Tensor const& out, at::Tensor const& softmax_lse,
                                                       double softmax_scale, bool causal, bool deterministic,
                                                       std::optional<at::Tensor> const& cu_seqlens_q,
                                                       std::optional<at::Tensor> const& cu_seqlens_k,
                                                       int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                       int64_t window_left, int64_t window_right, double softcap,
                                                       std::optional<at::Tensor> const& alibi_slopes,
                                                       double dropout_p, std::optional<at::Tensor> const& rng_state);

// The dropout keep mask (bool (batch, heads, seqlen_q, seqlen_k)) that mha_fwd/mha_bwd apply for this
// rng_state and dropout_p; with cu_seqlens, seqlen_q/k are the bounds and entries past a sequence are false.
at::Tensor mha_dropout_mask(at::Tensor const& rng_state, int64_t batch, int64_t num_heads, int64_t seqlen_q,
                        int64_t seqlen_k, double dropout_p, std::optional<at::Tensor> const& cu_seqlens_q,
                        std::optional<at::Tensor> const& cu_seqlens_k);

// flash_attn_with_kvcache: appends k/v (b, s_new, h_k, d) to the caches in place at cache_seqlens (int32
// (b,), the lengths before the append), rotating k (and q) when rotary_cos/sin are given, then attends q
// (b, s_q, h, d) to each sequence's cached keys. Caches: dense (b_cache, s_cache, h_k, d), or paged
// (num_pages, page_size, h_k, d) with block_table int32 (b, max_pages). num_splits: 0 chooses, 1 no split.
// Returns out (b, s_q, h, d) and softmax_lse (b, h, s_q) fp32.
std::tuple<at::Tensor, at::Tensor> mha_fwd_kvcache(
    at::Tensor const& q, at::Tensor const& k_cache, at::Tensor const& v_cache, std::optional<at::Tensor> const& k,
    std::optional<at::Tensor> const& v, std::optional<at::Tensor> const& rotary_cos,
    std::optional<at::Tensor> const& rotary_sin, at::Tensor const& cache_seqlens,
    std::optional<at::Tensor> const& cache_batch_idx, std::optional<at::Tensor> const& cache_leftpad,
    std::optional<at::Tensor> const& block_table, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, bool rotary_interleaved, std::optional<at::Tensor> const& alibi_slopes,
    int64_t num_splits);

}  // namespace flash_attn2
