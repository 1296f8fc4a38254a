"""The CUDA forward kernels against the fp32 reference, over the grid of kernels this build compiled.

Pass rule (flash-attn's): the kernel's max error against the reference computed in float32 on the
same inputs may be at most twice the error of PyTorch doing the same math in the input precision,
plus 1e-5. Inputs are fresh ``randn`` (never zeros), and the allocator is filled with NaN before
each call so that any output element the kernel fails to write shows up as NaN.
"""

import pytest
import torch
from kernel_grid import grid_or_skip, kernel_id, one_kernel_per_dtype_and_mask, plain_kernels

from flash_attn2 import _ops, flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from flash_attn2.reference import attention_ref

pytestmark = pytest.mark.requires_cuda

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
KERNELS = plain_kernels()
NHEADS = 8

SEQLENS = [
    (1, 1), (113, 203), (128, 128), (256, 256), (1023, 1024), (2048, 2048), (1, 2048), (2048, 1), (113, 128), (512, 256)
]
"""Length 1, lengths that are not a multiple of any tile, s_q < s_k and s_q > s_k (empty causal rows), decode."""
SEQLENS_LARGE_HEAD_DIM = [(1, 1), (113, 203), (1023, 1024), (1, 2048), (2048, 1), (512, 256)]
"""A subsample for head dims > 128, whose kernels use the same masking and tiling code at twice the cost."""






def _forward_cases():
    cases = []
    for kernel in KERNELS:
        seqlens = SEQLENS if kernel.head_dim <= 128 else SEQLENS_LARGE_HEAD_DIM
        for seqlen_q, seqlen_k in seqlens:
            for nheads_k in (1, 2, NHEADS):
                case = (kernel, seqlen_q, seqlen_k, nheads_k)
                cases.append(pytest.param(case, id=f"{kernel_id(kernel)}-sq{seqlen_q}-sk{seqlen_k}-hk{nheads_k}"))
    return grid_or_skip(cases)




def _uncompiled_head_dim_cases():
    """Head dims no kernel is compiled for, wherever a larger kernel serves them: 40 and 72 run on a
    larger kernel as they are; 100 and 27 are first zero-padded to a multiple of 8 by Python."""
    cases = []
    for dtype, mask in sorted({(k.dtype, k.mask) for k in KERNELS}):
        largest = max(k.head_dim for k in KERNELS if (k.dtype, k.mask) == (dtype, mask))
        for head_dim in (40, 72, 100, 27):
            if (head_dim + 7) // 8 * 8 <= largest:
                cases.append(pytest.param((dtype, mask, head_dim), id=f"{dtype}-d{head_dim}-{mask}"))
    return grid_or_skip(cases)


def poison_outputs_of(q):
    """Fill blocks the size of the op's outputs for ``q`` (out with the head dim padded to a multiple
    of 8, and lse) with NaN and free them: the caching allocator hands that memory to the op's next
    allocations of the same size, so elements the op never writes read as NaN."""
    batch, seqlen_q, nheads, head_dim = q.shape
    padded = (head_dim + 7) // 8 * 8
    out = torch.full((batch, seqlen_q, nheads, padded), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((batch, nheads, seqlen_q), float("nan"), dtype=torch.float32, device=q.device)
    del out, lse


def run_poisoned(q, k, v, causal):
    """``flash_attn_func(q, k, v, causal, return_attn_probs=True)[:2]`` on NaN-poisoned memory."""
    poison_outputs_of(q)
    out, lse, s_dmask = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert s_dmask is None
    return out, lse


def make_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, dtype):
    return (
        torch.randn(batch, seqlen_q, nheads, head_dim, dtype=dtype, device="cuda"),
        torch.randn(batch, seqlen_k, nheads_k, head_dim, dtype=dtype, device="cuda"),
        torch.randn(batch, seqlen_k, nheads_k, head_dim, dtype=dtype, device="cuda"),
    )


def assert_matches_reference(out, lse, q, k, v, causal, softmax_scale=None):
    """flash-attn's rule for out; lse against the fp32 reference, +inf exactly where it is."""
    assert out.shape == q.shape and out.dtype == q.dtype
    assert out.is_contiguous() or q.shape[-1] % 8 != 0, "only a padded head dim returns a (sliced) view"
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert not out.isnan().any(), "NaN in out: an element was not written, or the math broke"
    assert not lse.isnan().any(), "NaN in lse: an element was not written, or the math broke"
    ref_out, ref_lse = attention_ref(q, k, v, softmax_scale, causal)
    lowp_out, _ = attention_ref(q, k, v, softmax_scale, causal, upcast=False)
    if out.numel():
        error = (out.float() - ref_out).abs().max().item()
        baseline = (lowp_out.float() - ref_out).abs().max().item()
        assert error <= 2 * baseline + 1e-5, (
            f"max |out - ref| = {error:.3g} > 2 * {baseline:.3g} + 1e-5, the error of PyTorch in {q.dtype}"
        )
    assert torch.equal(torch.isposinf(lse), torch.isposinf(ref_lse)), "lse must be +inf exactly on rows that see no key"
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("case", _forward_cases())
def test_forward_matches_reference(case):
    kernel, seqlen_q, seqlen_k, nheads_k = case
    causal = kernel.mask == "causal"
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, NHEADS, nheads_k, kernel.head_dim, TORCH_DTYPES[kernel.dtype])
    out, lse = run_poisoned(q, k, v, causal)
    assert_matches_reference(out, lse, q, k, v, causal)


@pytest.mark.parametrize("case", _uncompiled_head_dim_cases())
def test_head_dim_between_compiled_sizes(case):
    dtype, mask, head_dim = case
    causal = mask == "causal"
    q, k, v = make_qkv(2, 113, 203, NHEADS, 2, head_dim, TORCH_DTYPES[dtype])
    out, lse = run_poisoned(q, k, v, causal)
    assert_matches_reference(out, lse, q, k, v, causal, softmax_scale=head_dim**-0.5)


def _layouts(head_dim, dtype, seqlen_q=113, seqlen_k=203, nheads_k=2):
    """Non-contiguous q, k, v, each with what the kernel gets from it."""
    b, h = 2, NHEADS

    def wide(seqlen, heads):  # stride(-1) == 1, head dim a slice of a wider tensor (16-byte aligned offset)
        return torch.randn(b, seqlen, heads, 2 * head_dim, dtype=dtype, device="cuda")[..., head_dim:]

    def bhsd(seqlen, heads):  # (b, h, s, d) memory seen as (b, s, h, d)
        return torch.randn(b, heads, seqlen, head_dim, dtype=dtype, device="cuda").transpose(1, 2)

    def strided_last(seqlen, heads):  # stride(-1) != 1: Python makes it contiguous
        return torch.randn(b, seqlen, head_dim, heads, dtype=dtype, device="cuda").transpose(-1, -2)

    def batch_broadcast(seqlen, heads):  # batch stride 0
        return torch.randn(1, seqlen, heads, head_dim, dtype=dtype, device="cuda").expand(b, -1, -1, -1)

    def misaligned(seqlen, heads):  # stride(-1) == 1 but starting 3 elements in: not 16-byte aligned
        return torch.randn(b * seqlen * heads * head_dim + 3, dtype=dtype, device="cuda")[3:].view(
            b, seqlen, heads, head_dim)

    makers = {"head_dim_slice": wide, "bhsd": bhsd, "last_dim_strided": strided_last, "batch_stride_0": batch_broadcast,
              "misaligned_start": misaligned}
    return {
        name: (make(seqlen_q, h), make(seqlen_k, nheads_k), make(seqlen_k, nheads_k)) for name, make in makers.items()
    }


@pytest.mark.parametrize("layout", ["head_dim_slice", "bhsd", "last_dim_strided", "batch_stride_0", "misaligned_start"])
@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(KERNELS))
def test_non_contiguous_inputs(kernel, layout):
    causal = kernel.mask == "causal"
    q, k, v = _layouts(kernel.head_dim, TORCH_DTYPES[kernel.dtype])[layout]
    assert layout == "misaligned_start" or not q.is_contiguous()
    out, lse = run_poisoned(q, k, v, causal)
    assert_matches_reference(out, lse, q, k, v, causal)


@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(KERNELS))
def test_op_refuses_misaligned_tensor_instead_of_faulting(kernel):
    """The raw op (the C++ checks, below the Python layer's copy) raises on a 16-byte-misaligned start."""
    q, k, v = _layouts(kernel.head_dim, TORCH_DTYPES[kernel.dtype])["misaligned_start"]
    with pytest.raises(RuntimeError, match="16-byte boundary"):
        torch.ops.flash_attn2.fwd(q, k, v, 0.125, kernel.mask == "causal")
    torch.cuda.synchronize()  # the context is still healthy
    assert torch.isfinite(flash_attn_func(q, k, v, causal=kernel.mask == "causal")).all()


@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(KERNELS))
def test_packed_entry_points_equal_unpacked(kernel):
    causal, dtype, d = kernel.mask == "causal", TORCH_DTYPES[kernel.dtype], kernel.head_dim
    qkv = torch.randn(2, 200, 3, NHEADS, d, dtype=dtype, device="cuda")
    q, k, v = qkv.unbind(2)
    expected = flash_attn_func(q, k, v, causal=causal)
    poison_outputs_of(q)
    assert torch.equal(flash_attn_qkvpacked_func(qkv, causal=causal), expected)
    poison_outputs_of(q)
    assert torch.equal(flash_attn_kvpacked_func(q, qkv[:, :, 1:], causal=causal), expected)


@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(KERNELS, mask="causal"))
@pytest.mark.parametrize(
    "seqlen_q,seqlen_k", [(512, 256), (2048, 1), (129, 64)], ids=["sq_twice_sk", "sk1", "sq_gt_sk_not_tile_multiple"]
)
def test_causal_rows_seeing_no_key_are_exact_zero_with_inf_lse(kernel, seqlen_q, seqlen_k):
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, NHEADS, 2, kernel.head_dim, TORCH_DTYPES[kernel.dtype])
    out, lse = run_poisoned(q, k, v, True)
    empty = seqlen_q - seqlen_k
    assert torch.equal(out[:, :empty], torch.zeros_like(out[:, :empty]))
    assert torch.isposinf(lse[..., :empty]).all()
    assert torch.isfinite(out[:, empty:]).all() and torch.isfinite(lse[..., empty:]).all()


@pytest.mark.parametrize("seqlen_k", [1, 2048, 2**16 + 1], ids=["sk1", "sk2048", "sk2^16+1"])
@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(KERNELS))
def test_decode_one_query_mqa(kernel, seqlen_k):
    causal = kernel.mask == "causal"
    q, k, v = make_qkv(2, 1, seqlen_k, NHEADS, 1, kernel.head_dim, TORCH_DTYPES[kernel.dtype])
    out, lse = run_poisoned(q, k, v, causal)
    assert_matches_reference(out, lse, q, k, v, causal)


@pytest.mark.parametrize(
    "batch,nheads", [(2**16 + 1, 1), (1, 2**16 + 1)], ids=["batch2^16+1", "nheads2^16+1"]
)
@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(KERNELS))
def test_grid_dimension_over_65535(kernel, batch, nheads):
    """Batch or heads past the 65535 limit of a CUDA grid's y and z dimensions."""
    causal = kernel.mask == "causal"
    q, k, v = make_qkv(batch, 3, 5, nheads, 1, kernel.head_dim, TORCH_DTYPES[kernel.dtype])
    out, lse = run_poisoned(q, k, v, causal)
    assert_matches_reference(out, lse, q, k, v, causal)


@pytest.mark.parametrize(
    "batch,seqlen_q,seqlen_k", [(2, 5, 0), (2, 0, 5), (0, 5, 5)], ids=["seqlen_k0", "seqlen_q0", "batch0"]
)
@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(KERNELS))
def test_length_zero(kernel, batch, seqlen_q, seqlen_k):
    """seqlen_k = 0: every row sees no key (out 0, lse +inf); an empty output launches nothing."""
    causal = kernel.mask == "causal"
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, NHEADS, 2, kernel.head_dim, TORCH_DTYPES[kernel.dtype])
    out, lse = run_poisoned(q, k, v, causal)
    assert out.shape == q.shape and lse.shape == (batch, NHEADS, seqlen_q)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isposinf(lse).all()


@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(KERNELS))
def test_forward_is_deterministic(kernel):
    q, k, v = make_qkv(2, 1000, 1000, NHEADS, 2, kernel.head_dim, TORCH_DTYPES[kernel.dtype])
    causal = kernel.mask == "causal"
    assert torch.equal(flash_attn_func(q, k, v, causal=causal), flash_attn_func(q, k, v, causal=causal))


# Refusals that depend on the GPU and on the build.


def test_refuses_gpu_below_sm80(monkeypatch):
    kernel = KERNELS[0]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    q = torch.randn(1, 4, 2, kernel.head_dim, dtype=TORCH_DTYPES[kernel.dtype], device="cuda")
    with pytest.raises(RuntimeError, match=r"compute capability 7\.5; the kernels need 8\.0 or newer"):
        flash_attn_func(q, q, q, causal=kernel.mask == "causal")


def test_refuses_head_dim_larger_than_any_compiled():
    for kernel in KERNELS:
        largest = _ops.largest_head_dim(TORCH_DTYPES[kernel.dtype], kernel.mask)
        if largest < 256:
            break
    else:
        pytest.skip("every dtype and mask has a head-dim-256 kernel")
    q = torch.randn(1, 4, 2, largest + 8, dtype=TORCH_DTYPES[kernel.dtype], device="cuda")
    match = rf"head dim {largest + 8} .* this build's largest is {largest}\. This build has: .*FLASH_ATTN2_HEAD_DIMS"
    with pytest.raises(RuntimeError, match=match):
        flash_attn_func(q, q, q, causal=kernel.mask == "causal")


def test_refuses_dtype_and_mask_not_compiled():
    compiled = {(k.dtype, k.mask) for k in KERNELS}
    missing = [(d, m) for d in TORCH_DTYPES for m in ("none", "causal") if (d, m) not in compiled]
    if not missing:
        pytest.skip("every dtype and mask is compiled")
    dtype, mask = missing[0]
    q = torch.randn(1, 4, 2, 64, dtype=TORCH_DTYPES[dtype], device="cuda")
    match = rf"no kernel for dtype {dtype} with mask {mask} and modifiers plain was compiled\. This build has"
    with pytest.raises(RuntimeError, match=match):
        flash_attn_func(q, q, q, causal=mask == "causal")
