"""torch.compile and torch.library checks of the CUDA op (skipped without CUDA and the extension).

The CUDA path must trace into one graph (``fullgraph=True``): validation reads only shapes, dtypes
and devices, and the environment checks are constant-folded at trace time."""

import pytest
import torch
from kernel_grid import plain_kernels

from flash_attn2 import _ops, flash_attn_func

pytestmark = pytest.mark.requires_cuda

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _kernel_params():
    """One compiled kernel per (dtype, mask), head dim closest to 128."""
    best = {}
    for kernel in plain_kernels():
        key = (kernel.dtype, kernel.mask)
        if key not in best or abs(kernel.head_dim - 128) < abs(best[key].head_dim - 128):
            best[key] = kernel
    params = [pytest.param(k, id=f"{k.dtype}-d{k.head_dim}-{k.mask}") for k in sorted(best.values())]
    return params or [pytest.param(None, marks=pytest.mark.skip(reason="no compiled kernel"))]


def make_qkv(seqlen_q, seqlen_k, head_dim, dtype, nheads=8, nheads_k=2):
    return (
        torch.randn(2, seqlen_q, nheads, head_dim, dtype=dtype, device="cuda"),
        torch.randn(2, seqlen_k, nheads_k, head_dim, dtype=dtype, device="cuda"),
        torch.randn(2, seqlen_k, nheads_k, head_dim, dtype=dtype, device="cuda"),
    )


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kernel", _kernel_params())
def test_compile_fullgraph_matches_eager(kernel):
    causal = kernel.mask == "causal"
    q, k, v = make_qkv(300, 257, kernel.head_dim, TORCH_DTYPES[kernel.dtype])

    def attention(q, k, v):
        return flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)[:2]

    out, lse = torch.compile(attention, fullgraph=True)(q, k, v)
    expected_out, expected_lse = attention(q, k, v)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)


@pytest.mark.parametrize("kernel", _kernel_params())
def test_compile_fullgraph_dynamic_seqlens(kernel):
    causal = kernel.mask == "causal"
    compiled = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), fullgraph=True, dynamic=True)
    for seqlen_q, seqlen_k in [(100, 300), (257, 129), (64, 64)]:
        q, k, v = make_qkv(seqlen_q, seqlen_k, kernel.head_dim, TORCH_DTYPES[kernel.dtype])
        assert torch.equal(compiled(q, k, v), flash_attn_func(q, k, v, causal=causal))


@pytest.mark.parametrize("kernel", _kernel_params())
def test_compile_fullgraph_pads_odd_head_dim(kernel):
    head_dim = kernel.head_dim - 3  # not a multiple of 8, served by this kernel
    causal = kernel.mask == "causal"
    q, k, v = make_qkv(200, 200, head_dim, TORCH_DTYPES[kernel.dtype])
    compiled = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), fullgraph=True)
    assert torch.equal(compiled(q, k, v), flash_attn_func(q, k, v, causal=causal))


@pytest.mark.parametrize("kernel", _kernel_params())
@pytest.mark.parametrize(
    "layout", ["contiguous", "gqa_sq_gt_sk", "head_dim_slice", "decode"],
)
def test_opcheck(kernel, layout):
    dtype, d = TORCH_DTYPES[kernel.dtype], kernel.head_dim
    if layout == "contiguous":
        q, k, v = make_qkv(128, 128, d, dtype, nheads_k=8)
    elif layout == "gqa_sq_gt_sk":
        q, k, v = make_qkv(300, 100, d, dtype)
    elif layout == "head_dim_slice":
        q, k, v = (t.repeat(1, 1, 1, 2)[..., d:] for t in make_qkv(113, 203, d, dtype))
    else:
        q, k, v = make_qkv(1, 999, d, dtype, nheads_k=1)
    torch.library.opcheck(torch.ops.flash_attn2.fwd.default, (q, k, v, d**-0.5, kernel.mask == "causal"))
