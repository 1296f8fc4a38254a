// Op schemas and their CUDA implementations. No logic here: see api/.
#include <Python.h>
#include <torch/library.h>

#include "api/torch_api.h"
#include "flash_attn2/flash_attn2.h"

TORCH_LIBRARY(flash_attn2, m) {
  // Variable-length batches are optional arguments of the same op: with cu_seqlens_q/k, q, k and v are
  // packed (total, heads, head_dim) and max_seqlen_q bounds the q lengths.
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal, Tensor? cu_seqlens_q=None, "
      "Tensor? cu_seqlens_k=None, int max_seqlen_q=0, int max_seqlen_k=0, int window_left=-1, int window_right=-1, "
      "float softcap=0.0, Tensor? alibi_slopes=None, float dropout_p=0.0, Tensor? rng_state=None) "
      "-> (Tensor out, Tensor softmax_lse)");
  // Gradients of fwd from the forward's inputs and outputs; dk, dv have k's and v's shapes (GQA reduced).
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, float softmax_scale, "
      "bool causal, bool deterministic, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
      "int max_seqlen_q=0, int max_seqlen_k=0, int window_left=-1, int window_right=-1, float softcap=0.0, "
      "Tensor? alibi_slopes=None, float dropout_p=0.0, Tensor? rng_state=None) -> (Tensor dq, Tensor dk, Tensor dv)");
  // The dropout keep mask fwd and bwd apply for rng_state (bool (batch, heads, seqlen_q, seqlen_k)); for tests.
  m.def(
      "dropout_mask(Tensor rng_state, int batch, int num_heads, int seqlen_q, int seqlen_k, float dropout_p, "
      "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None) -> Tensor");
  // Attention over a KV cache, forward only; appends k, v to the caches in place (hence the (a!), (b!)).
  m.def(
      "fwd_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, Tensor? rotary_cos, "
      "Tensor? rotary_sin, Tensor cache_seqlens, Tensor? cache_batch_idx, Tensor? cache_leftpad, "
      "Tensor? block_table, float softmax_scale, bool causal, int window_left, int window_right, float softcap, "
      "bool rotary_interleaved, Tensor? alibi_slopes, int num_splits) -> (Tensor out, Tensor softmax_lse)");
}

TORCH_LIBRARY_IMPL(flash_attn2, CUDA, m) {
  m.impl("fwd", &flash_attn2::mha_fwd);
  m.impl("bwd", &flash_attn2::mha_bwd);
  m.impl("dropout_mask", &flash_attn2::mha_dropout_mask);
  m.impl("fwd_kvcache", &flash_attn2::mha_fwd_kvcache);
}

// `import flash_attn2._C` loads this library, which registers the ops above. The module itself offers
// one plain function, built_kernels(), the list of compiled kernels (no tensors: not an op).
static PyObject* built_kernels(PyObject*, PyObject*) {
  return PyUnicode_FromString(flash_attn2::built_kernels().c_str());
}
static PyMethodDef flash_attn2_methods[] = {
    {"built_kernels", built_kernels, METH_NOARGS,
     "Compiled kernels, one per line: '<dir> <dtype> <hdim> <mask> <plain|mod>'."},
    {nullptr, nullptr, 0, nullptr},
};
static PyModuleDef flash_attn2_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, flash_attn2_methods};
PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&flash_attn2_module); }
