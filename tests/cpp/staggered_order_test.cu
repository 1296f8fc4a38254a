// Host-side checks of the deterministic backward's staggered order (collective/staggered_order.h) against the
// walk the kernel takes (the round loop and the rotated walk of flash_bwd_kernel_sm80.h, restated here):
//  - staggered_position is the step at which the walk visits each query block;
//  - the turns the kernel computes for the additions to each dQ tile are 0, 1, ..., k - 1, in the order
//    (round, position + the round's start, split), so every addition has its own turn and each waits only for earlier ones;
//  - a timing model of a head's splits running side by side (a step per tick; a turn is passed when its
//    split issues its next tile, a step after its own issue) finishes, and its waits stay small.
// The model prints its waits for the shapes of issue 3's bar: the prediction for the GPU runs.
// No GPU needed; CTest runs it.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <tuple>
#include <vector>

#include "collective/staggered_order.h"
#include "collective/mask.h"

namespace {

int failures = 0;

void expect(bool ok, char const* what, int a, int b, int c, int d, int e) {
  if (!ok && failures++ < 20) { std::printf("FAIL %s (%d %d %d %d %d)\n", what, a, b, c, d, e); }
}

struct Visit {
  int round, split, pos, m;
  int time;  // pos + the round's start (staggered_round_start)
  int turn = -1;
};

// The kernel's walk of key block n by split s (kRotate, staggered: m_first rotated by stride * s).
template <class Mask>
std::vector<int> walk(Mask const& mask, int stride, int s, int n) {
  std::vector<int> order;
  int const begin = mask.m_block_begin(n), end = mask.m_block_end(n);
  if (begin >= end) { return order; }
  int const unmasked_begin = mask.m_block_unmasked_begin(n);
  int const bare = end - unmasked_begin;
  int m = bare == 0 ? end - 1 : end - 1 - stride * s % bare;
  for (int i = 0; i < bare; ++i) {
    order.push_back(m);
    int const after = i + 1 == bare ? unmasked_begin - 1 : m == unmasked_begin ? end - 1 : m - 1;
    m = after;
  }
  for (m = unmasked_begin - 1; m >= begin; --m) { order.push_back(m); }
  return order;
}

struct ModelResult {
  long ticks = 0;    // when the last split finished
  long busiest = 0;  // the most steps any split takes: the finish without waits
};

// One head: checks the turns and runs the timing model.
template <flash_attn2::MaskMode kMode, int kBM, int kBN>
ModelResult check_head(int seqlen_q, int seqlen_k, int splits, int stride) {
  using Mask = flash_attn2::BlockMask<kMode, kBM, kBN>;
  Mask const mask(seqlen_q, seqlen_k, -1, kMode == flash_attn2::MaskMode::kCausal ? 0 : -1);
  int const n_blocks = (seqlen_k + kBN - 1) / kBN;
  int const m_blocks = (seqlen_q + kBM - 1) / kBM;
  // Each split's visits in its order, and every visit of each tile.
  std::vector<std::vector<Visit>> by_split(splits);
  for (int s = 0; s < splits; ++s) {
    for (int round = 0, n = s; n < n_blocks; ++round, n = flash_attn2::zigzag_key_block(round, splits, s)) {
      std::vector<int> const order = walk(mask, stride, s, n);
      flash_attn2::StaggeredWalk const w = flash_attn2::staggered_walk(mask, n_blocks, stride, round, splits, s);
      for (int i = 0; i < int(order.size()); ++i) {
        int const m = order[i];
        expect(flash_attn2::staggered_position(w, m_blocks, m) == i, "position", seqlen_q, seqlen_k, s, n, m);
        by_split[s].push_back({round, s, i, m, i + w.start});
      }
      for (int m = 0; m < m_blocks; ++m) {
        if (std::find(order.begin(), order.end(), m) == order.end()) {
          expect(flash_attn2::staggered_position(w, m_blocks, m) == -1, "unvisited", seqlen_q, seqlen_k, s, n, m);
        }
      }
    }
  }
  // The kernel's turn count (count_staggered_turns: the same loop over the other splits).
  std::vector<std::vector<Visit*>> by_tile(m_blocks);
  for (auto& visits : by_split) {
    for (Visit& v : visits) {
      int const n = flash_attn2::zigzag_key_block(v.round, splits, v.split);
      flash_attn2::StaggeredWalk const mine = flash_attn2::staggered_walk(mask, n_blocks, stride, v.round, splits, v.split);
      int turn = flash_attn2::staggered_turns_before_round(v.round, splits);
      for (int lane = 0; lane < splits; ++lane) {
        flash_attn2::StaggeredWalk const theirs = flash_attn2::staggered_walk(mask, n_blocks, stride, v.round, splits, lane);
        if (lane != v.split && flash_attn2::staggered_before(theirs, lane, mine, v.split, m_blocks, v.m)) { ++turn; }
      }
      v.turn = turn;
      by_tile[v.m].push_back(&v);
    }
  }
  for (int m = 0; m < m_blocks; ++m) {
    auto& visits = by_tile[m];
    std::sort(visits.begin(), visits.end(), [](Visit const* a, Visit const* b) {
      return std::make_tuple(a->round, a->time, a->split) < std::make_tuple(b->round, b->time, b->split);
    });
    for (int i = 0; i < int(visits.size()); ++i) {
      expect(visits[i]->turn == i, "turn", seqlen_q, seqlen_k, splits, m, visits[i]->turn - i);
    }
  }
  // The timing model. Split s runs its visits in order, one step each; its tile of step t is issued at the
  // start of step t + 1, after its turn's wait, and its turn passed at the next issue (the start of step
  // t + 2, or the key block's end). A wait stalls the split (its warp 0 holds the next barrier).
  // The visits in turn order over all tiles form a topological order (a split's own visits and a tile's
  // additions both come in increasing (round, position + the round's start, split)), so one pass in that order settles the times.
  std::vector<Visit*> all;
  for (auto& visits : by_split) {
    for (Visit& v : visits) { all.push_back(&v); }
  }
  std::sort(all.begin(), all.end(), [](Visit const* a, Visit const* b) {
    return std::make_tuple(a->round, a->time, a->split) < std::make_tuple(b->round, b->time, b->split);
  });
  std::vector<long> split_clock(splits, 0);     // when each split starts its next step
  std::vector<long> tile_passed(m_blocks, 0);   // when each tile's last addition passed its turn
  std::vector<long> issue_of(all.size(), 0);
  ModelResult result;
  for (Visit* v : all) {
    long const start = split_clock[v->split];
    long const issue = std::max(start + 1, tile_passed[v->m]);
    split_clock[v->split] = issue;     // the next step starts after this issue
    tile_passed[v->m] = issue + 1;     // passed at the next issue, a step later
    result.ticks = std::max(result.ticks, issue);
  }
  for (auto& visits : by_split) { result.busiest = std::max<long>(result.busiest, long(visits.size())); }
  return result;
}

template <flash_attn2::MaskMode kMode, int kBM, int kBN>
void check_shapes() {
  int const lengths[] = {1, 63, 64, 65, 127, 128, 129, 300, 1000, 2049};
  for (int seqlen_q : lengths) {
    for (int seqlen_k : lengths) {
      for (int splits : {1, 2, 3, 5, 8, 32}) {
        for (int stride : {1, 2, 3}) {
          ModelResult const r = check_head<kMode, kBM, kBN>(seqlen_q, seqlen_k, splits, stride);
          expect(r.ticks >= r.busiest, "model", seqlen_q, seqlen_k, splits, stride, int(r.ticks));
        }
      }
    }
  }
}

// Issue 3's bar shapes (16k tokens, 16 heads of 128, or of 64 with 32 heads): a head's splits as the
// dispatcher gives them on an H100 / H200 (132 SMs, one CTA each: 132 / heads, at most 32).
template <flash_attn2::MaskMode kMode, int kBM, int kBN>
void predict(char const* name, int head_dim, int heads_per_batch) {
  for (int seqlen : {4096, 8192, 16384}) {
    int const batch = 16384 / seqlen;
    int const heads = batch * heads_per_batch;
    int const splits = std::min({132 / heads, (seqlen + kBN - 1) / kBN, 32});
    if (splits < 2) { continue; }
    ModelResult const r = check_head<kMode, kBM, kBN>(seqlen, seqlen, splits, 2);
    std::printf("model %-7s hdim %3d seqlen %5d: %2d splits per head, %6ld steps, %6ld without waits (+%.2f%%)\n",
                name, head_dim, seqlen, splits, r.ticks, r.busiest, 100.0 * double(r.ticks - r.busiest) / double(r.busiest));
    expect(r.ticks <= r.busiest + r.busiest / 50, "model waits above 2%", head_dim, seqlen, splits, int(r.ticks),
           int(r.busiest));
  }
}

}  // namespace

int main() {
  using flash_attn2::MaskMode;
  check_shapes<MaskMode::kNone, 64, 128>();
  check_shapes<MaskMode::kCausal, 64, 128>();
  check_shapes<MaskMode::kNone, 128, 128>();
  check_shapes<MaskMode::kCausal, 128, 128>();
  predict<MaskMode::kNone, 64, 128>("none", 128, 16);
  predict<MaskMode::kCausal, 64, 128>("causal", 128, 16);
  predict<MaskMode::kNone, 128, 128>("none", 64, 32);
  predict<MaskMode::kCausal, 128, 128>("causal", 64, 32);
  if (failures > 0) {
    std::printf("%d failures\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("staggered order: all checks passed\n");
  return EXIT_SUCCESS;
}
