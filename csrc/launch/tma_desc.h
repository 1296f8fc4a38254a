// Host side of the TMA loads (collective/tma_copy.h): tensor maps of 16-bit (rows, head_dim) operands,
// encoded through the driver's cuTensorMapEncodeTiled, reached through the runtime's entry-point query so
// that the library links no libcuda of its own.
#pragma once

#include <cstdint>

#include <cuda.h>
#include <cuda_runtime.h>

namespace flash_attn2 {

// The driver function's type, from its declaration in cuda.h (nothing links against it).
using TensorMapEncodeTiled = decltype(&cuTensorMapEncodeTiled);

inline TensorMapEncodeTiled tensor_map_encoder() {
  static TensorMapEncodeTiled const encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<TensorMapEncodeTiled>(fn);
  }();
  return encode;
}

// A map of the (batch, seqlen, heads, head_dim) operand at `base` (strides in elements, head_dim's 1)
// whose boxes are (box_cols, box_rows) of one (batch, head), with the 128-byte swizzle and zeros outside
// the tensor. False where TMA cannot address it (alignment, strides) or the driver refuses: the caller
// keeps its other load path.
inline bool encode_rows_map(CUtensorMap* map, bool bf16, void const* base, int64_t batch, int64_t seqlen, int64_t heads,
                            int64_t head_dim, int64_t batch_stride, int64_t row_stride, int64_t head_stride,
                            int box_cols, int box_rows) {
  constexpr int64_t kElemBytes = 2;
  auto const encode = tensor_map_encoder();
  if (encode == nullptr || (reinterpret_cast<uintptr_t>(base) % 16) != 0) { return false; }
  if (box_cols * kElemBytes != 128 || box_rows < 1 || box_rows > 256) { return false; }
  // A dimension of extent 1 may have any stride: give it a harmless one.
  if (batch == 1) { batch_stride = 8; }
  if (heads == 1) { head_stride = 8; }
  int64_t const strides[3] = {row_stride, head_stride, batch_stride};
  cuuint64_t dims[4] = {cuuint64_t(head_dim), cuuint64_t(seqlen), cuuint64_t(heads), cuuint64_t(batch)};
  cuuint64_t bytes[3];
  for (int i = 0; i < 3; ++i) {
    int64_t const b = strides[i] * kElemBytes;
    if (b <= 0 || b % 16 != 0 || b >= (int64_t(1) << 40)) { return false; }
    bytes[i] = cuuint64_t(b);
  }
  for (cuuint64_t d : dims) {
    if (d == 0 || d > (cuuint64_t(1) << 32)) { return false; }
  }
  cuuint32_t const box[4] = {cuuint32_t(box_cols), cuuint32_t(box_rows), 1, 1};
  cuuint32_t const elem_strides[4] = {1, 1, 1, 1};
  CUresult const r = encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                            const_cast<void*>(base), dims, bytes, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

}  // namespace flash_attn2
