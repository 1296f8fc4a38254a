"""The CUDA backward kernels against the float32 reference, over the grid of backward kernels this build
compiled, and the backward through every entry point, layout, torch.compile, checkpointing and varlen.

Pass rule (flash-attn's): for each of dq, dk and dv, the max error against the gradient of the reference
computed in float32 (``attention_ref`` and autograd on float32 copies of the inputs) may be at most
GRAD_ERROR_RATIO = 2 times the error of PyTorch doing the same math in the input precision, plus GRAD_ATOL,
which only matters where both are near exact (one key: dq = dk = 0 exactly in PyTorch, within float32
rounding in the kernel). A gradient goes through more roundings to 16 bits than the forward (P and dS
before their matmuls, dk and dv per query head before GQA sums them); a CPU emulation of those roundings
once reached 2.1x in ~200 cases, but the kernels themselves pass at 2x on an H100 (all head dims, both
dtypes). If a new case needs more, the issue allows 3x with a stated reason: do not widen silently.
Inputs are fresh ``randn``, and the allocator is filled with NaN before each backward so that any
gradient element the kernels fail to write shows up as NaN.
"""

import pytest
import torch
from kernel_grid import grid_or_skip, kernel_id, one_kernel_per_dtype_and_mask, plain_kernels
from torch.utils.checkpoint import checkpoint
from packing import cu_seqlens

from flash_attn2 import (
    _ops,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_qkvpacked_func,
)
from flash_attn2.reference import attention_ref, attention_ref_varlen

pytestmark = pytest.mark.requires_cuda

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
NHEADS = 8
GRAD_ERROR_RATIO = 2.0
GRAD_ATOL = 1e-4
NO_BWD_KERNEL = "no compiled backward kernel fits this test"

SEQLENS = [(1, 1), (113, 203), (128, 128), (256, 256), (1023, 1024), (512, 256), (1, 300), (300, 1)]
"""Length 1, lengths that are not a multiple of any tile, s_q < s_k (decode) and s_q > s_k (causal rows
that see no key), several key blocks adding into one dq row."""
SEQLENS_LARGE_HEAD_DIM = [(1, 1), (113, 203), (1023, 1024), (512, 256), (300, 1)]
"""A subsample for head dims > 128, whose kernels use the same masking and tiling code at twice the cost."""


def _padded(head_dim):
    return (head_dim + 7) // 8 * 8


def _fwd_serves(dtype, mask, head_dim):
    return _ops.largest_head_dim(TORCH_DTYPES[dtype], mask) >= _padded(head_dim)


BWD_KERNELS = [k for k in plain_kernels("bwd") if _fwd_serves(k.dtype, k.mask, k.head_dim)]
"""The backward kernels a call can reach: those whose (dtype, head dim, mask) also has a forward."""


def _bwd_kernel_head_dim(dtype, mask, head_dim):
    """The head dim of the backward kernel that serves ``head_dim`` (the smallest one that fits), or 0."""
    fits = [k.head_dim for k in BWD_KERNELS if (k.dtype, k.mask) == (dtype, mask) and k.head_dim >= _padded(head_dim)]
    return min(fits, default=0)






def _backward_cases():
    cases = []
    for kernel in BWD_KERNELS:
        seqlens = SEQLENS if kernel.head_dim <= 128 else SEQLENS_LARGE_HEAD_DIM
        for seqlen_q, seqlen_k in seqlens:
            for nheads_k in (1, NHEADS // 4, NHEADS):
                case = (kernel, seqlen_q, seqlen_k, nheads_k)
                cases.append(pytest.param(case, id=f"{kernel_id(kernel)}-sq{seqlen_q}-sk{seqlen_k}-hk{nheads_k}"))
    return grid_or_skip(cases, reason=NO_BWD_KERNEL)




def _one_kernel_per_mask():
    """For the slow tests (torch.compile, opcheck): per mask, the kernel closest to head dim 128 (bf16 first)."""
    best = {}
    for kernel in sorted(BWD_KERNELS, key=lambda k: (k.dtype != "bf16", abs(k.head_dim - 128))):
        best.setdefault(kernel.mask, kernel)
    return grid_or_skip([pytest.param(k, id=kernel_id(k)) for k in sorted(best.values())], reason=NO_BWD_KERNEL)


def _uncompiled_head_dim_cases():
    """Head dims no kernel is compiled for, wherever a larger backward kernel serves them: 40, 56 and 72
    run on a larger kernel as they are (fewer columns than its tile); 27 and 100 are first zero-padded to
    a multiple of 8 by Python (the gradient of the pad slices the padding off)."""
    cases = []
    for dtype, mask in sorted({(k.dtype, k.mask) for k in BWD_KERNELS}):
        for head_dim in (27, 40, 56, 72, 100):
            kernel_head_dim = _bwd_kernel_head_dim(dtype, mask, head_dim)
            if kernel_head_dim and kernel_head_dim != head_dim:
                cases.append(pytest.param((dtype, mask, head_dim), id=f"{dtype}-d{head_dim}-{mask}"))
    return grid_or_skip(cases, reason=NO_BWD_KERNEL)


# Running the backward, and the pass rule.


def poison_backward_of(q, k, mask="none", slices=1):
    """Fill blocks the size of the backward op's allocations for ``q`` and ``k`` (dense or packed) with NaN
    and free them together: the caching allocator hands that memory to the op's next allocations of the
    same sizes, so elements the kernels never write (or a scratch buffer they never clear) read as NaN.
    The blocks: dq; dk and dv per query head (GQA sums them afterwards into k's shape); and the float32
    workspace (a row sum per query row and head, and the dq accumulator at the kernel's head dim, times
    ``slices``: the deterministic mode's private slices are one accumulator per split)."""
    dtype_name = {v: n for n, v in TORCH_DTYPES.items()}[q.dtype]
    padded = _padded(q.shape[-1])
    nheads = q.shape[-2]
    rows = q[..., 0].numel()  # query rows x heads
    kernel_head_dim = _bwd_kernel_head_dim(dtype_name, mask, padded) or padded
    kv_per_query_head = k.shape[:-2] + (nheads, padded)
    blocks = [
        torch.full(q.shape[:-1] + (padded,), float("nan"), dtype=q.dtype, device="cuda"),
        torch.full(kv_per_query_head, float("nan"), dtype=q.dtype, device="cuda"),
        torch.full(kv_per_query_head, float("nan"), dtype=q.dtype, device="cuda"),
        torch.full((rows * (1 + slices * kernel_head_dim),), float("nan"), dtype=torch.float32, device="cuda"),
    ]
    del blocks


def run_backward(attention, inputs, grad_out, mask="none", k_like=None, slices=1):
    """``torch.autograd.grad(attention(*inputs), inputs, grad_out)`` with the backward on poisoned memory.
    ``inputs`` require grad (leaves, or views of leaves); the poisoned blocks are sized for q (shaped like
    grad_out) and k (``k_like``, by default the second input: pass it for packed inputs)."""
    out = attention(*inputs)
    poison_backward_of(grad_out, inputs[1] if k_like is None else k_like, mask, slices)
    return torch.autograd.grad(out, inputs, grad_out)


def reference_grads(attention, q, k, v, grad_out):
    """Gradients of ``attention(q, k, v, upcast)`` for ``grad_out``: ``(float32 oracle, PyTorch in the
    input precision)``. The oracle's leaves are float32 copies, so its gradients are not rounded back."""
    leaves32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    grads32 = torch.autograd.grad(attention(*leaves32, upcast=True), leaves32, grad_out.float())
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    grads_lowp = torch.autograd.grad(attention(*leaves, upcast=False), leaves, grad_out)
    return grads32, grads_lowp


def dense_reference(causal, softmax_scale=None):
    return lambda q, k, v, upcast: attention_ref(q, k, v, softmax_scale, causal, upcast=upcast)[0]


def assert_grad_within_rule(name, grad, ref32, lowp, baseline=None, ratio=GRAD_ERROR_RATIO):
    """``baseline``: PyTorch's error to scale by, when it is measured on a larger tensor than ``grad``
    (default: on the same elements)."""
    assert not grad.isnan().any(), f"NaN in {name}: an element was not written, or the math broke"
    if grad.numel() == 0:
        return
    error = (grad.float() - ref32).abs().max().item()
    if baseline is None:
        baseline = (lowp.float() - ref32).abs().max().item()
    limit = ratio * baseline + GRAD_ATOL
    assert error <= limit, (
        f"max |{name} - ref| = {error:.3g} > {ratio:g} * {baseline:.3g} + {GRAD_ATOL:g}, "
        f"with {baseline:.3g} the error of PyTorch in {grad.dtype}"
    )


def assert_grads_match_reference(grads, q, k, v, grad_out, causal, softmax_scale=None):
    """The pass rule (see the module docstring) for dq, dk, dv against the dense reference; shapes and
    dtypes like q, k, v."""
    for name, grad, like in zip(("dq", "dk", "dv"), grads, (q, k, v)):
        assert grad.shape == like.shape and grad.dtype == like.dtype, f"{name}: {grad.shape} {grad.dtype}"
    grads32, grads_lowp = reference_grads(dense_reference(causal, softmax_scale), q, k, v, grad_out)
    for name, grad, ref32, lowp in zip(("dq", "dk", "dv"), grads, grads32, grads_lowp):
        assert_grad_within_rule(name, grad, ref32, lowp)


def make_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, dtype):
    """Leaves that require grad."""
    shapes = [(batch, seqlen_q, nheads, head_dim)] + [(batch, seqlen_k, nheads_k, head_dim)] * 2
    return [torch.randn(s, dtype=dtype, device="cuda", requires_grad=True) for s in shapes]


def attention_fn(causal, deterministic=False):
    return lambda q, k, v: flash_attn_func(q, k, v, causal=causal, deterministic=deterministic)


def assert_equal_grads(grads, expected, what):
    for name, grad, want in zip(("dq", "dk", "dv"), grads, expected):
        assert torch.equal(grad, want), f"{name} differs bitwise: {what}"


# The grid.


@pytest.mark.parametrize("case", _backward_cases())
def test_backward_matches_reference(case):
    kernel, seqlen_q, seqlen_k, nheads_k = case
    causal = kernel.mask == "causal"
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, NHEADS, nheads_k, kernel.head_dim, TORCH_DTYPES[kernel.dtype])
    grad_out = torch.randn_like(q)
    grads = run_backward(attention_fn(causal), (q, k, v), grad_out, kernel.mask)
    assert_grads_match_reference(grads, q, k, v, grad_out, causal)
    if causal and seqlen_q > seqlen_k:  # the first s_q - s_k rows see no key: out is 0 whatever q is
        dq_empty = grads[0][:, : seqlen_q - seqlen_k]
        assert torch.equal(dq_empty, torch.zeros_like(dq_empty)), "dq of rows that see no key must be exactly 0"


@pytest.mark.parametrize("case", _uncompiled_head_dim_cases())
def test_head_dim_between_compiled_sizes(case):
    dtype, mask, head_dim = case
    causal = mask == "causal"
    q, k, v = make_qkv(2, 113, 203, NHEADS, 2, head_dim, TORCH_DTYPES[dtype])
    grad_out = torch.randn_like(q)
    grads = run_backward(attention_fn(causal), (q, k, v), grad_out, mask)
    assert_grads_match_reference(grads, q, k, v, grad_out, causal, softmax_scale=head_dim**-0.5)


# Layouts of q, k, v and of the incoming gradient.


def _input_layouts(head_dim, dtype, seqlen_q=113, seqlen_k=203, nheads_k=2):
    """Non-contiguous q, k, v (views of leaves that require grad), by name."""
    b, h = 2, NHEADS

    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype, device="cuda", requires_grad=True)

    def wide(seqlen, heads):  # stride(-1) == 1, head dim a slice of a wider tensor (16-byte aligned offset)
        return leaf(b, seqlen, heads, 2 * head_dim)[..., head_dim:]

    def bhsd(seqlen, heads):  # (b, h, s, d) memory seen as (b, s, h, d)
        return leaf(b, heads, seqlen, head_dim).transpose(1, 2)

    def strided_last(seqlen, heads):  # stride(-1) != 1: Python makes it contiguous
        return leaf(b, seqlen, head_dim, heads).transpose(-1, -2)

    def batch_broadcast(seqlen, heads):  # batch stride 0
        return leaf(1, seqlen, heads, head_dim).expand(b, -1, -1, -1)

    def misaligned(seqlen, heads):  # stride(-1) == 1 but starting 3 elements in: not 16-byte aligned
        return leaf(b * seqlen * heads * head_dim + 3)[3:].view(b, seqlen, heads, head_dim)

    makers = {"head_dim_slice": wide, "bhsd": bhsd, "last_dim_strided": strided_last, "batch_stride_0": batch_broadcast,
              "misaligned_start": misaligned}
    layouts = {
        name: (make(seqlen_q, h), make(seqlen_k, nheads_k), make(seqlen_k, nheads_k)) for name, make in makers.items()
    }
    layouts["qkv_packed"] = leaf(b, seqlen_k, 3, h, head_dim).unbind(2)  # s_q = s_k and h_k = h to pack
    return layouts


INPUT_LAYOUTS = ["qkv_packed", "head_dim_slice", "bhsd", "last_dim_strided", "batch_stride_0", "misaligned_start"]


@pytest.mark.parametrize("layout", INPUT_LAYOUTS)
@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(BWD_KERNELS, reason=NO_BWD_KERNEL))
def test_non_contiguous_inputs(kernel, layout):
    causal = kernel.mask == "causal"
    q, k, v = _input_layouts(kernel.head_dim, TORCH_DTYPES[kernel.dtype])[layout]
    assert layout == "misaligned_start" or not q.is_contiguous()
    grad_out = torch.randn(q.shape, dtype=q.dtype, device="cuda")
    grads = run_backward(attention_fn(causal), (q, k, v), grad_out, kernel.mask)
    assert_grads_match_reference(grads, q, k, v, grad_out, causal)


GRAD_OUT_LAYOUTS = ["sum", "bhsd", "head_dim_slice", "batch_stride_0", "misaligned_start", "last_dim_strided"]


def _grad_out(layout, shape, dtype):
    """An incoming gradient of ``shape`` with a given layout; "sum" is out.sum()'s (a stride-0 expansion)."""
    b, s, h, d = shape
    if layout == "sum":
        return torch.ones((), dtype=dtype, device="cuda").expand(b, s, h, d)
    if layout == "bhsd":
        return torch.randn(b, h, s, d, dtype=dtype, device="cuda").transpose(1, 2)
    if layout == "head_dim_slice":
        return torch.randn(b, s, h, 2 * d, dtype=dtype, device="cuda")[..., d:]
    if layout == "batch_stride_0":
        return torch.randn(1, s, h, d, dtype=dtype, device="cuda").expand(b, s, h, d)
    if layout == "misaligned_start":
        return torch.randn(b * s * h * d + 3, dtype=dtype, device="cuda")[3:].view(b, s, h, d)
    return torch.randn(b, s, d, h, dtype=dtype, device="cuda").transpose(-1, -2)


@pytest.mark.parametrize("layout", GRAD_OUT_LAYOUTS)
@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(BWD_KERNELS, reason=NO_BWD_KERNEL))
def test_non_contiguous_grad_out(kernel, layout):
    """Gradients from autograd can have any strides: aligned ones reach the op as they are, others get a copy."""
    causal = kernel.mask == "causal"
    q, k, v = make_qkv(2, 113, 203, NHEADS, 2, kernel.head_dim, TORCH_DTYPES[kernel.dtype])
    grad_out = _grad_out(layout, q.shape, q.dtype)
    assert not grad_out.is_contiguous() or layout == "misaligned_start"
    if layout == "sum":
        out = flash_attn_func(q, k, v, causal=causal)
        poison_backward_of(q, k, kernel.mask)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    else:
        grads = run_backward(attention_fn(causal), (q, k, v), grad_out, kernel.mask)
    assert_grads_match_reference(grads, q, k, v, grad_out.contiguous(), causal)


# Entry points and edge cases.


@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(BWD_KERNELS, reason=NO_BWD_KERNEL))
def test_packed_entry_points_give_the_unpacked_grads(kernel):
    """Gradients reach qkv / kv through the unbind views, bitwise those of separate q, k, v."""
    causal, dtype, d = kernel.mask == "causal", TORCH_DTYPES[kernel.dtype], kernel.head_dim
    qkv = torch.randn(2, 200, 3, NHEADS, d, dtype=dtype, device="cuda", requires_grad=True)
    grad_out = torch.randn(2, 200, NHEADS, d, dtype=dtype, device="cuda")
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv.unbind(2))
    expected = run_backward(attention_fn(causal, deterministic=True), (q, k, v), grad_out, kernel.mask)

    (dqkv,) = run_backward(lambda qkv: flash_attn_qkvpacked_func(qkv, causal=causal, deterministic=True), (qkv,),
                           grad_out, kernel.mask, k_like=k)
    assert_equal_grads(dqkv.unbind(2), expected, "qkvpacked")

    kv = qkv.detach()[:, :, 1:].clone().requires_grad_()
    dq, dkv = run_backward(lambda q, kv: flash_attn_kvpacked_func(q, kv, causal=causal, deterministic=True), (q, kv),
                           grad_out, kernel.mask, k_like=k)
    assert_equal_grads((dq, *dkv.unbind(2)), expected, "kvpacked")


@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(BWD_KERNELS, reason=NO_BWD_KERNEL))
def test_kvpacked_gqa_grads_match_reference(kernel):
    causal, dtype, d = kernel.mask == "causal", TORCH_DTYPES[kernel.dtype], kernel.head_dim
    q = torch.randn(2, 300, NHEADS, d, dtype=dtype, device="cuda", requires_grad=True)
    kv = torch.randn(2, 129, 2, 2, d, dtype=dtype, device="cuda", requires_grad=True)
    grad_out = torch.randn_like(q)
    dq, dkv = run_backward(lambda q, kv: flash_attn_kvpacked_func(q, kv, causal=causal), (q, kv), grad_out,
                           kernel.mask, k_like=kv[:, :, 0])
    k, v = kv.detach().unbind(2)
    assert_grads_match_reference((dq, *dkv.unbind(2)), q, k, v, grad_out, causal)


@pytest.mark.parametrize(
    "batch,seqlen_q,seqlen_k", [(2, 5, 0), (2, 0, 5), (0, 5, 5)], ids=["seqlen_k0", "seqlen_q0", "batch0"]
)
@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(BWD_KERNELS, reason=NO_BWD_KERNEL))
def test_length_zero(kernel, batch, seqlen_q, seqlen_k):
    """No keys: out is the constant 0, so dq is 0. No queries: nothing reads k and v, so dk and dv are 0."""
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, NHEADS, 2, kernel.head_dim, TORCH_DTYPES[kernel.dtype])
    grads = run_backward(attention_fn(kernel.mask == "causal"), (q, k, v), torch.randn_like(q), kernel.mask)
    for grad, like in zip(grads, (q, k, v)):
        assert grad.shape == like.shape and grad.dtype == like.dtype
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize(
    "batch,nheads", [(2**16 + 1, 1), (1, 2**16 + 1)], ids=["batch2^16+1", "nheads2^16+1"]
)
@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(BWD_KERNELS, reason=NO_BWD_KERNEL))
def test_grid_dimension_over_65535(kernel, batch, nheads):
    """Batch or heads past the 65535 limit of a CUDA grid's y and z dimensions (MQA: 2^16+1 query heads
    summed into one kv head)."""
    causal = kernel.mask == "causal"
    q, k, v = make_qkv(batch, 3, 5, nheads, 1, kernel.head_dim, TORCH_DTYPES[kernel.dtype])
    grad_out = torch.randn_like(q)
    grads = run_backward(attention_fn(causal), (q, k, v), grad_out, kernel.mask)
    assert_grads_match_reference(grads, q, k, v, grad_out, causal)


# Determinism.


@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(BWD_KERNELS, reason=NO_BWD_KERNEL))
def test_deterministic_backward_is_bitwise_reproducible(kernel):
    """Many key blocks add into each dq row (s_k ~ 1000) and 4 query heads share each kv head: with
    deterministic=True repeated runs agree bit for bit; both modes match the reference."""
    causal = kernel.mask == "causal"
    q, k, v = make_qkv(2, 1000, 1000, NHEADS, 2, kernel.head_dim, TORCH_DTYPES[kernel.dtype])
    grad_out = torch.randn_like(q)
    first = run_backward(attention_fn(causal, deterministic=True), (q, k, v), grad_out, kernel.mask)
    for _ in range(2):
        again = run_backward(attention_fn(causal, deterministic=True), (q, k, v), grad_out, kernel.mask)
        assert_equal_grads(again, first, "deterministic=True must reproduce its bits")
    assert_grads_match_reference(first, q, k, v, grad_out, causal)
    atomic = run_backward(attention_fn(causal, deterministic=False), (q, k, v), grad_out, kernel.mask)
    assert_grads_match_reference(atomic, q, k, v, grad_out, causal)


@pytest.mark.parametrize("mode", ["ordered", "slices"])
@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(BWD_KERNELS, reason=NO_BWD_KERNEL))
def test_deterministic_modes_at_length(kernel, mode, monkeypatch):
    """Both deterministic dq modes with many key blocks per head (s_k ~ 4k), GQA and s_q != s_k: the
    private slices (the default) and the ordered one (FLASH_ATTN2_BWD_DET=ordered, Hopper only: the key
    blocks of a head add to each dq tile in turns, lowest first) each reproduce their bits and match the
    reference."""
    causal = kernel.mask == "causal"
    if mode == "ordered":
        monkeypatch.setenv("FLASH_ATTN2_BWD_DET", "ordered")
    q, k, v = make_qkv(1, 3001, 4099, 4, 2, kernel.head_dim, TORCH_DTYPES[kernel.dtype])
    grad_out = torch.randn_like(q)
    first = run_backward(attention_fn(causal, deterministic=True), (q, k, v), grad_out, kernel.mask)
    again = run_backward(attention_fn(causal, deterministic=True), (q, k, v), grad_out, kernel.mask)
    assert_equal_grads(again, first, f"deterministic=True ({mode}) must reproduce its bits")
    assert_grads_match_reference(first, q, k, v, grad_out, causal)


DET_SLICE_SHAPES = [(2, 1, 300, 8, 2), (2, 300, 1, 8, 2), (4, 1000, 2000, 8, 2), (4, 2000, 1000, 8, 8),
                    (4, 1999, 1999, 8, 4)]
"""(batch, s_q, s_k, heads, kv heads): one query block; keys that one key block holds (causal rows that see
none); batch 4 x 8 heads over 1-2k keys, which the slices split 4 ways with 2-4 key blocks each (several
rounds per split, the first storing, the later ones adding); mid-tile lengths."""


DET_OPTIONS = {
    "slices": {},
    "slices_serpentine": {"FLASH_ATTN2_BWD_DET_WALK": "serpentine"},
    "slices_rotate": {"FLASH_ATTN2_BWD_DET_WALK": "rotate"},
    "slices_add": {"FLASH_ATTN2_BWD_DET_STORE": "add"},
    "slices_4": {"FLASH_ATTN2_BWD_DET_SPLITS": "4"},
    "slices_cp_async": {"FLASH_ATTN2_BWD_DET_TMA": "0"},
}
"""The private slices' options: the walk (by default serpentine where a split is a whole head, else the
default kernel's rotated one; FLASH_ATTN2_BWD_DET_WALK forces either), the first key block of a split storing
its dq tiles (FLASH_ATTN2_BWD_DET_STORE=add: memset and add instead), and the splits per head
(FLASH_ATTN2_BWD_DET_SPLITS), and on Hopper Q and dO through cp.async instead of TMA (FLASH_ATTN2_BWD_DET_TMA=0)."""


@pytest.mark.parametrize("option", list(DET_OPTIONS))
@pytest.mark.parametrize("shape", DET_SLICE_SHAPES, ids=lambda s: "b{}_q{}_k{}_h{}_{}".format(*s))
@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(BWD_KERNELS, reason=NO_BWD_KERNEL))
def test_deterministic_options(kernel, shape, option, monkeypatch):
    """Each option over shapes that give a split several rounds, rows that see no key and a single query
    block. The allocator is NaN-filled before each run, so a slice row that nobody stored, zeroed or added
    to shows. Each reproduces its bits and matches the reference."""
    causal = kernel.mask == "causal"
    for name, value in DET_OPTIONS[option].items():
        monkeypatch.setenv(name, value)
    batch, seqlen_q, seqlen_k, nheads, nheads_k = shape
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, kernel.head_dim, TORCH_DTYPES[kernel.dtype])
    grad_out = torch.randn_like(q)
    # The poisoned workspace block covers up to 8 slices (these shapes take at most 4).
    first = run_backward(attention_fn(causal, deterministic=True), (q, k, v), grad_out, kernel.mask, slices=8)
    again = run_backward(attention_fn(causal, deterministic=True), (q, k, v), grad_out, kernel.mask, slices=8)
    assert_equal_grads(again, first, f"deterministic=True ({option}) must reproduce its bits")
    assert_grads_match_reference(first, q, k, v, grad_out, causal)


@pytest.mark.parametrize("seqlen_q", [332, 333])
@pytest.mark.parametrize("layout", ["contiguous", "heads_outer"])
@pytest.mark.parametrize("head_dim_less", [0, 8])
@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(BWD_KERNELS, reason=NO_BWD_KERNEL))
def test_deterministic_tma_matches_cp_async(kernel, head_dim_less, layout, seqlen_q, monkeypatch):
    """The deterministic kernel's two ways of loading Q, dO and the rows' lse and dsum (TMA boxes and bulk
    copies on Hopper, per-thread cp.async and loads elsewhere and with FLASH_ATTN2_BWD_DET_TMA=0) put the same
    tiles in shared memory: the same bits. Mid-tile lengths (boxes past the sequence's end are zero-filled;
    332 rows take TMA with a partial last run of rows, 333 rows, not a multiple of 4, keep cp.async), a head
    dim below the kernel's (the last box partly past it), GQA, and q / grad_out as (b, h, s, d) tensors viewed
    as (b, s, h, d) (other strides)."""
    causal = kernel.mask == "causal"
    head_dim = kernel.head_dim - head_dim_less
    q, k, v = make_qkv(2, seqlen_q, 517, NHEADS, 2, head_dim, TORCH_DTYPES[kernel.dtype])
    grad_out = torch.randn_like(q)
    if layout == "heads_outer":
        q = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        grad_out = grad_out.transpose(1, 2).contiguous().transpose(1, 2)
    grads = {}
    for tma in ("1", "0"):
        monkeypatch.setenv("FLASH_ATTN2_BWD_DET_TMA", tma)
        grads[tma] = run_backward(attention_fn(causal, deterministic=True), (q, k, v), grad_out, kernel.mask)
    assert_equal_grads(grads["1"], grads["0"], "TMA and cp.async loads of Q and dO must give the same bits")
    assert_grads_match_reference(grads["1"], q, k, v, grad_out, causal)


@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(BWD_KERNELS, reason=NO_BWD_KERNEL))
def test_atomic_dq_path(kernel, monkeypatch):
    """FLASH_ATTN2_BWD_DQ=atomic keeps Hopper on the sm80 way of adding dq (vector atomics, the plain
    accumulator layout) instead of the bulk reductions: both modes still match the reference, the
    deterministic one bit for bit run to run. Mid-tile lengths, s_q != s_k, GQA."""
    causal = kernel.mask == "causal"
    q, k, v = make_qkv(2, 333, 517, NHEADS, 2, kernel.head_dim, TORCH_DTYPES[kernel.dtype])
    grad_out = torch.randn_like(q)
    monkeypatch.setenv("FLASH_ATTN2_BWD_DQ", "atomic")
    for deterministic in (False, True):
        grads = run_backward(attention_fn(causal, deterministic), (q, k, v), grad_out, kernel.mask)
        assert_grads_match_reference(grads, q, k, v, grad_out, causal)
    again = run_backward(attention_fn(causal, True), (q, k, v), grad_out, kernel.mask)
    assert_equal_grads(again, grads, "deterministic=True must reproduce its bits")


# torch.compile, torch.library, activation checkpointing.


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kernel", _one_kernel_per_mask())
def test_compiled_training_step_matches_eager(kernel, fresh_dynamo):
    """torch.compile(fullgraph=True) of forward + loss; loss.backward() runs the compiled backward graph,
    which calls the bwd op. Causal also takes the head-dim padding path; the full mask, dynamic shapes."""
    causal, dtype = kernel.mask == "causal", TORCH_DTYPES[kernel.dtype]
    head_dim = kernel.head_dim - 3 if causal else kernel.head_dim

    def loss_fn(q, k, v, grad_out):
        out = flash_attn_func(q, k, v, causal=causal, deterministic=True)
        return (out * grad_out).sum()  # its gradient with respect to out is exactly grad_out

    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=not causal)
    for seqlen_q, seqlen_k in [(300, 257), (129, 400)] if not causal else [(300, 257)]:
        q, k, v = make_qkv(2, seqlen_q, seqlen_k, NHEADS, 2, head_dim, dtype)
        grad_out = torch.randn_like(q)
        compiled(q, k, v, grad_out).backward()
        compiled_grads = [t.grad for t in (q, k, v)]
        eager_grads = torch.autograd.grad(loss_fn(q, k, v, grad_out), (q, k, v))
        assert_equal_grads(compiled_grads, eager_grads, "compiled training step vs eager")
        assert_grads_match_reference(compiled_grads, q, k, v, grad_out, causal, softmax_scale=head_dim**-0.5)


@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(BWD_KERNELS, reason=NO_BWD_KERNEL))
def test_activation_checkpointing_gives_the_same_grads(kernel):
    causal = kernel.mask == "causal"
    q, k, v = make_qkv(2, 257, 300, NHEADS, 2, kernel.head_dim, TORCH_DTYPES[kernel.dtype])
    grad_out = torch.randn_like(q)
    attention = attention_fn(causal, deterministic=True)
    expected = torch.autograd.grad(attention(q, k, v), (q, k, v), grad_out)
    out = checkpoint(attention, q, k, v, use_reentrant=False)
    assert_equal_grads(torch.autograd.grad(out, (q, k, v), grad_out), expected, "checkpointed vs not")


def _opcheck_inputs(layout, head_dim, dtype):
    """(q, k, v, varlen arguments) for the opcheck layouts."""
    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device="cuda")

    if layout == "contiguous":
        return randn(2, 128, 8, head_dim), randn(2, 128, 8, head_dim), randn(2, 128, 8, head_dim), ()
    if layout == "gqa_sq_gt_sk":
        return randn(2, 300, 8, head_dim), randn(2, 100, 2, head_dim), randn(2, 100, 2, head_dim), ()
    if layout == "head_dim_slice":
        q, k, v = (randn(2, s, h, 2 * head_dim)[..., head_dim:] for s, h in ((113, 8), (203, 2), (203, 2)))
        return q, k, v, ()
    lens_q, lens_k = [113, 0, 1, 70], [5, 203, 0, 70]
    cu_q, cu_k = (torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
                  for lens in (lens_q, lens_k))
    q, k, v = randn(sum(lens_q), 8, head_dim), randn(sum(lens_k), 2, head_dim), randn(sum(lens_k), 2, head_dim)
    return q, k, v, (cu_q, cu_k, max(lens_q), max(lens_k))


@pytest.mark.parametrize("layout", ["contiguous", "contiguous_atomic", "gqa_sq_gt_sk", "head_dim_slice", "varlen"])
@pytest.mark.parametrize("kernel", _one_kernel_per_mask())  # the fake impls know no dtypes: one per mask
def test_opcheck(kernel, layout):
    """torch.library's checks (schema, fake impl against the real outputs, autograd registration, AOT
    dispatch with dynamic shapes) of the bwd op on what the fwd op returned; for varlen, of the fwd op too.
    opcheck compares repeated runs of the op: deterministic=True makes them equal, except in the
    "contiguous_atomic" case, which allows for dq's atomic adds adding up in another order."""
    causal, dtype, d = kernel.mask == "causal", TORCH_DTYPES[kernel.dtype], kernel.head_dim
    deterministic = layout != "contiguous_atomic"
    q, k, v, varlen_args = _opcheck_inputs(layout.removesuffix("_atomic"), d, dtype)
    if varlen_args:
        torch.library.opcheck(torch.ops.flash_attn2.fwd.default, (q, k, v, d**-0.5, causal, *varlen_args))
    out, lse = torch.ops.flash_attn2.fwd(q, k, v, d**-0.5, causal, *varlen_args)
    grad_out = torch.randn_like(out)
    tolerance = {} if deterministic else {"rtol": 2e-2, "atol": 1e-3}
    torch.library.opcheck(torch.ops.flash_attn2.bwd.default,
                          (grad_out, q, k, v, out, lse, d**-0.5, causal, deterministic, *varlen_args), **tolerance)


# Variable-length batches.

LENGTHS = {
    "mixed": ([113, 0, 1, 1000, 7, 257], [200, 5, 0, 1000, 64, 129]),  # lengths 0 and 1, none a tile multiple
    "decode": ([1, 1, 1], [513, 1, 300]),                               # one query per sequence
}



@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("nheads_k", [2, NHEADS])
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=list(LENGTHS))
@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(BWD_KERNELS, reason=NO_BWD_KERNEL))
def test_varlen_backward_matches_reference_per_sequence(kernel, lengths, nheads_k, deterministic):
    lens_q, lens_k = LENGTHS[lengths]
    causal, dtype, d = kernel.mask == "causal", TORCH_DTYPES[kernel.dtype], kernel.head_dim
    cu_q, cu_k = cu_seqlens(lens_q, "cuda"), cu_seqlens(lens_k, "cuda")
    q = torch.randn(sum(lens_q), NHEADS, d, dtype=dtype, device="cuda", requires_grad=True)
    k, v = (torch.randn(sum(lens_k), nheads_k, d, dtype=dtype, device="cuda", requires_grad=True) for _ in range(2))
    grad_out = torch.randn_like(q)

    def attention(q, k, v):  # max_seqlen larger than the true maxima, as allowed
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q) + 100, max(lens_k) + 3, causal=causal,
                                      deterministic=deterministic)

    grads = run_backward(attention, (q, k, v), grad_out, kernel.mask)
    if deterministic:
        assert_equal_grads(run_backward(attention, (q, k, v), grad_out, kernel.mask), grads, "varlen deterministic")
    for name, grad, like in zip(("dq", "dk", "dv"), grads, (q, k, v)):
        assert grad.shape == like.shape and grad.dtype == like.dtype and not grad.isnan().any(), name

    def reference(q, k, v, upcast):
        return attention_ref_varlen(q, k, v, cu_q, cu_k, causal=causal, upcast=upcast)[0]

    grads32, grads_lowp = reference_grads(reference, q, k, v, grad_out)
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    for b in range(len(lens_q)):
        rows = {"dq": slice(starts_q[b], starts_q[b + 1])}
        rows["dk"] = rows["dv"] = slice(starts_k[b], starts_k[b + 1])
        for i, name in enumerate(("dq", "dk", "dv")):
            assert_grad_within_rule(f"{name} of sequence {b} (lengths q {lens_q[b]}, k {lens_k[b]})",
                                    grads[i][rows[name]], grads32[i][rows[name]], grads_lowp[i][rows[name]])
        if lens_q[b] == 0:  # keys no query reads
            assert not grads[1][rows["dk"]].any() and not grads[2][rows["dv"]].any()
        if lens_k[b] == 0:  # queries that see no key
            assert not grads[0][rows["dq"]].any()


@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(BWD_KERNELS, reason=NO_BWD_KERNEL))
def test_varlen_qkvpacked_gives_the_unpacked_grads(kernel):
    causal, dtype, d = kernel.mask == "causal", TORCH_DTYPES[kernel.dtype], kernel.head_dim
    lens = [300, 1, 77]
    cu = cu_seqlens(lens, "cuda")
    qkv = torch.randn(sum(lens), 3, NHEADS, d, dtype=dtype, device="cuda", requires_grad=True)
    grad_out = torch.randn(sum(lens), NHEADS, d, dtype=dtype, device="cuda")
    (dqkv,) = run_backward(
        lambda qkv: flash_attn_varlen_qkvpacked_func(qkv, cu, max(lens), causal=causal, deterministic=True), (qkv,),
        grad_out, kernel.mask, k_like=grad_out,
    )
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv.unbind(1))
    expected = run_backward(
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=causal,
                                               deterministic=True),
        (q, k, v), grad_out, kernel.mask,
    )
    assert_equal_grads(dqkv.unbind(1), expected, "varlen qkvpacked")


@pytest.mark.parametrize("kernel", one_kernel_per_dtype_and_mask(BWD_KERNELS, reason=NO_BWD_KERNEL))
def test_varlen_with_equal_lengths_gives_the_dense_grads(kernel):
    """Same kernels, same tiles, same order: a packed batch of equal lengths gives the dense bits."""
    causal, dtype, d = kernel.mask == "causal", TORCH_DTYPES[kernel.dtype], kernel.head_dim
    batch, seqlen = 3, 333
    q, k, v = make_qkv(batch, seqlen, seqlen, NHEADS, NHEADS, d, dtype)  # MHA: GQA's head sum is not under test
    grad_out = torch.randn_like(q)
    dense = run_backward(attention_fn(causal, deterministic=True), (q, k, v), grad_out, kernel.mask)
    cu = cu_seqlens([seqlen] * batch, "cuda")
    packed = [t.detach().reshape(batch * seqlen, *t.shape[2:]).requires_grad_() for t in (q, k, v)]
    grads = run_backward(
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, seqlen, seqlen, causal=causal, deterministic=True),
        packed, grad_out.reshape(batch * seqlen, NHEADS, d), kernel.mask,
    )
    assert_equal_grads([g.reshape(batch, seqlen, *g.shape[1:]) for g in grads], dense, "varlen vs dense")


# Refusals that depend on the build.


def test_refuses_backward_that_was_not_built():
    """A forward kernel without a backward kernel for its (dtype, head dim, mask): the forward runs, and
    the backward raises the op's error instead of computing something else."""
    bwd = _ops.built_kernels("bwd")
    missing = [
        k for k in plain_kernels()
        if not any((b.dtype, b.mask) == (k.dtype, k.mask) and b.head_dim >= k.head_dim for b in bwd)
    ]
    if not missing:
        pytest.skip("every forward kernel has a backward kernel")
    kernel = missing[0]
    q, k, v = make_qkv(1, 16, 16, 2, 2, kernel.head_dim, TORCH_DTYPES[kernel.dtype])
    out = flash_attn_func(q, k, v, causal=kernel.mask == "causal")
    with pytest.raises(RuntimeError, match="no backward kernel was built"):
        out.sum().backward()
