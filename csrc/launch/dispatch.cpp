// Runtime -> compile-time dispatch for the forward: one table, generated from the same list as the
// instantiation files, and one lookup that ends in an error naming what was built.
#include <cmath>
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common/strings.h"
#include "launch/fwd_launch.h"

namespace flash_attn2 {
namespace {

struct FwdKernel {
  DType dtype;
  int head_dim;
  MaskMode mask;
  Modifiers modifiers;
  cudaError_t (*run)(FwdParams const&, cudaStream_t);
  int (*smem_bytes)();
};

#define FLASH_ATTN2_FWD_KERNEL(DTYPE, HDIM, MASK, MODIFIERS)                                                \
  FwdKernel{DType::DTYPE, HDIM, MaskMode::MASK, Modifiers::MODIFIERS,                                      \
            &run_fwd<DType::DTYPE, HDIM, MaskMode::MASK, Modifiers::MODIFIERS>,                              \
            &fwd_smem_bytes<DType::DTYPE, HDIM, MaskMode::MASK, Modifiers::MODIFIERS>},
FwdKernel const kFwdKernels[] = {
#include "instantiations/fwd_table.inc"
    FwdKernel{DType::kBf16, 0, MaskMode::kNone, Modifiers::kPlain, nullptr, nullptr},  // sentinel: the table may be empty
};
#undef FLASH_ATTN2_FWD_KERNEL

struct BwdKernel {
  DType dtype;
  int head_dim;
  MaskMode mask;
  Modifiers modifiers;
  cudaError_t (*run)(BwdKernelParams const&, cudaStream_t);
  BwdKernelInfo (*info)();
};

#define FLASH_ATTN2_BWD_KERNEL(DTYPE, HDIM, MASK, MODIFIERS)                                                \
  BwdKernel{DType::DTYPE, HDIM, MaskMode::MASK, Modifiers::MODIFIERS,                                      \
            &run_bwd<DType::DTYPE, HDIM, MaskMode::MASK, Modifiers::MODIFIERS>,                              \
            &bwd_kernel_info<DType::DTYPE, HDIM, MaskMode::MASK, Modifiers::MODIFIERS>},
BwdKernel const kBwdKernels[] = {
#include "instantiations/bwd_table.inc"
    BwdKernel{DType::kBf16, 0, MaskMode::kNone, Modifiers::kPlain, nullptr, nullptr},  // sentinel
};
#undef FLASH_ATTN2_BWD_KERNEL

struct KVCacheKernel {
  DType dtype;
  int head_dim;
  MaskMode mask;
  Modifiers modifiers;  // always kAll: the KV-cache kernels compile softcap and ALiBi
  cudaError_t (*run)(KVCacheParams const&, cudaStream_t);
  KVCacheKernelInfo (*info)();
};

#define FLASH_ATTN2_KVCACHE_KERNEL(DTYPE, HDIM, MASK)                                                      \
  KVCacheKernel{DType::DTYPE, HDIM, MaskMode::MASK, Modifiers::kAll, &run_kvcache<DType::DTYPE, HDIM, MaskMode::MASK>, \
                &kvcache_kernel_info<DType::DTYPE, HDIM, MaskMode::MASK>},
KVCacheKernel const kKVCacheKernels[] = {
#include "instantiations/kvcache_table.inc"
    KVCacheKernel{DType::kBf16, 0, MaskMode::kNone, Modifiers::kAll, nullptr, nullptr},  // sentinel
};
#undef FLASH_ATTN2_KVCACHE_KERNEL

char const* dtype_name(DType d) { return d == DType::kFp16 ? "fp16" : "bf16"; }
char const* mask_name(MaskMode m) {
  return m == MaskMode::kCausal ? "causal" : m == MaskMode::kLocal ? "local" : "none";
}
char const* modifiers_name(Modifiers m) {
  return m == Modifiers::kSoftcap ? "softcap" : m == Modifiers::kAlibi ? "alibi" : m == Modifiers::kAll ? "mod" : "plain";
}

constexpr int kMaxHeadDim = 256;

// A head dim runs on the smallest built kernel of its (dtype, mask) whose head dim is >= it and whose
// family serves the call's (`modifiers`): its own family, or kAll, which serves any modifier; at equal head
// dims the call's own family (the KV-cache table has only kAll kernels).
template <class Kernel, size_t N>
Kernel const* smallest_fitting(Kernel const (&table)[N], FwdParams const& p, Modifiers modifiers) {
  Kernel const* best = nullptr;
  for (Kernel const& k : table) {
    if (k.run == nullptr || k.dtype != p.dtype || k.mask != p.mask || !serves(k.modifiers, modifiers) ||
        k.head_dim < p.head_dim) {
      continue;
    }
    if (best == nullptr || k.head_dim < best->head_dim ||
        (k.head_dim == best->head_dim && k.modifiers == modifiers)) {
      best = &k;
    }
  }
  return best;
}

template <class Kernel, size_t N>
void list_kernels(std::string& lines, char const* direction, Kernel const (&table)[N]) {
  for (Kernel const& k : table) {
    if (k.run == nullptr) { continue; }
    lines += str_cat(direction, " ", dtype_name(k.dtype), " ", k.head_dim, " ", mask_name(k.mask), " ",
                     modifiers_name(k.modifiers), "\n");
  }
}

// The current device's value of attr.
Status device_attribute(cudaDeviceAttr attr, int& value) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) { err = cudaDeviceGetAttribute(&value, attr, device); }
  if (err != cudaSuccess) { return {str_cat("flash_attn2: ", cudaGetErrorString(err))}; }
  return {};
}

// Whether a kernel's shared memory fits the current device's opt-in limit per block.
Status check_smem(char const* direction, int head_dim, int smem_bytes) {
  int smem_optin = 0;
  if (Status const queried = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, smem_optin); !queried.ok()) {
    return queried;
  }
  if (smem_bytes > smem_optin) {
    return {str_cat("flash_attn2: the head dim ", head_dim, " ", direction, " kernel needs ", smem_bytes,
                    " bytes of shared memory per block; this GPU offers ", smem_optin)};
  }
  return {};
}

// Why no kernel of `direction` serves p; built_kernels() is declared in flash_attn2.h.
std::string missing_kernel_message(char const* direction, FwdParams const& p) {
  return str_cat("flash_attn2: no ", direction, " kernel was built for dtype ", dtype_name(p.dtype), ", head dim ",
                 p.head_dim, ", mask ", mask_name(p.mask), ", modifiers ", modifiers_name(p.modifiers()),
                 ". Built:\n", built_kernels(),
                 "Rebuild with FLASH_ATTN2_HEAD_DIMS / _DTYPES / _MASKS / _MODIFIERS covering it (unset builds all).");
}

}  // namespace

std::string built_kernels() {
  std::string lines;
  list_kernels(lines, "fwd", kFwdKernels);
  list_kernels(lines, "bwd", kBwdKernels);
  list_kernels(lines, "kvcache", kKVCacheKernels);
  return lines;
}

// Checks shared by the forward and the backward (bwd: the backward's extra operands, or null).
Status check_params(FwdParams const& p, BwdParams const* bwd) {
  if (p.head_dim <= 0 || p.head_dim > kMaxHeadDim || p.head_dim % 8 != 0) {
    return {str_cat("flash_attn2: head_dim must be a multiple of 8 in [8, ", kMaxHeadDim, "], got ", p.head_dim)};
  }
  if (p.num_heads_k <= 0 || p.num_heads % p.num_heads_k != 0) {
    return {str_cat("flash_attn2: num_heads (", p.num_heads, ") must be a multiple of num_heads_k (", p.num_heads_k, ")")};
  }
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr)) {
    return {str_cat("flash_attn2: give both cu_seqlens_q and cu_seqlens_k, or neither")};
  }
  if (p.batch < 0 || p.num_heads < 0 || p.seqlen_q < 0 || p.seqlen_k < 0 || p.total_q < 0) {
    return {str_cat("flash_attn2: negative sizes")};
  }
  // One CTA per (query block, head, batch) in a flat grid of at most 2^31 - 1 blocks. Every kernel's
  // query block has at least 16 rows, so this bound is conservative.
  if ((int64_t(p.seqlen_q) + 15) / 16 * p.num_heads * p.batch > INT32_MAX) {
    return {str_cat("flash_attn2: batch * num_heads * seqlen_q is too large for one launch")};
  }
  if (!(p.softmax_scale > 0.f && std::isfinite(p.softmax_scale))) {
    return {str_cat("flash_attn2: softmax_scale must be positive and finite, got ", p.softmax_scale)};
  }
  if (p.mask != MaskMode::kNone && p.mask != MaskMode::kCausal && p.mask != MaskMode::kLocal) {
    return {str_cat("flash_attn2: unknown mask mode ", int(p.mask))};
  }
  if (p.mask == MaskMode::kLocal && (p.window_left < -1 || p.window_right < -1)) {
    return {str_cat("flash_attn2: window sizes must be >= 0, or -1 for unbounded; got (", p.window_left, ", ",
                    p.window_right, ")")};
  }
  if (!(p.softcap >= 0.f && std::isfinite(p.softcap))) {
    return {str_cat("flash_attn2: softcap must be >= 0 and finite (0 is off), got ", p.softcap)};
  }
  if (!(p.dropout_p >= 0.f && p.dropout_p < 1.f)) {
    return {str_cat("flash_attn2: dropout_p must be in [0, 1), got ", p.dropout_p)};
  }
  if (p.dropout_p > 0.f && (p.rng_state == nullptr || reinterpret_cast<uintptr_t>(p.rng_state) % 8 != 0)) {
    return {"flash_attn2: dropout needs rng_state: a device pointer to 2 uint64 (seed, offset), 8-byte aligned"};
  }
  if (p.alibi_slopes != nullptr && (reinterpret_cast<uintptr_t>(p.alibi_slopes) % 4 != 0 || p.alibi_slopes_batch_stride < 0)) {
    return {"flash_attn2: alibi_slopes must be a 4-byte aligned fp32 device pointer with a batch stride >= 0"};
  }
  // Per operand: offsets inside one tile are 32-bit in the kernels (tiles have at most kMaxTileRows rows),
  // and 16-byte (8-element) vector loads and stores need every tensor to start on 16 bytes and to step
  // by multiples of 8 elements along each dimension that has more than one entry.
  constexpr int64_t kMaxTileRows = 128;
  constexpr int64_t kVector = 8;
  struct Operand { char const* name; void const* ptr; int64_t batch, row, head; int heads; int rows; };
  Operand operands[8] = {
      {"q", p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, p.num_heads, p.seqlen_q},
      {"k", p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, p.num_heads_k, p.seqlen_k},
      {"v", p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, p.num_heads_k, p.seqlen_k},
      {"out", p.out, p.out_batch_stride, p.out_row_stride, p.out_head_stride, p.num_heads, p.seqlen_q},
  };
  int num_operands = 4;
  if (bwd != nullptr) {
    // dk and dv have one slice per query head under GQA (the caller reduces them), else k's heads.
    operands[num_operands++] = {"dout", bwd->dout, bwd->dout_batch_stride, bwd->dout_row_stride, bwd->dout_head_stride, p.num_heads, p.seqlen_q};
    operands[num_operands++] = {"dq", bwd->dq, bwd->dq_batch_stride, bwd->dq_row_stride, bwd->dq_head_stride, p.num_heads, p.seqlen_q};
    operands[num_operands++] = {"dk", bwd->dk, bwd->dk_batch_stride, bwd->dk_row_stride, bwd->dk_head_stride, p.num_heads, p.seqlen_k};
    operands[num_operands++] = {"dv", bwd->dv, bwd->dv_batch_stride, bwd->dv_row_stride, bwd->dv_head_stride, p.num_heads, p.seqlen_k};
  }
  for (int i = 0; i < num_operands; ++i) {
    Operand const& t = operands[i];
    if (t.row < 0 || t.row * kMaxTileRows > INT32_MAX) {
      return {str_cat("flash_attn2: row strides must be in [0, 2^31 / ", kMaxTileRows, "), got ", t.row)};
    }
    bool const aligned = reinterpret_cast<uintptr_t>(t.ptr) % (kVector * 2) == 0 &&
                         (p.batch <= 1 || t.batch % kVector == 0) && (t.rows <= 1 || t.row % kVector == 0) &&
                         (t.heads <= 1 || t.head % kVector == 0);
    if (!aligned) {
      return {str_cat("flash_attn2: ", t.name, " must start on a 16-byte boundary and have batch, row and head ",
                      "strides that are multiples of 8 elements (make it contiguous)")};
    }
  }
  return {};
}

Status fwd(FwdParams const& p, cudaStream_t stream) {
  if (Status const checked = check_params(p, nullptr); !checked.ok()) { return checked; }
  FwdKernel const* best = smallest_fitting(kFwdKernels, p, p.modifiers());
  if (best == nullptr) { return {missing_kernel_message("forward", p)}; }
  if (p.batch == 0 || p.seqlen_q == 0 || p.num_heads == 0) { return {}; }
  if (Status const fits = check_smem("forward", best->head_dim, best->smem_bytes()); !fits.ok()) { return fits; }
  cudaError_t const status = best->run(p, stream);
  if (status != cudaSuccess) {
    return {str_cat("flash_attn2: forward kernel launch failed: ", cudaGetErrorString(status))};
  }
  return {};
}

namespace {

int64_t lse_rows(FwdParams const& p) {
  return int64_t(p.num_heads) * (p.cu_seqlens_q != nullptr ? p.total_q : int64_t(p.batch) * p.seqlen_q);
}

constexpr size_t kWorkspaceAlign = 256;
size_t align_up(size_t bytes) { return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

// CTAs per (batch, head). Without private dQ slices one per key block, all adding dQ atomically (or, the
// ordered deterministic mode, in turns). With them, each split owns a private dQ accumulator (memory:
// splits x dQ in fp32), so take the fewest splits that keep the SMs as busy as the most would: the
// fraction of the last wave that is full.
int choose_splits(BwdParams const& p, int block_n, int num_sms, bool private_slices) {
  int const n_blocks = (p.seqlen_k + block_n - 1) / block_n;
  if (!private_slices || n_blocks <= 1) { return n_blocks; }
  int64_t const heads = int64_t(p.batch) * p.num_heads;
  int const limit = int(std::min<int64_t>(n_blocks, 2 * num_sms / std::max<int64_t>(heads, 1) + 1));
  auto fill_of = [&](int s) {
    int64_t const ctas = heads * s;
    int64_t const waves = (ctas + num_sms - 1) / num_sms;
    return double(ctas) / double(waves * num_sms);
  };
  int best = 1;
  double best_fill = 0.0;
  for (int s = 1; s <= limit; ++s) {
    if (double const fill = fill_of(s); fill > best_fill + 1e-6) { best = s, best_fill = fill; }
  }
  // Without a mask, two splits rather than one where they fill the SMs as well: a head's two splits run
  // side by side on the same walk (serpentine) and share Q and dO in L2 (PERF_LOG b25: H100, hdim 128, 2k,
  // deterministic / default backward 1.23 -> 1.13).
  if (best == 1 && limit >= 2 && p.mask == MaskMode::kNone && fill_of(2) >= best_fill - 1e-6) { best = 2; }
  return best;
}

struct BwdPlan {
  BwdKernel const* kernel = nullptr;
  BwdKernelInfo info = {};
  int num_splits = 0;
  int num_accum_slices = 0;
  bool ordered_dq = false;  // deterministic through dq_turns (BwdKernelParams)
  int dq_turn_blocks = 0;
  size_t dsum_bytes = 0;
  size_t accum_bytes = 0;
  size_t turns_bytes = 0;
};

// A positive integer from the environment variable `name` (A/B overrides), or 0 where it is unset or not one.
int positive_env_int(char const* name) {
  char const* env = std::getenv(name);
  int const value = env != nullptr ? std::atoi(env) : 0;
  return value > 0 ? value : 0;
}

// Deterministic backward: a private fp32 dQ slice per split (summed by the postprocess), the default; or,
// on the bulk dQ path with FLASH_ATTN2_BWD_DET=ordered, one accumulator per chain that the key blocks add to
// in turns (BwdKernelParams::dq_turns). The ordered mode lost to the slices in the A/B of PERF_LOG b21
// (bf16 hdim 64 / 128, 1k-16k, deterministic / default backward time: slices 1.08-1.21x, ordered with 1, 2,
// 4 or 8 chains 1.03-1.69x, 1.05-1.40x for the default 4): a chain's key blocks walk the query blocks in
// the same order, each a turn hand-over (about a step) behind the one before, and more chains mean more
// accumulator memory to zero and sum. It stays for A/B. Without bulk_dq (sm80, FLASH_ATTN2_BWD_DQ=atomic),
// in the modifier families and with one-stage tiles (hdim 256) the slices are the only deterministic mode.
bool ordered_dq_enabled() {
  char const* mode = std::getenv("FLASH_ATTN2_BWD_DET");
  return mode != nullptr && std::strcmp(mode, "ordered") == 0;
}

// The ordered mode's chains: key block n adds after key block n - chains, into accumulator slice
// n % chains (summed by the postprocess). The key blocks of a head start together, so a chain's k-th key
// block waits about k turn hand-overs (a step each) before its first addition: more chains, less
// waiting, more accumulator memory. FLASH_ATTN2_BWD_DET_CHAINS overrides (for A/B).
int ordered_dq_chains(int n_blocks) {
  int const chains = positive_env_int("FLASH_ATTN2_BWD_DET_CHAINS");
  return std::max(1, std::min(chains > 0 ? chains : 4, n_blocks));
}

Status plan_bwd(BwdParams const& p, BwdPlan& plan) {
  if (Status const checked = check_params(p, &p); !checked.ok()) { return checked; }
  if ((int64_t(p.seqlen_k) + 15) / 16 * p.num_heads * p.batch > INT32_MAX) {
    return {str_cat("flash_attn2: batch * num_heads * seqlen_k is too large for one launch")};
  }
  plan.kernel = smallest_fitting(kBwdKernels, p, p.modifiers());
  if (plan.kernel == nullptr) { return {missing_kernel_message("backward", p)}; }
  int num_sms = 0;
  if (Status const queried = device_attribute(cudaDevAttrMultiProcessorCount, num_sms); !queried.ok()) {
    return queried;
  }
  plan.info = plan.kernel->info();
  BwdKernelInfo const& info = plan.info;
  plan.ordered_dq = p.deterministic && info.ordered_dq && ordered_dq_enabled();
  bool const private_slices = p.deterministic && !plan.ordered_dq;
  plan.num_splits = choose_splits(p, info.block_n, std::max(num_sms, 1), private_slices);
  // FLASH_ATTN2_BWD_DET_SPLITS overrides the private slices' splits per head (for A/B).
  if (int const splits = positive_env_int("FLASH_ATTN2_BWD_DET_SPLITS"); private_slices && splits > 0) {
    int const n_blocks = (p.seqlen_k + info.block_n - 1) / info.block_n;
    plan.num_splits = std::max(1, std::min(splits, n_blocks));
  }
  plan.num_accum_slices = private_slices    ? std::max(plan.num_splits, 1)
                          : plan.ordered_dq ? ordered_dq_chains(plan.num_splits)
                                            : 1;
  int64_t const rows = lse_rows(p);
  plan.dsum_bytes = align_up(size_t(rows) * sizeof(float));
  plan.accum_bytes = align_up(size_t(plan.num_accum_slices) * size_t(rows) * info.head_dim * sizeof(float));
  if (plan.ordered_dq) {
    plan.dq_turn_blocks = (p.seqlen_q + info.block_m - 1) / info.block_m;
    plan.turns_bytes = align_up(size_t(p.batch) * size_t(p.num_heads) * size_t(plan.num_accum_slices) *
                                size_t(plan.dq_turn_blocks) * sizeof(int));
  }
  return {};
}

}  // namespace

size_t bwd_workspace_bytes(BwdParams const& p) {
  BwdPlan plan;
  if (!plan_bwd(p, plan).ok()) { return 0; }
  return plan.dsum_bytes + plan.accum_bytes + plan.turns_bytes;
}

Status bwd(BwdParams const& p, cudaStream_t stream) {
  BwdPlan plan;
  if (Status const planned = plan_bwd(p, plan); !planned.ok()) { return planned; }
  if (p.batch == 0 || p.num_heads == 0) { return {}; }
  if (p.dout == nullptr || p.dq == nullptr || p.dk == nullptr || p.dv == nullptr || p.softmax_lse == nullptr) {
    return {"flash_attn2: bwd needs dout, dq, dk, dv and softmax_lse"};
  }
  if (p.workspace == nullptr || reinterpret_cast<uintptr_t>(p.workspace) % kWorkspaceAlign != 0) {
    return {str_cat("flash_attn2: bwd needs a workspace of bwd_workspace_bytes() = ",
                    plan.dsum_bytes + plan.accum_bytes + plan.turns_bytes,
                    " bytes, aligned to ", kWorkspaceAlign)};
  }

  if (Status const fits = check_smem("backward", plan.info.head_dim, plan.info.smem_bytes); !fits.ok()) { return fits; }

  BwdKernelParams kp;
  static_cast<BwdParams&>(kp) = p;
  char* const workspace = static_cast<char*>(p.workspace);
  kp.dsum = reinterpret_cast<float*>(workspace);
  kp.dq_accum = reinterpret_cast<float*>(workspace + plan.dsum_bytes);
  kp.lse_rows = lse_rows(p);
  kp.num_splits = plan.num_splits;
  kp.num_accum_slices = plan.num_accum_slices;
  kp.bulk_dq = plan.info.bulk_dq;
  if (plan.ordered_dq) {
    kp.dq_turns = reinterpret_cast<int*>(workspace + plan.dsum_bytes + plan.accum_bytes);
    kp.dq_turn_blocks = plan.dq_turn_blocks;
  }
  cudaError_t const status = plan.kernel->run(kp, stream);
  if (status != cudaSuccess) {
    return {str_cat("flash_attn2: backward kernel launch failed: ", cudaGetErrorString(status))};
  }
  return {};
}

namespace {

// One kernel lookup and the checks of the KV-cache entry points (beyond check_params).
Status plan_kvcache(KVCacheParams const& p, KVCacheKernel const*& kernel) {
  if (Status const checked = check_params(p, nullptr); !checked.ok()) { return checked; }
  if (p.cu_seqlens_q != nullptr || p.cu_seqlens_k != nullptr) {
    return {"flash_attn2: the KV-cache kernels take a dense batch (cu_seqlens must be null)"};
  }
  if (p.dropout_p != 0.f) { return {"flash_attn2: the KV-cache kernels have no dropout"}; }
  if (p.cache_seqlens == nullptr) { return {"flash_attn2: fwd_kvcache needs cache_seqlens"}; }
  if (p.block_table != nullptr) {
    if (p.page_size <= 0 || p.page_size % 16 != 0) {
      return {str_cat("flash_attn2: page_size must be a positive multiple of 16, got ", p.page_size)};
    }
    if (p.cache_batch_idx != nullptr || p.cache_leftpad != nullptr) {
      return {"flash_attn2: cache_batch_idx and cache_leftpad are not supported with a paged cache"};
    }
    if (int64_t(p.max_pages) * p.page_size < p.seqlen_k) {
      return {"flash_attn2: seqlen_k (the capacity) exceeds max_pages * page_size"};
    }
  } else if (p.cache_batch <= 0) {
    return {"flash_attn2: a dense cache needs cache_batch > 0"};
  }
  kernel = smallest_fitting(kKVCacheKernels, p, Modifiers::kAll);
  if (kernel == nullptr) { return {missing_kernel_message("kvcache", p)}; }
  return {};
}

}  // namespace

int kvcache_num_splits(KVCacheParams const& p) {
  if (p.num_splits > 0) { return p.num_splits; }
  KVCacheKernel const* kernel = nullptr;
  if (!plan_kvcache(p, kernel).ok()) { return 1; }
  int num_sms = 0;
  if (!device_attribute(cudaDevAttrMultiProcessorCount, num_sms).ok() || num_sms <= 0) { return 1; }
  KVCacheKernelInfo const info = kernel->info();
  // Split only when batch x heads x query blocks leaves SM slots (the CTAs per SM the tile's shared memory
  // allows) idle, and then take the fewest splits whose grid fills its last wave best (within 5% of the
  // best fill): a grid of 1.2 waves runs as long as one of 2. Each split keeps at least kMinKeysPerSplit
  // keys so that its prologue (the first blocks of the ring) and the combine stay small next to its loop;
  // kMaxSplits bounds the workspace.
  constexpr int kMinKeysPerSplit = 256, kMaxSplits = 128;
  int64_t const ctas = int64_t(p.batch) * p.num_heads * ((p.seqlen_q + info.block_m - 1) / info.block_m);
  int const n_blocks = (p.seqlen_k + info.block_n - 1) / info.block_n;
  int const min_blocks = std::max(kMinKeysPerSplit / info.block_n, 1);
  int64_t const slots = int64_t(num_sms) * std::max(info.ctas_per_sm, 1);
  if (ctas <= 0 || ctas >= slots * 8 / 10) { return 1; }
  int const limit = int(std::min<int64_t>({kMaxSplits, std::max(n_blocks / min_blocks, 1), 4 * slots / ctas + 1}));
  auto fill = [&](int s) {  // busy share of the slots over the grid's waves
    int64_t const total = ctas * s;
    return double(total) / double((total + slots - 1) / slots * slots);
  };
  double best = 0.0;
  for (int s = 1; s <= limit; ++s) { best = std::max(best, fill(s)); }
  for (int s = 1; s <= limit; ++s) {
    if (fill(s) >= 0.95 * best) { return s; }
  }
  return 1;
}

size_t kvcache_out_accum_floats(KVCacheParams const& p) {
  return p.num_splits <= 1 ? 0 : size_t(p.num_splits) * p.batch * p.num_heads * p.seqlen_q * p.head_dim;
}

size_t kvcache_lse_accum_floats(KVCacheParams const& p) {
  return p.num_splits <= 1 ? 0 : size_t(p.num_splits) * p.batch * p.num_heads * p.seqlen_q;
}

size_t kvcache_split_tickets(KVCacheParams const& p) {
  bool const fused = p.num_splits > 1 && p.seqlen_q <= kFusedCombineMaxRows && p.head_dim % 4 == 0;
  return fused ? size_t(p.batch) * p.num_heads : 0;  // one query tile per (batch, head)
}

Status fwd_kvcache(KVCacheParams const& p, cudaStream_t stream) {
  KVCacheKernel const* kernel = nullptr;
  if (Status const planned = plan_kvcache(p, kernel); !planned.ok()) { return planned; }
  if (p.num_splits < 1) { return {"flash_attn2: fwd_kvcache needs num_splits >= 1 (see kvcache_num_splits)"}; }
  if (p.num_splits > kMaxKVCacheSplits) {
    return {str_cat("flash_attn2: fwd_kvcache takes at most ", kMaxKVCacheSplits, " splits, got ", p.num_splits)};
  }
  if (p.num_splits > 1 && (p.out_accum == nullptr || p.lse_accum == nullptr)) {
    return {"flash_attn2: num_splits > 1 needs out_accum and lse_accum"};
  }
  if (p.batch == 0 || p.seqlen_q == 0 || p.num_heads == 0) { return {}; }
  KVCacheKernelInfo const info = kernel->info();
  if (Status const fits = check_smem("kvcache", kernel->head_dim, info.smem_bytes); !fits.ok()) { return fits; }
  KVCacheParams run = p;
  if (kvcache_split_tickets(p) == 0) { run.split_tickets = nullptr; }  // too many rows: the combine kernel
  cudaError_t const status = kernel->run(run, stream);
  if (status != cudaSuccess) {
    return {str_cat("flash_attn2: KV-cache kernel launch failed: ", cudaGetErrorString(status))};
  }
  return {};
}

}  // namespace flash_attn2
