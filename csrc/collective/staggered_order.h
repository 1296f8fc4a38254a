// The order in which the deterministic backward's staggered mode (BwdKernelParams::dq_staggered) adds the
// key blocks' dQ tiles into its one accumulator, and each addition's turn in it. Host and device: the
// kernel counts turns with these (each thread some query blocks at a round's start), and
// tests/cpp/staggered_order_test.cu checks them on the CPU against the walk the kernel takes, and times
// that order in a model of the splits running side by side.
#pragma once

#include <cute/config.hpp>

namespace flash_attn2 {

// The key block that split s of a head takes in round r: every round takes the next `splits` key blocks,
// odd rounds in reverse (the zigzag: under a causal mask lower key blocks see more query blocks, so a
// split's rounds even out). Shared by all the deterministic modes.
CUTE_HOST_DEVICE constexpr int zigzag_key_block(int round, int splits, int s) {
  return round * splits + (round % 2 == 0 ? s : splits - 1 - s);
}

// A key block's staggered walk (the deterministic kernel's rotated one, split s's): the bare query blocks
// [unmasked_begin, end) from end - 1 - offset downwards and around (offset = (stride * s) % their count),
// then the masked ones [begin, unmasked_begin) from the top down. Without a left window edge `end` is the
// number of query blocks for every key block. `start`: staggered_round_start.
struct StaggeredWalk {
  int begin;
  int unmasked_begin;
  int offset;
  int start;
};

// Where a walk visits query block m (end: the number of query blocks), or -1 where it does not.
CUTE_HOST_DEVICE constexpr int staggered_position(StaggeredWalk const& w, int end, int m) {
  if (m < w.begin || m >= end) { return -1; }
  if (m >= w.unmasked_begin) {
    int const pos = end - 1 - w.offset - m;
    return pos < 0 ? pos + (end - w.unmasked_begin) : pos;
  }
  return end - w.unmasked_begin + (w.unmasked_begin - 1 - m);
}

// When split s starts round `round`, relative to split 0, in steps of the walks, as the splits would run
// without waiting: under a causal mask a round's key blocks walk different numbers of query blocks (each
// key block two fewer than the one below it at block_n = 2 * block_m), and the zigzag evens that out over
// each pair of rounds. So even rounds start together, and an odd round starts as much earlier for split s
// as its key block of the round before was shorter than split 0's. Within a round, the additions to a
// tile go by (position + this, split): the order the splits reach them in.
template <class Mask>
CUTE_HOST_DEVICE int staggered_round_start(Mask const& mask, int n_blocks, int round, int splits, int s) {
  if (round % 2 == 0) { return 0; }
  auto length = [&](int n) {
    if (n >= n_blocks) { return 0; }
    int const steps = mask.m_block_end(n) - mask.m_block_begin(n);
    return steps > 0 ? steps : 0;
  };
  int const first = (round - 1) * splits;  // the round before took key block first + s for split s
  return length(first + s) - length(first);
}

// Split s's walk of its key block of `round` (zigzag_key_block); one that sees no query block where the
// split has none this round. Mask: BlockMask without a left window edge.
template <class Mask>
CUTE_HOST_DEVICE StaggeredWalk staggered_walk(Mask const& mask, int n_blocks, int stride, int round, int splits, int s) {
  static_assert(!Mask::kHasLeft, "staggered: no left window edge");
  int const end = mask.m_blocks();
  int const n = zigzag_key_block(round, splits, s);
  if (n >= n_blocks) { return {end, end, 0, 0}; }
  int const begin = mask.m_block_begin(n);
  int const unmasked_begin = mask.m_block_unmasked_begin(n);
  int const bare = end - unmasked_begin;
  int const offset = bare == 0 ? 0 : stride * s < bare ? stride * s : stride * s % bare;
  return {begin, unmasked_begin, offset, staggered_round_start(mask, n_blocks, round, splits, s)};
}

// The additions to a query block m that the split visits in `round`, made in the rounds before: one by
// each key block [0, round * splits). Without a left window edge every key block sees the query blocks
// from its m_block_begin up to the last, and m_block_begin is non-decreasing in the key block: the split's
// key block n of this round sees m, so m >= m_block_begin(n) >= m_block_begin(n') for every earlier n'.
CUTE_HOST_DEVICE constexpr int staggered_turns_before_round(int round, int splits) { return round * splits; }

// Within a round, whether split a's addition to query block m comes before split b's (which exists): the
// earlier in time (position + the round's start) first, the lower split on a tie. end: the number of query
// blocks.
CUTE_HOST_DEVICE constexpr bool staggered_before(StaggeredWalk const& a, int split_a, StaggeredWalk const& b, int split_b,
                                                int end, int m) {
  int const pos_a = staggered_position(a, end, m);
  if (pos_a < 0) { return false; }
  int const time_a = pos_a + a.start, time_b = staggered_position(b, end, m) + b.start;
  return time_a < time_b || (time_a == time_b && split_a < split_b);
}

}  // namespace flash_attn2
