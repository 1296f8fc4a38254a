"""The torch-free C++ library (CMakeLists.txt) and the Python op run the same kernels: on the same inputs
they must give the same bits.

Needs a GPU, the Python extension, and the CMake build's example program, named by the environment
variable FLASH_ATTN2_CPP_EXAMPLE (e.g. build/fwd_example); skipped otherwise. Both builds must target
the same arch so that the same machine code runs.
"""

import math
import os
import subprocess

import pytest
import torch

pytestmark = pytest.mark.requires_cuda

EXAMPLE = os.environ.get("FLASH_ATTN2_CPP_EXAMPLE", "")


def _load(path, dtype, shape):
    data = torch.frombuffer(bytearray(open(path, "rb").read()), dtype=dtype)
    return data.view(shape)


@pytest.mark.skipif(not os.path.isfile(EXAMPLE), reason="FLASH_ATTN2_CPP_EXAMPLE does not name the built fwd_example")
def test_cpp_forward_is_bitwise_the_python_op(tmp_path):
    result = subprocess.run([EXAMPLE, "--dump", str(tmp_path)], capture_output=True, text=True)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, causal = map(
        int, (tmp_path / "case.txt").read_text().split()
    )
    q = _load(tmp_path / "q.bin", torch.bfloat16, (batch, seqlen_q, heads, head_dim)).cuda()
    k = _load(tmp_path / "k.bin", torch.bfloat16, (batch, seqlen_k, heads_k, head_dim)).cuda()
    v = _load(tmp_path / "v.bin", torch.bfloat16, (batch, seqlen_k, heads_k, head_dim)).cuda()
    out_cpp = _load(tmp_path / "out.bin", torch.bfloat16, (batch, seqlen_q, heads, head_dim)).cuda()
    lse_cpp = _load(tmp_path / "lse.bin", torch.float32, (batch, heads, seqlen_q)).cuda()
    out, lse = torch.ops.flash_attn2.fwd(q, k, v, 1.0 / math.sqrt(head_dim), bool(causal))
    assert torch.equal(out, out_cpp)
    assert torch.equal(lse, lse_cpp)
