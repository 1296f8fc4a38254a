"""The oracles: ``attention_ref`` against hand-written float64 math, ``attention_cpu`` against
``attention_ref``, and the CPU path's gradients (plain autograd) against the reference's."""

import math

import pytest
import torch

from flash_attn2 import flash_attn_func
from flash_attn2.reference import attention_cpu, attention_ref


def naive_attention(q, k, v, softmax_scale, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """One query row at a time, straight from the definition (module docstring of reference.py), in float64:
    the oracle of this module and of test_modifiers_cpu.py (window, softcap, ALiBi)."""
    q, k, v = q.double(), k.double(), v.double()
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    left, right = window_size
    if causal:
        right = 0
    out = torch.zeros(batch, seqlen_q, nheads, head_dim, dtype=torch.float64)
    lse = torch.full((batch, nheads, seqlen_q), math.inf, dtype=torch.float64)
    for b in range(batch):
        for h in range(nheads):
            kv_head = h // (nheads // nheads_k)
            for i in range(seqlen_q):
                diagonal = i + seqlen_k - seqlen_q
                keys = [j for j in range(seqlen_k)
                        if (left < 0 or j >= diagonal - left) and (right < 0 or j <= diagonal + right)]
                if not keys:
                    continue
                scores = []
                for j in keys:
                    z = float(q[b, i, h] @ k[b, j, kv_head]) * softmax_scale
                    if softcap > 0:
                        z = softcap * math.tanh(z / softcap)
                    if alibi_slopes is not None:
                        slope = alibi_slopes[h] if alibi_slopes.dim() == 1 else alibi_slopes[b, h]
                        z -= float(slope) * abs(diagonal - j)
                    scores.append(z)
                scores = torch.tensor(scores, dtype=torch.float64)
                weights = torch.softmax(scores, dim=0)
                out[b, i, h] = sum(w * v[b, j, kv_head] for w, j in zip(weights, keys))
                lse[b, h, i] = torch.logsumexp(scores, dim=0)
    return out, lse


def seqlen_ids(pairs):
    """Readable ids for (seqlen_q, seqlen_k) grids, e.g. ``sq1-sk300``."""
    return [f"sq{sq}-sk{sk}" for sq, sk in pairs]


def make_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, dtype=torch.float64, requires_grad=False):
    q = torch.randn(batch, seqlen_q, nheads, head_dim, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(batch, seqlen_k, nheads_k, head_dim, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(batch, seqlen_k, nheads_k, head_dim, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


SEQLENS_SMALL = [(1, 1), (5, 5), (3, 8), (8, 3), (1, 9), (9, 1)]
HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("nheads,nheads_k", HEADS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS_SMALL, ids=seqlen_ids(SEQLENS_SMALL))
def test_reference_matches_row_by_row_math(seqlen_q, seqlen_k, nheads, nheads_k, causal):
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, nheads, nheads_k, 8)
    out, lse = attention_ref(q, k, v, 0.3, causal)
    expected_out, expected_lse = naive_attention(q, k, v, 0.3, causal)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)


def test_reference_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = make_qkv(1, 4, 6, 2, 2, 40)
    torch.testing.assert_close(attention_ref(q, k, v)[0], attention_ref(q, k, v, 40**-0.5)[0])


def test_reference_causal_seqlen_q_longer_than_k_has_empty_rows():
    """Bottom-right alignment: with s_q = 7 > s_k = 3 the first 4 rows see no key."""
    q, k, v = make_qkv(2, 7, 3, 2, 1, 8)
    out, lse = attention_ref(q, k, v, causal=True)
    assert torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))
    assert torch.isinf(lse[..., :4]).all() and (lse[..., :4] > 0).all()
    assert torch.isfinite(out[:, 4:]).all() and torch.isfinite(lse[..., 4:]).all()


def test_reference_causal_seqlen_q_shorter_than_k_sees_prefix():
    """With s_q = 2 < s_k = 5, row 0 sees keys 0..3 and row 1 sees all five."""
    q, k, v = make_qkv(1, 2, 5, 1, 1, 8)
    out, _ = attention_ref(q, k, v, causal=True)
    row0, _ = attention_ref(q[:, :1], k[:, :4], v[:, :4])
    torch.testing.assert_close(out[:, :1], row0)


def test_reference_seqlen_k_zero_gives_zero_output_and_inf_lse():
    q, k, v = make_qkv(2, 3, 0, 2, 2, 8)
    out, lse = attention_ref(q, k, v)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isposinf(lse).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_upcast_false_stays_in_input_precision(dtype):
    q, k, v = make_qkv(1, 16, 16, 2, 2, 32, dtype=dtype)
    out_lowp, lse = attention_ref(q, k, v, upcast=False)
    out_fp32, lse_fp32 = attention_ref(q, k, v)
    assert out_lowp.dtype == dtype and out_fp32.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out_lowp.float(), out_fp32, rtol=0, atol=5e-2)
    torch.testing.assert_close(lse, lse_fp32, rtol=0, atol=5e-2)


# attention_cpu: the tiled online softmax must equal the full-matrix reference.

CPU_SEQLENS = [(1, 1), (1, 300), (37, 100), (100, 37), (128, 128), (65, 257)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("block_size", [3, 16, 64, 256])
@pytest.mark.parametrize("seqlen_q,seqlen_k", CPU_SEQLENS, ids=seqlen_ids(CPU_SEQLENS))
def test_attention_cpu_matches_reference_float64(seqlen_q, seqlen_k, block_size, causal):
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, 2, 16)
    out, lse = attention_cpu(q, k, v, 0.25, causal, block_size=block_size)
    expected_out, expected_lse = attention_ref(q, k, v, 0.25, causal)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_cpu_one_key_per_block(causal):
    """block_size=1 rescales the running max and sum at every key."""
    q, k, v = make_qkv(1, 9, 13, 2, 1, 8)
    out, lse = attention_cpu(q, k, v, 0.5, causal, block_size=1)
    expected_out, expected_lse = attention_ref(q, k, v, 0.5, causal)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)


FP32_SEQLENS = [(1, 1000), (200, 333), (333, 200)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("nheads,nheads_k", HEADS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("seqlen_q,seqlen_k", FP32_SEQLENS, ids=seqlen_ids(FP32_SEQLENS))
def test_attention_cpu_matches_reference_float32(seqlen_q, seqlen_k, nheads, nheads_k, causal):
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, nheads, nheads_k, 64, dtype=torch.float32)
    out, lse = attention_cpu(q, k, v, 64**-0.5, causal, block_size=128)
    expected_out, expected_lse = attention_ref(q, k, v, 64**-0.5, causal)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_cpu_16bit_inputs_return_16bit_out_and_float32_lse(dtype):
    q, k, v = make_qkv(1, 50, 70, 4, 1, 32, dtype=dtype)
    out, lse = attention_cpu(q, k, v, 32**-0.5, True, block_size=16)
    expected_out, expected_lse = attention_ref(q, k, v, 32**-0.5, True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out, expected_out.to(dtype))
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)


def test_attention_cpu_causal_empty_rows_are_exact_zero_and_inf_lse():
    q, k, v = make_qkv(2, 20, 5, 2, 2, 8, dtype=torch.float32)
    out, lse = attention_cpu(q, k, v, 0.5, True, block_size=2)
    assert torch.equal(out[:, :15], torch.zeros_like(out[:, :15])) and torch.isposinf(lse[..., :15]).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[..., 15:]).all()


@pytest.mark.parametrize(
    "batch,seqlen_q,seqlen_k", [(0, 4, 4), (2, 0, 4), (2, 4, 0)], ids=["batch0", "seqlen_q0", "seqlen_k0"]
)
def test_attention_cpu_length_zero(batch, seqlen_q, seqlen_k):
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, 2, 1, 8)
    out, lse = attention_cpu(q, k, v, 0.5, False)
    assert out.shape == (batch, seqlen_q, 2, 8) and lse.shape == (batch, 2, seqlen_q)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isposinf(lse).all()


def test_attention_cpu_rejects_block_size_zero():
    q, k, v = make_qkv(1, 2, 2, 1, 1, 8)
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        attention_cpu(q, k, v, 1.0, False, block_size=0)


# Gradients of the CPU path (plain autograd through attention_cpu).


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "seqlen_q,seqlen_k,nheads_k",
    [(1, 300, 1), (70, 300, 2), (300, 70, 4), (129, 129, 1)],
    ids=["decode-mqa", "sq_lt_sk-gqa", "sq_gt_sk-mha", "sq_eq_sk-mqa"],
)
def test_cpu_gradients_match_reference(seqlen_q, seqlen_k, nheads_k, causal):
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, nheads_k, 16, requires_grad=True)
    grad_out = torch.randn(2, seqlen_q, 4, 16, dtype=torch.float64)
    grads = torch.autograd.grad(flash_attn_func(q, k, v, causal=causal), (q, k, v), grad_out)
    expected = torch.autograd.grad(attention_ref(q, k, v, causal=causal)[0], (q, k, v), grad_out)
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-10)


def test_cpu_gradients_with_empty_causal_rows_are_finite():
    """Rows that see no key must not turn into 0/0 in the backward pass."""
    q, k, v = make_qkv(1, 9, 3, 2, 1, 8, requires_grad=True)
    flash_attn_func(q, k, v, causal=True).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[:, :6], torch.zeros_like(q.grad[:, :6]))


@pytest.mark.parametrize(
    "seqlen_q,seqlen_k,causal",
    [(3, 4, False), (3, 4, True), (4, 2, True), (1, 1, False)],
    ids=["full", "causal", "causal-empty_rows", "length1"],
)
def test_gradcheck_public_api_float64(seqlen_q, seqlen_k, causal):
    q, k, v = make_qkv(1, seqlen_q, seqlen_k, 2, 1, 5, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), (q, k, v))
