"""Variable-length (packed) batches on the CUDA kernels: the same kernels as the dense path, with
per-sequence offsets from cu_seqlens. Pass rule as in test_forward_gpu.py (flash-attn's 2x rule against
the float32 reference, computed per sequence), on NaN-poisoned memory.
"""

import pytest
import torch
from kernel_grid import plain_kernels
from packing import cu_seqlens

from flash_attn2 import flash_attn_func, flash_attn_varlen_func, flash_attn_varlen_qkvpacked_func
from flash_attn2.bert_padding import pad_input, unpad_input
from flash_attn2.reference import attention_ref_varlen

pytestmark = pytest.mark.requires_cuda

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
KERNELS = plain_kernels()
NHEADS = 8

LENGTHS = {
    "mixed": ([113, 0, 1, 1000, 7, 257], [200, 5, 0, 1000, 64, 129]),  # lengths 0 and 1, none a tile multiple
    "one_long": ([3, 2048, 5, 1], [3, 2048, 9, 17]),                  # one sequence much longer than the others
    "decode": ([1, 1, 1], [513, 1, 4096]),                              # one query per sequence
}


def _kernels_near_128():
    best = {}
    for kernel in KERNELS:
        key = (kernel.dtype, kernel.mask)
        if key not in best or abs(kernel.head_dim - 128) < abs(best[key].head_dim - 128):
            best[key] = kernel
    params = [pytest.param(k, id=f"{k.dtype}-d{k.head_dim}-{k.mask}") for k in sorted(best.values())]
    return params or [pytest.param(None, marks=pytest.mark.skip(reason="no compiled kernel"))]



def packed(total, heads, head_dim, dtype):
    return torch.randn(total, heads, head_dim, dtype=dtype, device="cuda")


@pytest.mark.parametrize("nheads_k", [1, 2, NHEADS])
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=list(LENGTHS))
@pytest.mark.parametrize("kernel", _kernels_near_128())
def test_varlen_matches_reference(kernel, lengths, nheads_k):
    lens_q, lens_k = LENGTHS[lengths]
    causal, dtype, d = kernel.mask == "causal", TORCH_DTYPES[kernel.dtype], kernel.head_dim
    cu_q, cu_k = cu_seqlens(lens_q, "cuda"), cu_seqlens(lens_k, "cuda")
    q, k, v = packed(sum(lens_q), NHEADS, d, dtype), packed(sum(lens_k), nheads_k, d, dtype), packed(sum(lens_k), nheads_k, d, dtype)
    # Poison the allocator with blocks of the outputs' sizes; max_seqlen larger than the true maxima.
    del_me = (torch.full_like(q, float("nan")), torch.full((NHEADS, q.shape[0]), float("nan"), device="cuda"))
    del del_me
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q) + 100, max(lens_k) + 3, causal=causal,
                                         return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (NHEADS, q.shape[0]) and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    ref_out, ref_lse = attention_ref_varlen(q, k, v, cu_q, cu_k, causal=causal)
    lowp_out, _ = attention_ref_varlen(q, k, v, cu_q, cu_k, causal=causal, upcast=False)
    error = (out.float() - ref_out).abs().max().item()
    baseline = (lowp_out.float() - ref_out).abs().max().item()
    assert error <= 2 * baseline + 1e-5, f"max |out - ref| = {error:.3g} > 2 * {baseline:.3g} + 1e-5"
    assert torch.equal(torch.isposinf(lse), torch.isposinf(ref_lse))
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kernel", _kernels_near_128())
def test_varlen_with_equal_lengths_is_bitwise_the_dense_path(kernel):
    """Same kernel, same tiles, same order: a packed batch of equal lengths gives the dense bits."""
    causal, dtype, d = kernel.mask == "causal", TORCH_DTYPES[kernel.dtype], kernel.head_dim
    batch, seqlen = 3, 333
    q, k, v = (torch.randn(batch, seqlen, NHEADS, d, dtype=dtype, device="cuda") for _ in range(3))
    dense_out, dense_lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    cu = cu_seqlens([seqlen] * batch, "cuda")
    out, lse, _ = flash_attn_varlen_func(
        *(t.reshape(batch * seqlen, NHEADS, d) for t in (q, k, v)), cu, cu, seqlen, seqlen, causal=causal,
        return_attn_probs=True,
    )
    assert torch.equal(out.reshape(batch, seqlen, NHEADS, d), dense_out)
    assert torch.equal(lse.reshape(NHEADS, batch, seqlen).transpose(0, 1), dense_lse)


@pytest.mark.parametrize("kernel", _kernels_near_128())
def test_unpad_varlen_pad_equals_dense_on_the_real_tokens(kernel):
    """bert_padding round trip: padded batch -> unpad -> varlen -> pad, against the dense path per sequence."""
    causal, dtype, d = kernel.mask == "causal", TORCH_DTYPES[kernel.dtype], kernel.head_dim
    batch, seqlen, lengths = 4, 300, [300, 17, 1, 150]
    mask = torch.arange(seqlen, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
    qkv = torch.randn(batch, seqlen, 3, NHEADS, d, dtype=dtype, device="cuda")
    qkv_unpad, indices, cu, max_seqlen, seqused = unpad_input(qkv, mask)
    assert max_seqlen == max(lengths) and seqused.tolist() == lengths
    out = pad_input(flash_attn_varlen_qkvpacked_func(qkv_unpad, cu, max_seqlen, causal=causal), indices, batch, seqlen)
    for b, length in enumerate(lengths):
        q, k, v = qkv[b : b + 1, :length].unbind(2)
        expected = flash_attn_func(q, k, v, causal=causal)
        assert torch.equal(out[b : b + 1, :length], expected)
        assert not out[b, length:].any()


@pytest.mark.parametrize("kernel", _kernels_near_128())
def test_varlen_compiles_without_graph_break(kernel):
    causal, dtype, d = kernel.mask == "causal", TORCH_DTYPES[kernel.dtype], kernel.head_dim
    lens = [5, 100, 33]
    cu = cu_seqlens(lens, "cuda")
    q, k, v = (packed(sum(lens), NHEADS, d, dtype) for _ in range(3))

    def step(q, k, v, cu):
        return flash_attn_varlen_func(q, k, v, cu, cu, 128, 128, causal=causal)

    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(q, k, v, cu), step(q, k, v, cu))


def test_varlen_is_capturable_in_a_cuda_graph():
    """No host synchronisation inside the call: capture once, replay with new lengths in place."""
    kernel = next((k for k in KERNELS if k.mask == "none"), None)
    if kernel is None:
        pytest.skip("no non-causal kernel compiled")
    dtype, d = TORCH_DTYPES[kernel.dtype], kernel.head_dim
    total = 400
    q, k, v = (packed(total, NHEADS, d, dtype) for _ in range(3))
    cu = cu_seqlens([100, 300], "cuda")
    flash_attn_varlen_func(q, k, v, cu, cu, 512, 512)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flash_attn_varlen_func(q, k, v, cu, cu, 512, 512)
    cu.copy_(cu_seqlens([250, 150], "cuda"))
    graph.replay()
    torch.cuda.synchronize()
    ref, _ = attention_ref_varlen(q, k, v, cu, cu)
    lowp, _ = attention_ref_varlen(q, k, v, cu, cu, upcast=False)
    assert (out.float() - ref).abs().max() <= 2 * (lowp.float() - ref).abs().max() + 1e-5
