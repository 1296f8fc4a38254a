// Helpers shared by the C++ examples (fwd_example.cpp, bwd_example.cpp): CUDA error checks,
// deterministic bf16 inputs, host <-> device copies, and the kernels a build offers.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "flash_attn2/flash_attn2.h"

namespace example {

constexpr int kSkipped = 77;  // CTest's SKIP_RETURN_CODE: no CUDA device

#define CHECK_CUDA(expr)                                                        \
  do {                                                                          \
    cudaError_t err_ = (expr);                                                  \
    if (err_ != cudaSuccess) {                                                  \
      std::fprintf(stderr, "%s failed: %s\n", #expr, cudaGetErrorString(err_)); \
      std::exit(1);                                                             \
    }                                                                           \
  } while (0)

// Deterministic inputs: a 64-bit LCG mapped to [-2, 2), rounded to bf16.
inline std::vector<__nv_bfloat16> random_bf16(size_t n, uint64_t seed) {
  std::vector<__nv_bfloat16> out(n);
  uint64_t state = seed * 6364136223846793005ull + 1442695040888963407ull;
  for (size_t i = 0; i < n; ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    float const u = float(state >> 40) / float(1ull << 24);  // [0, 1)
    out[i] = __float2bfloat16(4.f * u - 2.f);
  }
  return out;
}

template <class T>
T* to_device(std::vector<T> const& host) {
  T* ptr = nullptr;
  CHECK_CUDA(cudaMalloc(&ptr, host.size() * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return ptr;
}

template <class T>
std::vector<T> to_host(void const* dev, size_t n) {
  std::vector<T> host(n);
  CHECK_CUDA(cudaMemcpy(host.data(), dev, n * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

inline bool has_device() {
  int devices = 0;
  return cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
}

// The bf16 kernels of `direction` ("fwd" or "bwd") with the smallest compiled head dim: one
// (head dim, causal) pair per plain mask (none, causal), from built_kernels().
inline std::vector<std::pair<int, bool>> smallest_bf16_kernels(char const* direction) {
  std::string const built = flash_attn2::built_kernels();
  int smallest = 1 << 30;
  std::vector<std::pair<int, bool>> kernels;
  for (size_t start = 0, end; start < built.size(); start = end + 1) {
    end = built.find('\n', start);
    if (end == std::string::npos) { end = built.size(); }
    char dir[8], dtype[8], mask[8], modifiers[8];
    int head_dim = 0;
    if (std::sscanf(built.substr(start, end - start).c_str(), "%7s %7s %d %7s %7s", dir, dtype, &head_dim, mask,
                    modifiers) != 5 ||
        std::strcmp(modifiers, "plain") != 0 || std::strcmp(mask, "local") == 0) {
      continue;  // the examples exercise the plain masks
    }
    if (std::strcmp(dir, direction) == 0 && std::strcmp(dtype, "bf16") == 0 && head_dim <= smallest) {
      if (head_dim < smallest) { kernels.clear(); }
      smallest = head_dim;
      kernels.emplace_back(head_dim, std::strcmp(mask, "causal") == 0);
    }
  }
  return kernels;
}

}  // namespace example
