// Small register-level helpers shared by the forward and backward kernels.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>

namespace flash_attn2 {

using namespace cute;

// One MUFU.EX2 instead of exp2f's range handling: every caller feeds it scores already shifted by the
// row max (<= 0) or -inf, for which the approximation is exact enough and ex2(-inf) = +0.
CUTE_DEVICE float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Call first thing inside a warp- or CTA-uniform branch that is usually not taken. ptxas turns a branch
// around straight-line code into predicated instructions, and a predicated instruction takes its issue
// slot whether or not its predicate holds: the online softmax's O rescale (128 multiplies per thread at
// hdim 128) cost its full price every step though it runs in few. A NANOSLEEP of 0 ns cannot be
// predicated away, so the branch stays a branch (measured in the SASS: 976 -> 865 instructions per
// hdim-128 step); it costs one issue slot where the branch is taken.
CUTE_DEVICE void keep_branch() { __nanosleep(0); }

// The grid order of the masked kernels, whose CTAs' work depends on their block (the forward's query
// block, the backward's key block). Longest first across heads: the SMs take the next CTA as they free
// up, so with the short CTAs last the grid ends evenly, where head by head a wave's last CTAs can be long
// ones started late (a model of that list scheduling puts the tail at 7-15% of a causal run at 1k-4k
// keys, 1% longest first). But a head's CTAs then run far apart in time, and its operands come from HBM
// instead of L2. bytes_per_head > 0 takes the heads in groups whose operands fit in about half an L2
// (H100/H200 50 MB, A100 40 MB): longest first within a group, group after group; 0 orders all heads.
// Returns (block rank: 0 the longest, bh: batch * num_heads + head) of CTA `cta`.
struct GridSlot {
  int rank;
  int bh;
};
CUTE_HOST_DEVICE GridSlot longest_first(int cta, int blocks_per_head, int num_bh, int64_t bytes_per_head) {
  constexpr int64_t kL2Budget = int64_t(24) << 20;
  int const group = int(max(int64_t(1), min(int64_t(num_bh), kL2Budget / max(bytes_per_head, int64_t(1)))));
  int const per_group = group * blocks_per_head;  // <= the grid's CTAs
  int const g = cta / per_group;
  int const first = g * group;
  int const size = min(group, num_bh - first);
  int const r = cta - g * per_group;
  return {r / size, first + r % size};
}

// The 4 lanes of a quad (lane % 4) share the rows of an sm80 MMA accumulator.
CUTE_DEVICE float quad_allreduce_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
}
CUTE_DEVICE float quad_allreduce_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 2);
  return x + __shfl_xor_sync(0xffffffff, x, 1);
}

// (MMA=4, MMA_M, MMA_N) accumulator of an m16n8 MMA -> ((2, MMA_M), (2, MMA_N)) = (rows, cols).
// Values 0,1 of the atom are one row's two adjacent columns, values 2,3 the row 8 below.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_rowcol(Layout const& acc_layout) {
  static_assert(decltype(rank(acc_layout))::value == 3, "expects (MMA, MMA_M, MMA_N)");
  static_assert(decltype(size<0>(acc_layout))::value == 4, "expects the m16n8 accumulator");
  auto l = logical_divide(acc_layout, Shape<_2>{});  // ((2, 2), MMA_M, MMA_N)
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// (MMA=4, MMA_M, MMA_N) accumulator -> ((4, 2), MMA_M, MMA_N / 2): the A operand of an m16n8k16 MMA.
// Two adjacent 8-column accumulator tiles hold exactly the 16 k-values one A fragment needs, so P
// feeds the second GEMM straight from registers.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_to_a_operand(Layout const& acc_layout) {
  static_assert(decltype(size<2>(acc_layout))::value % 2 == 0, "MMA_N must be even");
  auto l = logical_divide(acc_layout, Shape<Underscore, Underscore, _2>{});  // (4, MMA_M, (2, MMA_N / 2))
  return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

// Converts an fp32 register fragment to To, element pairs at a time, into a new owning fragment.
template <class To, class Engine, class Layout>
CUTE_DEVICE auto convert_fragment(Tensor<Engine, Layout> const& src) {
  using From = typename Engine::value_type;
  constexpr int kNumel = decltype(size(src))::value;
  cutlass::NumericArrayConverter<To, From, kNumel> convert;
  auto converted = convert(*reinterpret_cast<cutlass::Array<From, kNumel> const*>(raw_pointer_cast(src.data())));
  Tensor dst = make_tensor<To>(src.layout());
  *reinterpret_cast<cutlass::Array<To, kNumel>*>(raw_pointer_cast(dst.data())) = converted;
  return dst;
}

}  // namespace flash_attn2
