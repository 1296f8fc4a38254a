// Runtime -> compile-time dispatch for the forward: one table, generated from the same list as the
// instantiation files, and one lookup that ends in an error naming what was built.
#include <cmath>
#include <cstdint>

#include "common/strings.h"
#include "launch/fwd_launch.h"

namespace flash_attn2 {
namespace {

struct FwdKernel {
  DType dtype;
  int head_dim;
  MaskMode mask;
  cudaError_t (*run)(FwdParams const&, cudaStream_t);
  int (*smem_bytes)();
};

#define FLASH_ATTN2_FWD_KERNEL(DTYPE, HDIM, MASK)                                         \
  FwdKernel{DType::DTYPE, HDIM, MaskMode::MASK, &run_fwd<DType::DTYPE, HDIM, MaskMode::MASK>, \
            &fwd_smem_bytes<DType::DTYPE, HDIM, MaskMode::MASK>},
FwdKernel const kFwdKernels[] = {
#include "instantiations/fwd_table.inc"
    FwdKernel{DType::kBf16, 0, MaskMode::kNone, nullptr, nullptr},  // sentinel: the table may be empty
};
#undef FLASH_ATTN2_FWD_KERNEL

char const* dtype_name(DType d) { return d == DType::kFp16 ? "fp16" : "bf16"; }
char const* mask_name(MaskMode m) { return m == MaskMode::kCausal ? "causal" : "none"; }

constexpr int kMaxHeadDim = 256;

}  // namespace

std::string built_kernels() {
  std::string lines;
  for (FwdKernel const& k : kFwdKernels) {
    if (k.run == nullptr) { continue; }
    lines += str_cat("fwd ", dtype_name(k.dtype), " ", k.head_dim, " ", mask_name(k.mask), "\n");
  }
  return lines;
}

Status fwd(FwdParams const& p, cudaStream_t stream) {
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
  // Per operand: offsets inside one tile are 32-bit in the kernels (tiles have at most kMaxTileRows rows),
  // and 16-byte (8-element) vector loads and stores need every tensor to start on 16 bytes and to step
  // by multiples of 8 elements along each dimension that has more than one entry.
  constexpr int64_t kMaxTileRows = 128;
  constexpr int64_t kVector = 8;
  struct Operand { char const* name; void const* ptr; int64_t batch, row, head; int heads; int rows; };
  Operand const operands[] = {
      {"q", p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, p.num_heads, p.seqlen_q},
      {"k", p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, p.num_heads_k, p.seqlen_k},
      {"v", p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, p.num_heads_k, p.seqlen_k},
      {"out", p.out, p.out_batch_stride, p.out_row_stride, p.out_head_stride, p.num_heads, p.seqlen_q},
  };
  for (Operand const& t : operands) {
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
  FwdKernel const* best = nullptr;
  for (FwdKernel const& k : kFwdKernels) {
    if (k.run == nullptr || k.dtype != p.dtype || k.mask != p.mask || k.head_dim < p.head_dim) { continue; }
    if (best == nullptr || k.head_dim < best->head_dim) { best = &k; }
  }
  if (best == nullptr) {
    return {str_cat("flash_attn2: no forward kernel was built for dtype ", dtype_name(p.dtype), ", head dim ", p.head_dim, ", mask ", mask_name(p.mask), ". Built:\n", built_kernels(), "Rebuild with FLASH_ATTN2_HEAD_DIMS / FLASH_ATTN2_DTYPES covering it (unset builds all).")};
  }
  if (p.batch == 0 || p.seqlen_q == 0 || p.num_heads == 0) { return {}; }

  int device = 0;
  int smem_optin = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) {
    status = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (status != cudaSuccess) { return {str_cat("flash_attn2: ", cudaGetErrorString(status))}; }
  int const smem = best->smem_bytes();
  if (smem > smem_optin) {
    return {str_cat("flash_attn2: the head dim ", best->head_dim, " kernel needs ", smem, " bytes of shared memory per block; this GPU offers ", smem_optin)};
  }
  status = best->run(p, stream);
  if (status != cudaSuccess) {
    return {str_cat("flash_attn2: forward kernel launch failed: ", cudaGetErrorString(status))};
  }
  return {};
}

}  // namespace flash_attn2
