// The in-place append of flash_attn_with_kvcache: new keys (rotated) and values into the cache, and the
// rotated queries, before the attention kernel reads them. One CTA per (batch, row, head), its threads
// over pairs of features: a rotary pair is two features that rotate together, and the features past
// rotary_dim are copied two at a time.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/grid_dependency.h"
#include "common/strings.h"
#include "flash_attn2/flash_attn2.h"

namespace flash_attn2 {
namespace {

constexpr int kThreads = 128;

template <class T> struct Scalar;
template <> struct Scalar<__half> {
  static __device__ float to_float(__half x) { return __half2float(x); }
  static __device__ __half from_float(float x) { return __float2half_rn(x); }
};
template <> struct Scalar<__nv_bfloat16> {
  static __device__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// Copies one row of head_dim features from src to dst, rotating the first rotary_dim of them by the
// angles of position pos when with_rotary (no rotation when rotary_dim is 0 or pos is outside the table).
template <class T>
__device__ void rotate_row(KVCacheAppendParams const& p, T const* src, T* dst, int pos, bool with_rotary) {
  using S = Scalar<T>;
  bool const rotate = with_rotary && p.rotary_dim > 0 && pos >= 0 && pos < p.seqlen_ro;
  int const half = p.rotary_dim / 2;
  T const* const cos = static_cast<T const*>(p.rotary_cos) + int64_t(rotate ? pos : 0) * half;
  T const* const sin = static_cast<T const*>(p.rotary_sin) + int64_t(rotate ? pos : 0) * half;
  for (int j = threadIdx.x; j < p.head_dim / 2; j += kThreads) {
    if (rotate && j < half) {
      // The pair rotated by angle j: (2j, 2j + 1) interleaved, (j, j + half) in GPT-NeoX style.
      int const a = p.rotary_interleaved ? 2 * j : j;
      int const b = p.rotary_interleaved ? 2 * j + 1 : j + half;
      float const x = S::to_float(src[a]), y = S::to_float(src[b]);
      float const c = S::to_float(cos[j]), s = S::to_float(sin[j]);
      dst[a] = S::from_float(x * c - y * s);
      dst[b] = S::from_float(x * s + y * c);
    } else {  // not rotated: no rotary, or j >= half (features 2j, 2j + 1 lie past the rotated ones in either style)
      dst[2 * j] = src[2 * j];
      dst[2 * j + 1] = src[2 * j + 1];
    }
  }
}

// blockIdx.y == 0: new keys and values of (batch, row, kv head) into the cache; 1: the query of
// (batch, row, head) into q_rotated.
template <class T>
__global__ void __launch_bounds__(kThreads) kvcache_append_kernel(KVCacheAppendParams const p) {
  grid_launch_dependents();  // the attention kernel may start now: it waits for our writes (grid_dependency.h)
  int const idx = blockIdx.x;
  if (idx == 0 && blockIdx.y == 0) {
    for (int t = threadIdx.x; t < p.zero_count; t += kThreads) { p.zero_ints[t] = 0; }
  }
  if (blockIdx.y == 0) {
    if (idx >= p.batch * p.seqlen_new * p.num_heads_k) { return; }
    int const head = idx % p.num_heads_k;
    int const i = idx / p.num_heads_k % p.seqlen_new;
    int const b = idx / p.num_heads_k / p.seqlen_new;
    int const start = p.cache_seqlens[b];
    int const leftpad = p.cache_leftpad == nullptr ? 0 : p.cache_leftpad[b];
    int const row = start + i;
    if (row < 0 || row >= p.capacity) { return; }  // past the cache: not written (the caller was told)
    // Where the row lives: (page, row in the page) of a paged cache, (cache row, row) of a dense one.
    int64_t slot, slot_row;
    if (p.block_table != nullptr) {
      int const page = p.block_table[b * p.block_table_batch_stride + row / p.page_size];
      if (page < 0 || page >= p.num_pages) { return; }
      slot = page, slot_row = row % p.page_size;
    } else {
      int const cache_row = p.cache_batch_idx == nullptr ? b : p.cache_batch_idx[b];
      if (cache_row < 0 || cache_row >= p.cache_batch) { return; }
      slot = cache_row, slot_row = row;
    }
    T const* const k_src = static_cast<T const*>(p.k_new) + b * p.k_new_batch_stride + i * p.k_new_row_stride +
                           head * p.k_new_head_stride;
    T const* const v_src = static_cast<T const*>(p.v_new) + b * p.v_new_batch_stride + i * p.v_new_row_stride +
                           head * p.v_new_head_stride;
    T* const k_dst = static_cast<T*>(p.k_cache) + slot * p.k_cache_batch_stride + slot_row * p.k_cache_row_stride +
                     head * p.k_cache_head_stride;
    T* const v_dst = static_cast<T*>(p.v_cache) + slot * p.v_cache_batch_stride + slot_row * p.v_cache_row_stride +
                     head * p.v_cache_head_stride;
    rotate_row(p, k_src, k_dst, start - leftpad + i, true);
    rotate_row(p, v_src, v_dst, 0, false);
  } else {
    if (idx >= p.batch * p.seqlen_q * p.num_heads) { return; }
    int const head = idx % p.num_heads;
    int const i = idx / p.num_heads % p.seqlen_q;
    int const b = idx / p.num_heads / p.seqlen_q;
    int const leftpad = p.cache_leftpad == nullptr ? 0 : p.cache_leftpad[b];
    int const pos = p.cache_seqlens[b] - leftpad + (p.q_positions_advance ? i : 0);
    T const* const src = static_cast<T const*>(p.q) + b * p.q_batch_stride + i * p.q_row_stride + head * p.q_head_stride;
    T* const dst = static_cast<T*>(p.q_rotated) + b * p.q_rotated_batch_stride + i * p.q_rotated_row_stride +
                   head * p.q_rotated_head_stride;
    rotate_row(p, src, dst, pos, true);
  }
}

}  // namespace

Status kvcache_append(KVCacheAppendParams const& p, cudaStream_t stream) {
  if (p.cache_seqlens == nullptr) { return {"flash_attn2: kvcache_append needs cache_seqlens"}; }
  if (p.head_dim <= 0 || p.head_dim % 2 != 0 || p.rotary_dim < 0 || p.rotary_dim % 2 != 0 ||
      p.rotary_dim > p.head_dim) {
    return {str_cat("flash_attn2: kvcache_append needs an even head_dim and an even rotary_dim <= head_dim; got ",
                    p.head_dim, " and ", p.rotary_dim)};
  }
  if (p.rotary_dim > 0 && (p.rotary_cos == nullptr || p.rotary_sin == nullptr)) {
    return {"flash_attn2: rotary_dim > 0 needs rotary_cos and rotary_sin"};
  }
  if (p.block_table != nullptr && p.page_size <= 0) { return {"flash_attn2: a paged cache needs page_size > 0"}; }
  if (p.seqlen_q > 0 && (p.q == nullptr || p.q_rotated == nullptr)) {
    return {"flash_attn2: rotating q needs q and q_rotated"};
  }
  int64_t const kv_rows = int64_t(p.batch) * p.seqlen_new * p.num_heads_k;
  int64_t const q_rows = p.rotary_dim > 0 ? int64_t(p.batch) * p.seqlen_q * p.num_heads : 0;
  int64_t rows = kv_rows > q_rows ? kv_rows : q_rows;
  if (p.zero_count > 0) {
    if (p.zero_ints == nullptr) { return {"flash_attn2: kvcache_append: zero_count > 0 needs zero_ints"}; }
    rows = rows > 0 ? rows : 1;
  }
  if (rows == 0) { return {}; }
  if (rows > INT32_MAX) { return {"flash_attn2: kvcache_append: too many rows for one launch"}; }
  dim3 const grid(unsigned(rows), q_rows > 0 ? 2u : 1u);
  if (p.dtype == DType::kFp16) {
    kvcache_append_kernel<__half><<<grid, kThreads, 0, stream>>>(p);
  } else {
    kvcache_append_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p);
  }
  cudaError_t const err = cudaGetLastError();
  if (err != cudaSuccess) { return {str_cat("flash_attn2: kvcache_append launch failed: ", cudaGetErrorString(err))}; }
  return {};
}

}  // namespace flash_attn2
