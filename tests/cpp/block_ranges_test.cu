// Host-side checks of the index arithmetic that decides which blocks the kernels visit and how, against
// brute force over many shapes: BlockMask's block ranges (forward: key blocks of a query block; backward:
// query blocks of a key block) and their unmasked middles, the ALiBi family's diagonal-crossing blocks,
// and the longest-first grid order. No GPU needed; CTest runs it.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <utility>

#include "collective/mask.h"
#include "collective/score_mod.h"
#include "collective/utils.h"

namespace {

int failures = 0;

void expect(bool ok, char const* what, int a, int b, int c, int d, int e) {
  if (!ok && failures++ < 20) { std::printf("FAIL %s (%d %d %d %d %d)\n", what, a, b, c, d, e); }
}

// Row i sees key j (the kernels' rule; -1 is unbounded; causal is the window (left, 0)).
bool visible(int i, int j, int seqlen_q, int seqlen_k, int left, int right) {
  if (i < 0 || i >= seqlen_q || j < 0 || j >= seqlen_k) { return false; }
  int const diag = i + seqlen_k - seqlen_q;
  return (left < 0 || j >= diag - left) && (right < 0 || j <= diag + right);
}

template <flash_attn2::MaskMode kMode, int kBM, int kBN>
void check_mask(int seqlen_q, int seqlen_k, int left, int right) {
  using Mask = flash_attn2::BlockMask<kMode, kBM, kBN>;
  // The rule the mask applies: none sees everything, causal is (-1, 0).
  int const l = kMode == flash_attn2::MaskMode::kLocal ? left : -1;
  int const r = kMode == flash_attn2::MaskMode::kNone ? -1 : kMode == flash_attn2::MaskMode::kCausal ? 0 : right;
  Mask const mask(seqlen_q, seqlen_k, l, r);
  int const m_blocks = (seqlen_q + kBM - 1) / kBM, n_blocks = (seqlen_k + kBN - 1) / kBN;
  auto any_visible = [&](int m, int n) {
    for (int i = m * kBM; i < (m + 1) * kBM; ++i)
      for (int j = n * kBN; j < (n + 1) * kBN; ++j)
        if (visible(i, j, seqlen_q, seqlen_k, l, r)) { return true; }
    return false;
  };
  auto all_visible = [&](int m, int n, bool valid_rows_only) {
    for (int i = m * kBM; i < (m + 1) * kBM; ++i) {
      if (valid_rows_only && i >= seqlen_q) { continue; }
      for (int j = n * kBN; j < (n + 1) * kBN; ++j)
        if (!visible(i, j, seqlen_q, seqlen_k, l, r)) { return false; }
    }
    return true;
  };
  for (int m = 0; m < m_blocks; ++m) {
    int const begin = mask.n_block_begin(m), end = mask.n_block_end(m);
    for (int n = 0; n < n_blocks; ++n) {
      bool const inside = n >= begin && n < end;
      expect(inside || !any_visible(m, n), "fwd: a skipped key block has a visible key", seqlen_q, seqlen_k, l, r, m * 1000 + n);
      bool const bare = inside && n >= mask.n_block_unmasked_begin(m) && n < mask.n_block_unmasked_end(m);
      expect(!bare || all_visible(m, n, true), "fwd: an unmasked key block hides a key", seqlen_q, seqlen_k, l, r, m * 1000 + n);
    }
  }
  for (int n = 0; n < n_blocks; ++n) {
    int const begin = mask.m_block_begin(n), end = mask.m_block_end(n);
    for (int m = 0; m < m_blocks; ++m) {
      bool const inside = m >= begin && m < end;
      expect(inside || !any_visible(m, n), "bwd: a skipped query block sees a key", seqlen_q, seqlen_k, l, r, n * 1000 + m);
      bool const bare = inside && m >= mask.m_block_unmasked_begin(n) && m < mask.m_block_unmasked_end(n);
      expect(!bare || all_visible(m, n, true), "bwd: an unmasked query block misses a key", seqlen_q, seqlen_k, l, r, n * 1000 + m);
    }
  }
  // ALiBi: outside the crossing range every score of a (full) tile lies on one side of the diagonal.
  for (int m = 0; m < m_blocks; ++m) {
    flash_attn2::BlockRange const crossing = flash_attn2::alibi_crossing_blocks(m, kBM, kBN, seqlen_k - seqlen_q);
    for (int n = 0; n < n_blocks; ++n) {
      if (n >= crossing.begin && n < crossing.end) { continue; }
      bool below = false, above = false;
      for (int i = m * kBM; i < (m + 1) * kBM; ++i)
        for (int j = n * kBN; j < (n + 1) * kBN; ++j) {
          int const d = i + seqlen_k - seqlen_q - j;
          below |= d > 0;
          above |= d < 0;
        }
      expect(!(below && above), "alibi: a block outside the crossing range crosses the diagonal", seqlen_q, seqlen_k, m, n, 0);
    }
  }
}

void check_longest_first(int blocks_per_head, int num_bh, int64_t bytes_per_head) {
  // The group of heads ordered together: all of them for bytes_per_head 0, else those fitting in 24 MB.
  int64_t const fit = bytes_per_head == 0 ? num_bh : (int64_t(24) << 20) / bytes_per_head;
  int const group = int(fit < 1 ? 1 : fit > num_bh ? num_bh : fit);
  std::set<std::pair<int, int>> seen;
  for (int cta = 0; cta < blocks_per_head * num_bh; ++cta) {
    flash_attn2::GridSlot const slot = flash_attn2::longest_first(cta, blocks_per_head, num_bh, bytes_per_head);
    expect(slot.rank >= 0 && slot.rank < blocks_per_head && slot.bh >= 0 && slot.bh < num_bh,
           "longest_first: out of range", cta, slot.rank, slot.bh, blocks_per_head, num_bh);
    expect(slot.bh / group == cta / (group * blocks_per_head), "longest_first: a head outside its group", cta,
           slot.bh, group, blocks_per_head, num_bh);
    if (cta > 0 && cta % (group * blocks_per_head) != 0) {  // within a group the ranks never decrease
      flash_attn2::GridSlot const before = flash_attn2::longest_first(cta - 1, blocks_per_head, num_bh, bytes_per_head);
      expect(slot.rank >= before.rank, "longest_first: a longer block after a shorter one", cta, slot.rank,
             before.rank, blocks_per_head, num_bh);
    }
    seen.insert({slot.rank, slot.bh});
  }
  expect(int(seen.size()) == blocks_per_head * num_bh, "longest_first: not a bijection", blocks_per_head, num_bh,
         int(seen.size()), 0, 0);
}

}  // namespace

int main() {
  using flash_attn2::MaskMode;
  int const lengths[] = {1, 7, 63, 64, 65, 128, 129, 200, 257, 511};
  int const windows[][2] = {{-1, -1}, {0, 0}, {3, 3}, {64, 0}, {-1, 5}, {7, -1}, {100, 50}, {300, 1}};
  for (int seqlen_q : lengths) {
    for (int seqlen_k : lengths) {
      check_mask<MaskMode::kNone, 128, 64>(seqlen_q, seqlen_k, -1, -1);
      check_mask<MaskMode::kCausal, 128, 64>(seqlen_q, seqlen_k, -1, 0);
      check_mask<MaskMode::kCausal, 64, 128>(seqlen_q, seqlen_k, -1, 0);
      for (auto const& w : windows) {
        check_mask<MaskMode::kLocal, 128, 64>(seqlen_q, seqlen_k, w[0], w[1]);
        check_mask<MaskMode::kLocal, 64, 128>(seqlen_q, seqlen_k, w[0], w[1]);
      }
    }
  }
  for (int blocks : {1, 3, 8, 16}) {
    for (int heads : {1, 5, 64, 256}) {
      for (int64_t bytes : {int64_t(0), int64_t(1) << 20, int64_t(10) << 20, int64_t(100) << 20}) {
        check_longest_first(blocks, heads, bytes);
      }
    }
  }
  if (failures > 0) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("block ranges, ALiBi crossing blocks, longest-first order: all checks passed\n");
  return 0;
}
