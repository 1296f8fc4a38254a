// Op schemas and their CUDA implementations. No logic here: see api/.
#include <Python.h>
#include <torch/library.h>

#include "api/fwd_api.h"

TORCH_LIBRARY(flash_attn2, m) {
  m.def("fwd(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal) -> (Tensor out, Tensor softmax_lse)");
  m.def("built_kernels() -> str", &flash_attn2::built_kernels_str);
}

TORCH_LIBRARY_IMPL(flash_attn2, CUDA, m) { m.impl("fwd", &flash_attn2::mha_fwd); }

// `import flash_attn2._C` loads this library, which registers the ops above; the module itself is empty.
static PyModuleDef flash_attn2_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&flash_attn2_module); }
