// flash_attn2's C++ backward on raw device pointers: forward, then backward (atomic and deterministic
// modes) on deterministic pseudo-random bf16 data with GQA, for every compiled bf16 backward kernel of
// the smallest head dim; dq, dk, dv are checked against a CPU reference in double precision, and the
// deterministic mode is run twice and compared byte for byte. Exits 0 on success, 1 on a wrong result,
// 77 (CTest: skipped) without a GPU.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "example_common.h"

namespace {

using namespace example;

struct Case {
  int batch = 2, seqlen_q = 100, seqlen_k = 150, heads = 4, heads_k = 2, head_dim = 0;
  bool causal = false;
};

double to_double(__nv_bfloat16 x) { return double(__bfloat162float(x)); }

// Max |got - ref| over a tensor, NaN counting as infinite.
double max_error(std::vector<double> const& got, std::vector<double> const& ref) {
  double err = 0;
  for (size_t i = 0; i < ref.size(); ++i) { err = std::isnan(got[i]) ? INFINITY : std::fmax(err, std::fabs(got[i] - ref[i])); }
  return err;
}

double max_abs(std::vector<double> const& t) {
  double m = 0;
  for (double x : t) { m = std::fmax(m, std::fabs(x)); }
  return m;
}

bool run_case(Case const& c) {
  int const d = c.head_dim, group = c.heads / c.heads_k;
  size_t const q_elems = size_t(c.batch) * c.seqlen_q * c.heads * d;
  size_t const kv_elems = size_t(c.batch) * c.seqlen_k * c.heads_k * d;
  size_t const kv_per_q_head = size_t(c.batch) * c.seqlen_k * c.heads * d;  // GQA: dk/dv per query head
  auto const q = random_bf16(q_elems, 11), k = random_bf16(kv_elems, 12), v = random_bf16(kv_elems, 13);
  auto const dout = random_bf16(q_elems, 14);

  flash_attn2::BwdParams p;
  p.q = to_device(q), p.k = to_device(k), p.v = to_device(v), p.dout = to_device(dout);
  void *out = nullptr, *dq = nullptr, *dk = nullptr, *dv = nullptr, *workspace = nullptr;
  float* lse = nullptr;
  CHECK_CUDA(cudaMalloc(&out, q_elems * 2));
  CHECK_CUDA(cudaMalloc(&dq, q_elems * 2));
  CHECK_CUDA(cudaMalloc(&dk, kv_per_q_head * 2));
  CHECK_CUDA(cudaMalloc(&dv, kv_per_q_head * 2));
  p.out = out, p.dq = dq, p.dk = dk, p.dv = dv;
  p.batch = c.batch, p.seqlen_q = c.seqlen_q, p.seqlen_k = c.seqlen_k;
  p.num_heads = c.heads, p.num_heads_k = c.heads_k, p.head_dim = d;
  int64_t const q_row = int64_t(c.heads) * d, kv_row = int64_t(c.heads_k) * d;
  p.q_row_stride = p.out_row_stride = p.dout_row_stride = p.dq_row_stride = q_row;
  p.q_head_stride = p.out_head_stride = p.dout_head_stride = p.dq_head_stride = d;
  p.q_batch_stride = p.out_batch_stride = p.dout_batch_stride = p.dq_batch_stride = q_row * c.seqlen_q;
  p.k_row_stride = p.v_row_stride = kv_row;
  p.k_head_stride = p.v_head_stride = d;
  p.k_batch_stride = p.v_batch_stride = kv_row * c.seqlen_k;
  p.dk_row_stride = p.dv_row_stride = q_row;  // (batch, seqlen_k, heads, d)
  p.dk_head_stride = p.dv_head_stride = d;
  p.dk_batch_stride = p.dv_batch_stride = q_row * c.seqlen_k;
  p.softmax_scale = float(1.0 / std::sqrt(double(d)));
  p.dtype = flash_attn2::DType::kBf16;
  p.mask = c.causal ? flash_attn2::MaskMode::kCausal : flash_attn2::MaskMode::kNone;
  CHECK_CUDA(cudaMalloc(&lse, flash_attn2::fwd_lse_bytes(p)));
  p.softmax_lse = lse;

  flash_attn2::Status status = flash_attn2::fwd(p, nullptr);
  if (!status.ok()) {
    std::fprintf(stderr, "fwd failed: %s\n", status.message.c_str());
    return false;
  }

  // Reference gradients in double, dk/dv per kv head.
  std::vector<double> ref_dq(q_elems, 0.0), ref_dk(kv_elems, 0.0), ref_dv(kv_elems, 0.0);
  std::vector<double> prob(c.seqlen_k), dprob(c.seqlen_k);
  double const scale = p.softmax_scale;
  for (int b = 0; b < c.batch; ++b) {
    for (int h = 0; h < c.heads; ++h) {
      int const hk = h / group;
      auto qi = [&](int i, int e) { return ((size_t(b) * c.seqlen_q + i) * c.heads + h) * d + e; };
      auto kj = [&](int j, int e) { return ((size_t(b) * c.seqlen_k + j) * c.heads_k + hk) * d + e; };
      for (int i = 0; i < c.seqlen_q; ++i) {
        double row_max = -INFINITY;
        for (int j = 0; j < c.seqlen_k; ++j) {
          double s = -INFINITY;
          if (!c.causal || j <= i + c.seqlen_k - c.seqlen_q) {
            s = 0;
            for (int e = 0; e < d; ++e) { s += to_double(q[qi(i, e)]) * to_double(k[kj(j, e)]); }
            s *= scale;
          }
          prob[j] = s;
          row_max = std::fmax(row_max, s);
        }
        if (row_max == -INFINITY) { continue; }  // a row that sees no key: zero gradients
        double sum = 0;
        for (int j = 0; j < c.seqlen_k; ++j) { sum += (prob[j] = std::exp(prob[j] - row_max)); }
        double row_dot = 0;  // rowsum(dO o O)
        for (int j = 0; j < c.seqlen_k; ++j) {
          prob[j] /= sum;
          double dp = 0;
          for (int e = 0; e < d; ++e) { dp += to_double(dout[qi(i, e)]) * to_double(v[kj(j, e)]); }
          dprob[j] = dp;
          row_dot += prob[j] * dp;
        }
        for (int j = 0; j < c.seqlen_k; ++j) {
          double const ds = prob[j] * (dprob[j] - row_dot);
          for (int e = 0; e < d; ++e) {
            ref_dq[qi(i, e)] += scale * ds * to_double(k[kj(j, e)]);
            ref_dk[kj(j, e)] += scale * ds * to_double(q[qi(i, e)]);
            ref_dv[kj(j, e)] += prob[j] * to_double(dout[qi(i, e)]);
          }
        }
      }
    }
  }

  bool ok = true;
  std::vector<__nv_bfloat16> first[3];
  for (bool deterministic : {false, true, true}) {
    p.deterministic = deterministic;
    size_t const bytes = flash_attn2::bwd_workspace_bytes(p);
    CHECK_CUDA(cudaMalloc(&workspace, bytes > 0 ? bytes : 1));  // cudaMalloc aligns to 256 bytes
    p.workspace = workspace;
    status = flash_attn2::bwd(p, nullptr);
    if (!status.ok()) {
      std::fprintf(stderr, "bwd failed: %s\n", status.message.c_str());
      return false;
    }
    CHECK_CUDA(cudaDeviceSynchronize());
    CHECK_CUDA(cudaFree(workspace));
    auto const got_dq16 = to_host<__nv_bfloat16>(dq, q_elems);
    auto const got_dk16 = to_host<__nv_bfloat16>(dk, kv_per_q_head);
    auto const got_dv16 = to_host<__nv_bfloat16>(dv, kv_per_q_head);
    std::vector<double> got_dq(q_elems), got_dk(kv_elems, 0.0), got_dv(kv_elems, 0.0);
    for (size_t i = 0; i < q_elems; ++i) { got_dq[i] = to_double(got_dq16[i]); }
    // The caller's half of GQA: sum each group of query heads into its kv head.
    for (size_t row = 0; row < size_t(c.batch) * c.seqlen_k; ++row) {
      for (int h = 0; h < c.heads; ++h) {
        for (int e = 0; e < d; ++e) {
          size_t const src = (row * c.heads + h) * d + e, dst = (row * c.heads_k + h / group) * d + e;
          got_dk[dst] += to_double(got_dk16[src]);
          got_dv[dst] += to_double(got_dv16[src]);
        }
      }
    }
    // bf16 gradients: errors relative to each gradient's largest entry (P and dS are rounded to bf16
    // before their matmuls, like the output).
    constexpr double kRelTolerance = 2e-2;
    double const e_dq = max_error(got_dq, ref_dq) / std::fmax(max_abs(ref_dq), 1e-3);
    double const e_dk = max_error(got_dk, ref_dk) / std::fmax(max_abs(ref_dk), 1e-3);
    double const e_dv = max_error(got_dv, ref_dv) / std::fmax(max_abs(ref_dv), 1e-3);
    bool const close = e_dq <= kRelTolerance && e_dk <= kRelTolerance && e_dv <= kRelTolerance;
    std::printf("bf16 hdim %d %s%s b=%d s_q=%d s_k=%d h=%d h_k=%d: max relative error dq %.2e dk %.2e dv %.2e: %s\n",
                d, c.causal ? "causal" : "none", deterministic ? " deterministic" : "", c.batch, c.seqlen_q,
                c.seqlen_k, c.heads, c.heads_k, e_dq, e_dk, e_dv, close ? "ok" : "WRONG");
    ok = ok && close;
    if (deterministic) {
      if (first[0].empty()) {
        first[0] = got_dq16, first[1] = got_dk16, first[2] = got_dv16;
      } else {
        bool const same = std::memcmp(first[0].data(), got_dq16.data(), q_elems * 2) == 0 &&
                          std::memcmp(first[1].data(), got_dk16.data(), kv_per_q_head * 2) == 0 &&
                          std::memcmp(first[2].data(), got_dv16.data(), kv_per_q_head * 2) == 0;
        std::printf("  deterministic rerun bitwise identical: %s\n", same ? "yes" : "NO");
        ok = ok && same;
      }
    }
  }
  for (void const* ptr : {p.q, p.k, p.v, p.dout}) { CHECK_CUDA(cudaFree(const_cast<void*>(ptr))); }
  for (void* ptr : {out, dq, dk, dv}) { CHECK_CUDA(cudaFree(ptr)); }
  CHECK_CUDA(cudaFree(lse));
  return ok;
}

}  // namespace

int main() {
  if (!has_device()) {
    std::printf("bwd_example: no CUDA device; skipped\n");
    return kSkipped;
  }
  std::vector<Case> cases;
  for (auto const& [head_dim, causal] : smallest_bf16_kernels("bwd")) {
    Case c;
    c.head_dim = head_dim;
    c.causal = causal;
    cases.push_back(c);
  }
  if (cases.empty()) {
    std::fprintf(stderr, "bwd_example: this build has no bf16 backward kernel\n");
    return 1;
  }
  bool ok = true;
  for (Case const& c : cases) { ok = run_case(c) && ok; }

  // A missing workspace is an error status with a message, never a crash.
  flash_attn2::BwdParams bad;
  bad.batch = 1, bad.seqlen_q = bad.seqlen_k = 1, bad.head_dim = 64, bad.num_heads = bad.num_heads_k = 1;
  bad.softmax_scale = 1.f;
  flash_attn2::Status const refused = flash_attn2::bwd(bad, nullptr);
  std::printf("bwd without buffers refused: %s\n", refused.ok() ? "NO" : refused.message.c_str());
  return ok && !refused.ok() ? 0 : 1;
}
