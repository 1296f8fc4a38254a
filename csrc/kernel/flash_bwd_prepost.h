// The backward's two memory-bound companions of the main kernel, one query row per group of lanes:
//   preprocess:  dsum[row] = sum_c dout[row, c] * out[row, c]   (fp32)
//   postprocess: dq[row, c] = softmax_scale * sum_s dq_accum[s][row, c], converted to the element type
//                (dq_accum's column permutation on the bulk path: dq_accum_col in bwd_kernel_params.h)
// Rows are numbered in softmax_lse's layout: (batch, head, seqlen_q) dense, (head, total_q) packed.
#pragma once

#include <cstdint>

#include <cute/config.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>

#include "launch/bwd_kernel_params.h"

namespace flash_attn2 {

template <int kHeadDim>
struct RowGroups {
  static constexpr int kElemsPerLane = 8;  // 16 bytes of 16-bit elements
  // Lanes per row: the power of two covering kHeadDim / 8 vectors, so rows never straddle a warp.
  static constexpr int kLanesPerRow = kHeadDim / kElemsPerLane <= 4    ? 4
                                      : kHeadDim / kElemsPerLane <= 8  ? 8
                                      : kHeadDim / kElemsPerLane <= 16 ? 16
                                                                       : 32;
  static_assert(kHeadDim / kElemsPerLane <= 32, "head dim too large");
  static constexpr int kThreads = 256;
  static constexpr int kRowsPerBlock = kThreads / kLanesPerRow;

  static int64_t num_blocks(int64_t rows) { return (rows + kRowsPerBlock - 1) / kRowsPerBlock; }

  // Element offsets of row `row` (lse layout) in a tensor with the given strides.
  CUTE_DEVICE static int64_t offset(BwdKernelParams const& p, int64_t row, int64_t batch_stride, int64_t row_stride,
                                    int64_t head_stride) {
    if (p.cu_seqlens_q == nullptr) {
      int64_t const pos = row % p.seqlen_q;
      int64_t const bh = row / p.seqlen_q;
      return (bh / p.num_heads) * batch_stride + pos * row_stride + (bh % p.num_heads) * head_stride;
    }
    return (row % p.total_q) * row_stride + (row / p.total_q) * head_stride;
  }
};

template <class Element, int kHeadDim>
__global__ void __launch_bounds__(RowGroups<kHeadDim>::kThreads)
    bwd_preprocess_kernel(CUTE_GRID_CONSTANT BwdKernelParams const p) {
  using G = RowGroups<kHeadDim>;
  using Vec = cutlass::Array<Element, G::kElemsPerLane>;
  int const lane_in_row = threadIdx.x % G::kLanesPerRow;
  int64_t const row = int64_t(blockIdx.x) * G::kRowsPerBlock + threadIdx.x / G::kLanesPerRow;
  int const col = lane_in_row * G::kElemsPerLane;
  float sum = 0.f;
  if (row < p.lse_rows && col < p.head_dim) {
    Vec const o = *reinterpret_cast<Vec const*>(
        static_cast<Element const*>(p.out) + G::offset(p, row, p.out_batch_stride, p.out_row_stride, p.out_head_stride) + col);
    Vec const d = *reinterpret_cast<Vec const*>(
        static_cast<Element const*>(p.dout) + G::offset(p, row, p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride) + col);
    CUTE_UNROLL
    for (int i = 0; i < G::kElemsPerLane; ++i) { sum += float(o[i]) * float(d[i]); }
  }
  CUTE_UNROLL
  for (int offset = G::kLanesPerRow / 2; offset > 0; offset /= 2) { sum += __shfl_xor_sync(0xffffffff, sum, offset); }
  if (row < p.lse_rows && lane_in_row == 0) { p.dsum[row] = sum; }
}

template <class Element, int kHeadDim>
__global__ void __launch_bounds__(RowGroups<kHeadDim>::kThreads)
    bwd_postprocess_kernel(CUTE_GRID_CONSTANT BwdKernelParams const p) {
  using G = RowGroups<kHeadDim>;
  int const lane_in_row = threadIdx.x % G::kLanesPerRow;
  int64_t const row = int64_t(blockIdx.x) * G::kRowsPerBlock + threadIdx.x / G::kLanesPerRow;
  int const col = lane_in_row * G::kElemsPerLane;
  if (row >= p.lse_rows || col >= p.head_dim) { return; }
  cutlass::Array<float, G::kElemsPerLane> acc;
  acc.fill(0.f);
  for (int s = 0; s < p.num_accum_slices; ++s) {  // a fixed order: the same sums every run
    float const* const slice_row = p.dq_accum + (int64_t(s) * p.lse_rows + row) * kHeadDim;
    if (p.bulk_dq) {  // permuted columns: pairs stay adjacent
      CUTE_UNROLL
      for (int i = 0; i < G::kElemsPerLane; i += 2) {
        float2 const pair = *reinterpret_cast<float2 const*>(slice_row + dq_accum_col<kHeadDim>(row, col + i));
        acc[i] += pair.x;
        acc[i + 1] += pair.y;
      }
    } else {
      auto const part = *reinterpret_cast<cutlass::Array<float, G::kElemsPerLane> const*>(slice_row + col);
      CUTE_UNROLL
      for (int i = 0; i < G::kElemsPerLane; ++i) { acc[i] += part[i]; }
    }
  }
  CUTE_UNROLL
  for (int i = 0; i < G::kElemsPerLane; ++i) { acc[i] *= p.softmax_scale; }
  cutlass::NumericArrayConverter<Element, float, G::kElemsPerLane> convert;
  *reinterpret_cast<cutlass::Array<Element, G::kElemsPerLane>*>(
      static_cast<Element*>(p.dq) + G::offset(p, row, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride) + col) =
      convert(acc);
}

}  // namespace flash_attn2
