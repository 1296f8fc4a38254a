// The dropout keep mask as a tensor, drawn from the same Philox stream as the kernels (collective/score_mod.h).
// For tests and for return_attn_probs: it is batch x heads x seqlen_q x seqlen_k bytes.
#include <cstdint>

#include <cuda_runtime.h>

#include "collective/score_mod.h"
#include "common/strings.h"
#include "flash_attn2/flash_attn2.h"

namespace flash_attn2 {
namespace {

constexpr int kThreads = 256;

// One thread per score: the score (i, j) is value (i % 16 >= 8) * 2 + j % 2 of the atom whose first
// score is (i with bit 3 cleared, j with bit 0 cleared), as the kernels' MMA accumulators hold it.
__global__ void __launch_bounds__(kThreads) dropout_mask_kernel(FwdParams const params, uint8_t* keep, int64_t total) {
  int64_t const cols = params.seqlen_k;
  int64_t const rows = params.seqlen_q;
  for (int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * kThreads) {
    int const col = int(idx % cols);
    int const row = int(idx / cols % rows);
    int64_t const bh = idx / (cols * rows);
    int const head = int(bh % params.num_heads);
    int const batch = int(bh / params.num_heads);
    int len_q = params.seqlen_q, len_k = params.seqlen_k;
    if (params.cu_seqlens_q != nullptr) {
      len_q = params.cu_seqlens_q[batch + 1] - params.cu_seqlens_q[batch];
      len_k = params.cu_seqlens_k[batch + 1] - params.cu_seqlens_k[batch];
    }
    bool kept = false;
    if (row < len_q && col < len_k) {
      Dropout const dropout(params, batch, head);
      uint4 const bits = dropout.atom_bits(row & ~8, col & ~1);
      kept = Dropout::pick(bits, (row % 16 >= 8) * 2 + col % 2) < dropout.threshold;
    }
    keep[idx] = kept;
  }
}

}  // namespace

Status dropout_mask(FwdParams const& p, uint8_t* keep, cudaStream_t stream) {
  if (!(p.dropout_p > 0.f && p.dropout_p < 1.f) || p.rng_state == nullptr) {
    return {str_cat("flash_attn2: dropout_mask needs dropout_p in (0, 1) and rng_state, got dropout_p ", p.dropout_p)};
  }
  if (p.batch < 0 || p.num_heads < 0 || p.seqlen_q < 0 || p.seqlen_k < 0) { return {"flash_attn2: negative sizes"}; }
  int64_t const total = int64_t(p.batch) * p.num_heads * p.seqlen_q * p.seqlen_k;
  if (total == 0) { return {}; }
  int64_t const blocks = (total + kThreads - 1) / kThreads;
  constexpr int64_t kMaxBlocks = 65536;  // grid-stride beyond this
  dropout_mask_kernel<<<unsigned(blocks < kMaxBlocks ? blocks : kMaxBlocks), kThreads, 0, stream>>>(p, keep, total);
  cudaError_t const err = cudaGetLastError();
  if (err != cudaSuccess) { return {str_cat("flash_attn2: dropout_mask launch failed: ", cudaGetErrorString(err))}; }
  return {};
}

}  // namespace flash_attn2
