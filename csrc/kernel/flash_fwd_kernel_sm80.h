// FlashAttention-2 forward on mma.sync (sm80, and sm90 through the same code).
// One CTA per (query block, head, batch), and per split of the key blocks for the KV-cache kernels. The
// CTA keeps its Q tile in shared memory, walks the key blocks from the last visible one down to the first,
// and keeps O, the running max and the running sum in registers. In the forward K and V each have one
// shared buffer; their loads alternate so that one is always in flight under the other's GEMM: K[n-1]
// streams in during softmax + P V of block n, V[n] during Q K[n]^T. The KV-cache kernels (bound by the
// bytes of the cache) instead cycle K and V through a ring of stages, several key blocks in flight.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/detail/helper_macros.hpp>

#include "collective/block_info.h"
#include "collective/copy.h"
#include "collective/gemm.h"
#include "collective/mask.h"
#include "collective/score_mod.h"
#include "collective/softmax.h"
#include "collective/utils.h"
#include "common/grid_dependency.h"
#include "flash_attn2/params.h"
#include "kernel/flash_fwd_combine.h"

namespace flash_attn2 {

using namespace cute;

// kMods: the score modifiers compiled in (Modifiers in params.h; collective/score_mod.h); dropout only
// with kAll.
// kKVCache: attention over a KV cache (KVCacheParams): keys of a dense cache row or of pages looked up per
// row, the key blocks optionally split across CTAs (flash-decoding) with fp32 partial outputs; no dropout.
template <class Traits, MaskMode kMask, Modifiers kMods, bool kKVCache = false>
struct FlashFwdKernelSm80 {
  using Element = typename Traits::Element;
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kHeadDim = Traits::kHeadDim;
  static constexpr int kNThreads = Traits::kNThreads;
  static constexpr int kSmemBytes = Traits::kSmemBytes;
  using SharedStorage = typename Traits::SharedStorage;
  using Mask = BlockMask<kMask, kBlockM, kBlockN>;
  using Params = std::conditional_t<kKVCache, KVCacheParams, FwdParams>;
  using BlockInfo = std::conditional_t<kKVCache, KVCacheBlockInfo, FwdBlockInfo>;
  static constexpr bool kModifiers = kMods != Modifiers::kPlain;
  static constexpr bool kDropout = kMods == Modifiers::kAll && !kKVCache;

  CUTE_HOST_DEVICE static int num_m_blocks(int seqlen_q) { return (seqlen_q + kBlockM - 1) / kBlockM; }
  CUTE_HOST_DEVICE static int num_splits(Params const& p) {
    if constexpr (kKVCache) { return p.num_splits; } else { return 1; }
  }

  // One flat grid dimension (x allows 2^31 - 1 blocks; y and z only 65535, less than batch or heads may
  // be). Without a mask every CTA has the same work and the query blocks of one (batch, head) are
  // consecutive, so they share K and V in L2. Under a causal or window mask the work grows with the
  // query block, and head dims >= 64 run longest first (see operator()).
  static int64_t num_blocks(Params const& p) {
    return int64_t(num_m_blocks(p.seqlen_q)) * num_splits(p) * p.num_heads * p.batch;
  }

  // The fused split combine (KVCacheParams::split_tickets; the dispatcher sets it only for tiles of at
  // most kFusedCombineMaxRows rows, one tile per (batch, head)): every split CTA takes a ticket once its
  // partials are out (each thread's stores fenced first), and the one that takes the last merges the
  // tile's rows, a warp per row, in place of the combine kernel (PERF_LOG b16).
  template <class BlockInfoT>
  CUTE_DEVICE static void combine_if_last(Params const& params, BlockInfoT const& binfo, int bh, int m_block,
                                          int rows_q, char* smem_buf) {
    static_assert(kBlockM >= kFusedCombineMaxRows, "one query tile per (batch, head)");
    static_assert(Traits::kNWarps * kMaxKVCacheSplits * sizeof(float) <= sizeof(SharedStorage), "weights fit");
    __threadfence();  // this thread's partial output and lse, before the ticket
    int prev = 0;
    if (threadIdx.x == 0) { prev = atomicAdd(params.split_tickets + bh, 1); }
    if (!__syncthreads_or(threadIdx.x == 0 && prev == num_splits(params) - 1)) { return; }
    __threadfence();  // the other splits' partials, after their tickets
    cp_async_wait<0>();  // shared memory is free (no copy still lands in it)
    __syncthreads();
    int const warp = int(threadIdx.x) / 32;
    float* const weight = reinterpret_cast<float*>(smem_buf) + warp * kMaxKVCacheSplits;
    Element* const out = static_cast<Element*>(params.out) + binfo.out_offset;
    int const rows = min(rows_q, kBlockM);
    for (int r = warp; r < rows; r += Traits::kNWarps) {
      int const i = m_block * kBlockM + r;
      combine_row_warp<Element>(params, binfo.lse_offset + i, out + int64_t(i) * params.out_row_stride, weight);
    }
  }

  CUTE_DEVICE void operator()(Params const& params, char* smem_buf) const {
    if constexpr (kKVCache) {
      // Launched dependent on the append (run_kvcache): its writes first; then the combine kernel, if any, may launch.
      grid_dependency_wait();
      grid_launch_dependents();
    }
    int const tidx = threadIdx.x;
    int const m_blocks = num_m_blocks(params.seqlen_q);
    int const splits = num_splits(params);
    int bhs = int(blockIdx.x) / m_blocks;
    // The last query blocks do the most work under a mask (and as much without one): they go first.
    int m_block = m_blocks - 1 - (int(blockIdx.x) - bhs * m_blocks);
    // Longest first under a mask (H200, causal, bf16, ratio to SDPA-flash at 1k / 2k / 4k / 16k keys): hdim
    // 128 1.04 / 1.05 / 1.08 / 1.12 head by head, 1.05 / 1.10 / 1.12 / 1.14 longest first over all heads;
    // hdim 256 0.79 / 0.88 / 0.90 / 1.04 -> 0.92 / 0.98 / 1.02 / 1.05; hdim 96, one run, 0.92 / 0.95 / 0.97 /
    // 1.01 -> 0.90 / 0.97 / 1.03 / 1.07. hdim 64 lost over all heads (its CTAs of one head run apart in time,
    // K and V come from HBM, and its short steps cannot cover that latency), so it goes longest first within
    // groups of heads whose K and V fit in about half an L2 (longest_first's budget): with the 128 x 128
    // tile, same-run A/B against head by head, 1.02 / 0.99 / 1.00 / 1.035 -> 1.04 / 1.00 / 1.02 / 1.04
    // (PERF_LOG b12). Groups cost hdim 128 and 256 most of their gain (measured in v8): they keep one group.
    // hdim 96 groups up to 2k keys only (A/B, causal, bf16 / fp16 at 1k 2k 4k 16k, PERF_LOG b17: groups
    // 0.93 -> 0.94 / 0.91 -> 0.95 at 1k, +1-3% at 2k, but -3% at 4k and -5% at 16k).
    constexpr bool kLongestFirst = kMask != MaskMode::kNone && !kKVCache && kHeadDim >= 64;
    if constexpr (kLongestFirst) {
      bool const grouped = kHeadDim == 64 || (kHeadDim == 96 && params.seqlen_k <= 2048);
      int64_t const kv_bytes = grouped ? int64_t(params.seqlen_k) * kHeadDim * 2 * int64_t(sizeof(Element)) : 0;
      GridSlot const slot = longest_first(int(blockIdx.x), m_blocks, params.num_heads * params.batch, kv_bytes);
      bhs = slot.bh;
      m_block = m_blocks - 1 - slot.rank;
    }
    int const split = bhs % splits;
    int const bh = bhs / splits;
    int const head = bh % params.num_heads;
    int const batch = bh / params.num_heads;

    BlockInfo const binfo(params, batch, head);
    if (m_block * kBlockM >= binfo.seqlen_q) { return; }
    Mask const mask(binfo.seqlen_q, binfo.seqlen_k, params.window_left, params.window_right);
    int n_block_min = mask.n_block_begin(m_block);
    int n_block_max = mask.n_block_end(m_block);
    if (splits > 1) {
      // Splits own fixed ranges of the capacity's key blocks, so every sequence's blocks split alike.
      int const per_split = ceil_div((params.seqlen_k + kBlockN - 1) / kBlockN, splits);
      n_block_min = max(n_block_min, split * per_split);
      n_block_max = min(n_block_max, (split + 1) * per_split);
    }
    int const head_dim = params.head_dim;
    int const rows_q = binfo.seqlen_q - m_block * kBlockM;  // valid rows of this Q tile (may exceed kBlockM)

    SharedStorage& storage = *reinterpret_cast<SharedStorage*>(smem_buf);

    // Global tiles. Each tile's base pointer is computed in 64 bits; offsets inside a tile are 32-bit
    // (the dispatcher checks row_stride * block rows < 2^31), which keeps per-copy addresses cheap
    // enough that they need not stay live in registers across the main loop.
    Element const* const q_ptr = static_cast<Element const*>(params.q) + binfo.q_offset;
    Element const* const k_ptr = static_cast<Element const*>(params.k) + binfo.k_offset;
    Element const* const v_ptr = static_cast<Element const*>(params.v) + binfo.v_offset;
    Element* const o_ptr = static_cast<Element*>(params.out) + binfo.out_offset;
    auto tile = [](auto* base, int64_t row_stride, int block, auto rows) {  // (rows, kHeadDim)
      return make_tensor(make_gmem_ptr(base + int64_t(block) * decltype(rows)::value * row_stride),
                         make_layout(make_shape(rows, Int<kHeadDim>{}), make_stride(int(row_stride), _1{})));
    };
    Tensor gQ = tile(q_ptr, params.q_row_stride, m_block, Int<kBlockM>{});  // (kBlockM, kHeadDim)
    Tensor gO = tile(o_ptr, params.out_row_stride, m_block, Int<kBlockM>{});  // (kBlockM, kHeadDim)
    // A split's rows (lse and O) go to its slice of the fp32 accumulators, laid out as softmax_lse is.
    int64_t split_rows = 0;
    float* lse_base = params.softmax_lse;
    if constexpr (kKVCache) {
      if (splits > 1) {
        split_rows = int64_t(split) * params.batch * params.num_heads * params.seqlen_q;
        lse_base = params.lse_accum + split_rows;
      }
    }
    Tensor mLSE = make_tensor(make_gmem_ptr(lse_base + binfo.lse_offset), make_shape(binfo.seqlen_q));

    Tensor sQ = make_tensor(make_smem_ptr(storage.q.data()), typename Traits::SmemLayoutQ{});   // (kBlockM, kHeadDim)
    Tensor sK = make_tensor(make_smem_ptr(storage.k.data()), typename Traits::SmemLayoutKV{});  // (kBlockN, kHeadDim)
    Tensor sV = make_tensor(make_smem_ptr(storage.v.data()), typename Traits::SmemLayoutKV{});  // (kBlockN, kHeadDim)
    Tensor sVt = make_tensor(make_smem_ptr(storage.v.data()), typename Traits::SmemLayoutVt{});  // (kHeadDim, kBlockN)
    Tensor sVtNoSwizzle =
        make_tensor(make_smem_ptr(storage.v.data()), typename Traits::SmemLayoutVtNoSwizzle{});  // (kHeadDim, kBlockN)
    Tensor sO = make_tensor(make_smem_ptr(storage.q.data()), typename Traits::SmemLayoutO{});   // (kBlockM, kHeadDim)

    // Global -> shared copies, with identity tensors for the tail predicates.
    typename Traits::GmemTiledCopyQKV gmem_tiled_copy;
    auto gmem_thr_copy = gmem_tiled_copy.get_thread_slice(tidx);
    Tensor tQgQ = gmem_thr_copy.partition_S(gQ);  // (CPY, CPY_M, CPY_K)
    Tensor tQsQ = gmem_thr_copy.partition_D(sQ);  // (CPY, CPY_M, CPY_K)
    Tensor tKsK = gmem_thr_copy.partition_D(sK);  // (CPY, CPY_N, CPY_K)
    Tensor tVsV = gmem_thr_copy.partition_D(sV);  // (CPY, CPY_N, CPY_K)
    // (CPY, CPY_N, CPY_K) source partitions of key block n
    auto tKgK = [&](int n) { return gmem_thr_copy.partition_S(tile(k_ptr, params.k_row_stride, n, Int<kBlockN>{})); };
    auto tVgV = [&](int n) { return gmem_thr_copy.partition_S(tile(v_ptr, params.v_row_stride, n, Int<kBlockN>{})); };
    Tensor tQcQ = gmem_thr_copy.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));  // (CPY, CPY_M, CPY_K) -> (row, col)
    Tensor tKVcKV = gmem_thr_copy.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));  // (CPY, CPY_N, CPY_K) -> (row, col)
    // Key block n of K or V into shared memory, rows >= max_rows zero-filled (the forward's loop; the
    // KV-cache loop has its own, with stages and paged rows).
    auto load_kv = [&](Element const* base, int64_t row_stride, auto& tXsX, int n, int max_rows)
                       CUTLASS_LAMBDA_FUNC_INLINE {
      copy_tile<true>(gmem_tiled_copy, gmem_thr_copy.partition_S(tile(base, row_stride, n, Int<kBlockN>{})), tXsX,
                      tKVcKV, max_rows, head_dim);
    };
    auto load_k = [&](int n, int max_rows) CUTLASS_LAMBDA_FUNC_INLINE {
      load_kv(k_ptr, params.k_row_stride, tKsK, n, max_rows);
    };
    auto load_v = [&](int n, int max_rows) CUTLASS_LAMBDA_FUNC_INLINE {
      load_kv(v_ptr, params.v_row_stride, tVsV, n, max_rows);
    };

    // Tensor-core partitions.
    typename Traits::TiledMma tiled_mma;
    auto thr_mma = tiled_mma.get_thread_slice(tidx);
    Tensor tSrQ = thr_mma.partition_fragment_A(sQ);             // (MMA, MMA_M, MMA_K)
    Tensor tSrK = thr_mma.partition_fragment_B(sK);             // (MMA, MMA_N, MMA_K)
    Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);  // (MMA, MMA_K=head dim / 8, MMA_N=kBlockN / 16)
    Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // (MMA, MMA_M, MMA_K)
    clear(acc_o);
    // Tile-local (row, col) of the scores: this thread's first one, and thread 0's as static offsets.
    Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor tScS0 = tiled_mma.get_thread_slice(0).partition_C(cS);  // (MMA, MMA_M, MMA_N) -> (row, col)
    auto const score_base = thr_mma.partition_C(cS)(0);  // this thread's first (row, col)
    int const score_row_base = get<0>(score_base);
    int const score_col_base = get<1>(score_base);

    // Shared -> register copies (ldmatrix), partitioned to match the MMA fragments.
    auto smem_tiled_copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
    auto smem_tiled_copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
    auto smem_tiled_copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
    Tensor tSsQ = smem_tiled_copy_q.get_thread_slice(tidx).partition_S(sQ);    // (CPY, MMA_M, MMA_K)
    Tensor tSsK = smem_tiled_copy_k.get_thread_slice(tidx).partition_S(sK);    // (CPY, MMA_N, MMA_K)
    Tensor tOsVt = smem_tiled_copy_v.get_thread_slice(tidx).partition_S(sVt);  // (CPY, MMA_K, MMA_N)

    ScoreModifiers<kMods> const modifiers(params, batch, head);
    // The scale of the scores as the main loop holds them (raw q.k, or tanh units for the softcap family).
    float const score_scale = modifiers.score_scale(params);
    OnlineSoftmax<decltype(size<0>(acc_rowcol(acc_o.layout())))::value> softmax(score_scale * float(M_LOG2E));
    Dropout const dropout(params, batch, head);

    // The math of one key block, shared by the forward's loop and the KV-cache loop, which interleave it
    // with their loads differently. scores: S = Q K^T (acc_s already initialised, K read through
    // tSsK_view), the modifiers, then the mask where needs_mask (a compile-time tag or a bool).
    auto scores = [&](auto& acc_s, int n_block, auto const& tSsK_view, auto needs_mask) CUTLASS_LAMBDA_FUNC_INLINE {
      gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK_view, tiled_mma, smem_tiled_copy_q, smem_tiled_copy_k, tidx);
      if constexpr (kModifiers) {  // before the mask: it must leave -inf, not tanh(-inf)
        modifiers.apply<false>(acc_s, acc_s, tScS0, score_row_base, score_col_base, m_block, n_block, kBlockM,
                               kBlockN, mask.diagonal_offset());
      }
      if (needs_mask) { mask.apply(acc_s, tScS0, score_row_base, score_col_base, m_block, n_block); }
    };
    // attend: the online softmax of the scores (and dropout), then O += P V with P from registers and V
    // read through tOsVt_view.
    auto attend = [&](auto& acc_s, int n_block, auto const& tOsVt_view) CUTLASS_LAMBDA_FUNC_INLINE {
      softmax.update(acc_s, acc_o);
      // Dropout after the row sums: the normaliser counts every probability, kept or not.
      if constexpr (kDropout) {
        if (dropout.on) {
          keep_branch();  // else ptxas predicates Philox into every step of a call without dropout
          dropout.apply<false>(acc_s, tScS0, m_block * kBlockM + score_row_base, n_block * kBlockN + score_col_base);
        }
      }
      Tensor rP = convert_fragment<Element>(acc_s);
      Tensor tOrP = make_tensor(rP.data(), acc_to_a_operand(rP.layout()));  // (MMA, MMA_M, MMA_N / 2)
      gemm_rs(acc_o, tOrP, tOrVt, tOsVt_view, tiled_mma, smem_tiled_copy_v, tidx);
    };

    if constexpr (kKVCache) {
      if (n_block_max > n_block_min) {
        // kStages K/V buffers in a ring: block i of the walk (from the last key block down, the masked
        // one first) lives in stage i % kStages, and blocks i + 1 ... i + kStages - 1 stream in while block
        // i is computed on. One barrier per block: after it every warp is done with block i - 1, whose
        // stage the next load takes.
        constexpr int kStages = Traits::kStages;
        constexpr int kStageElems = Traits::kStageElems;
        static_assert(kStages >= 2, "the KV-cache loop keeps a block in flight under the math");
        auto at_stage = [](auto const& t, int stage) CUTLASS_LAMBDA_FUNC_INLINE {
          return make_tensor(t.data() + stage * kStageElems, t.layout());
        };
        // The TiledMma gives warp w query rows [16w, 16w + 16). A warp whose rows are all padding (GQA
        // decode fills 4-8 of the 64) skips the math, which leaves the tensor cores and the shared memory
        // reads to the warps with rows; every warp still copies and meets the barriers.
        static_assert(kBlockM == 16 * Traits::kNWarps, "one 16-row slab per warp");
        int const warp = __shfl_sync(0xffffffff, tidx / 32, 0);
        bool const warp_has_rows = warp * 16 < rows_q;
        // A paged cache: the page of each of this thread's rows of the next block to load is read one
        // load ahead into registers (kRows of them), so the block table's latency hides under the math
        // instead of sitting in front of every cp.async.
        constexpr int kRows = decltype(size<1>(tKVcKV))::value;
        bool const paged = params.block_table != nullptr;
        int const* const pages = paged ? params.block_table + batch * params.block_table_batch_stride : nullptr;
        int page_of[kRows];
        int row_in_page[kRows];
        auto fetch_pages = [&](int n) CUTLASS_LAMBDA_FUNC_INLINE {
          CUTE_UNROLL
          for (int m = 0; m < kRows; ++m) {
            int const key = n * kBlockN + get<0>(tKVcKV(0, m, 0));
            int const slot = key / params.page_size;
            // key < seqlen_k <= the capacity <= max_pages * page_size (checked by the dispatcher).
            page_of[m] = key < binfo.seqlen_k ? pages[slot] : -1;
            row_in_page[m] = key - slot * params.page_size;
          }
        };
        auto load_block = [&](int n, int stage) CUTLASS_LAMBDA_FUNC_INLINE {
          auto tKsK_s = at_stage(tKsK, stage);
          auto tVsV_s = at_stage(tVsV, stage);
          if (paged) {
            auto rows_of = [&](Element const* base, int64_t row_stride, int64_t page_stride) CUTLASS_LAMBDA_FUNC_INLINE {
              return [base, row_stride, page_stride, &params, &page_of, &row_in_page](int m) -> Element const* {
                int const page = page_of[m];
                if (page < 0 || page >= params.num_pages) { return nullptr; }  // past the sequence, or a bad entry
                return base + int64_t(page) * page_stride + int64_t(row_in_page[m]) * row_stride;
              };
            };
            copy_rows(gmem_tiled_copy, tKgK(0), tKsK_s, tKVcKV, rows_of(k_ptr, params.k_row_stride, params.k_batch_stride),
                      head_dim);
            copy_rows(gmem_tiled_copy, tVgV(0), tVsV_s, tKVcKV, rows_of(v_ptr, params.v_row_stride, params.v_batch_stride),
                      head_dim);
          } else {
            int const max_rows = binfo.seqlen_k - n * kBlockN;
            copy_tile<true>(gmem_tiled_copy, tKgK(n), tKsK_s, tKVcKV, max_rows, head_dim);
            copy_tile<true>(gmem_tiled_copy, tVgV(n), tVsV_s, tKVcKV, max_rows, head_dim);
          }
        };
        int const n_count = n_block_max - n_block_min;
        auto block_at = [&](int i) { return n_block_max - 1 - i; };
        // Loads block i of the walk into `stage`, then reads the pages of block i + 1 (the next to load).
        auto issue = [&](int i, int stage) CUTLASS_LAMBDA_FUNC_INLINE {
          load_block(block_at(i), stage);
          if (paged && i + 1 < n_count) { fetch_pages(block_at(i + 1)); }
        };
        int const n_block_unmasked_end = max(mask.n_block_unmasked_end(m_block), n_block_min);
        int n_block_unmasked_begin = n_block_min;
        if constexpr (Mask::kHasLeft) { n_block_unmasked_begin = max(mask.n_block_unmasked_begin(m_block), n_block_min); }

        // Prologue: Q with the first block, then the next kStages - 2 blocks, one commit group each (empty
        // groups where the walk is shorter, so the wait counts below hold).
        copy_tile<true>(gmem_tiled_copy, tQgQ, tQsQ, tQcQ, rows_q, head_dim);
        if (paged) { fetch_pages(block_at(0)); }
        CUTE_UNROLL
        for (int i = 0; i < kStages - 1; ++i) {
          if (i < n_count) { issue(i, i); }
          cp_async_fence();
        }

        int stage = 0;                  // block i's
        int ahead_stage = kStages - 1;  // block i + kStages - 1's
        for (int i = 0; i < n_count; ++i) {
          cp_async_wait<kStages - 2>();
          __syncthreads();  // block i has landed; every warp is done with block i - 1 (ahead_stage)
          int const ahead = i + kStages - 1;
          if (ahead < n_count) { issue(ahead, ahead_stage); }
          cp_async_fence();

          if (warp_has_rows) {
            int const n_block = block_at(i);
            Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});  // (MMA, MMA_M, MMA_N)
            modifiers.init(acc_s, tScS0, score_row_base, score_col_base, m_block, n_block, kBlockM, kBlockN,
                           mask.diagonal_offset());
            scores(acc_s, n_block, at_stage(tSsK, stage),
                   n_block >= n_block_unmasked_end || n_block < n_block_unmasked_begin);
            attend(acc_s, n_block, at_stage(tOsVt, stage));
          }
          stage = stage + 1 == kStages ? 0 : stage + 1;
          ahead_stage = ahead_stage + 1 == kStages ? 0 : ahead_stage + 1;
        }
      }
    } else if (n_block_max > n_block_min) {
      // The key blocks run from the last down, the masked ones at the ends. ALiBi without a mask instead
      // runs outward from the diagonal: [turn, max) up, then [min, turn) down. Its bias falls with the
      // distance from the diagonal, so a query block far below it would see its running max rise at
      // almost every step of the downward order, and each rise by more than the softmax's threshold
      // costs an O rescale; outward, the first blocks hold the largest scores.
      constexpr bool kOutward = kMods == Modifiers::kAlibi && kMask == MaskMode::kNone;
      // The ALiBi family's key blocks that the diagonal crosses (exact bias), empty for the others.
      BlockRange const crossing = kMods == Modifiers::kAlibi
                                      ? alibi_crossing_blocks(m_block, kBlockM, kBlockN, mask.diagonal_offset())
                                      : BlockRange{0, 0};
      int const turn = kOutward ? min(max(crossing.begin, n_block_min), n_block_max) : n_block_max;
      // Prologue: Q and the first key block in flight together.
      int n_block = turn < n_block_max ? turn : n_block_max - 1;
      using True = cute::true_type;
      using False = cute::false_type;
      int const n_block_unmasked_end = max(mask.n_block_unmasked_end(m_block), n_block_min);
      copy_tile<true>(gmem_tiled_copy, tQgQ, tQsQ, tQcQ, rows_q, head_dim);
      load_k(n_block, binfo.seqlen_k - n_block * kBlockN);
      cp_async_fence();

      // Forced inline: step is called from several loops, and an outlined step would take the register
      // fragments it captures by reference through local memory.
      // next_block: the block to prefetch K of (none if < n_block_min). exact_bias (the ALiBi family): the
      // block may cross the diagonal (see alibi_bias).
      auto step = [&](int n_block, int next_block, auto needs_mask, auto exact_bias) CUTLASS_LAMBDA_FUNC_INLINE {
        Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});  // (MMA, MMA_M, MMA_N)
        modifiers.template init<decltype(exact_bias)::value>(acc_s, tScS0, score_row_base, score_col_base, m_block,
                                                             n_block, kBlockM, kBlockN, mask.diagonal_offset());
        cp_async_wait<0>();
        __syncthreads();  // K[n] has landed, and every warp is done reading V[n + 1]
        load_v(n_block, binfo.seqlen_k - n_block * kBlockN);
        cp_async_fence();

        scores(acc_s, n_block, tSsK, needs_mask);

        cp_async_wait<0>();
        __syncthreads();  // V[n] has landed, and every warp is done reading K[n]
        if (next_block >= n_block_min) {
          load_k(next_block, binfo.seqlen_k - next_block * kBlockN);
          cp_async_fence();
        }

        attend(acc_s, n_block, tOsVt);
      };

      if constexpr (kOutward) {
        // Up from the diagonal, then down from below it. Blocks the diagonal crosses and the partial last
        // block take the exact bias and the mask (for kNone, the sequence end: one compare per score), the
        // rest the one-FFMA bias; a run-time choice between two whole steps, which stay branches.
        auto visit = [&](int n, int next) CUTLASS_LAMBDA_FUNC_INLINE {
          if ((n >= turn && n < crossing.end) || n >= n_block_unmasked_end) {
            step(n, next, True{}, True{});
          } else {
            step(n, next, False{}, False{});
          }
        };
        for (n_block = turn; n_block < n_block_max; ++n_block) {
          visit(n_block, n_block + 1 < n_block_max ? n_block + 1 : turn - 1);
        }
        for (n_block = turn - 1; n_block >= n_block_min; --n_block) { visit(n_block, n_block - 1); }
      } else {
        // The bare middle, from n_block down to begin. The ALiBi family runs the blocks on one side of the
        // diagonal with its cheaper bias, the ones the diagonal crosses with the exact one.
        auto run_unmasked = [&](int begin) CUTLASS_LAMBDA_FUNC_INLINE {
          if constexpr (kMods == Modifiers::kAlibi) {
            int const crossing_end = max(crossing.end, begin), crossing_begin = max(crossing.begin, begin);
            for (; n_block >= crossing_end; --n_block) { step(n_block, n_block - 1, False{}, False{}); }
            for (; n_block >= crossing_begin; --n_block) { step(n_block, n_block - 1, False{}, True{}); }
            for (; n_block >= begin; --n_block) { step(n_block, n_block - 1, False{}, False{}); }
          } else {
            for (; n_block >= begin; --n_block) { step(n_block, n_block - 1, False{}, True{}); }
          }
        };
        // The highest key blocks straddle the diagonal or the sequence end, the lowest (sliding window)
        // the window's left edge: those are masked. The middle runs bare.
        for (; n_block >= n_block_unmasked_end; --n_block) { step(n_block, n_block - 1, True{}, True{}); }
        if constexpr (Mask::kHasLeft) {
          run_unmasked(max(mask.n_block_unmasked_begin(m_block), n_block_min));
          for (; n_block >= n_block_min; --n_block) { step(n_block, n_block - 1, True{}, True{}); }
        } else {
          run_unmasked(n_block_min);
        }
      }
    }

    // Epilogue: normalise, write lse, stage O through shared memory for 16-byte global stores.
    // Kept probabilities are scaled by 1 / (1 - p) with the normalisation.
    Tensor lse = softmax.finalize(acc_o, score_scale, kDropout ? dropout.keep_scale : 1.f);

    Tensor cO = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
    Tensor tOcO = thr_mma.partition_C(cO);  // (MMA, MMA_M, MMA_K) -> (row, col)
    Tensor tOcO_rowcol = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));  // (rows, cols) -> (row, col)
    if (get<1>(tOcO_rowcol(0, 0)) == 0) {  // the quad's first lane owns the row
      CUTE_UNROLL
      for (int r = 0; r < size(lse); ++r) {
        int const row = get<0>(tOcO_rowcol(r, 0));
        if (row < rows_q) { mLSE(m_block * kBlockM + row) = lse(r); }
      }
    }
    if constexpr (kKVCache) {
      if (splits > 1) {
        // This split's normalised output, fp32, for the combine kernel. A split that saw no key leaves
        // lse = +inf and O = 0, which the combine weighs as nothing.
        float* const o_accum =
            params.out_accum + (split_rows + binfo.lse_offset + int64_t(m_block) * kBlockM) * head_dim;
        CUTE_UNROLL
        for (int i = 0; i < size(acc_o); ++i) {
          int const row = get<0>(tOcO(i));
          int const col = get<1>(tOcO(i));
          if (row < rows_q && col < head_dim) { o_accum[int64_t(row) * head_dim + col] = acc_o(i); }
        }
        if (params.split_tickets != nullptr) { combine_if_last(params, binfo, bh, m_block, rows_q, smem_buf); }
        return;
      }
    }
    Tensor rO = convert_fragment<Element>(acc_o);

    auto smem_tiled_copy_o = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, tiled_mma);
    auto smem_thr_copy_o = smem_tiled_copy_o.get_thread_slice(tidx);
    Tensor taccOrO = smem_thr_copy_o.retile_S(rO);   // (CPY, MMA_M, MMA_K)
    Tensor taccOsO = smem_thr_copy_o.partition_D(sO);  // (CPY, MMA_M, MMA_K)
    __syncthreads();  // every warp is done reading Q before O overwrites it
    copy(smem_tiled_copy_o, taccOrO, taccOsO);
    __syncthreads();

    typename Traits::GmemTiledCopyO gmem_tiled_copy_o;
    auto gmem_thr_copy_o = gmem_tiled_copy_o.get_thread_slice(tidx);
    Tensor tOsO = gmem_thr_copy_o.partition_S(sO);  // (CPY, CPY_M, CPY_K)
    Tensor tOgO = gmem_thr_copy_o.partition_D(gO);  // (CPY, CPY_M, CPY_K)
    Tensor tOcO_copy = gmem_thr_copy_o.partition_D(cO);  // (CPY, CPY_M, CPY_K) -> (row, col)
    Tensor tOrO = make_fragment_like(tOsO);
    copy(gmem_tiled_copy_o, tOsO, tOrO);
    copy_tile<false>(gmem_tiled_copy_o, tOrO, tOgO, tOcO_copy, rows_q, head_dim);
  }
};

}  // namespace flash_attn2
