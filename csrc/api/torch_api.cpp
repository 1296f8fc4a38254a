#include "api/torch_api.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "common/strings.h"
#include "launch/fwd_launch.h"

// Messages are built with str_cat and handed to TORCH_CHECK as one std::string, which c10 passes
// through as is; see common/strings.h for why no iostream formatting happens in this library.
namespace flash_attn2 {
namespace {

// The window and score modifiers of a call, as the ops take them.
struct ModifierArgs {
  int64_t window_left = -1;
  int64_t window_right = -1;
  double softcap = 0.0;
  std::optional<at::Tensor> alibi_slopes;
  double dropout_p = 0.0;
  std::optional<at::Tensor> rng_state;
};

DType dtype_of(at::Tensor const& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFp16;
    case at::kBFloat16: return DType::kBf16;
    default:
      TORCH_CHECK(false, str_cat("flash_attn2: only float16 and bfloat16 are supported, got ",
                                 c10::toString(t.scalar_type())));
  }
}

void check_qkv(at::Tensor const& t, char const* name, at::Tensor const& q, int64_t dims) {
  TORCH_CHECK(t.is_cuda(), str_cat("flash_attn2: ", name, " must be a CUDA tensor"));
  TORCH_CHECK(t.device() == q.device(), str_cat("flash_attn2: ", name, " is on ", t.device().str(), " but q is on ",
                                                q.device().str()));
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), str_cat("flash_attn2: ", name, " has dtype ",
                                                          c10::toString(t.scalar_type()), " but q has ",
                                                          c10::toString(q.scalar_type())));
  TORCH_CHECK(t.dim() == dims, str_cat("flash_attn2: ", name, " must have ", dims, " dims (",
                                       dims == 4 ? "batch, seqlen" : "total tokens", ", heads, head_dim), got ", t.dim()));
  TORCH_CHECK(t.stride(-1) == 1, str_cat("flash_attn2: ", name, " must be contiguous in its last dimension"));
}

void check_cu_seqlens(at::Tensor const& cu, char const* name, at::Tensor const& q, int64_t batch) {
  TORCH_CHECK(cu.device() == q.device(), str_cat("flash_attn2: ", name, " must be on q's device"));
  TORCH_CHECK(cu.scalar_type() == at::kInt, str_cat("flash_attn2: ", name, " must be int32"));
  TORCH_CHECK(cu.dim() == 1 && cu.is_contiguous(), str_cat("flash_attn2: ", name, " must be a contiguous 1-D tensor"));
  TORCH_CHECK(cu.numel() == batch + 1, str_cat("flash_attn2: ", name, " has ", cu.numel(), " entries; expected ",
                                               batch + 1, " (batch + 1)"));
}

// Sets the batch, row and head strides of a (batch, seqlen, heads, d) or packed (total, heads, d) tensor,
// counted from the last dim so both layouts read alike; no batch stride when packed.
void set_strides(at::Tensor const& t, bool varlen, int64_t& batch, int64_t& row, int64_t& head) {
  batch = varlen ? 0 : t.stride(0), row = t.stride(-3), head = t.stride(-2);
}

// flash-attn's (causal, window) convention to a mask mode: causal is the window (left, 0), no window
// on either side is kNone, and a window that is only "right = 0" is plain causal.
void set_mask(FwdParams& p, bool causal, int64_t window_left, int64_t window_right) {
  TORCH_CHECK(window_left >= -1 && window_right >= -1,
              str_cat("flash_attn2: window_size entries must be >= 0, or -1 for unbounded; got (", window_left, ", ",
                      window_right, ")"));
  if (causal) { window_right = 0; }
  constexpr int64_t kMaxWindow = int64_t(1) << 30;  // beyond any sequence the kernels accept
  p.window_left = int(std::min(window_left, kMaxWindow));
  p.window_right = int(std::min(window_right, kMaxWindow));
  if (window_left < 0 && window_right < 0) {
    p.mask = MaskMode::kNone;
  } else if (window_left < 0 && window_right == 0) {
    p.mask = MaskMode::kCausal;
  } else {
    p.mask = MaskMode::kLocal;
  }
}

// The score modifiers: softcap, ALiBi slopes ((heads,) or (batch, heads) fp32), dropout with its rng state.
void set_modifiers(FwdParams& p, at::Tensor const& q, double softcap, std::optional<at::Tensor> const& alibi_slopes,
                   double dropout_p, std::optional<at::Tensor> const& rng_state) {
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap),
              str_cat("flash_attn2: softcap must be >= 0 and finite (0 is off), got ", softcap));
  p.softcap = float(softcap);
  if (alibi_slopes.has_value()) {
    at::Tensor const& a = *alibi_slopes;
    TORCH_CHECK(a.device() == q.device() && a.scalar_type() == at::kFloat,
                "flash_attn2: alibi_slopes must be a float32 tensor on q's device");
    bool const per_head = a.dim() == 1 && a.size(0) == p.num_heads;
    bool const per_batch = a.dim() == 2 && a.size(0) == p.batch && a.size(1) == p.num_heads;
    TORCH_CHECK(per_head || per_batch, str_cat("flash_attn2: alibi_slopes must be (nheads,) = (", p.num_heads,
                                               ",) or (batch, nheads) = (", p.batch, ", ", p.num_heads, ")"));
    TORCH_CHECK(a.stride(-1) == 1 || p.num_heads <= 1, "flash_attn2: alibi_slopes must be contiguous in its last dim");
    p.alibi_slopes = a.data_ptr<float>();
    p.alibi_slopes_batch_stride = per_batch && p.batch > 1 ? a.stride(0) : 0;
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, str_cat("flash_attn2: dropout_p must be in [0, 1), got ", dropout_p));
  p.dropout_p = float(dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(rng_state.has_value(), "flash_attn2: dropout_p > 0 needs rng_state (int64 (2,): seed, offset)");
    at::Tensor const& r = *rng_state;
    TORCH_CHECK(r.device() == q.device() && r.scalar_type() == at::kLong && r.numel() == 2 && r.is_contiguous(),
                "flash_attn2: rng_state must be a contiguous int64 tensor of 2 elements (seed, offset) on q's device");
    p.rng_state = reinterpret_cast<uint64_t const*>(r.data_ptr<int64_t>());
  }
}

// Checks q, k, v (and the varlen vectors) and fills the size, stride, dtype and mask fields of p that
// the forward and the backward share; out and softmax_lse are filled by the caller.
void fill_problem(FwdParams& p, at::Tensor const& q, at::Tensor const& k, at::Tensor const& v, double softmax_scale,
                  bool causal, std::optional<at::Tensor> const& cu_seqlens_q,
                  std::optional<at::Tensor> const& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                  ModifierArgs const& mods) {
  bool const varlen = cu_seqlens_q.has_value();
  TORCH_CHECK(varlen == cu_seqlens_k.has_value(), "flash_attn2: give both cu_seqlens_q and cu_seqlens_k, or neither");
  int64_t const dims = varlen ? 3 : 4;
  check_qkv(q, "q", q, dims);
  check_qkv(k, "k", q, dims);
  check_qkv(v, "v", q, dims);
  DType const dtype = dtype_of(q);
  // Dense: (batch, seqlen, heads, head_dim). Varlen: (total, heads, head_dim), seen with seqlen = the bound.
  int64_t const batch = varlen ? cu_seqlens_q->numel() - 1 : q.size(0);
  int64_t const seqlen_q = varlen ? max_seqlen_q : q.size(1);
  int64_t const seqlen_k = varlen ? max_seqlen_k : k.size(1);
  int64_t const num_heads = q.size(-2), head_dim = q.size(-1), num_heads_k = k.size(-2);
  TORCH_CHECK(k.sizes() == v.sizes(), "flash_attn2: k and v must have the same shape");
  TORCH_CHECK(varlen || k.size(0) == batch,
              str_cat("flash_attn2: batch of k (", k.size(0), ") differs from q (", batch, ")"));
  TORCH_CHECK(k.size(-1) == head_dim,
              str_cat("flash_attn2: head_dim of k (", k.size(-1), ") differs from q (", head_dim, ")"));
  TORCH_CHECK(seqlen_q >= 0 && seqlen_k >= 0 && seqlen_q <= INT32_MAX && seqlen_k <= INT32_MAX,
              "flash_attn2: sequence lengths (max_seqlen_q/k for variable-length batches) must be in [0, 2^31)");
  if (varlen) {
    TORCH_CHECK(batch >= 0, "flash_attn2: cu_seqlens_q must have at least one entry");
    check_cu_seqlens(*cu_seqlens_q, "cu_seqlens_q", q, batch);
    check_cu_seqlens(*cu_seqlens_k, "cu_seqlens_k", q, batch);
  }

  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  set_strides(q, varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  set_strides(k, varlen, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  set_strides(v, varlen, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  if (varlen) {
    p.cu_seqlens_q = cu_seqlens_q->data_ptr<int>();
    p.cu_seqlens_k = cu_seqlens_k->data_ptr<int>();
    p.total_q = q.size(0);
  }
  p.batch = int(batch);
  p.seqlen_q = int(seqlen_q);
  p.seqlen_k = int(seqlen_k);
  p.num_heads = int(num_heads);
  p.num_heads_k = int(num_heads_k);
  p.head_dim = int(head_dim);
  p.softmax_scale = float(softmax_scale);
  p.dtype = dtype;
  set_mask(p, causal, mods.window_left, mods.window_right);
  set_modifiers(p, q, mods.softcap, mods.alibi_slopes, mods.dropout_p, mods.rng_state);
}

// softmax_lse's shape: (batch, heads, seqlen_q), or (heads, total_q) for a packed batch.
std::vector<int64_t> lse_shape(FwdParams const& p, at::Tensor const& q) {
  return p.cu_seqlens_q != nullptr ? std::vector<int64_t>{p.num_heads, q.size(0)}
                                   : std::vector<int64_t>{p.batch, p.num_heads, p.seqlen_q};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mha_fwd(at::Tensor const& q, at::Tensor const& k, at::Tensor const& v,
                                           double softmax_scale, bool causal,
                                           std::optional<at::Tensor> const& cu_seqlens_q,
                                           std::optional<at::Tensor> const& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k, int64_t window_left, int64_t window_right,
                                           double softcap, std::optional<at::Tensor> const& alibi_slopes,
                                           double dropout_p, std::optional<at::Tensor> const& rng_state) {
  ModifierArgs const mods{window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state};
  FwdParams p;
  fill_problem(p, q, k, v, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mods);
  bool const varlen = cu_seqlens_q.has_value();

  c10::cuda::CUDAGuard device_guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(lse_shape(p, q), q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.softmax_lse = lse.data_ptr<float>();
  set_strides(out, varlen, p.out_batch_stride, p.out_row_stride, p.out_head_stride);

  // num_heads % num_heads_k, head_dim limits and the kernel choice are checked by the dispatcher.
  Status const status = fwd(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status.ok(), status.message);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mha_bwd(at::Tensor const& dout, at::Tensor const& q,
                                                       at::Tensor const& k, at::Tensor const& v,
                                                       at::Tensor const& out, at::Tensor const& softmax_lse,
                                                       double softmax_scale, bool causal, bool deterministic,
                                                       std::optional<at::Tensor> const& cu_seqlens_q,
                                                       std::optional<at::Tensor> const& cu_seqlens_k,
                                                       int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                       int64_t window_left, int64_t window_right, double softcap,
                                                       std::optional<at::Tensor> const& alibi_slopes,
                                                       double dropout_p, std::optional<at::Tensor> const& rng_state) {
  ModifierArgs const mods{window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state};
  BwdParams p;
  fill_problem(p, q, k, v, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mods);
  bool const varlen = cu_seqlens_q.has_value();
  int64_t const dims = varlen ? 3 : 4;
  check_qkv(out, "out", q, dims);
  check_qkv(dout, "dout", q, dims);
  TORCH_CHECK(out.sizes() == q.sizes(), "flash_attn2: out must have q's shape");
  TORCH_CHECK(dout.sizes() == q.sizes(), "flash_attn2: dout must have q's shape");
  TORCH_CHECK(softmax_lse.is_cuda() && softmax_lse.device() == q.device() && softmax_lse.scalar_type() == at::kFloat &&
                  softmax_lse.is_contiguous() && softmax_lse.sizes() == at::IntArrayRef(lse_shape(p, q)),
              str_cat("flash_attn2: softmax_lse must be the forward's contiguous float32 ",
                      varlen ? "(heads, total_q)" : "(batch, heads, seqlen_q)", " tensor on q's device"));

  c10::cuda::CUDAGuard device_guard(q.device());
  p.out = const_cast<void*>(out.data_ptr());
  p.softmax_lse = softmax_lse.data_ptr<float>();
  set_strides(out, varlen, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
  p.dout = dout.data_ptr();
  set_strides(dout, varlen, p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride);

  // GQA: the kernel writes one dk/dv slice per query head; each group is summed below (in the input
  // dtype, with fp32 accumulation inside at::sum). The alternative, fp32 atomics into k's shape, would
  // make the default path's dk/dv order-dependent and need a conversion pass anyway.
  bool const grouped = p.num_heads_k != p.num_heads;
  std::vector<int64_t> kv_shape(k.sizes().begin(), k.sizes().end());
  if (grouped) { kv_shape[kv_shape.size() - 2] = p.num_heads; }
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(kv_shape, k.options());
  at::Tensor dv = at::empty(kv_shape, k.options());
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  set_strides(dq, varlen, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  set_strides(dk, varlen, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  set_strides(dv, varlen, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
  p.deterministic = deterministic;

  size_t const workspace_bytes = bwd_workspace_bytes(p);
  at::Tensor workspace = at::empty({int64_t(std::max<size_t>(workspace_bytes, 1))}, q.options().dtype(at::kByte));
  p.workspace = workspace.data_ptr();
  Status const status = bwd(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status.ok(), status.message);

  if (grouped) {
    int64_t const group = p.num_heads / p.num_heads_k;
    std::vector<int64_t> split_shape(k.sizes().begin(), k.sizes().end());
    split_shape.insert(split_shape.end() - 1, group);  // (..., heads_k, group, d)
    dk = dk.view(split_shape).sum(-2);
    dv = dv.view(split_shape).sum(-2);
  }
  return {dq, dk, dv};
}

at::Tensor mha_dropout_mask(at::Tensor const& rng_state, int64_t batch, int64_t num_heads, int64_t seqlen_q,
                        int64_t seqlen_k, double dropout_p, std::optional<at::Tensor> const& cu_seqlens_q,
                        std::optional<at::Tensor> const& cu_seqlens_k) {
  TORCH_CHECK(rng_state.is_cuda(), "flash_attn2: rng_state must be a CUDA tensor");
  TORCH_CHECK(batch >= 0 && num_heads >= 0 && seqlen_q >= 0 && seqlen_k >= 0 && seqlen_q <= INT32_MAX &&
                  seqlen_k <= INT32_MAX && batch <= INT32_MAX && num_heads <= INT32_MAX,
              "flash_attn2: dropout_mask sizes must be in [0, 2^31)");
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
              "flash_attn2: give both cu_seqlens_q and cu_seqlens_k, or neither");
  FwdParams p;
  p.batch = int(batch);
  p.num_heads = int(num_heads);
  p.seqlen_q = int(seqlen_q);
  p.seqlen_k = int(seqlen_k);
  set_modifiers(p, rng_state, 0.0, std::nullopt, dropout_p, rng_state);
  if (cu_seqlens_q.has_value()) {
    check_cu_seqlens(*cu_seqlens_q, "cu_seqlens_q", rng_state, batch);
    check_cu_seqlens(*cu_seqlens_k, "cu_seqlens_k", rng_state, batch);
    p.cu_seqlens_q = cu_seqlens_q->data_ptr<int>();
    p.cu_seqlens_k = cu_seqlens_k->data_ptr<int>();
  }
  c10::cuda::CUDAGuard device_guard(rng_state.device());
  at::Tensor keep = at::empty({batch, num_heads, seqlen_q, seqlen_k}, rng_state.options().dtype(at::kBool));
  Status const status = flash_attn2::dropout_mask(p, reinterpret_cast<uint8_t*>(keep.data_ptr()),
                                                  c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status.ok(), status.message);
  return keep;
}

namespace {

void check_index_vector(std::optional<at::Tensor> const& t, char const* name, at::Tensor const& q, int64_t batch) {
  if (!t.has_value()) { return; }
  TORCH_CHECK(t->device() == q.device() && t->scalar_type() == at::kInt && t->dim() == 1 && t->numel() == batch &&
                  t->is_contiguous(),
              str_cat("flash_attn2: ", name, " must be a contiguous int32 tensor of shape (batch,) = (", batch,
                      ",) on q's device"));
}

int const* ptr_or_null(std::optional<at::Tensor> const& t) { return t.has_value() ? t->data_ptr<int>() : nullptr; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> mha_fwd_kvcache(
    at::Tensor const& q, at::Tensor const& k_cache, at::Tensor const& v_cache, std::optional<at::Tensor> const& k,
    std::optional<at::Tensor> const& v, std::optional<at::Tensor> const& rotary_cos,
    std::optional<at::Tensor> const& rotary_sin, at::Tensor const& cache_seqlens,
    std::optional<at::Tensor> const& cache_batch_idx, std::optional<at::Tensor> const& cache_leftpad,
    std::optional<at::Tensor> const& block_table, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, bool rotary_interleaved, std::optional<at::Tensor> const& alibi_slopes,
    int64_t num_splits) {
  check_qkv(q, "q", q, 4);
  check_qkv(k_cache, "k_cache", q, 4);
  check_qkv(v_cache, "v_cache", q, 4);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(),
              "flash_attn2: k_cache and v_cache must have the same shape and strides");
  int64_t const batch = q.size(0), seqlen_q = q.size(1), num_heads = q.size(2), head_dim = q.size(3);
  int64_t const num_heads_k = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim, str_cat("flash_attn2: head_dim of the cache (", k_cache.size(3),
                                                   ") differs from q (", head_dim, ")"));
  TORCH_CHECK(num_heads_k > 0 && num_heads % num_heads_k == 0,
              str_cat("flash_attn2: num_heads (", num_heads, ") must be a multiple of the cache's (", num_heads_k, ")"));
  bool const paged = block_table.has_value();
  int64_t capacity = k_cache.size(1);
  if (paged) {
    at::Tensor const& bt = *block_table;
    TORCH_CHECK(bt.device() == q.device() && bt.scalar_type() == at::kInt && bt.dim() == 2 && bt.size(0) == batch &&
                    bt.stride(1) == 1,
                str_cat("flash_attn2: block_table must be int32 (batch, max_pages) = (", batch,
                        ", ...) on q's device, contiguous in its last dim"));
    capacity = bt.size(1) * k_cache.size(1);
    TORCH_CHECK(!cache_batch_idx.has_value() && !cache_leftpad.has_value(),
                "flash_attn2: cache_batch_idx and cache_leftpad are not supported with block_table");
  }
  TORCH_CHECK(capacity <= INT32_MAX, "flash_attn2: the cache holds too many rows per sequence (>= 2^31)");
  check_index_vector(cache_seqlens, "cache_seqlens", q, batch);
  check_index_vector(cache_batch_idx, "cache_batch_idx", q, batch);
  check_index_vector(cache_leftpad, "cache_leftpad", q, batch);
  TORCH_CHECK(k.has_value() == v.has_value(), "flash_attn2: give both k and v, or neither");
  int64_t const seqlen_new = k.has_value() ? k->size(1) : 0;
  if (k.has_value()) {
    check_qkv(*k, "k", q, 4);
    check_qkv(*v, "v", q, 4);
    TORCH_CHECK(k->sizes() == v->sizes() && k->size(0) == batch && k->size(2) == num_heads_k && k->size(3) == head_dim,
                str_cat("flash_attn2: k and v must be (batch, seqlen_new, nheads_k, head_dim) = (", batch,
                        ", s_new, ", num_heads_k, ", ", head_dim, ")"));
    TORCH_CHECK(seqlen_new <= capacity, str_cat("flash_attn2: ", seqlen_new, " new keys do not fit a cache of ",
                                                capacity, " rows per sequence"));
  }
  TORCH_CHECK(rotary_cos.has_value() == rotary_sin.has_value(), "flash_attn2: give both rotary_cos and rotary_sin, or neither");
  int64_t rotary_dim = 0;
  if (rotary_cos.has_value()) {
    at::Tensor const& c = *rotary_cos;
    at::Tensor const& sn = *rotary_sin;
    TORCH_CHECK(c.device() == q.device() && c.scalar_type() == q.scalar_type() && c.dim() == 2 && c.is_contiguous() &&
                    sn.sizes() == c.sizes() && sn.scalar_type() == c.scalar_type() && sn.device() == c.device() &&
                    sn.is_contiguous(),
                "flash_attn2: rotary_cos and rotary_sin must be contiguous (seqlen_ro, rotary_dim / 2) tensors of q's "
                "dtype on q's device");
    rotary_dim = 2 * c.size(1);
    TORCH_CHECK(rotary_dim > 0 && rotary_dim <= head_dim && rotary_dim % 16 == 0,
                str_cat("flash_attn2: rotary_dim (", rotary_dim, ") must be a positive multiple of 16 <= head_dim"));
    TORCH_CHECK(c.size(0) >= capacity, str_cat("flash_attn2: rotary_cos/sin have ", c.size(0),
                                               " positions; the cache needs ", capacity));
  }

  c10::cuda::CUDAGuard device_guard(q.device());
  cudaStream_t const stream = c10::cuda::getCurrentCUDAStream().stream();
  DType const dtype = dtype_of(q);

  // 1. The append (and q's rotation), in place.
  KVCacheAppendParams a;
  a.dtype = dtype;
  a.batch = int(batch);
  a.seqlen_new = int(seqlen_new);
  a.num_heads = int(num_heads);
  a.num_heads_k = int(num_heads_k);
  a.head_dim = int(head_dim);
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  set_strides(k_cache, false, a.k_cache_batch_stride, a.k_cache_row_stride, a.k_cache_head_stride);
  set_strides(v_cache, false, a.v_cache_batch_stride, a.v_cache_row_stride, a.v_cache_head_stride);
  a.capacity = int(capacity);
  a.cache_batch = int(k_cache.size(0));
  a.cache_seqlens = cache_seqlens.data_ptr<int>();
  a.cache_batch_idx = ptr_or_null(cache_batch_idx);
  a.cache_leftpad = ptr_or_null(cache_leftpad);
  if (paged) {
    a.block_table = block_table->data_ptr<int>();
    a.block_table_batch_stride = block_table->stride(0);
    a.page_size = int(k_cache.size(1));
    a.num_pages = int(k_cache.size(0));
  }
  if (k.has_value()) {
    a.k_new = k->data_ptr();
    a.v_new = v->data_ptr();
    set_strides(*k, false, a.k_new_batch_stride, a.k_new_row_stride, a.k_new_head_stride);
    set_strides(*v, false, a.v_new_batch_stride, a.v_new_row_stride, a.v_new_head_stride);
  }
  at::Tensor q_attn = q;
  if (rotary_dim > 0) {
    q_attn = at::empty(q.sizes(), q.options());
    a.seqlen_q = int(seqlen_q);
    a.q = q.data_ptr();
    a.q_rotated = q_attn.data_ptr();
    set_strides(q, false, a.q_batch_stride, a.q_row_stride, a.q_head_stride);
    set_strides(q_attn, false, a.q_rotated_batch_stride, a.q_rotated_row_stride, a.q_rotated_head_stride);
    a.rotary_cos = rotary_cos->data_ptr();
    a.rotary_sin = rotary_sin->data_ptr();
    a.rotary_dim = int(rotary_dim);
    a.seqlen_ro = int(rotary_cos->size(0));
    a.rotary_interleaved = rotary_interleaved;
    a.q_positions_advance = causal || window_left >= 0 || window_right >= 0;
  }
  bool const appends = seqlen_new > 0 || rotary_dim > 0;  // launched below, once the splits are known

  // 2. Attention over the cache. One query row sees every key up to the last whatever causal or a right
  // window say, so decoding without a left window or ALiBi (both depend on the row's position) packs the
  // query heads of each KV head into the query tile: q (b, 1, h_k * g, d) viewed as (b, g, h_k, d), a
  // strided view, reads every K/V tile once per group.
  bool const one_row = seqlen_q == 1;
  bool const pack_gqa = one_row && num_heads > num_heads_k && window_left < 0 && !alibi_slopes.has_value();
  int64_t const group = num_heads / num_heads_k;
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({batch, num_heads, seqlen_q}, q.options().dtype(at::kFloat));
  if (pack_gqa && !q_attn.is_contiguous()) { q_attn = q_attn.contiguous(); }
  at::Tensor q_view = pack_gqa ? q_attn.view({batch, num_heads_k, group, head_dim}).transpose(1, 2) : q_attn;
  at::Tensor out_view = pack_gqa ? out.view({batch, num_heads_k, group, head_dim}).transpose(1, 2) : out;

  KVCacheParams p;
  p.q = q_view.data_ptr();
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.out = out_view.data_ptr();
  p.softmax_lse = lse.data_ptr<float>();
  set_strides(q_view, false, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  set_strides(k_cache, false, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  set_strides(v_cache, false, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  set_strides(out_view, false, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
  p.batch = int(batch);
  p.seqlen_q = int(pack_gqa ? group : seqlen_q);
  p.seqlen_k = int(capacity);
  p.num_heads = int(pack_gqa ? num_heads_k : num_heads);
  p.num_heads_k = int(num_heads_k);
  p.head_dim = int(head_dim);
  p.softmax_scale = float(softmax_scale);
  p.dtype = dtype;
  // One query row sits on the last key's diagonal: no key lies right of it, so causal and a right window
  // change nothing there (and must not, once its heads are packed as rows).
  set_mask(p, one_row ? false : causal, window_left, one_row ? -1 : window_right);
  set_modifiers(p, q, softcap, alibi_slopes, 0.0, std::nullopt);
  p.cache_seqlens = cache_seqlens.data_ptr<int>();
  p.seqlen_new = int(seqlen_new);
  p.cache_batch_idx = a.cache_batch_idx;
  p.cache_batch = int(k_cache.size(0));
  p.cache_leftpad = a.cache_leftpad;
  if (paged) {
    p.block_table = a.block_table;
    p.block_table_batch_stride = a.block_table_batch_stride;
    p.max_pages = int(block_table->size(1));
    p.page_size = a.page_size;
    p.num_pages = a.num_pages;
  }
  TORCH_CHECK(num_splits >= 0, str_cat("flash_attn2: num_splits must be >= 0 (0 chooses), got ", num_splits));
  // Documented: more is taken as kMaxKVCacheSplits (the combine's bound).
  p.num_splits = int(std::min<int64_t>(num_splits, kMaxKVCacheSplits));
  p.num_splits = kvcache_num_splits(p);
  at::Tensor out_accum, lse_accum;
  if (p.num_splits > 1) {
    out_accum = at::empty({int64_t(kvcache_out_accum_floats(p))}, q.options().dtype(at::kFloat));
    lse_accum = at::empty({int64_t(kvcache_lse_accum_floats(p))}, q.options().dtype(at::kFloat));
    p.out_accum = out_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  }
  // Decoding with splits: the attention kernel combines them itself, on tickets the append zeroes (or a
  // memset, without an append), so a decode step is two kernels.
  at::Tensor tickets;
  if (size_t const num_tickets = kvcache_split_tickets(p); num_tickets > 0) {
    tickets = appends ? at::empty({int64_t(num_tickets)}, q.options().dtype(at::kInt))
                      : at::zeros({int64_t(num_tickets)}, q.options().dtype(at::kInt));
    p.split_tickets = tickets.data_ptr<int>();
    if (appends) {
      a.zero_ints = p.split_tickets;
      a.zero_count = int(num_tickets);
    }
  }
  if (appends) {
    Status const appended = kvcache_append(a, stream);
    TORCH_CHECK(appended.ok(), appended.message);
  }
  Status const status = fwd_kvcache(p, stream);
  TORCH_CHECK(status.ok(), status.message);
  return {out, lse};
}

}  // namespace flash_attn2
