// The score modifiers: logit softcapping, ALiBi and dropout, compiled per kernel family (Modifiers in
// params.h). The plain kernels compile none of it.
//
// Units. The main loops keep raw scores s = q.k and fold the softmax scale into the exponent. The
// modifiers act on scaled scores z = s * scale, so they are written back in raw units, z' / scale, and
// the softmax code is the same for every kernel; only the softcap family keeps tanh units instead, with
// its own softmax scale (ScoreModifiers::score_scale).
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_fp16.h>
#include <cute/tensor.hpp>

#include "collective/utils.h"
#include "flash_attn2/params.h"

namespace flash_attn2 {

using namespace cute;

CUTE_DEVICE float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ALiBi's bias, -slope * |d|, for this thread's scores: the ALiBi family writes it as the initial value of
// the score accumulator, so that the GEMM adds q.k to it; kAdd adds it instead (the kAll family, after the
// softcap). Score (r, c) of this thread is d = base + r - c keys from its row's diagonal (r, c: thread 0's static
// offsets, as in BlockMask::apply). On a tile wholly on one side of the diagonal -slope * |d| = x_r + y_c,
// a row term plus a column term: one FFMA with an immediate per score. kAbs: the tile may cross the
// diagonal (alibi_crossing_blocks), and each score takes -|x_r + y_c|, one op more. (A run-time choice
// between the two would be compiled as both, predicated: the caller's loops decide it.) x_r and y_c are
// small wherever the bias is (near the diagonal), so fp32 keeps it exact enough; far from it exp() of the
// bias is 0 anyway.
template <bool kAbs, bool kAdd = false, class TensorS, class TensorC>
CUTE_DEVICE void alibi_bias(TensorS& acc_s, TensorC const& tScS0, float raw_slope, int row_base, int col_base,
                                   int m_block, int n_block, int block_m, int block_n, int diagonal_offset) {
  CUTE_STATIC_ASSERT_V(size(acc_s) == size(tScS0));
  Tensor scores = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));    // (rows, cols)
  Tensor coords = make_tensor(tScS0.data(), acc_rowcol(tScS0.layout()));    // (rows, cols) -> (row, col)
  int const row0 = m_block * block_m + diagonal_offset, col0 = n_block * block_n;
  // Below the diagonal (d >= 0) the bias is -slope * d; above it (the tile's largest distance <= 0)
  // slope * d. The tile's side is CTA-uniform.
  int const d_max = row0 + block_m - 1 - col0;
  float const signed_slope = !kAbs && d_max <= 0 ? raw_slope : -raw_slope;
  float const x0 = signed_slope * float(row0 + row_base - col0 - col_base);
  float x[decltype(size<0>(scores))::value];
  CUTE_UNROLL
  for (int r = 0; r < size<0>(scores); ++r) { x[r] = x0 + signed_slope * float(get<0>(coords(r, 0))); }
  CUTE_UNROLL
  for (int c = 0; c < size<1>(scores); ++c) {
    float const y = -signed_slope * float(get<1>(coords(0, c)));
    CUTE_UNROLL
    for (int r = 0; r < size<0>(scores); ++r) {
      float const bias = kAbs ? -fabsf(x[r] + y) : x[r] + y;
      if constexpr (kAdd) {
        scores(r, c) += bias;
      } else {
        scores(r, c) = bias;
      }
    }
  }
}

// The key blocks [begin, end) whose scores lie on both sides of the diagonal for query block m_block
// (distances d = row + diagonal_offset - key of both signs): those need alibi_bias<true>.
struct BlockRange {
  int begin, end;
};
CUTE_HOST_DEVICE int floor_div(int a, int b) { return a >= 0 ? a / b : -((b - 1 - a) / b); }  // b > 0
CUTE_HOST_DEVICE BlockRange alibi_crossing_blocks(int m_block, int block_m, int block_n, int diagonal_offset) {
  int const row0 = m_block * block_m + diagonal_offset;
  // d_max = row0 + block_m - 1 - n * block_n > 0 and d_min = row0 - n * block_n - block_n + 1 < 0.
  return {floor_div(row0 - block_n + 1, block_n) + 1, floor_div(row0 + block_m - 2, block_n) + 1};
}

// The backward's softcap derivative, 1 - tanh^2 of each of a thread's N scores, two per register as fp16
// pairs: it multiplies dS, which is rounded to 16 bits right after, and 32 fp32 registers more made the
// hdim 128 softcap backward spill 164 B (plain 60 B; PERF_LOG b19). Pairs are scores (2k, 2k + 1).
template <int N>
struct PackedDtanh {
  static_assert(N % 2 == 0, "pairs");
  __half2 v[N / 2];
  CUTE_DEVICE void set(int i, float a, float b) { v[i / 2] = __floats2half2_rn(a, b); }
  CUTE_DEVICE float2 get(int i) const { return __half22float2(v[i / 2]); }
};

// Softcap and ALiBi, in that order (as flash-attn): z -> softcap * tanh(z / softcap) - slope * |i + off - j|.
// kMods is the kernel's family (params.h): kSoftcap and kAlibi compile their one modifier, always on;
// kAll compiles both, each behind its run-time switch; kPlain nothing.
template <Modifiers kMods>
struct ScoreModifiers {
  static constexpr bool kSoftcap = kMods == Modifiers::kSoftcap || kMods == Modifiers::kAll;
  static constexpr bool kAlibi = kMods == Modifiers::kAlibi || kMods == Modifiers::kAll;
  // The softcap family keeps tanh(z / softcap) itself in the score registers ("tanh units": z = softcap
  // * t), which saves the multiply back to raw units; score_scale() says which units the scores are in.
  static constexpr bool kTanhUnits = kMods == Modifiers::kSoftcap;

  bool softcap_on;
  float softcap_in;   // scale / softcap: raw score -> tanh argument
  float softcap_out;  // softcap / scale: tanh -> raw units (kAll)
  bool alibi_on;
  float alibi_raw_slope;  // slope / scale: the bias in raw units per key of distance

  CUTE_DEVICE ScoreModifiers(FwdParams const& p, int batch, int head) {
    softcap_on = kSoftcap && p.softcap > 0.f;
    softcap_in = softcap_on ? p.softmax_scale / p.softcap : 0.f;
    softcap_out = softcap_on ? p.softcap / p.softmax_scale : 0.f;
    alibi_on = kAlibi && p.alibi_slopes != nullptr;
    alibi_raw_slope = alibi_on ? p.alibi_slopes[batch * p.alibi_slopes_batch_stride + head] / p.softmax_scale : 0.f;
  }

  // What one unit of the modified scores is worth as a scaled score: the kernels' softmax scale.
  CUTE_DEVICE float score_scale(FwdParams const& p) const { return kTanhUnits ? p.softcap : p.softmax_scale; }

  // The score accumulator before S = Q K^T adds to it: zero, or the ALiBi family's bias
  // (alibi_bias; the kAll family adds its bias after the softcap, in apply()). kAbs: see alibi_bias.
  template <bool kAbs = true, class TensorS, class TensorC>
  CUTE_DEVICE void init(TensorS& acc_s, TensorC const& tScS0, int row_base, int col_base, int m_block, int n_block,
                        int block_m, int block_n, int diagonal_offset) const {
    if constexpr (kMods == Modifiers::kAlibi) {
      alibi_bias<kAbs>(acc_s, tScS0, alibi_raw_slope, row_base, col_base, m_block, n_block, block_m, block_n,
                       diagonal_offset);
    } else {
      clear(acc_s);
    }
  }

  // Modifies raw scores in place. dtanh (same shape, may be unused): 1 - tanh^2 of each score, the
  // derivative the backward multiplies dS by. tScS0 and the bases as in BlockMask::apply;
  // diagonal_offset = seqlen_k - seqlen_q.
  template <bool kKeepDtanh, class TensorS, class TensorD, class TensorC>
  CUTE_DEVICE void apply(TensorS& acc_s, TensorD& dtanh, TensorC const& tScS0, int row_base, int col_base,
                         int m_block, int n_block, int block_m, int block_n, int diagonal_offset) const {
    CUTE_STATIC_ASSERT_V(size(acc_s) == size(tScS0));
    if constexpr (kSoftcap) {
      if (kMods == Modifiers::kSoftcap || softcap_on) {
        if constexpr (kMods == Modifiers::kAll) { keep_branch(); }  // a run-time switch: skip what is off
        static_assert(decltype(size(acc_s))::value % 2 == 0, "pairs of scores");
        CUTE_UNROLL
        for (int i = 0; i < size(acc_s); i += 2) {
          float const t0 = tanh_approx(acc_s(i) * softcap_in);
          float const t1 = tanh_approx(acc_s(i + 1) * softcap_in);
          acc_s(i) = kTanhUnits ? t0 : t0 * softcap_out;
          acc_s(i + 1) = kTanhUnits ? t1 : t1 * softcap_out;
          if constexpr (kKeepDtanh) { dtanh.set(i, 1.f - t0 * t0, 1.f - t1 * t1); }
        }
      }
    }
    if constexpr (kMods == Modifiers::kAll) {  // the ALiBi family's bias is already in (init)
      if (alibi_on) {
        keep_branch();
        alibi_bias</*kAbs=*/true, /*kAdd=*/true>(acc_s, tScS0, alibi_raw_slope, row_base, col_base, m_block,
                                                 n_block, block_m, block_n, diagonal_offset);
      }
    }
  }
};

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a counter-based
// generator, so any score's random number is a pure function of (key, counter), the same in the forward
// and the backward whatever their tilings.
CUTE_DEVICE uint4 philox4x32_10(uint4 counter, uint2 key) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  CUTE_UNROLL
  for (int round = 0; round < 10; ++round) {
    uint32_t const hi0 = __umulhi(kMul0, counter.x), lo0 = kMul0 * counter.x;
    uint32_t const hi1 = __umulhi(kMul1, counter.z), lo1 = kMul1 * counter.z;
    counter = make_uint4(hi1 ^ counter.y ^ key.x, lo1, hi0 ^ counter.w ^ key.y, lo0);
    key.x += kWeyl0;
    key.y += kWeyl1;
  }
  return counter;
}

// The dropout keep mask. One Philox call gives four 32-bit numbers, one per score of an m16n8 MMA atom as a
// thread holds it: rows (r, r + 8) x columns (c, c + 1), with r % 16 < 8 and c even. The counter is
// (column / 8, row / 16, lane, batch * heads + head) with lane = (r % 8) * 4 + (c % 8) / 2 (plus 32 x the
// rng offset), a function of the coordinates only: every kernel whose MMA tiles rows by 16 and columns
// by 8 from multiples of 16 and 8 (forward, backward, and the mask kernel) draws the same numbers.
// A score is kept iff its number is below (1 - p) * 2^32: exact to 2^-32.
struct Dropout {
  uint2 key;
  uint32_t lane_word;
  uint32_t bh;
  uint32_t threshold;
  float keep_scale;  // 1 / (1 - p)

  bool on;

  CUTE_DEVICE Dropout(FwdParams const& p, int batch, int head) {
    on = p.dropout_p > 0.f;
    // rng_state is only read when dropout is on (it may be null otherwise).
    uint64_t const seed = on ? p.rng_state[0] : 0;
    uint64_t const offset = on ? p.rng_state[1] : 0;
    key = make_uint2(uint32_t(seed), uint32_t(seed >> 32));
    lane_word = uint32_t(offset) << 5;
    bh = uint32_t(batch) * uint32_t(p.num_heads) + uint32_t(head);
    double const keep = on ? 1.0 - double(p.dropout_p) : 1.0;
    threshold = uint32_t(fmin(keep * 4294967296.0, 4294967295.0));
    keep_scale = float(1.0 / keep);
  }

  // The 4 random numbers of the atom whose first score (row, col) is global (row, col) of the head.
  CUTE_DEVICE uint4 atom_bits(int row, int col) const {
    uint32_t const lane = uint32_t(row % 8) * 4 + uint32_t(col % 8) / 2;
    return philox4x32_10(make_uint4(uint32_t(col) / 8, uint32_t(row) / 16, lane_word | lane, bh), key);
  }
  CUTE_DEVICE static uint32_t pick(uint4 bits, int i) {
    return i == 0 ? bits.x : i == 1 ? bits.y : i == 2 ? bits.z : bits.w;
  }

  // acc_s is (MMA=4, MMA_M, MMA_N) of an m16n8 MMA; its value v of each atom is row + 8 * (v / 2),
  // column + v % 2. The forward zeroes dropped scores (kNegate false); the backward needs both P and the
  // mask, so it negates them (kNegate true: then P = |p|, and p < 0 marks a dropped score; a masked
  // score is 0 either way).
  // row0, col0: this thread's first global (row, col).
  template <bool kNegate, class TensorS, class TensorC>
  CUTE_DEVICE void apply(TensorS& acc_s, TensorC const& tScS0, int row0, int col0) const {
    static_assert(decltype(size<0>(acc_s))::value == 4, "expects the m16n8 accumulator");
    CUTE_UNROLL
    for (int m = 0; m < size<1>(acc_s); ++m) {
      CUTE_UNROLL
      for (int n = 0; n < size<2>(acc_s); ++n) {
        uint4 const bits = atom_bits(row0 + get<0>(tScS0(0, m, n)), col0 + get<1>(tScS0(0, m, n)));
        CUTE_UNROLL
        for (int v = 0; v < 4; ++v) {
          bool const keep = pick(bits, v) < threshold;
          if constexpr (kNegate) {
            acc_s(v, m, n) = keep ? acc_s(v, m, n) : -acc_s(v, m, n);
          } else {
            acc_s(v, m, n) = keep ? acc_s(v, m, n) : 0.f;
          }
        }
      }
    }
  }
};

}  // namespace flash_attn2
