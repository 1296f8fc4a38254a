// Links flash_attn2 through find_package and calls it. Needs no GPU: it lists the compiled kernels
// and checks that a bad argument comes back as an error status.
#include <cstdio>

#include <flash_attn2/flash_attn2.h>

int main() {
  std::printf("flash_attn2 %s kernels:\n%s", flash_attn2::kVersion, flash_attn2::built_kernels().c_str());
  flash_attn2::FwdParams params;  // head_dim 0: refused before any CUDA call
  flash_attn2::Status const status = flash_attn2::fwd(params, nullptr);
  std::printf("refused as expected: %s\n", status.message.c_str());
  return status.ok() || flash_attn2::built_kernels().empty() ? 1 : 0;
}
