// FlashAttention-2 backward on mma.sync (sm80, and sm90 through the same code).
// One CTA per (key block, head, batch), or per (split, head, batch) walking every num_splits-th key
// block (deterministic mode). The CTA keeps its K and V tile in shared memory and dK, dV in registers, and walks
// the query blocks that see the key block (plain kernels: the bare ones from a rotated start, then the masked
// ones; the others from the last down). Per query block it recomputes
// P = exp(S * scale - lse) from the forward's lse (no running max, nothing N x N stored), forms
// dS = P o (dP - rowsum(dO o O)) with dP = dO V^T, accumulates dV += P^T dO and dK += dS^T Q, and adds
// dQ = dS K into an fp32 accumulator in global memory, with atomics or (Hopper) one bulk reduction of a
// shared staging tile per step. Deterministic mode: on Hopper the key blocks of a head add to each dQ tile
// in turns, lowest first (BwdKernelParams::dq_turns), walking the query blocks in the same order;
// elsewhere each split adds into a slice of its own. Q and dO of the next query block load under this
// one's math when there are two stages.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/detail/helper_macros.hpp>

#include "collective/block_info.h"
#include "collective/bulk_copy.h"
#include "collective/copy.h"
#include "collective/gemm.h"
#include "collective/mask.h"
#include "collective/score_mod.h"
#include "collective/tma_copy.h"
#include "collective/utils.h"
#include "launch/bwd_kernel_params.h"

namespace flash_attn2 {

using namespace cute;

// kMods: the score modifiers compiled in (Modifiers in params.h; collective/score_mod.h); dropout only
// with kAll. kDeterministic: the deterministic mode's second kernel of the plain family with two stages,
// the only one that runs the ordered dQ (params.dq_turns) and, with params.early_loads, issues the next
// query block's Q and dO at a step's start instead of between its GEMMs (see the step). Kept out of the
// default kernels, whose registers it would cost (ptxas, bf16 hdim 128 causal: spills 40 -> 116 B).
// kTmaQdO: that kernel with Q and dO loaded by TMA boxes (Hopper, fixed-length batches, 64-column swizzle
// atoms; BwdKernelParams::tma_qdo): its loads then wait on DRAM in the copy engine, not in the per-thread
// cp.async queue in front of the GEMMs' ldmatrix (PERF_LOG b24). A kernel of its own, since a run-time
// switch between the two load paths cost the cp.async one 4-6%; but it keeps the cp.async path behind
// params.tma_qdo (always set where it runs): without that branch ptxas spills 472 B / 1284 B (stores / loads,
// bf16 hdim 128) instead of 120 / 360.
template <class Traits, MaskMode kMask, Modifiers kMods, bool kDeterministic = false, bool kTmaQdO = false>
struct FlashBwdKernelSm80 {
  static constexpr bool kModifiers = kMods != Modifiers::kPlain;
  static constexpr bool kSoftcap = ScoreModifiers<kMods>::kSoftcap;
  static constexpr bool kDropout = kMods == Modifiers::kAll;
  static_assert(!kTmaQdO || (kDeterministic && Traits::kTmaQdOCapable && Traits::kStages == 2),
                "TMA loads of Q and dO: the deterministic kernel, 64-column swizzle atoms, two stages");
  using Element = typename Traits::Element;
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kHeadDim = Traits::kHeadDim;
  static constexpr int kNThreads = Traits::kNThreads;
  static constexpr int kStages = Traits::kStages;
  static constexpr int kSmemBytes = Traits::kSmemBytes;
  using SharedStorage = typename Traits::SharedStorage;
  using Mask = BlockMask<kMask, kBlockM, kBlockN>;
  static_assert(dq_accum_perm_is_valid<kHeadDim>(), "dq_accum_col must permute the head dim's columns");
  static_assert((1 << kDqPairBit<kHeadDim>) == 8 * (Traits::kNWarps / Traits::kTile.warps_m_dq),
                "stage_dq pairs fragments 8 x (warps along the head dim) columns apart: a power of two");

  CUTE_HOST_DEVICE static int num_n_blocks(int seqlen_k) { return (seqlen_k + kBlockN - 1) / kBlockN; }

  // Adds a thread's dQ fragment to the (kBlockM, kHeadDim) accumulator tile at `tile` (the plain layout of
  // dq_accum_col's comment in bwd_kernel_params.h) with fire-and-forget atomics (no load latency in the
  // loop); rows >= max_rows are outside the sequence.
  // Deterministic mode gives each split its own accumulator slice, so each address has one writing
  // thread, whose same-address atomics apply in program order: the same sums every run.
  template <class TensorA, class TensorC>
  CUTE_DEVICE static void add_dq(float* tile, TensorA const& acc, TensorC const& coords, int max_rows) {
    // Values 2j and 2j + 1 of an m16n8 accumulator are adjacent columns of one row.
    auto add_pair = [&](int i) {
      float* const dst = tile + get<0>(coords(i)) * kHeadDim + get<1>(coords(i));
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      atomicAdd(reinterpret_cast<float2*>(dst), make_float2(acc(i), acc(i + 1)));
#else
      atomicAdd(dst, acc(i));
      atomicAdd(dst + 1, acc(i + 1));
#endif
    };
    // A full tile takes a branch-free run of atomics (a per-atomic predicate compiles to a branch each).
    if (max_rows >= kBlockM) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc); i += 2) { add_pair(i); }
    } else {
      CUTE_UNROLL
      for (int i = 0; i < size(acc); i += 2) {
        if (get<0>(coords(i)) < max_rows) { add_pair(i); }
      }
    }
  }

  // Writes a thread's dQ fragment into the shared staging tile, in the accumulator's layout
  // (dq_accum_col in bwd_kernel_params.h), for one bulk reduction of the whole tile. The fragment is
  // (values, MMA_M, MMA_N), values (column, row half) of an m16n8 accumulator; fragments n and n + 1
  // (n even) are 2^kDqPairBit columns apart, so their column pairs form one 16-byte chunk.
  // row_flip: dq_accum_row_flip of this thread's rows (all of one parity). The tile goes out at the
  // next barrier_flushing_dq.
  template <class TensorA, class TensorC>
  CUTE_DEVICE static void stage_dq(float* sdq, TensorA const& acc, TensorC const& coords, int row_flip) {
    static_assert(decltype(size<2>(acc))::value % 2 == 0, "fragments pair up along the head dim");
    CUTE_UNROLL
    for (int n = 0; n < size<2>(acc); n += 2) {
      CUTE_UNROLL
      for (int m = 0; m < size<1>(acc); ++m) {
        CUTE_UNROLL
        for (int h = 0; h < 2; ++h) {
          auto const rc = coords(2 * h, m, n);
          *reinterpret_cast<float4*>(sdq + get<0>(rc) * kHeadDim + (dq_accum_perm<kHeadDim>(get<1>(rc)) ^ row_flip)) =
              make_float4(acc(2 * h, m, n), acc(2 * h + 1, m, n), acc(2 * h, m, n + 1), acc(2 * h + 1, m, n + 1));
        }
      }
    }
  }

  CUTE_DEVICE void operator()(BwdKernelParams const& params, char* smem_buf) const {
    int const tidx = threadIdx.x;
    int const splits = params.num_splits;
    // Without a mask the splits of one head are consecutive, sharing Q and dO in L2. Under one the first
    // key blocks see the most query blocks: longest first, in groups of heads whose Q, dO (16-bit) and dQ
    // accumulator (fp32) fit in L2 together (longest_first in collective/utils.h).
    int bh = int(blockIdx.x) / splits;
    int split = int(blockIdx.x) - bh * splits;
    if constexpr (kMask != MaskMode::kNone) {
      int64_t const q_bytes = int64_t(params.seqlen_q) * kHeadDim * (2 * int64_t(sizeof(Element)) + 4);
      GridSlot const slot = longest_first(int(blockIdx.x), splits, params.num_heads * params.batch, q_bytes);
      bh = slot.bh;
      split = slot.rank;
    }
    int const head = bh % params.num_heads;
    int const batch = bh / params.num_heads;

    BwdBlockInfo const binfo(params, batch, head);
    Mask const mask(binfo.seqlen_q, binfo.seqlen_k, params.window_left, params.window_right);
    int const n_blocks = num_n_blocks(binfo.seqlen_k);
    float* const dq_accum_ptr =
        params.dq_accum + (int64_t(split % params.num_accum_slices) * params.lse_rows + binfo.lse_offset) * kHeadDim;
    // dq_store_first: this split's slice rows [row_begin, row_end) of the head get zeros, where no key block
    // of the split adds (the slices are not zeroed beforehand).
    auto zero_dq_rows = [&](int row_begin, int row_end) {
      if (!kDeterministic || row_begin >= row_end) { return; }
      float4* const base = reinterpret_cast<float4*>(dq_accum_ptr + int64_t(row_begin) * kHeadDim);
      int const count = (row_end - row_begin) * (kHeadDim / 4);
      for (int i = int(threadIdx.x); i < count; i += Traits::kNThreads) { base[i] = make_float4(0.f, 0.f, 0.f, 0.f); }
    };
    if (split >= n_blocks) {
      if (kDeterministic && params.dq_store_first) { zero_dq_rows(0, binfo.seqlen_q); }
      return;
    }
    int const head_dim = params.head_dim;
    ScoreModifiers<kMods> const modifiers(params, batch, head);
    // The scores' units as the loop holds them (raw, or tanh units for the softcap family); lse is in
    // scaled units either way.
    float const scale_log2 = modifiers.score_scale(params) * float(M_LOG2E);
    Dropout const dropout(params, batch, head);

    SharedStorage& storage = *reinterpret_cast<SharedStorage*>(smem_buf);

    Element const* const q_ptr = static_cast<Element const*>(params.q) + binfo.q_offset;
    Element const* const k_ptr = static_cast<Element const*>(params.k) + binfo.k_offset;
    Element const* const v_ptr = static_cast<Element const*>(params.v) + binfo.v_offset;
    Element const* const do_ptr = static_cast<Element const*>(params.dout) + binfo.dout_offset;
    Element* const dk_ptr = static_cast<Element*>(params.dk) + binfo.dk_offset;
    Element* const dv_ptr = static_cast<Element*>(params.dv) + binfo.dv_offset;
    float const* const lse_ptr = params.softmax_lse + binfo.lse_offset;
    float const* const dsum_ptr = params.dsum + binfo.lse_offset;
    // (rows, kHeadDim) tile `block` of a row-major operand; 32-bit offsets inside the tile.
    auto tile = [](auto* base, int64_t row_stride, int block, auto rows) {
      return make_tensor(make_gmem_ptr(base + int64_t(block) * decltype(rows)::value * row_stride),
                         make_layout(make_shape(rows, Int<kHeadDim>{}), make_stride(int(row_stride), _1{})));
    };

    // Shared memory. Q and dO have kStages buffers; `buf` selects one.
    constexpr int kQSize = cosize_v<typename Traits::SmemLayoutQ>;
    auto sQ = [&](int buf) { return make_tensor(make_smem_ptr(storage.q.data() + buf * kQSize), typename Traits::SmemLayoutQ{}); };
    auto sdO = [&](int buf) { return make_tensor(make_smem_ptr(storage.dout.data() + buf * kQSize), typename Traits::SmemLayoutQ{}); };
    auto sQt = [&](int buf) { return make_tensor(make_smem_ptr(storage.q.data() + buf * kQSize), typename Traits::SmemLayoutQt{}); };
    auto sdOt = [&](int buf) { return make_tensor(make_smem_ptr(storage.dout.data() + buf * kQSize), typename Traits::SmemLayoutQt{}); };
    Tensor sQtNoSwizzle = make_tensor(make_smem_ptr(storage.q.data()), typename Traits::SmemLayoutQtNoSwizzle{});
    Tensor sK = make_tensor(make_smem_ptr(storage.k.data()), typename Traits::SmemLayoutKV{});    // (kBlockN, d)
    Tensor sV = make_tensor(make_smem_ptr(storage.v.data()), typename Traits::SmemLayoutKV{});    // (kBlockN, d)
    Tensor sKt = make_tensor(make_smem_ptr(storage.k.data()), typename Traits::SmemLayoutKt{});   // (d, kBlockN)
    Tensor sKtNoSwizzle = make_tensor(make_smem_ptr(storage.k.data()), typename Traits::SmemLayoutKtNoSwizzle{});
    Tensor sP = make_tensor(make_smem_ptr(storage.p.data()), typename Traits::SmemLayoutPdS{});     // (kBlockM, kBlockN)
    Tensor sdS = make_tensor(make_smem_ptr(storage.ds.data()), typename Traits::SmemLayoutPdS{});   // (kBlockM, kBlockN)
    Tensor sPt = make_tensor(make_smem_ptr(storage.p.data()), typename Traits::SmemLayoutPdSt{});   // (kBlockN, kBlockM)
    Tensor sdSt = make_tensor(make_smem_ptr(storage.ds.data()), typename Traits::SmemLayoutPdSt{}); // (kBlockN, kBlockM)
    Tensor sPdStNoSwizzle = make_tensor(make_smem_ptr(storage.p.data()), typename Traits::SmemLayoutPdStNoSwizzle{});

    // kTmaQdO with params.tma_qdo (the deterministic kernel on Hopper): thread 0 issues a stage's Q and
    // dO boxes and its mbarrier's expected bytes; every thread waits on the stage's phase (tma_phase: bit b,
    // the parity of stage b's next completion) before the step's first barrier.
    uint64_t* const tma_bar = reinterpret_cast<uint64_t*>(smem_buf + Traits::kTmaBarrierOffset);
    float* const tma_rows = reinterpret_cast<float*>(smem_buf + Traits::kTmaRowsOffset);  // per stage: lse, dsum
    uint32_t tma_phase = 0;
    if (kTmaQdO && params.tma_qdo) {
      if (tidx == 0) {
        if ((__cvta_generic_to_shared(smem_buf) & 1023) != 0) { __trap(); }  // the 128-byte swizzle: 1024-byte aligned
        CUTE_UNROLL
        for (int b = 0; b < kStages; ++b) { mbarrier_init(tma_bar + b, 1); }
      }
      __syncthreads();
    }
    auto tma_load_q_do = [&](int m_block, int buf) {
      if (tidx == 0) {
        constexpr int kBoxCols = 64;
        constexpr int kBoxElems = kBlockM * kBoxCols;  // a (kBlockM, 64) column block of the tile
        // The rows' lse and dsum: a multiple of 16 bytes, since the host takes this path only where
        // seqlen_q % 4 == 0 (and the head's rows start 16-byte aligned).
        uint32_t const row_bytes = uint32_t(min(kBlockM, binfo.seqlen_q - m_block * kBlockM)) * uint32_t(sizeof(float));
        mbarrier_arrive_expect_tx(tma_bar + buf, 2 * kBlockM * kHeadDim * int(sizeof(Element)) + 2 * row_bytes);
        CUTE_UNROLL
        for (int c = 0; c < kHeadDim / kBoxCols; ++c) {
          tma_load_4d(storage.q.data() + buf * kQSize + c * kBoxElems, &params.tma_q, tma_bar + buf, c * kBoxCols,
                      m_block * kBlockM, head, batch);
          tma_load_4d(storage.dout.data() + buf * kQSize + c * kBoxElems, &params.tma_dout, tma_bar + buf,
                      c * kBoxCols, m_block * kBlockM, head, batch);
        }
        bulk_load_1d(tma_rows + buf * 2 * kBlockM, lse_ptr + m_block * kBlockM, row_bytes, tma_bar + buf);
        bulk_load_1d(tma_rows + buf * 2 * kBlockM + kBlockM, dsum_ptr + m_block * kBlockM, row_bytes, tma_bar + buf);
      }
    };

    // Global -> shared.
    typename Traits::GmemTiledCopyLoad gmem_tiled_copy;
    auto gmem_thr_copy = gmem_tiled_copy.get_thread_slice(tidx);
    Tensor tQcQ = gmem_thr_copy.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    Tensor tKVcKV = gmem_thr_copy.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
    // Q and dO of a query block, one commit group (dO's load closes it). A step with two stages issues
    // the next block's Q after its S GEMM and dO after its dP GEMM (early_loads: both at its start).
    auto load_q = [&](int m_block, int buf) {
      copy_tile<true>(gmem_tiled_copy, gmem_thr_copy.partition_S(tile(q_ptr, params.q_row_stride, m_block, Int<kBlockM>{})),
                      gmem_thr_copy.partition_D(sQ(buf)), tQcQ, binfo.seqlen_q - m_block * kBlockM, head_dim);
    };
    auto load_do = [&](int m_block, int buf) {
      copy_tile<true>(gmem_tiled_copy, gmem_thr_copy.partition_S(tile(do_ptr, params.dout_row_stride, m_block, Int<kBlockM>{})),
                      gmem_thr_copy.partition_D(sdO(buf)), tQcQ, binfo.seqlen_q - m_block * kBlockM, head_dim);
      cp_async_fence();
    };
    auto load_q_do = [&](int m_block, int buf) {
      if (kTmaQdO && params.tma_qdo) {
        tma_load_q_do(m_block, buf);
        cp_async_fence();  // closes the group of a key block's K and V, if any
      } else {
        load_q(m_block, buf);
        load_do(m_block, buf);
      }
    };

    // S = Q K^T and dP = dO V^T.
    typename Traits::TiledMmaSdP tiled_mma_sdp;
    auto thr_mma_sdp = tiled_mma_sdp.get_thread_slice(tidx);
    Tensor tSrQ = thr_mma_sdp.partition_fragment_A(sQ(0));   // (MMA, MMA_M, MMA_K)
    Tensor tSrK = thr_mma_sdp.partition_fragment_B(sK);      // (MMA, MMA_N, MMA_K)
    Tensor tdPrdO = thr_mma_sdp.partition_fragment_A(sdO(0));
    Tensor tdPrV = thr_mma_sdp.partition_fragment_B(sV);
    auto copy_a_sdp = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma_sdp);
    auto copy_b_sdp = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma_sdp);
    auto thr_copy_a_sdp = copy_a_sdp.get_thread_slice(tidx);
    Tensor tSsK = copy_b_sdp.get_thread_slice(tidx).partition_S(sK);
    Tensor tdPsV = copy_b_sdp.get_thread_slice(tidx).partition_S(sV);
    Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor tScS0 = tiled_mma_sdp.get_thread_slice(0).partition_C(cS);  // thread 0's (row, col): static offsets
    Tensor tScS = thr_mma_sdp.partition_C(cS);
    int const score_row_base = get<0>(tScS(0));
    int const score_col_base = get<1>(tScS(0));
    Tensor tScS_rowcol = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));  // (rows, cols) -> (row, col)
    constexpr int kScoreRows = decltype(size<0>(tScS_rowcol))::value;

    // dV += P^T dO and dK += dS^T Q.
    typename Traits::TiledMmadKV tiled_mma_dkv;
    auto thr_mma_dkv = tiled_mma_dkv.get_thread_slice(tidx);
    Tensor tdVrPt = thr_mma_dkv.partition_fragment_A(sPdStNoSwizzle);  // also dS^T's fragment
    Tensor tdVrdOt = thr_mma_dkv.partition_fragment_B(sQtNoSwizzle);   // also Q^T's fragment
    auto copy_a_dkv = make_tiled_copy_A(typename Traits::SmemCopyAtomTransposed{}, tiled_mma_dkv);
    auto copy_b_dkv = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma_dkv);
    Tensor tdVsPt = copy_a_dkv.get_thread_slice(tidx).partition_S(sPt);
    Tensor tdKsdSt = copy_a_dkv.get_thread_slice(tidx).partition_S(sdSt);

    // dQ = dS K.
    typename Traits::TiledMmadQ tiled_mma_dq;
    auto thr_mma_dq = tiled_mma_dq.get_thread_slice(tidx);
    Tensor tdQrdS = thr_mma_dq.partition_fragment_A(sdS);
    Tensor tdQrKt = thr_mma_dq.partition_fragment_B(sKtNoSwizzle);
    auto copy_a_dq = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma_dq);
    auto copy_b_dq = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma_dq);
    Tensor tdQsdS = copy_a_dq.get_thread_slice(tidx).partition_S(sdS);
    Tensor tdQsKt = copy_b_dq.get_thread_slice(tidx).partition_S(sKt);
    Tensor tdQcdQ = thr_mma_dq.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    // Hopper: dQ goes through a shared staging tile that one thread hands to the copy engine as a bulk
    // reduction (cp.reduce.async.bulk ... add.f32), where every thread would otherwise issue 16 vector
    // atomics per step into the memory pipe that also carries the next Q and dO. A tile staged at the end of
    // a step is issued after the next step's first barrier and must be read out before its second one.
#ifdef FLASH_ATTN2_BULK_COPY
    bool const bulk_dq = params.bulk_dq;
    // Ordered deterministic dQ (one CTA per key block; key block n adds into slice n % slices after key
    // block n - slices, so a head's key blocks form `slices` chains): thread 0 waits for this key block's
    // turn at a tile before it issues the tile's reduction, and passes the turn at the next issue (or the
    // key block's end), once the reduction is complete. Neither this nor passing it at the step's second
    // barrier beat the private slices (PERF_LOG b21): the mode is kept for A/B only.
    bool const ordered_dq = kDeterministic && bulk_dq && params.dq_turns != nullptr;
#else
    constexpr bool bulk_dq = false;
    constexpr bool ordered_dq = false;
#endif
    bool const early_loads = kDeterministic && (params.early_loads || (kTmaQdO && params.tma_qdo));  // TMA: both boxes at once
    // This chain's turn counters: params.dq_turns + dq_turns_base + m_block (32 bits: one register less).
    int const dq_turns_base =
        ordered_dq ? ((batch * params.num_heads + head) * params.num_accum_slices + split % params.num_accum_slices) *
                         params.dq_turn_blocks
                   : 0;
    // This key block's turn at query block m_block: the key blocks of its chain below it that see m_block.
    // Every key block from the first that sees m_block (m_block_end is non-decreasing in the key block) up
    // to this one does (m_block_begin is non-decreasing too), and runs, since it sees m_block.
    auto dq_turn = [&](int n_block, int m_block) {
      int first = 0;
      if constexpr (Mask::kHasLeft) {
        int hi = n_block;  // the first key block with m_block_end > m_block lies in [first, hi]
        while (first < hi) {
          int const mid = (first + hi) / 2;
          if (mask.m_block_end(mid) > m_block) { hi = mid; } else { first = mid + 1; }
        }
      }
      return (n_block - first) / params.num_accum_slices;
    };
    int dq_unpassed = -1;  // thread 0: the tile whose reduction is issued but whose turn is not passed
    auto pass_dq_turn = [&] {
      if (dq_unpassed >= 0) {
        bulk_wait_all();
        pass_turn(params.dq_turns + dq_turns_base + dq_unpassed);
        dq_unpassed = -1;
      }
    };
    // The bulk path's bank flip for this thread's rows (all of one parity: 8 apart).
    int const dq_row_flip = dq_accum_row_flip(binfo.lse_offset + get<0>(tdQcdQ(0)));
    float* const sdq = reinterpret_cast<float*>(smem_buf + Traits::kDqSmemOffset);
    int dq_staged = -1;  // the query block whose dQ waits in sdq, or -1
    bool dq_store = false;  // dq_store_first, the split's first key block: the staged tiles are stored
    // A CTA barrier that also hands the staged dQ tile, if any, to the copy engine: every writer fences its
    // own staging stores just before it (as late as possible: the fence waits for them), thread 0 issues
    // the reduction after it.
    auto barrier_flushing_dq = [&] CUTLASS_LAMBDA_FUNC_INLINE {
      if (bulk_dq && dq_staged >= 0) { fence_shared_for_bulk(); }
      __syncthreads();
      if (bulk_dq) {
        if (tidx == 0 && dq_staged >= 0) {
          int const rows = min(kBlockM, binfo.seqlen_q - dq_staged * kBlockM);
          // Ordered: one round, so the key block is `split`.
          if (ordered_dq) {
            pass_dq_turn();
            wait_turn(params.dq_turns + dq_turns_base + dq_staged, dq_turn(split, dq_staged));
            dq_unpassed = dq_staged;
          }
          if (kDeterministic && dq_store) {
            bulk_store(dq_accum_ptr + int64_t(dq_staged) * kBlockM * kHeadDim, sdq, rows * kHeadDim * int(sizeof(float)));
          } else {
            bulk_reduce_add_f32(dq_accum_ptr + int64_t(dq_staged) * kBlockM * kHeadDim, sdq,
                                rows * kHeadDim * int(sizeof(float)));
          }
          bulk_commit();
        }
        dq_staged = -1;
      }
    };

    // Register -> shared for P and dS.
    auto copy_pds = make_tiled_copy_C(typename Traits::SmemCopyAtomStore{}, tiled_mma_sdp);
    auto thr_copy_pds = copy_pds.get_thread_slice(tidx);
    Tensor tPsP = thr_copy_pds.partition_D(sP);
    Tensor tdSsdS = thr_copy_pds.partition_D(sdS);

    bool const store_first = kDeterministic && bulk_dq && params.dq_store_first;
    bool const serpentine = kDeterministic && params.det_serpentine;
    int walks = 0;  // key blocks of this split that saw a query block so far

    // Round r of a split takes key block r * splits + (split, or splits - 1 - split on odd rounds): the
    // zigzag evens out causal work (lower key blocks see more queries) across a deterministic run's splits.
    for (int round = 0, n_block = split; n_block < n_blocks;
         ++round, n_block = round * splits + (round % 2 == 0 ? split : splits - 1 - split)) {
      int const rows_k = binfo.seqlen_k - n_block * kBlockN;
      int const m_block_begin = mask.m_block_begin(n_block);
      int const m_block_end = mask.m_block_end(n_block);
      // Storing first: round 0's key block is the split's lowest, and without a left window edge
      // (dq_store_first's condition) every later one sees a subset of its query blocks.
      dq_store = store_first && round == 0;
      if (dq_store) {
        if (m_block_begin < m_block_end) {
          zero_dq_rows(0, m_block_begin * kBlockM);
          zero_dq_rows(m_block_end * kBlockM, binfo.seqlen_q);
        } else {
          zero_dq_rows(0, binfo.seqlen_q);
        }
      }

      Tensor acc_dk = partition_fragment_C(tiled_mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
      Tensor acc_dv = partition_fragment_C(tiled_mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
      clear(acc_dk);
      clear(acc_dv);

      if (m_block_begin < m_block_end) {
        __syncthreads();  // a previous key block's epilogue is done with sK and sV
        copy_tile<true>(gmem_tiled_copy, gmem_thr_copy.partition_S(tile(k_ptr, params.k_row_stride, n_block, Int<kBlockN>{})),
                        gmem_thr_copy.partition_D(sK), tKVcKV, rows_k, head_dim);
        copy_tile<true>(gmem_tiled_copy, gmem_thr_copy.partition_S(tile(v_ptr, params.v_row_stride, n_block, Int<kBlockN>{})),
                        gmem_thr_copy.partition_D(sV), tKVcKV, rows_k, head_dim);
        // The bare steps of a key block (those that see all of it) are alike, and may run in any order: key
        // block n starts them at bare query block n (mod their count) from the last, so a head's key blocks,
        // which run side by side, add into different dQ tiles instead of all into the same one at once
        // (+1-4% non-causal, PERF_LOG b8; b9 causal); the masked ones (the diagonal's, or every step of a
        // partial last key block) follow, descending. Plain and softcap kernels without a left window edge: the
        // "mod" family and local windows keep the descending loops, where their registers were measured.
        constexpr bool kRotate = (kMods == Modifiers::kPlain || kMods == Modifiers::kSoftcap) && !Mask::kHasLeft;
        int const m_block_unmasked_begin = mask.m_block_unmasked_begin(n_block);
        int const m_bare = m_block_end - m_block_unmasked_begin;  // >= 0
        // The ordered dQ needs every key block of a head to walk the query blocks in the same order.
        bool const walk_up = serpentine && walks % 2 == 1;  // serpentine: odd walks ascend
        int const m_first = walk_up                                       ? m_block_begin
                            : kRotate && m_bare > 0 && !ordered_dq && !serpentine ? m_block_end - 1 - n_block % m_bare
                                                                                  : m_block_end - 1;
        load_q_do(m_first, 0);  // one group with K and V

        int buf = 0;
        // Forced inline: step is called from several loops, and an outlined step would take the register
        // fragments it captures by reference through local memory.
        // m_next: the query block of the next step, or -1.
        auto step = [&](int m_block, int m_next, auto needs_mask) CUTLASS_LAMBDA_FUNC_INLINE {
          // This thread's score rows: lse (log2 units) and rowsum(dO o O). Rows past the sequence get
          // lse = +inf, so P = 0 there (their Q and dO are zero-filled).
          // The TMA kernel's come with Q and dO into shared memory (the stage's mbarrier).
          int const rows_q = binfo.seqlen_q - m_block * kBlockM;
          float lse_log2[kScoreRows];
          float dsum[kScoreRows];
          bool const tma_rows_here = kTmaQdO && params.tma_qdo;
          if (tma_rows_here) {
            mbarrier_wait(tma_bar + buf, (tma_phase >> buf) & 1u);
            tma_phase ^= 1u << buf;
          }
          float const* const lse_src = tma_rows_here ? tma_rows + buf * 2 * kBlockM : lse_ptr + m_block * kBlockM;
          float const* const dsum_src = tma_rows_here ? tma_rows + buf * 2 * kBlockM + kBlockM : dsum_ptr + m_block * kBlockM;
          CUTE_UNROLL
          for (int r = 0; r < kScoreRows; ++r) {
            int const row = get<0>(tScS_rowcol(r, 0));
            bool const valid = row < rows_q;
            lse_log2[r] = valid ? lse_src[row] * float(M_LOG2E) : INFINITY;
            dsum[r] = valid ? dsum_src[row] : 0.f;
          }
          cp_async_wait<0>();
          barrier_flushing_dq();  // Q[m], dO[m] landed; every warp is done with the previous step's buffers
          // Where the next query block's Q and dO load: after the S and the dP GEMM; issued together here,
          // their copies queue in front of the S GEMM's ldmatrix (ncu, hdim 96: mio_throttle 2.00 cycles
          // per issue here, 0.74 spread; PERF_LOG b11). The deterministic mode loads here (PERF_LOG b13:
          // its cost over the backward 1.12-1.32x -> 1.05-1.19x), likely because its splits' private dQ
          // slices crowd Q and dO out of L2, so the loads wait on DRAM and need the whole step.
          if (early_loads && kStages == 2 && m_next >= 0) { load_q_do(m_next, buf ^ 1); }

          Tensor acc_s = partition_fragment_C(tiled_mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
          modifiers.init(acc_s, tScS0, score_row_base, score_col_base, m_block, n_block, kBlockM, kBlockN,
                         mask.diagonal_offset());
          gemm_ss(acc_s, tSrQ, tSrK, thr_copy_a_sdp.partition_S(sQ(buf)), tSsK, tiled_mma_sdp, copy_a_sdp,
                  copy_b_sdp, tidx);
          if (!early_loads && kStages == 2 && m_next >= 0) { load_q(m_next, buf ^ 1); }
          // Softcap's derivative, 1 - tanh^2, multiplies dS (only the kernels with modifiers hold it).
          auto dtanh = [&] {
            if constexpr (kSoftcap) { return PackedDtanh<decltype(size(acc_s))::value>{}; } else { return 0; }
          }();
          if constexpr (kModifiers) {
            modifiers.apply<true>(acc_s, dtanh, tScS0, score_row_base, score_col_base, m_block, n_block, kBlockM,
                                  kBlockN, mask.diagonal_offset());
          }
          if constexpr (decltype(needs_mask)::value) {
            mask.apply(acc_s, tScS0, score_row_base, score_col_base, m_block, n_block);
          }
          Tensor scores = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));  // (rows, cols)
          CUTE_UNROLL
          for (int r = 0; r < size<0>(scores); ++r) {
            CUTE_UNROLL
            for (int c = 0; c < size<1>(scores); ++c) {
              scores(r, c) = exp2_approx(scores(r, c) * scale_log2 - lse_log2[r]);
            }
          }

          bool const dropout_on = kDropout && dropout.on;
          if (dropout_on) {
            keep_branch();  // else ptxas predicates Philox into every step of a call without dropout
            // Dropped probabilities become negative: dV takes max(p, 0), dS both P and the mask.
            dropout.apply<true>(acc_s, tScS0, m_block * kBlockM + score_row_base, n_block * kBlockN + score_col_base);
            Tensor kept = make_fragment_like(acc_s);
            CUTE_UNROLL
            for (int i = 0; i < size(acc_s); ++i) { kept(i) = fmaxf(acc_s(i), 0.f); }
            Tensor rP = convert_fragment<Element>(kept);
            copy(copy_pds, thr_copy_pds.retile_S(rP), tPsP);
          } else {
            Tensor rP = convert_fragment<Element>(acc_s);  // stored under the dP GEMM's latency
            copy(copy_pds, thr_copy_pds.retile_S(rP), tPsP);
          }

          Tensor acc_dp = partition_fragment_C(tiled_mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
          clear(acc_dp);
          gemm_ss(acc_dp, tdPrdO, tdPrV, thr_copy_a_sdp.partition_S(sdO(buf)), tdPsV, tiled_mma_sdp, copy_a_sdp,
                  copy_b_sdp, tidx);
          if (!early_loads && kStages == 2 && m_next >= 0) { load_do(m_next, buf ^ 1); }
          Tensor dp = make_tensor(acc_dp.data(), acc_rowcol(acc_dp.layout()));
          if (dropout_on) {
            keep_branch();
            // dS = P o (Z o dP / (1 - p) - D): a dropped score (p = -P < 0) gets -P * D = p * D.
            CUTE_UNROLL
            for (int r = 0; r < size<0>(dp); ++r) {
              CUTE_UNROLL
              for (int c = 0; c < size<1>(dp); ++c) {
                float const p = scores(r, c);
                dp(r, c) = p >= 0.f ? p * (dp(r, c) * dropout.keep_scale - dsum[r]) : p * dsum[r];
              }
            }
          } else {
            CUTE_UNROLL
            for (int r = 0; r < size<0>(dp); ++r) {
              CUTE_UNROLL
              for (int c = 0; c < size<1>(dp); ++c) { dp(r, c) = scores(r, c) * (dp(r, c) - dsum[r]); }
            }
          }
          if constexpr (kSoftcap) {
            if (modifiers.softcap_on) {
              if constexpr (kMods == Modifiers::kAll) { keep_branch(); }
              CUTE_UNROLL
              for (int i = 0; i < size(acc_dp); i += 2) {
                float2 const d = dtanh.get(i);
                acc_dp(i) *= d.x;
                acc_dp(i + 1) *= d.y;
              }
            }
          }
          Tensor rdS = convert_fragment<Element>(acc_dp);
          copy(copy_pds, thr_copy_pds.retile_S(rdS), tdSsdS);
          if (bulk_dq && tidx == 0) { bulk_wait_read<0>(); }  // sdq is free for this step's dQ
          __syncthreads();  // P and dS are in shared memory

          // dQ first: its accumulator is written out after the dV and dK GEMMs, whose MMAs cover the dQ
          // MMAs' latency, instead of stalling the stores right behind its own last MMAs.
          Tensor acc_dq = partition_fragment_C(tiled_mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
          clear(acc_dq);
          gemm_ss(acc_dq, tdQrdS, tdQrKt, tdQsdS, tdQsKt, tiled_mma_dq, copy_a_dq, copy_b_dq, tidx);
          gemm_ss(acc_dv, tdVrPt, tdVrdOt, tdVsPt, copy_b_dkv.get_thread_slice(tidx).partition_S(sdOt(buf)),
                  tiled_mma_dkv, copy_a_dkv, copy_b_dkv, tidx);
          gemm_ss(acc_dk, tdVrPt, tdVrdOt, tdKsdSt, copy_b_dkv.get_thread_slice(tidx).partition_S(sQt(buf)),
                  tiled_mma_dkv, copy_a_dkv, copy_b_dkv, tidx);
          if (bulk_dq) {
            stage_dq(sdq, acc_dq, tdQcdQ, dq_row_flip);
            dq_staged = m_block;
          } else {
            add_dq(dq_accum_ptr + int64_t(m_block) * kBlockM * kHeadDim, acc_dq, tdQcdQ, rows_q);
          }

          if (kStages == 1 && m_next >= 0) {
            __syncthreads();  // every warp is done reading Q[m] and dO[m]
            load_q_do(m_next, 0);
          }
          if (kStages == 2) { buf ^= 1; }
        };

        // The walk. Ascending (the deterministic kernel's serpentine, odd walks): bare where unmasked_begin
        // <= m < unmasked_end, masked elsewhere. Descending, rotated (kRotate; from m_first, which is the last
        // query block in the serpentine): the bare steps, then the masked ones from the last down. Otherwise
        // from the last down: those past the window's left edge (masked), those that see the whole key block
        // (bare), those that straddle the diagonal or see the zero-filled tail (masked).
        auto next = [&](int m_block) { return m_block > m_block_begin ? m_block - 1 : -1; };
        int m_block = m_block_end - 1;
        if (walk_up) {
          auto next_up = [&](int m_block) { return m_block + 1 < m_block_end ? m_block + 1 : -1; };
          int const m_block_unmasked_end =
              Mask::kHasLeft ? max(mask.m_block_unmasked_end(n_block), m_block_begin) : m_block_end;
          for (m_block = m_block_begin; m_block < min(m_block_unmasked_begin, m_block_unmasked_end); ++m_block) {
            step(m_block, next_up(m_block), cute::true_type{});
          }
          for (; m_block < m_block_unmasked_end; ++m_block) { step(m_block, next_up(m_block), cute::false_type{}); }
          if constexpr (Mask::kHasLeft) {
            for (; m_block < m_block_end; ++m_block) { step(m_block, next_up(m_block), cute::true_type{}); }
          }
        } else {
          if constexpr (kRotate) {
            m_block = m_first;
            for (int i = 0; i < m_bare; ++i) {
              int const after = i + 1 == m_bare ? next(m_block_unmasked_begin)
                                : m_block == m_block_unmasked_begin ? m_block_end - 1 : m_block - 1;
              step(m_block, after, cute::false_type{});
              m_block = after;
            }
            m_block = m_block_unmasked_begin - 1;
          } else {
            if constexpr (Mask::kHasLeft) {
              int const m_block_unmasked_end = max(mask.m_block_unmasked_end(n_block), m_block_begin);
              for (; m_block >= m_block_unmasked_end; --m_block) { step(m_block, next(m_block), cute::true_type{}); }
            }
            for (; m_block >= m_block_unmasked_begin; --m_block) { step(m_block, next(m_block), cute::false_type{}); }
          }
          for (; m_block >= m_block_begin; --m_block) { step(m_block, next(m_block), cute::true_type{}); }
        }
        ++walks;
      }

      // Epilogue: dK picks up the softmax scale (dS is the gradient of the scaled scores); both go to
      // global memory through shared memory for 16-byte stores.
      CUTE_UNROLL
      for (int i = 0; i < size(acc_dk); ++i) { acc_dk(i) *= params.softmax_scale; }
      if (kDropout && dropout.on) {  // dV summed the kept probabilities unscaled
        CUTE_UNROLL
        for (int i = 0; i < size(acc_dv); ++i) { acc_dv(i) *= dropout.keep_scale; }
      }
      Tensor rdK = convert_fragment<Element>(acc_dk);
      Tensor rdV = convert_fragment<Element>(acc_dv);
      auto copy_dkv = make_tiled_copy_C(typename Traits::SmemCopyAtomStore{}, tiled_mma_dkv);
      auto thr_copy_dkv = copy_dkv.get_thread_slice(tidx);
      barrier_flushing_dq();  // every warp is done reading K and V (and has staged its last dQ)
      copy(copy_dkv, thr_copy_dkv.retile_S(rdK), thr_copy_dkv.partition_D(sK));
      copy(copy_dkv, thr_copy_dkv.retile_S(rdV), thr_copy_dkv.partition_D(sV));
      __syncthreads();

      typename Traits::GmemTiledCopyStore gmem_tiled_copy_store;
      auto gmem_thr_copy_store = gmem_tiled_copy_store.get_thread_slice(tidx);
      Tensor tdKVcdKV = gmem_thr_copy_store.partition_D(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
      Tensor tdKsdK = gmem_thr_copy_store.partition_S(sK);
      Tensor tdVsdV = gmem_thr_copy_store.partition_S(sV);
      Tensor tdKrdK = make_fragment_like(tdKsdK);
      Tensor tdVrdV = make_fragment_like(tdVsdV);
      copy(gmem_tiled_copy_store, tdKsdK, tdKrdK);
      copy(gmem_tiled_copy_store, tdVsdV, tdVrdV);
      copy_tile<false>(gmem_tiled_copy_store, tdKrdK,
                       gmem_thr_copy_store.partition_D(tile(dk_ptr, params.dk_row_stride, n_block, Int<kBlockN>{})),
                       tdKVcdKV, rows_k, head_dim);
      copy_tile<false>(gmem_tiled_copy_store, tdVrdV,
                       gmem_thr_copy_store.partition_D(tile(dv_ptr, params.dv_row_stride, n_block, Int<kBlockN>{})),
                       tdKVcdKV, rows_k, head_dim);
      // Before sdq is rewritten and before the next key block revisits these rows (deterministic
      // mode's order of additions), and before the CTA exits: the reductions are complete.
      if (bulk_dq && tidx == 0) {
        bulk_wait_all();
        if (ordered_dq) { pass_dq_turn(); }
      }
    }
  }
};

}  // namespace flash_attn2
