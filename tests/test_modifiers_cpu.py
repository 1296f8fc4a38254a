"""Sliding-window attention, softcapping, ALiBi and dropout without a GPU.

* ``attention_ref`` against a row-by-row float64 definition of the semantics;
* ``attention_cpu`` (the public API's CPU path) against ``attention_ref``: windows with and without
  causal, seqlen_q != seqlen_k both ways, windows that leave rows without a key, one key per block;
* gradients (gradcheck in float64, and against the reference with a fixed dropout mask);
* dropout: keep rate, out / S_dmask / lse consistent with one mask, reproducibility from the seed;
* the entry points thread the arguments, the CUDA branch is called with them, and bad values are refused.
"""

import math

import pytest
import torch
from packing import cu_seqlens
from test_reference_cpu import make_qkv, naive_attention

from flash_attn2 import (
    _ops,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    interface,
)
from flash_attn2.reference import (
    attention_cpu,
    attention_cpu_varlen,
    attention_probs,
    attention_probs_varlen,
    attention_ref,
    attention_ref_varlen,
)


def assert_close_f64(actual, expected, tol=1e-10):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


SEQLENS = [(6, 6), (3, 9), (9, 3), (1, 7), (7, 1)]
"""(seqlen_q, seqlen_k): equal, fewer queries (decode-like), more queries (rows without keys), one query, one key."""

WINDOWS = [(-1, -1), (2, 0), (0, 3), (3, -1), (-1, 1), (0, 0), (1, 1)]
"""Full, left-only local, right-only, left unbounded on the right, right-bounded only, diagonal only, symmetric."""


def window_id(w):
    return f"w{w[0]}_{w[1]}"


# attention_ref against the row-by-row definition.


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window_size", WINDOWS, ids=[window_id(w) for w in WINDOWS])
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS, ids=[f"sq{a}-sk{b}" for a, b in SEQLENS])
def test_reference_window_matches_definition(seqlen_q, seqlen_k, window_size, causal):
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, 2, 8)
    out, lse = attention_ref(q, k, v, 0.4, causal, window_size=window_size)
    expected_out, expected_lse = naive_attention(q, k, v, 0.4, causal, window_size)
    assert_close_f64(out, expected_out)
    assert_close_f64(lse, expected_lse)


@pytest.mark.parametrize("alibi_shape", [None, "h", "bh"])
@pytest.mark.parametrize("softcap", [0.0, 0.7, 5.0])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(5, 8), (8, 5)], ids=["sq5-sk8", "sq8-sk5"])
def test_reference_softcap_alibi_match_definition(seqlen_q, seqlen_k, softcap, alibi_shape):
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, 1, 8)
    slopes = {None: None, "h": torch.rand(4), "bh": torch.rand(2, 4)}[alibi_shape]
    kwargs = dict(window_size=(2, 1), softcap=softcap, alibi_slopes=slopes)
    out, lse = attention_ref(q, k, v, 1.3, **kwargs)
    expected_out, expected_lse = naive_attention(q, k, v, 1.3, **kwargs)
    assert_close_f64(out, expected_out)
    assert_close_f64(lse, expected_lse)


def test_reference_softcap_bounds_the_scores():
    """|softcap * tanh(z / softcap)| < softcap: with a tiny cap every key gets nearly the same weight."""
    q, k, v = make_qkv(1, 4, 6, 2, 2, 8)
    q = q * 100  # scores far beyond the cap
    probs = attention_probs(q, k, 1.0, softcap=0.01)
    torch.testing.assert_close(probs, torch.full_like(probs, 1 / 6), rtol=0.05, atol=0)


def test_reference_alibi_per_head_equals_per_batch_rows():
    q, k, v = make_qkv(3, 5, 7, 4, 2, 8)
    slopes = torch.rand(4)
    per_head = attention_ref(q, k, v, alibi_slopes=slopes)
    per_batch = attention_ref(q, k, v, alibi_slopes=slopes.expand(3, 4).clone())
    assert_close_f64(per_head[0], per_batch[0])
    assert_close_f64(per_head[1], per_batch[1])


def test_reference_upcast_false_keeps_input_precision_with_modifiers():
    q, k, v = make_qkv(1, 16, 24, 2, 2, 32, dtype=torch.bfloat16)
    kwargs = dict(causal=True, window_size=(5, 0), softcap=3.0, alibi_slopes=torch.rand(2))
    out_lowp, lse = attention_ref(q, k, v, upcast=False, **kwargs)
    out, _ = attention_ref(q, k, v, **kwargs)
    assert out_lowp.dtype == torch.bfloat16 and lse.dtype == torch.float32 and out.dtype == torch.float32
    torch.testing.assert_close(out_lowp.float(), out, rtol=5e-2, atol=5e-2)


# attention_cpu (the CPU path) against attention_ref.


@pytest.mark.parametrize("block_size", [1, 4, 256], ids=["blk1", "blk4", "blk256"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window_size", WINDOWS, ids=[window_id(w) for w in WINDOWS])
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS + [(13, 30)], ids=[f"sq{a}-sk{b}" for a, b in SEQLENS + [(13, 30)]])
def test_cpu_window_matches_reference(seqlen_q, seqlen_k, window_size, causal, block_size):
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, 2, 8)
    out, lse = attention_cpu(q, k, v, 0.5, causal, window_size, block_size=block_size)
    expected_out, expected_lse = attention_ref(q, k, v, 0.5, causal, window_size=window_size)
    assert_close_f64(out, expected_out)
    assert_close_f64(lse, expected_lse)


@pytest.mark.parametrize(
    "seqlen_q,seqlen_k,window_size,causal,empty_rows",
    [
        (8, 3, (1, 1), False, [0, 1, 2, 3]),  # off = -5: row i sees [i - 6, i - 4]
        (8, 3, (0, 2), False, [0, 1, 2]),
        (8, 3, (4, 0), True, [0, 1, 2, 3, 4]),  # causal: nothing left of the diagonal -5 + i reaches key 0 before row 5
        (5, 0, (2, 2), False, [0, 1, 2, 3, 4]),  # no keys at all
    ],
    ids=["sym-window", "right-window", "causal-local", "no-keys"],
)
def test_rows_without_a_key_give_zero_and_inf_lse(seqlen_q, seqlen_k, window_size, causal, empty_rows):
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 2, 1, 8)
    for out, lse in (attention_cpu(q, k, v, 0.5, causal, window_size, softcap=2.0, alibi_slopes=torch.rand(2),
                                   block_size=2),
                     attention_ref(q, k, v, 0.5, causal, window_size=window_size, softcap=2.0,
                                   alibi_slopes=torch.rand(2))):
        empty = torch.isinf(lse[0, 0])
        assert empty.nonzero().flatten().tolist() == empty_rows
        assert torch.all(out[:, empty_rows] == 0) and torch.all(lse[:, :, empty_rows] == math.inf)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("alibi_shape", [None, "h", "bh"])
@pytest.mark.parametrize("softcap", [0.0, 1.0, 30.0])
@pytest.mark.parametrize("window_size,causal", [((-1, -1), False), ((-1, -1), True), ((4, 2), False), ((3, 0), True)],
                         ids=["full", "causal", "local", "causal-local"])
def test_cpu_softcap_alibi_combos_match_reference(window_size, causal, softcap, alibi_shape):
    q, k, v = make_qkv(2, 11, 17, 4, 2, 8)
    slopes = {None: None, "h": torch.rand(4), "bh": torch.rand(2, 4)}[alibi_shape]
    kwargs = dict(window_size=window_size, softcap=softcap, alibi_slopes=slopes)
    out, lse = attention_cpu(q, k, v, 0.9, causal, block_size=5, **kwargs)
    expected_out, expected_lse = attention_ref(q, k, v, 0.9, causal, **kwargs)
    assert_close_f64(out, expected_out)
    assert_close_f64(lse, expected_lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cpu_modifiers_in_low_precision(dtype):
    q, k, v = make_qkv(2, 40, 70, 4, 1, 32, dtype=dtype)
    kwargs = dict(window_size=(16, 4), softcap=5.0, alibi_slopes=torch.rand(2, 4))
    out, lse = attention_cpu(q, k, v, 32**-0.5, True, block_size=16, **kwargs)
    expected_out, expected_lse = attention_ref(q, k, v, 32**-0.5, True, **kwargs)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)


def test_public_api_matches_reference_with_modifiers():
    q, k, v = make_qkv(2, 33, 47, 4, 2, 16, dtype=torch.float32)
    kwargs = dict(window_size=(8, 3), softcap=4.0, alibi_slopes=torch.rand(4))
    out, lse, s_dmask = flash_attn_func(q, k, v, causal=True, return_attn_probs=True, **kwargs)
    expected_out, expected_lse = attention_ref(q, k, v, causal=True, **kwargs)
    assert s_dmask is None
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)


def test_window_list_and_causal_fold():
    """window_size may be a list (as flash-attn allows); causal with (left, right) means (left, 0)."""
    q, k, v = make_qkv(1, 9, 12, 2, 2, 8)
    torch.testing.assert_close(flash_attn_func(q, k, v, window_size=[3, 5], causal=True),
                               flash_attn_func(q, k, v, window_size=(3, 0)))
    torch.testing.assert_close(flash_attn_func(q, k, v, window_size=(-1, 0)), flash_attn_func(q, k, v, causal=True))


# Variable-length batches.


@pytest.mark.parametrize("alibi_shape", ["h", "bh"])
def test_varlen_cpu_matches_reference_per_sequence(alibi_shape):
    lens_q, lens_k = [7, 0, 1, 12, 5], [9, 3, 0, 12, 2]
    q = torch.randn(sum(lens_q), 4, 8, dtype=torch.float64)
    k, v = (torch.randn(sum(lens_k), 2, 8, dtype=torch.float64) for _ in range(2))
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    slopes = torch.rand(4) if alibi_shape == "h" else torch.rand(len(lens_q), 4)
    kwargs = dict(window_size=(3, 1), softcap=2.0, alibi_slopes=slopes)
    out, lse = attention_cpu_varlen(q, k, v, cu_q, cu_k, 0.5, True, block_size=4, **kwargs)
    expected_out, expected_lse = attention_ref_varlen(q, k, v, cu_q, cu_k, 0.5, True, **kwargs)
    assert_close_f64(out, expected_out)
    assert_close_f64(lse, expected_lse)
    api_out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 12, 12, softmax_scale=0.5, causal=True, **kwargs)
    assert_close_f64(api_out, expected_out)
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    for b in range(len(lens_q)):  # each sequence alone, with its own slopes, positions from its own start
        sq, sk = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        seq_slopes = slopes if slopes.dim() == 1 else slopes[b]
        dense_out, _ = naive_attention(q[None, sq], k[None, sk], v[None, sk], 0.5, True, (3, 1), 2.0, seq_slopes)
        assert_close_f64(out[sq], dense_out[0])


# Gradients.


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(window_size=(2, 1)),
        dict(window_size=(1, 0), causal=True),
        dict(softcap=0.8),
        dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625])),
        dict(alibi_slopes=torch.rand(2, 4), softcap=2.0, window_size=(3, 2), causal=True),
    ],
    ids=["window", "causal-window", "softcap", "alibi-h", "all"],
)
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(4, 6), (6, 4)], ids=["sq4-sk6", "sq6-sk4"])
def test_gradcheck_modifiers(seqlen_q, seqlen_k, kwargs):
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, 2, 4, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=0.7, **kwargs), (q, k, v))


def test_gradcheck_varlen_modifiers():
    lens_q, lens_k = [3, 0, 4], [2, 3, 5]
    q = torch.randn(sum(lens_q), 2, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), 1, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    kwargs = dict(window_size=(1, 1), softcap=1.5, alibi_slopes=torch.rand(3, 2))

    def attention(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, **kwargs)

    assert torch.autograd.gradcheck(attention, (q, k, v))


def test_gradcheck_dropout_with_fixed_mask():
    q, k, v = make_qkv(1, 5, 6, 2, 1, 4, requires_grad=True)
    keep = torch.rand(1, 2, 5, 6) < 0.7
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention_cpu(q, k, v, 0.6, True, (2, 0), dropout_p=0.3, dropout_mask=keep, block_size=2)[0],
        (q, k, v),
    )


def test_cpu_dropout_gradients_match_reference_with_the_same_mask():
    """The public API's dropout gradients: S_dmask gives the mask, the reference with that mask the gradients."""
    q, k, v = make_qkv(2, 9, 13, 4, 2, 8, requires_grad=True)
    grad_out = torch.randn(2, 9, 4, 8, dtype=torch.float64)
    out, _, s_dmask = flash_attn_func(q, k, v, dropout_p=0.25, window_size=(4, 4), softcap=3.0, return_attn_probs=True)
    keep = ~torch.signbit(s_dmask)  # dropped entries are negated, -0.0 included
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_out, _ = attention_ref(q, k, v, window_size=(4, 4), softcap=3.0, dropout_p=0.25, dropout_mask=keep)
    assert_close_f64(out, ref_out)
    for grad, want in zip(grads, torch.autograd.grad(ref_out, (q, k, v), grad_out)):
        assert_close_f64(grad, want)


def test_cpu_dropout_without_probs_gradient_flows():
    q, k, v = make_qkv(2, 20, 30, 4, 2, 16, dtype=torch.float32, requires_grad=True)
    out = flash_attn_func(q, k, v, dropout_p=0.1, causal=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    out.square().sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


# Dropout.


def dropout_probe(seqlen_q, seqlen_k, dropout_p, block_size):
    """attention_cpu with v = identity (head dim = seqlen_k): out[i, j] = P_ij * keep_ij / (1 - p), so the
    output shows the mask. Returns (out (b, h, s_q, s_k), probs without dropout)."""
    q, k, _ = make_qkv(2, seqlen_q, seqlen_k, 2, 2, seqlen_k)
    v = torch.eye(seqlen_k, dtype=torch.float64).expand(2, 2, seqlen_k, seqlen_k).transpose(1, 2)
    out, _ = attention_cpu(q, k, v, 0.1, False, dropout_p=dropout_p, block_size=block_size)
    return out.transpose(1, 2), attention_probs(q, k, 0.1)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_cpu_dropout_keep_rate_and_scaling(dropout_p):
    out, probs = dropout_probe(64, 96, dropout_p, block_size=40)
    kept = out != 0
    rate, n = kept.double().mean().item(), kept.numel()
    sigma = math.sqrt(dropout_p * (1 - dropout_p) / n)
    assert abs(rate - (1 - dropout_p)) < 5 * sigma, f"keep rate {rate}, expected {1 - dropout_p} +- {5 * sigma}"
    assert_close_f64(out, torch.where(kept, probs / (1 - dropout_p), torch.zeros_like(probs)))
    # Every block of keys draws its own mask: the kept fraction is right in each.
    for start in range(0, 96, 40):
        assert abs(kept[..., start : start + 40].double().mean().item() - (1 - dropout_p)) < 0.1


def test_dropout_is_reproducible_from_the_seed():
    q, k, v = make_qkv(1, 16, 16, 2, 2, 8, dtype=torch.float32)
    torch.manual_seed(7)
    first = flash_attn_func(q, k, v, dropout_p=0.3)
    torch.manual_seed(7)
    again = flash_attn_func(q, k, v, dropout_p=0.3)
    other = flash_attn_func(q, k, v, dropout_p=0.3)
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("entry", ["func", "qkvpacked", "kvpacked"])
def test_return_attn_probs_with_dropout_gives_signed_probabilities(entry):
    q, k, v = make_qkv(2, 12, 12, 4, 4, 8)
    kwargs = dict(dropout_p=0.4, softmax_scale=0.5, causal=True, window_size=(5, 0), alibi_slopes=torch.rand(4),
                  return_attn_probs=True)
    if entry == "func":
        out, lse, s_dmask = flash_attn_func(q, k, v, **kwargs)
    elif entry == "qkvpacked":
        out, lse, s_dmask = flash_attn_qkvpacked_func(torch.stack([q, k, v], dim=2), **kwargs)
    else:
        out, lse, s_dmask = flash_attn_kvpacked_func(q, torch.stack([k, v], dim=2), **kwargs)
    assert s_dmask.shape == (2, 4, 12, 12) and s_dmask.dtype == q.dtype
    modifiers = dict(window_size=(5, 0), alibi_slopes=kwargs["alibi_slopes"])
    probs = attention_probs(q, k, 0.5, True, **modifiers)
    assert_close_f64(s_dmask.abs(), probs)
    keep = ~torch.signbit(s_dmask)
    dropped_visible = (~keep & (probs > 0)).double().sum() / (probs > 0).sum()
    assert 0.25 < dropped_visible < 0.55
    expected_out, expected_lse = attention_ref(q, k, v, 0.5, True, dropout_p=0.4, dropout_mask=keep, **modifiers)
    assert_close_f64(out, expected_out)
    assert_close_f64(lse, expected_lse)
    assert_close_f64(lse, attention_ref(q, k, v, 0.5, True, **modifiers)[1])  # lse ignores dropout


def test_varlen_return_attn_probs_with_dropout_is_padded_per_sequence():
    lens_q, lens_k = [5, 0, 3], [4, 2, 6]
    q = torch.randn(sum(lens_q), 2, 8, dtype=torch.float64)
    k, v = (torch.randn(sum(lens_k), 2, 8, dtype=torch.float64) for _ in range(2))
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    slopes = torch.rand(3, 2)
    out, lse, s_dmask = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 7, dropout_p=0.3, window_size=(2, 2),
                                               alibi_slopes=slopes, return_attn_probs=True)
    assert s_dmask.shape == (3, 2, 6, 7)
    probs = attention_probs_varlen(q, k, cu_q, cu_k, 6, 7, window_size=(2, 2), alibi_slopes=slopes)
    assert_close_f64(s_dmask.abs(), probs)
    assert torch.all(s_dmask[0, :, 5:] == 0) and torch.all(s_dmask[0, :, :, 4:] == 0)  # padding past sequence 0
    keep = ~torch.signbit(s_dmask)
    expected_out, expected_lse = attention_ref_varlen(q, k, v, cu_q, cu_k, window_size=(2, 2), alibi_slopes=slopes,
                                                      dropout_p=0.3, dropout_mask=keep)
    assert_close_f64(out, expected_out)
    assert_close_f64(lse, expected_lse)


def test_reference_dropout_needs_a_mask():
    q, k, v = make_qkv(1, 4, 5, 2, 2, 8)
    with pytest.raises(ValueError, match=r"dropout_p=0.2 needs dropout_mask.*\(1, 2, 4, 5\)"):
        attention_ref(q, k, v, dropout_p=0.2)
    with pytest.raises(ValueError, match=r"dropout_mask must be bool \(1, 2, 4, 5\).*got torch.bool \(1, 2, 4, 4\)"):
        attention_ref(q, k, v, dropout_p=0.2, dropout_mask=torch.ones(1, 2, 4, 4, dtype=torch.bool))


def test_varlen_dropout_mask_must_hold_every_sequence():
    q = torch.randn(9, 2, 8, dtype=torch.float64)
    cu = cu_seqlens([4, 5])
    with pytest.raises(ValueError, match=r"dropout_mask of shape \(2, 2, 4, 4\) must be \(batch=2, nheads, >= 5, >= 5\)"):
        attention_ref_varlen(q, q, q, cu, cu, dropout_p=0.1, dropout_mask=torch.ones(2, 2, 4, 4, dtype=torch.bool))


# The entry points thread every argument.


def test_packed_entry_points_equal_unpacked_with_modifiers():
    kwargs = dict(softmax_scale=0.3, causal=True, window_size=(6, 0), softcap=10.0, alibi_slopes=torch.rand(2, 4))
    qkv = torch.randn(2, 20, 3, 4, 16, dtype=torch.float64)
    q, k, v = qkv.unbind(2)
    expected = flash_attn_func(q, k, v, **kwargs)
    assert torch.equal(flash_attn_qkvpacked_func(qkv, **kwargs), expected)
    assert torch.equal(flash_attn_kvpacked_func(q, qkv[:, :, 1:], **kwargs), expected)

    lens = [7, 13]
    cu = cu_seqlens(lens)
    packed = qkv[0].clone()
    expected = flash_attn_varlen_func(*packed.unbind(1), cu, cu, 13, 13, **kwargs)
    assert torch.equal(flash_attn_varlen_qkvpacked_func(packed, cu, 13, **kwargs), expected)
    assert torch.equal(flash_attn_varlen_kvpacked_func(packed[:, 0], packed[:, 1:], cu, cu, 13, 13, **kwargs), expected)


class CudaBranchRecorder:
    """Stand-ins for ``_attention_cuda`` and ``_ops.dropout_keep_mask``: the CUDA branch of ``_attention`` on CPU
    tensors, recording what it is called with. The "kernel" is attention_ref with the mask the keep-mask op returns."""

    def __init__(self):
        self.calls, self.mask_calls = [], []
        self.keep = None

    def attention_cuda(self, q, k, v, softmax_scale, causal, deterministic, varlen_args=(None, None, 0, 0), *,
                       window_size, softcap, alibi_slopes, dropout_p):
        self.calls.append(dict(softmax_scale=softmax_scale, causal=causal, deterministic=deterministic,
                               varlen_args=varlen_args, window_size=window_size, softcap=softcap,
                               alibi_slopes=alibi_slopes, dropout_p=dropout_p))
        out, lse = attention_ref(q, k, v, softmax_scale, causal, window_size=window_size, softcap=softcap,
                                 alibi_slopes=alibi_slopes) if varlen_args[0] is None else attention_ref_varlen(
            q, k, v, *varlen_args[:2], softmax_scale, causal, window_size=window_size, softcap=softcap,
            alibi_slopes=alibi_slopes)
        return out.to(q.dtype), lse, (torch.tensor([1, 2]) if dropout_p > 0 else None)

    def dropout_keep_mask(self, rng_state, batch, nheads, seqlen_q, seqlen_k, dropout_p, cu_seqlens_q=None,
                          cu_seqlens_k=None):
        self.mask_calls.append(dict(rng_state=rng_state, shape=(batch, nheads, seqlen_q, seqlen_k), dropout_p=dropout_p,
                                    cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k))
        self.keep = torch.rand(batch, nheads, seqlen_q, seqlen_k) < 1 - dropout_p
        return self.keep


@pytest.fixture
def cuda_branch(monkeypatch):
    recorder = CudaBranchRecorder()
    monkeypatch.setattr(interface, "_runs_on_kernels", lambda q: True)
    monkeypatch.setattr(interface, "_attention_cuda", recorder.attention_cuda)
    monkeypatch.setattr(_ops, "dropout_keep_mask", recorder.dropout_keep_mask, raising=False)
    return recorder


def test_cuda_branch_gets_every_modifier(cuda_branch):
    q, k, v = make_qkv(2, 6, 9, 4, 2, 8)
    slopes = torch.rand(2, 4)
    out, lse, s_dmask = flash_attn_func(q, k, v, 0.2, 0.5, True, [3, 7], 2.5, slopes, True, return_attn_probs=True)
    (call,) = cuda_branch.calls
    assert call["window_size"] == (3, 0) and isinstance(call["window_size"], tuple)  # causal folded in
    assert call["causal"] is True and call["deterministic"] is True and call["softmax_scale"] == 0.5
    assert call["softcap"] == 2.5 and call["alibi_slopes"] is slopes and call["dropout_p"] == 0.2
    assert call["varlen_args"] == (None, None, 0, 0)
    (mask_call,) = cuda_branch.mask_calls
    assert mask_call["shape"] == (2, 4, 6, 9) and mask_call["dropout_p"] == 0.2 and mask_call["cu_seqlens_q"] is None
    assert torch.equal(mask_call["rng_state"], torch.tensor([1, 2]))
    probs = attention_probs(q, k, 0.5, True, (3, 0), 2.5, slopes)
    assert_close_f64(s_dmask, torch.where(cuda_branch.keep, probs, -probs))
    assert not s_dmask.requires_grad


def test_cuda_branch_without_dropout_asks_for_no_mask(cuda_branch):
    q, k, v = make_qkv(1, 4, 4, 2, 2, 8)
    assert flash_attn_func(q, k, v, window_size=(1, 1), return_attn_probs=True)[2] is None
    assert flash_attn_func(q, k, v, dropout_p=0.5).shape == q.shape  # no S_dmask asked for
    assert cuda_branch.mask_calls == [] and cuda_branch.calls[0]["window_size"] == (1, 1)


def test_cuda_branch_varlen_gets_the_packed_batch(cuda_branch):
    lens_q, lens_k = [3, 5], [4, 2]
    q = torch.randn(8, 2, 8, dtype=torch.float64)
    k, v = (torch.randn(6, 1, 8, dtype=torch.float64) for _ in range(2))
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    out, lse, s_dmask = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 4, dropout_p=0.1, window_size=(2, 1),
                                               softcap=1.0, return_attn_probs=True)
    (call,) = cuda_branch.calls
    assert call["varlen_args"] == (cu_q, cu_k, 5, 4) and call["window_size"] == (2, 1) and call["softcap"] == 1.0
    (mask_call,) = cuda_branch.mask_calls
    assert mask_call["shape"] == (2, 2, 5, 4) and mask_call["cu_seqlens_q"] is cu_q and mask_call["cu_seqlens_k"] is cu_k
    probs = attention_probs_varlen(q, k, cu_q, cu_k, 5, 4, window_size=(2, 1), softcap=1.0, lse=lse)
    assert s_dmask.shape == (2, 2, 5, 4)
    assert_close_f64(s_dmask, torch.where(cuda_branch.keep, probs, -probs))


# Refusals: one per bad value, matching the message.


def _dense_call(**kwargs):
    q = torch.randn(2, 8, 4, 16)
    k = torch.randn(2, 8, 2, 16)
    return flash_attn_func(q, k, k, **kwargs)


BAD_VALUES = [
    (dict(window_size=(-2, 0)), ValueError, r"each edge of window_size must be -1 \(unbounded\) or >= 0, got window_size=\(-2, 0\)"),
    (dict(window_size=(4, -5)), ValueError, r"got window_size=\(4, -5\)"),
    (dict(window_size=(1.5, 0)), TypeError, r"window_size must be a pair \(left, right\) of ints, got \(1.5, 0\)"),
    (dict(window_size=(1, 2, 3)), TypeError, r"window_size must be a pair .* got \(1, 2, 3\)"),
    (dict(window_size=4), TypeError, r"window_size must be a pair .* got 4"),
    (dict(window_size=(True, 0)), TypeError, r"window_size must be a pair"),
    (dict(softcap=-1.0), ValueError, r"softcap must be finite and >= 0 \(0 turns it off\), got -1.0"),
    (dict(softcap=math.inf), ValueError, r"softcap must be finite .* got inf"),
    (dict(softcap=math.nan), ValueError, r"softcap must be finite .* got nan"),
    (dict(softcap="30"), TypeError, r"softcap must be a number, got str"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\), got -0.1"),
    (dict(dropout_p=math.nan), ValueError, r"dropout_p must be in \[0, 1\), got nan"),
    (dict(dropout_p=None), TypeError, r"dropout_p must be a number in \[0, 1\), got NoneType"),
    (dict(alibi_slopes=torch.rand(5)), ValueError,
     r"alibi_slopes must have shape \(nheads,\) = \(4,\) or \(batch, nheads\) = \(2, 4\), got \(5,\)"),
    (dict(alibi_slopes=torch.rand(3, 4)), ValueError, r"= \(2, 4\), got \(3, 4\)"),
    (dict(alibi_slopes=torch.rand(4, 1)), ValueError, r"got \(4, 1\)"),
    (dict(alibi_slopes=torch.rand(2, 2)), ValueError, r"got \(2, 2\)"),  # nheads_k, not nheads
    (dict(alibi_slopes=torch.rand(4, dtype=torch.float64)), TypeError, r"alibi_slopes must be float32 .* got torch.float64"),
    (dict(alibi_slopes=torch.rand(4).half()), TypeError, r"got torch.float16"),
    (dict(alibi_slopes=[0.5] * 4), TypeError, r"alibi_slopes must be a torch.Tensor or None, got list"),
    (dict(alibi_slopes=torch.empty(4, device="meta")), ValueError, r"alibi_slopes is on meta but q is on cpu"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_VALUES, ids=[
    "window-left-2", "window-right-5", "window-float", "window-triple", "window-int", "window-bool",
    "softcap-negative", "softcap-inf", "softcap-nan", "softcap-str", "dropout-1", "dropout-negative", "dropout-nan",
    "dropout-none", "alibi-5", "alibi-batch3", "alibi-4x1", "alibi-kv-heads", "alibi-f64", "alibi-f16", "alibi-list",
    "alibi-device",
])
def test_bad_modifier_values_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        _dense_call(**kwargs)


def test_varlen_alibi_batch_is_the_number_of_sequences():
    q = torch.randn(9, 4, 8)
    cu = cu_seqlens([4, 2, 3])
    flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, alibi_slopes=torch.rand(3, 4))  # 3 sequences: accepted
    with pytest.raises(ValueError, match=r"\(batch, nheads\) = \(3, 4\), got \(9, 4\)"):
        flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, alibi_slopes=torch.rand(9, 4))


def test_alibi_slopes_need_not_be_contiguous():
    q, k, v = make_qkv(2, 5, 5, 4, 4, 8, dtype=torch.float32)
    slopes = torch.rand(4, 2).t()  # (2, 4) with strides (1, 2)
    assert not slopes.is_contiguous()
    torch.testing.assert_close(flash_attn_func(q, k, v, alibi_slopes=slopes),
                               flash_attn_func(q, k, v, alibi_slopes=slopes.contiguous()))
