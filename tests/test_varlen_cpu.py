"""Variable-length batches through the public API on CPU (the PyTorch path), bert_padding, and the
argument checks of the varlen functions."""

import pytest
import torch
from packing import cu_seqlens

from flash_attn2 import (
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from flash_attn2.bert_padding import pad_input, unpad_input
from flash_attn2.reference import attention_ref



@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nheads_k", [1, 2, 4])
def test_varlen_equals_dense_per_sequence(causal, nheads_k):
    lens_q, lens_k = [7, 0, 1, 33, 5], [9, 3, 0, 33, 1]
    q = torch.randn(sum(lens_q), 4, 16, dtype=torch.float64)
    k = torch.randn(sum(lens_k), nheads_k, 16, dtype=torch.float64)
    v = torch.randn_like(k)
    out, lse, _ = flash_attn_varlen_func(
        q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), 40, 40, causal=causal, return_attn_probs=True
    )
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    starts_q, starts_k = cu_seqlens(lens_q).tolist(), cu_seqlens(lens_k).tolist()
    for b in range(len(lens_q)):
        sq, sk = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        ref_out, ref_lse = attention_ref(q[None, sq], k[None, sk], v[None, sk], causal=causal)
        torch.testing.assert_close(out[sq], ref_out[0].to(out.dtype))
        torch.testing.assert_close(lse[:, sq], ref_lse[0].to(lse.dtype))


def test_varlen_gradients_on_cpu():
    lens = [3, 5]
    q, k, v = (torch.randn(8, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu = cu_seqlens(lens)
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True), (q, k, v))


def test_packed_varlen_variants_equal_unpacked():
    lens = [4, 9]
    cu = cu_seqlens(lens)
    qkv = torch.randn(13, 3, 2, 16)
    q, k, v = qkv.unbind(1)
    expected = flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, causal=True)
    torch.testing.assert_close(flash_attn_varlen_qkvpacked_func(qkv, cu, 9, causal=True), expected)
    torch.testing.assert_close(flash_attn_varlen_kvpacked_func(q, qkv[:, 1:], cu, cu, 9, 9, causal=True), expected)


def test_unpad_pad_round_trip():
    hidden = torch.randn(3, 6, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    unpadded, indices, cu, max_seqlen, seqused = unpad_input(hidden, mask)
    assert unpadded.shape == (9, 5) and cu.tolist() == [0, 3, 9, 9] and cu.dtype == torch.int32
    assert max_seqlen == 6 and seqused.tolist() == [3, 6, 0]
    padded = pad_input(unpadded, indices, 3, 6)
    torch.testing.assert_close(padded, hidden * mask[..., None])


def test_unpad_varlen_pad_equals_dense_on_padded_batch():
    batch, seqlen, lengths = 3, 10, [10, 4, 1]
    mask = torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]
    q, k, v = (torch.randn(batch, seqlen, 2, 8, dtype=torch.float64) for _ in range(3))
    (q_u, indices, cu, max_seqlen, _), k_u, v_u = unpad_input(q, mask), unpad_input(k, mask)[0], unpad_input(v, mask)[0]
    out = pad_input(flash_attn_varlen_func(q_u, k_u, v_u, cu, cu, max_seqlen, max_seqlen, causal=True), indices, batch, seqlen)
    for b, length in enumerate(lengths):
        expected = flash_attn_func(q[b : b + 1, :length], k[b : b + 1, :length], v[b : b + 1, :length], causal=True)
        torch.testing.assert_close(out[b : b + 1, :length], expected)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(cu_seqlens_q=torch.tensor([0, 4, 8], dtype=torch.int64)), TypeError, "int32"),
        (dict(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "one length"),
        (dict(cu_seqlens_q=torch.tensor([0, 6, 4], dtype=torch.int32)), ValueError, "not decrease"),
        (dict(cu_seqlens_q=torch.tensor([0, 4, 80], dtype=torch.int32)), ValueError, "end at most"),
        (dict(cu_seqlens_q=torch.tensor([[0, 4, 8]], dtype=torch.int32)), ValueError, "1-d"),
        (dict(max_seqlen_q=-1), ValueError, "max_seqlen_q"),
        (dict(max_seqlen_k=2.5), ValueError, "max_seqlen_k"),
        (dict(q=torch.randn(1, 8, 2, 8)), ValueError, "3-d"),
        (dict(block_table=torch.zeros(2, 1, dtype=torch.int32)), NotImplementedError, "block_table"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    ],
    ids=["cu_int64", "cu_numel_mismatch", "cu_decreasing", "cu_past_total", "cu_2d", "max_negative", "max_float",
         "q_4d", "block_table", "dropout"],
)
def test_varlen_bad_input(change, error, match):
    args = dict(
        q=torch.randn(8, 2, 8), k=torch.randn(8, 2, 8), v=torch.randn(8, 2, 8),
        cu_seqlens_q=torch.tensor([0, 4, 8], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 4, 8], dtype=torch.int32),
        max_seqlen_q=4, max_seqlen_k=4,
    )
    args.update(change)
    with pytest.raises(error, match=match):
        flash_attn_varlen_func(**args)
