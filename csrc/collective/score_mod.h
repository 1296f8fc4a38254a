// The score modifiers of the kernels built with modifiers: logit softcapping, ALiBi and dropout. Each is
// switched by its runtime parameter (a branch uniform over the CTA); the plain kernels compile none of it.
//
// Units. The main loops keep raw scores s = q.k and fold the softmax scale into the exponent. The
// modifiers act on scaled scores z = s * scale, so they are written back in raw units, z' / scale, and
// the softmax code is the same for both kinds of kernel.
#pragma once

#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>

#include "flash_attn2/params.h"

namespace flash_attn2 {

using namespace cute;

CUTE_DEVICE float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Softcap and ALiBi, in that order (as flash-attn): z -> softcap * tanh(z / softcap) - slope * |i + off - j|.
struct ScoreModifiers {
  bool softcap_on;
  float softcap_in;   // scale / softcap: raw score -> tanh argument
  float softcap_out;  // softcap / scale: tanh -> raw units
  bool alibi_on;
  float alibi_raw_slope;  // slope / scale: the bias in raw units per key of distance

  CUTE_DEVICE ScoreModifiers(FwdParams const& p, int batch, int head) {
    softcap_on = p.softcap > 0.f;
    softcap_in = softcap_on ? p.softmax_scale / p.softcap : 0.f;
    softcap_out = softcap_on ? p.softcap / p.softmax_scale : 0.f;
    alibi_on = p.alibi_slopes != nullptr;
    alibi_raw_slope = alibi_on ? p.alibi_slopes[batch * p.alibi_slopes_batch_stride + head] / p.softmax_scale : 0.f;
  }

  // Modifies raw scores in place. dtanh (same shape, may be unused): 1 - tanh^2 of each score, the
  // derivative the backward multiplies dS by. tScS0 and the bases as in BlockMask::apply;
  // diagonal_offset = seqlen_k - seqlen_q.
  template <bool kKeepDtanh, class TensorS, class TensorD, class TensorC>
  CUTE_DEVICE void apply(TensorS& acc_s, TensorD& dtanh, TensorC const& tScS0, int row_base, int col_base,
                         int m_block, int n_block, int block_m, int block_n, int diagonal_offset) const {
    CUTE_STATIC_ASSERT_V(size(acc_s) == size(tScS0));
    if (softcap_on) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) {
        float const t = tanh_approx(acc_s(i) * softcap_in);
        acc_s(i) = t * softcap_out;
        if constexpr (kKeepDtanh) { dtanh(i) = 1.f - t * t; }
      }
    }
    if (alibi_on) {
      // Key distance of score (r, c) from its row's diagonal: |base + r - c|, base per thread and block.
      int const base = m_block * block_m + row_base + diagonal_offset - (n_block * block_n + col_base);
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) {
        int const distance = abs(base + get<0>(tScS0(i)) - get<1>(tScS0(i)));
        acc_s(i) -= alibi_raw_slope * float(distance);
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
