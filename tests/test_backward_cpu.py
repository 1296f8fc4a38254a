"""The backward pass without a GPU.

Two parts:

* ``gradcheck`` (float64) of the public API on CPU tensors, which runs the plain-PyTorch path:
  dense, packed and variable-length entry points, GQA, ``seqlen_q != seqlen_k``, causal rows that see
  no key, sequences of length 0 and 1.
* The CUDA path's Python side (``interface._attention_cuda`` -> ``FlashAttnFunction`` -> ``_ops.fwd`` /
  ``_ops.bwd``) on CPU tensors, with the two ops replaced by a PyTorch stand-in that does the FA2
  backward's math (recompute P from q, k and lse; D = rowsum(dO * O); dS = P * (dP - D)) and asserts
  that it is called the way the compiled op will be: kernel-ready tensors, the padded head dim, the
  flags and the packed-batch arguments. This checks the autograd plumbing, head-dim padding, GQA
  shapes, torch.compile(fullgraph=True) and activation checkpointing before any kernel runs.
"""

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from packing import cu_seqlens

from flash_attn2 import (
    _ops,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
)
from flash_attn2 import interface
from flash_attn2.reference import _visible_keys, attention_ref, attention_ref_varlen, sequence_bounds


def make_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, requires_grad=True):
    shapes = [(batch, seqlen_q, nheads, head_dim)] + [(batch, seqlen_k, nheads_k, head_dim)] * 2
    return [torch.randn(s, dtype=torch.float64, requires_grad=requires_grad) for s in shapes]



# gradcheck of the CPU path (the public API on CPU tensors).

GRADCHECK_SHAPES = [(4, 6, 4, 2), (6, 4, 4, 1), (5, 5, 2, 2), (1, 5, 2, 1), (5, 1, 4, 4)]
"""(seqlen_q, seqlen_k, nheads, nheads_k): s_q < s_k, s_q > s_k (causal rows that see no key), equal,
decode, one key; GQA, MQA and MHA."""


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES, ids=["sq{}-sk{}-h{}-hk{}".format(*s) for s in GRADCHECK_SHAPES])
def test_gradcheck_flash_attn_func(shape, causal):
    seqlen_q, seqlen_k, nheads, nheads_k = shape
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, nheads, nheads_k, 4)
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=0.7, causal=causal),
                                    (q, k, v))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck_packed_entry_points(causal):
    qkv = torch.randn(1, 5, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda qkv: flash_attn_qkvpacked_func(qkv, causal=causal), (qkv,))
    q = torch.randn(1, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(1, 4, 2, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, kv: flash_attn_kvpacked_func(q, kv, causal=causal), (q, kv))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck_varlen_with_empty_and_single_token_sequences(causal):
    lens_q, lens_k = [3, 0, 1, 4, 2], [2, 3, 0, 4, 5]
    q = torch.randn(sum(lens_q), 4, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)

    def attention(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)

    assert torch.autograd.gradcheck(attention, (q, k, v))


def test_gradcheck_varlen_kvpacked():
    lens_q, lens_k = [2, 3], [4, 1]
    q = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(5, 2, 1, 4, dtype=torch.float64, requires_grad=True)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    assert torch.autograd.gradcheck(
        lambda q, kv: flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 3, 4, causal=True), (q, kv)
    )


# The CUDA path's Python side, with a PyTorch stand-in for the two ops.


def _assert_kernel_ready(*tensors):
    """What the compiled ops require of their tensor arguments (the C++ side refuses the rest)."""
    for t in tensors:
        assert t.shape[-1] % _ops.VECTOR_ELEMENTS == 0, f"head dim {t.shape[-1]} not padded"
        if not torch.compiler.is_compiling():  # storage_offset() does not trace
            assert _ops.kernel_ready(t) is t, f"not kernel-ready: strides {t.stride()}, offset {t.storage_offset()}"


def _dense_bwd(dout, q, k, v, out, lse, softmax_scale, causal):
    """FA2's backward for (batch, seqlen, heads, head_dim) tensors, from the saved out and lse."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    k_rep, v_rep = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k_rep) * softmax_scale
    if causal:
        scores = scores.masked_fill(~_visible_keys(seqlen_q, 0, seqlen_k, seqlen_k, q.device), float("-inf"))
    probs = torch.exp(scores - lse.unsqueeze(-1))  # rows with lse = +inf and masked keys: exp(-inf) = 0
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout)
    dprobs = torch.einsum("bqhd,bkhd->bhqk", dout, v_rep)
    row_dot = (dout * out).sum(-1).transpose(1, 2)  # D = rowsum(dO * O), (b, h, s_q)
    dscores = probs * (dprobs - row_dot.unsqueeze(-1))
    dq = torch.einsum("bhqk,bkhd->bqhd", dscores, k_rep) * softmax_scale
    dk = torch.einsum("bhqk,bqhd->bkhd", dscores, q) * softmax_scale

    def fold(grad):  # GQA: sum the query heads of each kv head
        return grad.reshape(batch, seqlen_k, nheads_k, group, head_dim).sum(3)

    return dq, fold(dk), fold(dv)


def _assert_no_modifiers(causal, modifiers):
    """These stand-ins cover the plain kernels: the window must be what causal alone implies and every
    score modifier off (window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state)."""
    windows = [(-1, -1), (-1, 0)] if causal else [(-1, -1)]  # _attention_cuda may be called without the fold
    assert tuple(modifiers) in [()] + [w + (0.0, None, 0.0, None) for w in windows], (
        f"unexpected modifier arguments {modifiers}")


class StandInOps:
    """``_ops.fwd`` and ``_ops.bwd`` in plain PyTorch, recording the calls made in eager mode."""

    def __init__(self):
        self.fwd_calls, self.bwd_calls = [], []

    def fwd(self, q, k, v, softmax_scale, causal, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
            max_seqlen_k=0, *modifiers):
        _assert_kernel_ready(q, k, v)
        _assert_no_modifiers(causal, modifiers)
        if not torch.compiler.is_compiling():
            self.fwd_calls.append(dict(head_dim=q.shape[-1], cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q))
        if cu_seqlens_q is None:
            out, lse = attention_ref(q, k, v, softmax_scale, causal)
        else:
            out, lse = attention_ref_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
        return out.to(q.dtype).contiguous(), lse

    def bwd(self, dout, q, k, v, out, softmax_lse, softmax_scale, causal, deterministic, cu_seqlens_q=None,
            cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, *modifiers):
        _assert_kernel_ready(dout, q, k, v, out)
        _assert_no_modifiers(causal, modifiers)
        assert dout.shape == out.shape == q.shape and isinstance(deterministic, bool)
        if not torch.compiler.is_compiling():
            self.bwd_calls.append(dict(
                deterministic=deterministic, causal=causal, softmax_scale=softmax_scale, head_dim=q.shape[-1],
                cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                max_seqlen_k=max_seqlen_k,
            ))
        if cu_seqlens_q is None:
            return _dense_bwd(dout, q, k, v, out, softmax_lse, softmax_scale, causal)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        bounds_q = sequence_bounds(cu_seqlens_q, q.shape[0])
        bounds_k = sequence_bounds(cu_seqlens_k, k.shape[0])
        for (q0, q1), (k0, k1) in zip(bounds_q, bounds_k):
            grads = _dense_bwd(dout[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], out[None, q0:q1],
                               softmax_lse[None, :, q0:q1], softmax_scale, causal)
            dq[q0:q1], dk[k0:k1], dv[k0:k1] = (g[0] for g in grads)
        return dq, dk, dv


@pytest.fixture
def stand_in(monkeypatch):
    """Route the CUDA path to the stand-in, as if a GPU with every head dim built were present."""
    ops = StandInOps()
    monkeypatch.setattr(_ops, "fwd", ops.fwd)
    monkeypatch.setattr(_ops, "bwd", ops.bwd)
    monkeypatch.setattr(_ops, "cuda_refusal", lambda device, dtype, mask, modifiers="plain": "")
    monkeypatch.setattr(_ops, "largest_head_dim", lambda dtype, mask, modifiers="plain": interface.MAX_HEAD_DIM)
    return ops


def cuda_path(q, k, v, causal=False, deterministic=False, softmax_scale=None):
    """``flash_attn_func``'s CUDA branch, on CPU tensors (validation and device dispatch skipped)."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return interface._attention_cuda(q, k, v, scale, causal, deterministic)[0]


def reference_grads(q, k, v, grad_out, causal, softmax_scale=None):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return torch.autograd.grad(attention_ref(q, k, v, softmax_scale, causal)[0], (q, k, v), grad_out)


def assert_grads_close(grads, expected):
    for name, grad, want in zip(("dq", "dk", "dv"), grads, expected):
        assert grad.shape == want.shape, f"{name}: shape {tuple(grad.shape)}, expected {tuple(want.shape)}"
        torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


CUDA_PATH_SHAPES = [(7, 11, 4, 2, 8), (11, 7, 4, 1, 16), (9, 9, 2, 2, 5), (1, 13, 4, 4, 27), (6, 0, 2, 1, 8)]
"""(seqlen_q, seqlen_k, nheads, nheads_k, head_dim): GQA/MQA/MHA, s_q != s_k both ways, head dims that
need padding (5, 27), no keys at all."""


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", CUDA_PATH_SHAPES, ids=[f"sq{s[0]}-sk{s[1]}-h{s[2]}-hk{s[3]}-d{s[4]}"
                                                         for s in CUDA_PATH_SHAPES])
def test_cuda_path_grads_match_reference(stand_in, shape, causal, deterministic):
    seqlen_q, seqlen_k, nheads, nheads_k, head_dim = shape
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, nheads, nheads_k, head_dim)
    grad_out = torch.randn_like(q)
    grads = torch.autograd.grad(cuda_path(q, k, v, causal, deterministic), (q, k, v), grad_out)
    assert_grads_close(grads, reference_grads(q, k, v, grad_out, causal))
    if seqlen_k == 0:  # _ops.bwd (here the stand-in) is called; the real one returns zeros without a launch
        assert not any(g.any() for g in grads)
    (call,) = stand_in.bwd_calls
    assert call["deterministic"] is deterministic and call["causal"] is causal
    assert call["head_dim"] == (head_dim + 7) // 8 * 8 and call["softmax_scale"] == head_dim**-0.5
    assert call["cu_seqlens_q"] is None and call["max_seqlen_q"] == 0


@pytest.mark.parametrize(
    "grad_layout", ["sum", "bhsd", "head_dim_slice", "last_dim_strided", "misaligned_start", "batch_stride_0"]
)
def test_cuda_path_makes_grad_out_kernel_ready(stand_in, grad_layout):
    """Gradients from autograd can have any strides; the stand-in asserts the op gets kernel-ready ones."""
    q, k, v = make_qkv(2, 9, 12, 4, 2, 16)
    out = cuda_path(q, k, v, causal=True)
    b, s, h, d = out.shape
    if grad_layout == "sum":  # out.sum()'s gradient: a stride-0 expansion of a scalar
        grad_out = torch.ones(()).double().expand(b, s, h, d)
    elif grad_layout == "bhsd":
        grad_out = torch.randn(b, h, s, d, dtype=torch.float64).transpose(1, 2)
    elif grad_layout == "head_dim_slice":
        grad_out = torch.randn(b, s, h, 2 * d, dtype=torch.float64)[..., d:]
    elif grad_layout == "last_dim_strided":
        grad_out = torch.randn(b, s, d, h, dtype=torch.float64).transpose(-1, -2)
    elif grad_layout == "misaligned_start":
        grad_out = torch.randn(b * s * h * d + 3, dtype=torch.float64)[3:].view(b, s, h, d)
    else:
        grad_out = torch.randn(1, s, h, d, dtype=torch.float64).expand(b, s, h, d)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert_grads_close(grads, reference_grads(q, k, v, grad_out, causal=True))


def test_cuda_path_packed_views_get_gradients(stand_in):
    """qkv-packed views run as they are (kernel-ready strides); their gradients reach the packed tensor."""
    qkv = torch.randn(2, 10, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.unbind(2)
    grad_out = torch.randn(2, 10, 4, 8, dtype=torch.float64)
    (dqkv,) = torch.autograd.grad(cuda_path(q, k, v, causal=True), (qkv,), grad_out)
    assert_grads_close(dqkv.unbind(2), reference_grads(q, k, v, grad_out, causal=True))


def test_cuda_path_lse_is_not_differentiable(stand_in):
    q, k, v = make_qkv(1, 5, 6, 2, 1, 8)
    out, lse, _ = interface._attention_cuda(q, k, v, 0.5, False, False)
    assert out.requires_grad and not lse.requires_grad
    (out.sum() + lse.sum()).backward()
    assert_grads_close((q.grad, k.grad, v.grad), reference_grads(q, k, v, torch.ones_like(out), False, 0.5))


def test_cuda_path_varlen_passes_the_packed_batch_to_bwd(stand_in):
    lens_q, lens_k = [5, 0, 1, 9], [7, 3, 0, 9]
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    q = torch.randn(sum(lens_q), 4, 12, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), 2, 12, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out, _, _ = interface._attention_cuda(q, k, v, 0.3, True, True, (cu_q, cu_k, 10, 11))
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
    ref_out, _ = attention_ref_varlen(qd, kd, vd, cu_q, cu_k, 0.3, True)
    assert_grads_close(grads, torch.autograd.grad(ref_out, (qd, kd, vd), grad_out))
    (call,) = stand_in.bwd_calls
    assert call["cu_seqlens_q"] is cu_q and call["cu_seqlens_k"] is cu_k
    assert (call["max_seqlen_q"], call["max_seqlen_k"], call["deterministic"], call["head_dim"]) == (10, 11, True, 16)


@pytest.mark.parametrize("head_dim", [8, 13], ids=["d8", "d13_padded"])
def test_cuda_path_compiles_fullgraph_with_backward(stand_in, head_dim):
    """dynamo traces FlashAttnFunction's forward and backward (setup_context style) in one graph; the
    backward then runs through AOTAutograd's compiled graph and must give eager's gradients."""
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 9, 12, 4, 2, head_dim)
    grad_out = torch.randn_like(q)

    def loss(q, k, v):
        return (cuda_path(q, k, v, causal=True, deterministic=True) * grad_out).sum()

    try:
        compiled_grads = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(q, k, v),
                                             (q, k, v))
    finally:
        torch._dynamo.reset()
    eager_grads = torch.autograd.grad(loss(q, k, v), (q, k, v))
    assert_grads_close(compiled_grads, eager_grads)


def test_cuda_path_under_activation_checkpointing(stand_in):
    q, k, v = make_qkv(2, 9, 12, 4, 2, 16)
    grad_out = torch.randn_like(q)
    out = checkpoint(lambda q, k, v: cuda_path(q, k, v, causal=True), q, k, v, use_reentrant=False)
    assert len(stand_in.fwd_calls) == 1
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert len(stand_in.fwd_calls) == 2, "checkpointing recomputes the forward in the backward"
    assert_grads_close(grads, torch.autograd.grad(cuda_path(q, k, v, causal=True), (q, k, v), grad_out))


# _ops.bwd itself.


@pytest.mark.parametrize(
    "q_shape,k_shape", [((2, 0, 4, 8), (2, 5, 2, 8)), ((2, 5, 4, 8), (2, 0, 2, 8)), ((0, 5, 4, 8), (0, 5, 2, 8)),
                        ((0, 4, 8), (7, 2, 8))],
    ids=["seqlen_q0", "seqlen_k0", "batch0", "varlen_total_q0"],
)
def test_ops_bwd_without_queries_or_keys_launches_nothing(monkeypatch, q_shape, k_shape):
    """Empty problems are answered in Python (zero gradients), never by calling the op."""
    monkeypatch.setattr(_ops, "_C", object())  # "the extension is there"; torch.ops.flash_attn2.bwd is not touched
    q, k = torch.randn(q_shape, dtype=torch.float16), torch.randn(k_shape, dtype=torch.float16)
    v = torch.randn_like(k)
    dq, dk, dv = _ops.bwd(torch.randn_like(q), q, k, v, torch.zeros_like(q), None, 0.5, True, False)
    for grad, like in ((dq, q), (dk, k), (dv, v)):
        assert grad.shape == like.shape and grad.dtype == like.dtype and grad.is_contiguous() and not grad.any()


@pytest.mark.skipif(_ops.extension_available(), reason="the extension is built")
def test_ops_bwd_without_extension_says_how_to_build():
    q = torch.randn(1, 4, 2, 8, dtype=torch.float16)
    match = r"not available .*python setup.py build_ext --inplace.*FLASH_ATTN2_HEAD_DIMS"
    with pytest.raises(RuntimeError, match=match):
        _ops.bwd(q, q, q, q, q, torch.zeros(1, 2, 4), 1.0, False, False)


@pytest.mark.skipif(not _ops.extension_available(), reason="needs flash_attn2._C (the op and its fake impl)")
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_bwd_fake_impl_shapes(varlen):
    """The registered fake (meta) implementation: dq, dk, dv with q's, k's and v's shapes, contiguous."""
    if varlen:
        q = torch.empty(10, 8, 64, dtype=torch.bfloat16, device="meta")
        k = torch.empty(13, 2, 64, dtype=torch.bfloat16, device="meta")
        lse = torch.empty(8, 10, device="meta")
        cu = torch.empty(3, dtype=torch.int32, device="meta")
        extra = (cu, cu, 6, 7)
    else:
        q = torch.empty(2, 10, 8, 64, dtype=torch.bfloat16, device="meta").transpose(1, 2).contiguous().transpose(1, 2)
        k = torch.empty(2, 13, 2, 64, dtype=torch.bfloat16, device="meta")
        lse = torch.empty(2, 8, 10, device="meta")
        extra = ()
    v = torch.empty_like(k)
    dq, dk, dv = torch.ops.flash_attn2.bwd(q, q, k, v, q, lse, 0.125, True, False, *extra)
    for grad, like in ((dq, q), (dk, k), (dv, v)):
        assert grad.shape == like.shape and grad.dtype == like.dtype and grad.is_contiguous()
