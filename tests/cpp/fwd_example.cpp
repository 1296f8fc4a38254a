// flash_attn2's C++ API on raw device pointers: runs the forward on deterministic pseudo-random bf16
// data for every compiled bf16 kernel of the smallest head dim, and checks it against a CPU reference
// in double precision. Exits 0 on success, 1 on a wrong result, 77 (CTest: skipped) without a GPU.
//
//   fwd_example [--dump DIR]
//
// --dump writes the inputs and outputs of the last case (q.bin k.bin v.bin out.bin lse.bin, raw, and
// case.txt with the shape) so tests/test_cpp_library_gpu.py can check that the Python op gives the
// same bits on the same inputs.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "example_common.h"

namespace {

using namespace example;

struct Case {
  int batch = 2, seqlen_q = 200, seqlen_k = 333, heads = 4, heads_k = 2, head_dim = 0;
  bool causal = false;
};

// stdio rather than iostreams: see csrc/common/strings.h.
template <class T>
void write_file(std::string const& path, std::vector<T> const& data) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr || std::fwrite(data.data(), sizeof(T), data.size(), f) != data.size()) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(1);
  }
  std::fclose(f);
}

// Runs one case; true when out and lse match the reference (an lse of +inf must be +inf in both).
bool run_case(Case const& c, char const* dump_dir) {
  size_t const q_elems = size_t(c.batch) * c.seqlen_q * c.heads * c.head_dim;
  size_t const kv_elems = size_t(c.batch) * c.seqlen_k * c.heads_k * c.head_dim;
  auto const q = random_bf16(q_elems, 1), k = random_bf16(kv_elems, 2), v = random_bf16(kv_elems, 3);

  flash_attn2::FwdParams p;
  p.q = to_device(q);
  p.k = to_device(k);
  p.v = to_device(v);
  __nv_bfloat16* out_dev = nullptr;
  CHECK_CUDA(cudaMalloc(&out_dev, q_elems * sizeof(__nv_bfloat16)));
  p.out = out_dev;
  p.batch = c.batch, p.seqlen_q = c.seqlen_q, p.seqlen_k = c.seqlen_k;
  p.num_heads = c.heads, p.num_heads_k = c.heads_k, p.head_dim = c.head_dim;
  p.q_row_stride = int64_t(c.heads) * c.head_dim, p.q_head_stride = c.head_dim;
  p.q_batch_stride = p.q_row_stride * c.seqlen_q;
  p.k_row_stride = p.v_row_stride = int64_t(c.heads_k) * c.head_dim;
  p.k_head_stride = p.v_head_stride = c.head_dim;
  p.k_batch_stride = p.v_batch_stride = p.k_row_stride * c.seqlen_k;
  p.out_row_stride = p.q_row_stride, p.out_head_stride = p.q_head_stride, p.out_batch_stride = p.q_batch_stride;
  p.softmax_scale = float(1.0 / std::sqrt(double(c.head_dim)));
  p.dtype = flash_attn2::DType::kBf16;
  p.mask = c.causal ? flash_attn2::MaskMode::kCausal : flash_attn2::MaskMode::kNone;
  float* lse_dev = nullptr;
  CHECK_CUDA(cudaMalloc(&lse_dev, flash_attn2::fwd_lse_bytes(p)));
  p.softmax_lse = lse_dev;

  flash_attn2::Status const status = flash_attn2::fwd(p, /*stream=*/nullptr);
  if (!status.ok()) {
    std::fprintf(stderr, "fwd failed: %s\n", status.message.c_str());
    return false;
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<__nv_bfloat16> out(q_elems);
  std::vector<float> lse(size_t(c.batch) * c.heads * c.seqlen_q);
  CHECK_CUDA(cudaMemcpy(out.data(), out_dev, out.size() * sizeof(out[0]), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(lse.data(), lse_dev, lse.size() * sizeof(float), cudaMemcpyDeviceToHost));

  // Reference in double on the same bf16 inputs.
  double max_err = 0, max_lse_err = 0;
  int const group = c.heads / c.heads_k;
  std::vector<double> scores(c.seqlen_k);
  for (int b = 0; b < c.batch; ++b) {
    for (int h = 0; h < c.heads; ++h) {
      int const hk = h / group;
      for (int i = 0; i < c.seqlen_q; ++i) {
        auto qv = [&](int d) { return double(__bfloat162float(q[((size_t(b) * c.seqlen_q + i) * c.heads + h) * c.head_dim + d])); };
        auto kv = [&](std::vector<__nv_bfloat16> const& t, int j, int d) {
          return double(__bfloat162float(t[((size_t(b) * c.seqlen_k + j) * c.heads_k + hk) * c.head_dim + d]));
        };
        double row_max = -INFINITY;
        for (int j = 0; j < c.seqlen_k; ++j) {
          bool const visible = !c.causal || j <= i + c.seqlen_k - c.seqlen_q;
          double s = -INFINITY;
          if (visible) {
            s = 0;
            for (int d = 0; d < c.head_dim; ++d) { s += qv(d) * kv(k, j, d); }
            s *= p.softmax_scale;
          }
          scores[j] = s;
          row_max = std::fmax(row_max, s);
        }
        double sum = 0;
        for (int j = 0; j < c.seqlen_k; ++j) { sum += row_max == -INFINITY ? 0.0 : std::exp(scores[j] - row_max); }
        double const ref_lse = sum == 0 ? INFINITY : row_max + std::log(sum);
        float const got_lse = lse[(size_t(b) * c.heads + h) * c.seqlen_q + i];
        if (!(std::isinf(ref_lse) && std::isinf(got_lse))) { max_lse_err = std::fmax(max_lse_err, std::fabs(got_lse - ref_lse)); }
        for (int d = 0; d < c.head_dim; ++d) {
          double ref = 0;
          for (int j = 0; j < c.seqlen_k && sum > 0; ++j) { ref += std::exp(scores[j] - row_max) / sum * kv(v, j, d); }
          double const got = __bfloat162float(out[((size_t(b) * c.seqlen_q + i) * c.heads + h) * c.head_dim + d]);
          max_err = std::isnan(got) ? INFINITY : std::fmax(max_err, std::fabs(got - ref));
        }
      }
    }
  }
  // bf16 output: half an ulp near |out| ~ 1 is 2^-8; P is rounded to bf16 before P V as well.
  constexpr double kOutTolerance = 2e-2, kLseTolerance = 1e-3;
  bool const ok = max_err <= kOutTolerance && max_lse_err <= kLseTolerance;
  std::printf("bf16 hdim %d %s b=%d s_q=%d s_k=%d h=%d h_k=%d: max |out - ref| %.2e, max |lse - ref| %.2e: %s\n",
              c.head_dim, c.causal ? "causal" : "none", c.batch, c.seqlen_q, c.seqlen_k, c.heads, c.heads_k, max_err,
              max_lse_err, ok ? "ok" : "WRONG");

  if (dump_dir != nullptr) {
    std::string const dir(dump_dir);
    write_file(dir + "/q.bin", q);
    write_file(dir + "/k.bin", k);
    write_file(dir + "/v.bin", v);
    write_file(dir + "/out.bin", out);
    write_file(dir + "/lse.bin", lse);
    std::FILE* f = std::fopen((dir + "/case.txt").c_str(), "w");
    std::fprintf(f, "%d %d %d %d %d %d %d\n", c.batch, c.seqlen_q, c.seqlen_k, c.heads, c.heads_k, c.head_dim,
                 int(c.causal));
    std::fclose(f);
  }
  CHECK_CUDA(cudaFree(const_cast<void*>(p.q)));
  CHECK_CUDA(cudaFree(const_cast<void*>(p.k)));
  CHECK_CUDA(cudaFree(const_cast<void*>(p.v)));
  CHECK_CUDA(cudaFree(out_dev));
  CHECK_CUDA(cudaFree(lse_dev));
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  char const* dump_dir = (argc == 3 && std::strcmp(argv[1], "--dump") == 0) ? argv[2] : nullptr;
  if (!has_device()) {
    std::printf("fwd_example: no CUDA device; skipped\n");
    return kSkipped;
  }
  std::vector<Case> cases;
  for (auto const& [head_dim, causal] : smallest_bf16_kernels("fwd")) {
    Case c;
    c.head_dim = head_dim;
    c.causal = causal;
    cases.push_back(c);
  }
  if (cases.empty()) {
    std::fprintf(stderr, "fwd_example: this build has no bf16 forward kernel\n");
    return 1;
  }
  bool ok = true;
  for (Case const& c : cases) { ok = run_case(c, dump_dir) && ok; }

  // A bad argument is an error status with a message, never a crash.
  flash_attn2::FwdParams bad;
  bad.head_dim = 12;
  flash_attn2::Status const refused = flash_attn2::fwd(bad, nullptr);
  std::printf("head_dim 12 refused: %s\n", refused.ok() ? "NO" : refused.message.c_str());
  ok = ok && !refused.ok();
  return ok ? 0 : 1;
}
