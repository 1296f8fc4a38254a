"""flash_attn_with_kvcache and merge_attention without a GPU.

* ``apply_rotary`` against rotation by complex multiplication (both pair layouts, full and partial rotary_dim);
* the CPU path against a naive oracle that walks the cache row by row: dense and paged caches, the append in
  place (with every row that should not be written poisoned with NaN and checked bitwise untouched, and the NaN
  never reaching the output), leftpad, cache_batch_idx, causal and local windows with seqlen_q in {1, 4},
  softcap and ALiBi; ``kvcache_attention_ref`` (the GPU tests' oracle) against the same oracle;
* ``merge_attention``: parts of a key set merge to attention over all of it, empty parts and all-empty rows;
* the CUDA branch is called with an int32 cache_seqlens tensor and the folded window, and bad inputs are refused.
"""

import math

import pytest
import torch

from flash_attn2 import _ops, flash_attn_with_kvcache, interface, merge_attention
from flash_attn2.reference import apply_rotary, attention_ref, kvcache_attention_ref

ROTARY_BASE = 10000.0
NHEADS, HEAD_DIM = 4, 16
POISON = float("nan")


def rotary_tables(seqlen_ro, rotary_dim, dtype=torch.float64):
    """cos/sin (seqlen_ro, rotary_dim / 2) of the standard angles p * base^(-2i / rotary_dim), and the angles."""
    inv_freq = ROTARY_BASE ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(seqlen_ro, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype), angles


def rotate_by_complex(x, angles, positions, interleaved):
    """The rotation as a complex product: pair (a, b) is a + ib, times e^(i theta). x (n, h, d) float64, positions (n,)."""
    rotary_dim = 2 * angles.shape[1]
    part = x[..., :rotary_dim]
    if interleaved:
        pairs = torch.complex(part[..., 0::2], part[..., 1::2])
    else:
        pairs = torch.complex(part[..., : rotary_dim // 2], part[..., rotary_dim // 2 :])
    turned = pairs * torch.polar(torch.ones_like(angles[positions]), angles[positions])[:, None, :]
    if interleaved:
        rotated = torch.stack((turned.real, turned.imag), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((turned.real, turned.imag), dim=-1)
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("rotary_dim", [HEAD_DIM, HEAD_DIM // 2], ids=["full", "half"])
def test_apply_rotary_matches_complex_rotation(rotary_dim, interleaved):
    cos, sin, angles = rotary_tables(40, rotary_dim)
    x = torch.randn(3, 5, 2, HEAD_DIM, dtype=torch.float64)
    positions = torch.randint(0, 40, (3, 5))
    out = apply_rotary(x, cos, sin, positions, interleaved)
    for b in range(3):
        torch.testing.assert_close(out[b], rotate_by_complex(x[b], angles, positions[b], interleaved),
                                   rtol=1e-12, atol=1e-12)
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])


def test_apply_rotary_rounds_to_the_input_dtype():
    cos, sin, _ = rotary_tables(8, HEAD_DIM, torch.bfloat16)
    x = torch.randn(1, 8, 2, HEAD_DIM, dtype=torch.bfloat16)
    out = apply_rotary(x, cos, sin, torch.arange(8)[None], True)
    expected = apply_rotary(x.double(), cos.double(), sin.double(), torch.arange(8)[None], True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)


# The naive oracle: one cache row at a time.


class Cache:
    """A poisoned cache: NaN everywhere except the rows each sequence holds. ``slot(b, r)`` is the (index, row)
    of sequence b's logical row r, as the docstring of flash_attn_with_kvcache defines it."""

    def __init__(self, layout, seqlens, capacity, nheads_k, dtype=torch.float64, page_size=16, leftpad=None):
        self.layout, self.batch, self.page_size = layout, len(seqlens), page_size
        self.leftpad = leftpad or [0] * self.batch
        self.block_table = self.batch_idx = None
        if layout == "paged":
            pages = capacity // page_size
            num_blocks = self.batch * pages + 3  # spare pages nobody owns: must stay poisoned
            self.block_table = torch.randperm(num_blocks)[: self.batch * pages].reshape(self.batch, pages).int()
            shape = (num_blocks, page_size, nheads_k, HEAD_DIM)
        else:
            rows = self.batch + (2 if layout == "batch_idx" else 0)
            if layout == "batch_idx":
                self.batch_idx = torch.randperm(rows)[: self.batch].int()
            shape = (rows, capacity, nheads_k, HEAD_DIM)
        self.k = torch.full(shape, POISON, dtype=dtype)
        self.v = torch.full(shape, POISON, dtype=dtype)
        for b, n in enumerate(seqlens):
            for r in range(self.leftpad[b], n):  # rows before leftpad are padding: poisoned, never read
                self.k[self.slot(b, r)] = torch.randn(nheads_k, HEAD_DIM, dtype=dtype)
                self.v[self.slot(b, r)] = torch.randn(nheads_k, HEAD_DIM, dtype=dtype)

    def slot(self, b, r):
        if self.block_table is not None:
            return int(self.block_table[b, r // self.page_size]), r % self.page_size
        return (b if self.batch_idx is None else int(self.batch_idx[b])), r

    def kwargs(self):
        leftpad = torch.tensor(self.leftpad, dtype=torch.int32) if any(self.leftpad) else None
        return dict(block_table=self.block_table, cache_batch_idx=self.batch_idx, cache_leftpad=leftpad)


def naive_kvcache(q, cache, k, v, seqlens, causal, window_size, rotary=None, interleaved=True, softmax_scale=None,
                  softcap=0.0, alibi_slopes=None):
    """(expected k_cache, expected v_cache, out, lse): the append row by row, rotary by complex rotation, then
    attention_ref per sequence over the rows leftpad .. seqlens + seqlen_new."""
    k_cache, v_cache = cache.k.clone(), cache.v.clone()
    seqlen_new = 0 if k is None else k.shape[1]
    local = causal or tuple(window_size) != (-1, -1)
    outs, lses = [], []
    for b, n in enumerate(seqlens):
        start = n - cache.leftpad[b]  # the position of the first new row
        new_k = k[b] if k is not None else None
        if rotary is not None and new_k is not None:
            new_k = rotate_by_complex(new_k.double(), rotary, torch.arange(start, start + seqlen_new), interleaved)
        for i in range(seqlen_new):
            k_cache[cache.slot(b, n + i)] = new_k[i]
            v_cache[cache.slot(b, n + i)] = v[b, i]
        q_b = q[b].double()
        if rotary is not None:
            q_positions = start + (torch.arange(q.shape[1]) if local else torch.zeros(q.shape[1], dtype=torch.int64))
            q_b = rotate_by_complex(q_b, rotary, q_positions, interleaved)
        rows = range(cache.leftpad[b], n + seqlen_new)
        keys = torch.stack([k_cache[cache.slot(b, r)] for r in rows]) if rows else k_cache.new_zeros(0, *k_cache.shape[2:])
        values = torch.stack([v_cache[cache.slot(b, r)] for r in rows]) if rows else keys
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b : b + 1]
        out, lse = attention_ref(q_b[None], keys[None].double(), values[None].double(), softmax_scale, causal,
                                 window_size=window_size, softcap=softcap, alibi_slopes=slopes)
        outs.append(out)
        lses.append(lse)
    return k_cache, v_cache, torch.cat(outs), torch.cat(lses)


def assert_same_with_nan(actual, expected):
    """Equal, NaN where NaN: the poisoned rows are exactly where they were."""
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    assert torch.equal(actual.nan_to_num(), expected.nan_to_num())


CASES = [
    # layout, seqlens, capacity, seqlen_q, seqlen_new, nheads_k, causal, window, rotary ("" / "i" / "n" + dim), leftpad
    pytest.param("dense", [5, 0, 9], 16, 1, 1, 2, False, (-1, -1), "", None, id="dense-decode"),
    pytest.param("dense", [5, 2, 9], 16, 4, 4, 1, True, (-1, -1), "i16", None, id="dense-causal-rotary-interleaved"),
    pytest.param("dense", [7, 3, 12], 16, 4, 0, 4, True, (2, 0), "", None, id="dense-local-no-append"),
    pytest.param("dense", [6, 1, 10], 16, 1, 3, 2, False, (-1, -1), "n8", None, id="dense-rotary-neox-half"),
    pytest.param("dense", [6, 4, 10], 16, 4, 3, 2, False, (3, 1), "n16", None, id="dense-window-rotary-neox"),
    pytest.param("batch_idx", [4, 8, 0], 12, 1, 2, 2, True, (-1, -1), "i8", None, id="batch-idx"),
    pytest.param("batch_idx", [4, 8, 3], 12, 4, 1, 1, True, (4, 0), "", None, id="batch-idx-local"),
    pytest.param("dense", [5, 2, 9], 16, 1, 1, 2, False, (-1, -1), "i16", [2, 0, 4], id="leftpad-rotary"),
    pytest.param("dense", [5, 3, 9], 16, 4, 2, 2, True, (2, 0), "n16", [5, 1, 3], id="leftpad-local"),
    pytest.param("paged", [20, 0, 33], 48, 1, 1, 2, False, (-1, -1), "", None, id="paged-decode"),
    pytest.param("paged", [15, 16, 31], 48, 4, 4, 1, True, (-1, -1), "i16", None, id="paged-causal-page-edges"),
    pytest.param("paged", [17, 5, 40], 64, 4, 8, 4, True, (6, 0), "n8", None, id="paged-local-rotary"),
    pytest.param("paged", [3, 30, 12], 32, 1, 0, 2, False, (4, 0), "", None, id="paged-window-no-append"),
]


def rotary_args(spec, seqlen_ro=80):
    """(cos, sin, angles, interleaved) for a case's rotary spec, e.g. "i16", or Nones for ""."""
    if not spec:
        return None, None, None, True
    cos, sin, angles = rotary_tables(seqlen_ro, int(spec[1:]))
    return cos, sin, angles, spec[0] == "i"


@pytest.mark.parametrize("layout,seqlens,capacity,seqlen_q,seqlen_new,nheads_k,causal,window,rotary,leftpad", CASES)
@pytest.mark.parametrize("seqlens_as", ["tensor", "int"])
def test_cpu_path_matches_naive_oracle(layout, seqlens, capacity, seqlen_q, seqlen_new, nheads_k, causal, window,
                                       rotary, leftpad, seqlens_as):
    if seqlens_as == "int":  # every sequence as long as the first (int cache_seqlens), leftpad kept
        seqlens = [seqlens[0]] * len(seqlens)
        leftpad = None if leftpad is None else [min(p, seqlens[0]) for p in leftpad]
    cache = Cache(layout, seqlens, capacity, nheads_k, leftpad=leftpad)
    batch = len(seqlens)
    q = torch.randn(batch, seqlen_q, NHEADS, HEAD_DIM, dtype=torch.float64)
    k, v = (torch.randn(batch, seqlen_new, nheads_k, HEAD_DIM, dtype=torch.float64) for _ in range(2))
    cos, sin, angles, interleaved = rotary_args(rotary)
    if seqlen_new == 0 and rotary:
        k = v = None
        cos = sin = angles = None
    expected = naive_kvcache(q, cache, k, v, seqlens, causal, window, angles, interleaved)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32) if seqlens_as == "tensor" else seqlens[0]
    out, lse = flash_attn_with_kvcache(q, cache.k, cache.v, k, v, cos, sin, cache_seqlens, causal=causal,
                                       window_size=window, rotary_interleaved=interleaved, return_softmax_lse=True,
                                       **cache.kwargs())
    assert_same_with_nan(cache.k, expected[0])
    assert_same_with_nan(cache.v, expected[1])
    assert torch.isfinite(out).all(), "the poisoned rows leaked into the output"
    torch.testing.assert_close(out, expected[2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, expected[3], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [CASES[1].values, CASES[8].values, CASES[11].values],
                         ids=[CASES[1].id, CASES[8].id, CASES[11].id])
def test_kvcache_reference_matches_naive_and_leaves_the_caches(case):
    layout, seqlens, capacity, seqlen_q, seqlen_new, nheads_k, causal, window, rotary, leftpad = case
    cache = Cache(layout, seqlens, capacity, nheads_k, leftpad=leftpad)
    q = torch.randn(len(seqlens), seqlen_q, NHEADS, HEAD_DIM, dtype=torch.float64)
    k, v = (torch.randn(len(seqlens), seqlen_new, nheads_k, HEAD_DIM, dtype=torch.float64) for _ in range(2))
    cos, sin, angles, interleaved = rotary_args(rotary)
    slopes = torch.rand(len(seqlens), NHEADS)
    kwargs = dict(softmax_scale=0.3, softcap=2.0, alibi_slopes=slopes)
    before = cache.k.clone()
    out, lse = kvcache_attention_ref(q, cache.k, cache.v, k, v, cos, sin, torch.tensor(seqlens, dtype=torch.int32),
                                     causal=causal, window_size=window, rotary_interleaved=interleaved,
                                     **cache.kwargs(), **kwargs)
    _, _, expected_out, expected_lse = naive_kvcache(q, cache, k, v, seqlens, causal, window, angles, interleaved,
                                                     **kwargs)
    assert_same_with_nan(cache.k, before)
    torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("alibi_shape", ["h", "bh"])
def test_cpu_path_softcap_alibi(alibi_shape):
    seqlens = [6, 11]
    cache = Cache("paged", seqlens, 32, 2)
    q = torch.randn(2, 4, NHEADS, HEAD_DIM, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 2, HEAD_DIM, dtype=torch.float64) for _ in range(2))
    slopes = torch.rand(NHEADS) if alibi_shape == "h" else torch.rand(2, NHEADS)
    kwargs = dict(softmax_scale=0.4, softcap=1.5, alibi_slopes=slopes)
    expected = naive_kvcache(q, cache, k, v, seqlens, True, (3, 0), **kwargs)
    out, lse = flash_attn_with_kvcache(q, cache.k, cache.v, k, v, cache_seqlens=torch.tensor(seqlens).int(),
                                       block_table=cache.block_table, causal=True, window_size=(3, 0),
                                       return_softmax_lse=True, **kwargs)
    torch.testing.assert_close(out, expected[2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, expected[3], rtol=1e-10, atol=1e-10)


def test_cache_seqlens_none_means_full_and_empty_rows():
    """None: every cache full; a window that leaves a row without keys gives out 0, lse +inf."""
    k_cache, v_cache = torch.randn(2, 8, 2, HEAD_DIM, dtype=torch.float64), torch.randn(2, 8, 2, HEAD_DIM,
                                                                                        dtype=torch.float64)
    q = torch.randn(2, 1, NHEADS, HEAD_DIM, dtype=torch.float64)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, return_softmax_lse=True)
    expected_out, expected_lse = attention_ref(q, k_cache, v_cache)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(lse, expected_lse)
    q4 = torch.randn(2, 4, NHEADS, HEAD_DIM, dtype=torch.float64)
    out, lse = flash_attn_with_kvcache(q4, k_cache, v_cache, cache_seqlens=torch.tensor([0, 2]).int(), causal=True,
                                       return_softmax_lse=True)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == math.inf)  # no keys at all
    assert torch.all(out[1, :2] == 0) and torch.all(lse[1, :, :2] == math.inf)  # rows left of key 0 under causal
    assert torch.isfinite(lse[1, :, 2:]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cpu_path_low_precision(dtype):
    seqlens = [9, 30]
    cache = Cache("paged", seqlens, 32, 2, dtype=dtype)
    q = torch.randn(2, 1, NHEADS, HEAD_DIM, dtype=dtype)
    k, v = (torch.randn(2, 1, 2, HEAD_DIM, dtype=dtype) for _ in range(2))
    cos, sin, _ = rotary_tables(40, HEAD_DIM, dtype)
    kwargs = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=torch.tensor(seqlens).int(),
                  block_table=cache.block_table)
    expected, _ = kvcache_attention_ref(q, cache.k, cache.v, k, v, **kwargs)
    out = flash_attn_with_kvcache(q, cache.k, cache.v, k, v, **kwargs)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


# merge_attention.


def split_keys(seqlen_k, cuts):
    bounds = [0] + cuts + [seqlen_k]
    return list(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("cuts", [[5], [3, 11], [0, 7], [7, 7, 16]], ids=["two", "three", "empty-first", "empty-mid"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_merge_attention_equals_attention_over_the_union(cuts, dtype):
    q = torch.randn(2, 3, NHEADS, HEAD_DIM, dtype=dtype)
    k, v = (torch.randn(2, 16, 2, HEAD_DIM, dtype=dtype) for _ in range(2))
    parts = [attention_ref(q, k[:, a:b], v[:, a:b], 0.5) for a, b in split_keys(16, cuts)]
    out, lse = merge_attention([o.to(dtype) for o, _ in parts], [lse.float() for _, lse in parts])
    expected_out, expected_lse = attention_ref(q, k, v, 0.5)
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = 1e-6 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(out.double(), expected_out.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse, expected_lse.float(), rtol=1e-6, atol=1e-6)


def test_merge_attention_ignores_empty_parts_and_their_garbage():
    """+inf (ours) and -inf (flash-attn's splits) mark empty parts: weight 0, their out (NaN here) never read;
    a row empty in every part gives out 0 and lse +inf."""
    out_a, lse_a = torch.randn(1, 2, NHEADS, HEAD_DIM), torch.randn(1, NHEADS, 2)
    out_b, lse_b = torch.full((1, 2, NHEADS, HEAD_DIM), math.nan), torch.full((1, NHEADS, 2), math.inf)
    out_c, lse_c = torch.full((1, 2, NHEADS, HEAD_DIM), math.nan), torch.full((1, NHEADS, 2), -math.inf)
    lse_a[0, :, 1] = math.inf  # row 1: empty in a too
    out, lse = merge_attention([out_a, out_b, out_c], [lse_a, lse_b, lse_c])
    torch.testing.assert_close(out[:, 0], out_a[:, 0])
    torch.testing.assert_close(lse[..., 0], lse_a[..., 0])
    assert torch.all(out[:, 1] == 0) and torch.all(lse[..., 1] == math.inf)


def test_merge_attention_of_one_part_is_that_part():
    out, lse = torch.randn(2, 3, NHEADS, HEAD_DIM), torch.randn(2, NHEADS, 3) * 30
    merged_out, merged_lse = merge_attention([out], [lse])
    torch.testing.assert_close(merged_out, out)
    torch.testing.assert_close(merged_lse, lse)


def test_merge_attention_large_lse_does_not_overflow():
    out_a, out_b = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    lse_a, lse_b = torch.full((1, 1, 1), 1000.0), torch.full((1, 1, 1), 1000.0)
    out, lse = merge_attention([out_a, out_b], [lse_a, lse_b])
    torch.testing.assert_close(out, (out_a + out_b) / 2)
    torch.testing.assert_close(lse, lse_a + math.log(2))


# The CUDA branch, on CPU tensors with a stand-in op.


class KvcacheOpRecorder:
    """Stand-in for ``_ops.fwd_kvcache``: records its arguments, answers with the reference."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                 cache_leftpad, block_table, softmax_scale, causal, window_left, window_right, softcap,
                 rotary_interleaved, alibi_slopes, num_splits):
        self.calls.append(dict(cache_seqlens=cache_seqlens, softmax_scale=softmax_scale, causal=causal,
                               window=(window_left, window_right), softcap=softcap, interleaved=rotary_interleaved,
                               alibi_slopes=alibi_slopes, num_splits=num_splits, block_table=block_table))
        out, lse = kvcache_attention_ref(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                                         cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
                                         (window_left, window_right), softcap, rotary_interleaved, alibi_slopes)
        return out.to(q.dtype), lse


@pytest.fixture
def cuda_branch(monkeypatch):
    recorder = KvcacheOpRecorder()
    monkeypatch.setattr(interface, "_runs_on_kernels", lambda q: True)
    monkeypatch.setattr(_ops, "fwd_kvcache", recorder, raising=False)
    return recorder


def test_cuda_branch_gets_an_int32_seqlens_tensor_and_the_folded_window(cuda_branch):
    q = torch.randn(2, 1, NHEADS, HEAD_DIM, dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(2, 32, 2, HEAD_DIM, dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(2, 1, 2, HEAD_DIM, dtype=torch.bfloat16) for _ in range(2))
    slopes = torch.rand(NHEADS)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=7, causal=True, window_size=[5, 9],
                                       softcap=3.0, alibi_slopes=slopes, num_splits=3, rotary_interleaved=False,
                                       return_softmax_lse=True)
    (call,) = cuda_branch.calls
    assert call["cache_seqlens"].dtype == torch.int32 and call["cache_seqlens"].tolist() == [7, 7]
    assert call["window"] == (5, 0) and call["causal"] is True and call["num_splits"] == 3
    assert call["softmax_scale"] == HEAD_DIM**-0.5 and call["softcap"] == 3.0 and call["alibi_slopes"] is slopes
    assert call["interleaved"] is False and call["block_table"] is None
    assert out.shape == q.shape and lse.shape == (2, NHEADS, 1)
    assert flash_attn_with_kvcache(q, k_cache, v_cache).shape == q.shape  # None: full cache, 32 rows
    assert cuda_branch.calls[1]["cache_seqlens"].tolist() == [32, 32]


def test_cuda_branch_without_the_op_says_so(monkeypatch):
    monkeypatch.setattr(interface, "_runs_on_kernels", lambda q: True)
    monkeypatch.delattr(_ops, "fwd_kvcache", raising=False)
    q = torch.randn(1, 1, NHEADS, HEAD_DIM, dtype=torch.float16)
    cache = torch.randn(1, 16, 2, HEAD_DIM, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"flash_attn2: .*(not available|no kv-cache op)"):
        flash_attn_with_kvcache(q, cache, cache.clone(), cache_seqlens=3)


# Refusals: one per bad value, matching the message; the cache is left untouched.


def _call(dtype=torch.float32, paged=False, **overrides):
    """A valid call (dense, or paged with 16-row pages) with ``overrides`` replacing its arguments."""
    if paged:
        k_cache = torch.randn(6, 16, 2, HEAD_DIM, dtype=dtype)
        args = dict(block_table=torch.arange(4, dtype=torch.int32).reshape(2, 2))
    else:
        k_cache = torch.randn(2, 16, 2, HEAD_DIM, dtype=dtype)
        args = {}
    args.update(q=torch.randn(2, 1, NHEADS, HEAD_DIM, dtype=dtype), k_cache=k_cache, v_cache=k_cache.clone(),
                k=torch.randn(2, 1, 2, HEAD_DIM, dtype=dtype), v=torch.randn(2, 1, 2, HEAD_DIM, dtype=dtype),
                cache_seqlens=4)
    args.update(overrides)
    return args


def _rotary(rows=32, half=HEAD_DIM // 2, dtype=torch.float32):
    return dict(rotary_cos=torch.randn(rows, half, dtype=dtype), rotary_sin=torch.randn(rows, half, dtype=dtype))


F32, I32 = torch.float32, torch.int32

BAD_INPUTS = [
    ("q-list", {}, dict(q=[1.0]), TypeError, r"q must be a torch.Tensor, got list"),
    ("q-3d", {}, dict(q=torch.randn(2, NHEADS, HEAD_DIM)), ValueError, r"q must be 4-d \(batch, seqlen_q"),
    ("cache-3d", {}, dict(k_cache=torch.randn(2, 16, HEAD_DIM)), ValueError, r"k_cache must be 4-d"),
    ("k-without-v", {}, dict(v=None), ValueError, r"pass k and v both .* got k a tensor and v None"),
    ("cache-dtype", {}, dict(v_cache=torch.randn(2, 16, 2, HEAD_DIM, dtype=torch.float64)), TypeError,
     r"v_cache must have q's dtype torch.float32, got torch.float64"),
    ("int-dtype", {}, dict(q=torch.ones(2, 1, NHEADS, HEAD_DIM, dtype=torch.int64),
                           k_cache=torch.ones(2, 16, 2, HEAD_DIM, dtype=torch.int64),
                           v_cache=torch.ones(2, 16, 2, HEAD_DIM, dtype=torch.int64), k=None, v=None),
     TypeError, r"on CPU the dtype must be one of float16, bfloat16, float32, float64, got torch.int64"),
    ("device", {}, dict(k=torch.empty(2, 1, 2, HEAD_DIM, device="meta")), ValueError, r"k is on meta but q is on cpu"),
    ("cache-shapes", {}, dict(v_cache=torch.randn(2, 15, 2, HEAD_DIM)), ValueError,
     r"k_cache and v_cache must have one shape, got \(2, 16, 2, 16\) and \(2, 15, 2, 16\)"),
    ("head-dim", {}, dict(q=torch.randn(2, 1, NHEADS, 8)), ValueError, r"q and k_cache must have one head dim, got q 8"),
    ("gqa", {}, dict(q=torch.randn(2, 1, 3, HEAD_DIM)), ValueError,
     r"query heads \(3\) must be a multiple of the number of kv heads of k_cache \(2\)"),
    ("k-heads", {}, dict(k=torch.randn(2, 1, 1, HEAD_DIM), v=torch.randn(2, 1, 1, HEAD_DIM)), ValueError,
     r"k must be \(batch, seqlen_new, nheads_k, headdim\) = \(batch=2, seqlen_new, 2, 16\).*got \(2, 1, 1, 16\)"),
    ("kv-shapes", {}, dict(v=torch.randn(2, 2, 2, HEAD_DIM)), ValueError, r"k and v must have one shape"),
    ("cache-batch", {}, dict(k_cache=torch.randn(3, 16, 2, HEAD_DIM), v_cache=torch.randn(3, 16, 2, HEAD_DIM)),
     ValueError, r"k_cache has 3 sequences but q has batch 2; pass cache_batch_idx"),
    ("seqlen-new", {}, dict(k=torch.randn(2, 17, 2, HEAD_DIM), v=torch.randn(2, 17, 2, HEAD_DIM), cache_seqlens=0),
     ValueError, r"seqlen_new=17 rows but the cache holds only 16"),
    ("int-overflow", {}, dict(cache_seqlens=16), ValueError,
     r"cache_seqlens=16 plus seqlen_new=1 must fit in the cache's 16 rows"),
    ("int-negative", {}, dict(cache_seqlens=-1), ValueError, r"cache_seqlens=-1 .*must be >= 0"),
    ("seqlens-float", {}, dict(cache_seqlens=2.0), TypeError, r"cache_seqlens must be an int, an int32 tensor"),
    ("seqlens-none-append", {}, dict(cache_seqlens=None), ValueError, r"cache_seqlens=None means every cache is full"),
    ("seqlens-int64", {}, dict(cache_seqlens=torch.tensor([1, 2])), TypeError, r"cache_seqlens must be int32"),
    ("seqlens-shape", {}, dict(cache_seqlens=torch.tensor([1, 2, 3], dtype=I32)), ValueError,
     r"cache_seqlens must have shape \(batch,\) = \(2,\), got \(3,\)"),
    ("seqlens-value", {}, dict(cache_seqlens=torch.tensor([1, 16], dtype=I32)), ValueError,
     r"every cache_seqlens\[b\] \+ seqlen_new=1 must fit in the cache's 16 rows .* got cache_seqlens=\[1, 16\]"),
    ("leftpad-value", {}, dict(cache_leftpad=torch.tensor([0, 5], dtype=I32)), ValueError,
     r"every cache_leftpad\[b\] must be in 0..cache_seqlens\[b\], got cache_leftpad=\[0, 5\]"),
    ("leftpad-shape", {}, dict(cache_leftpad=torch.tensor([0], dtype=I32)), ValueError,
     r"cache_leftpad must have shape \(batch,\) = \(2,\), got \(1,\)"),
    ("batch-idx-dtype", {}, dict(cache_batch_idx=torch.tensor([0, 1])), TypeError, r"cache_batch_idx must be int32"),
    ("batch-idx-value", {}, dict(cache_batch_idx=torch.tensor([0, 2], dtype=I32)), ValueError,
     r"cache_batch_idx must index k_cache's 2 sequences, got \[0, 2\]"),
    ("table-dtype", dict(paged=True), dict(block_table=torch.zeros(2, 2, dtype=torch.int64)), TypeError,
     r"block_table must be int32"),
    ("table-1d", dict(paged=True), dict(block_table=torch.zeros(4, dtype=I32)), ValueError,
     r"block_table must be 2-d \(batch, max_pages\), got shape \(4,\)"),
    ("table-batch", dict(paged=True), dict(block_table=torch.zeros(3, 2, dtype=I32)), ValueError,
     r"block_table must have shape \(batch, max_pages\) = \(2, 2\), got \(3, 2\)"),
    ("table-list", dict(paged=True), dict(block_table=[[0, 1], [2, 3]]), TypeError,
     r"block_table must be a torch.Tensor or None, got list"),
    ("table-page", dict(paged=True), dict(block_table=torch.tensor([[0, 9], [2, 3]], dtype=I32), cache_seqlens=20),
     ValueError, r"block_table\[0\] names pages \[0, 9\] for its 21 rows, but k_cache has 6 pages"),
    ("page-size", dict(paged=True), dict(k_cache=torch.randn(6, 8, 2, HEAD_DIM), v_cache=torch.randn(6, 8, 2, HEAD_DIM)),
     ValueError, r"page size .* must be a multiple of 16, got 8"),
    ("paged-overflow", dict(paged=True), dict(cache_seqlens=32), ValueError,
     r"cache_seqlens=32 plus seqlen_new=1 must fit in the cache's 32 rows"),
    ("paged-leftpad", dict(paged=True), dict(cache_leftpad=torch.zeros(2, dtype=I32)), ValueError,
     r"cache_leftpad cannot be combined with block_table"),
    ("paged-batch-idx", dict(paged=True), dict(cache_batch_idx=torch.zeros(2, dtype=I32)), ValueError,
     r"cache_batch_idx cannot be combined with block_table"),
    ("rotary-one", {}, dict(rotary_cos=torch.randn(32, 8)), ValueError, r"pass rotary_cos and rotary_sin both"),
    ("rotary-no-k", {}, dict(k=None, v=None, **_rotary()), ValueError, r"rotary_cos/rotary_sin need k and v"),
    ("rotary-1d", {}, dict(rotary_cos=torch.randn(32), rotary_sin=torch.randn(32)), ValueError,
     r"rotary_cos must be 2-d \(seqlen_ro, rotary_dim / 2\)"),
    ("rotary-dtype", {}, _rotary(dtype=torch.float64), TypeError,
     r"rotary_cos must have q's dtype torch.float32, got torch.float64"),
    ("rotary-shapes", {}, dict(rotary_cos=torch.randn(32, 8), rotary_sin=torch.randn(32, 4)), ValueError,
     r"rotary_cos and rotary_sin must have one shape, got \(32, 8\) and \(32, 4\)"),
    ("rotary-dim", {}, _rotary(half=HEAD_DIM), ValueError, r"rotary_dim = 2 \* rotary_cos.shape\[1\] = 32 must be in"),
    ("rotary-short", {}, _rotary(rows=4), ValueError, r"rotary_cos/rotary_sin have 4 positions but this call rotates "
     r"positions up to 4"),
    ("window", {}, dict(window_size=(-2, 0)), ValueError, r"each edge of window_size must be -1 \(unbounded\) or >= 0"),
    ("window-type", {}, dict(window_size=3), TypeError, r"window_size must be a pair"),
    ("softcap", {}, dict(softcap=-1.0), ValueError, r"softcap must be finite and >= 0"),
    ("softcap-inf", {}, dict(softcap=math.inf), ValueError, r"softcap must be finite"),
    ("alibi-shape", {}, dict(alibi_slopes=torch.rand(2)), ValueError,
     r"alibi_slopes must have shape \(nheads,\) = \(4,\) or \(batch, nheads\) = \(2, 4\), got \(2,\)"),
    ("alibi-dtype", {}, dict(alibi_slopes=torch.rand(NHEADS, dtype=torch.float64)), TypeError,
     r"alibi_slopes must be float32"),
    ("num-splits-negative", {}, dict(num_splits=-1), ValueError, r"num_splits must be >= 0 .* got -1"),
    ("num-splits-float", {}, dict(num_splits=2.0), TypeError, r"num_splits must be an int .* got float"),
    ("num-splits-bool", {}, dict(num_splits=True), TypeError, r"num_splits must be an int .* got bool"),
]


@pytest.mark.parametrize("setup,overrides,error,match", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_are_refused_and_the_cache_is_untouched(setup, overrides, error, match):
    args = _call(**setup, **overrides)
    caches = [t.clone() for t in (args["k_cache"], args["v_cache"]) if isinstance(t, torch.Tensor)]
    with pytest.raises(error, match=match) as refusal:
        flash_attn_with_kvcache(**args)
    assert str(refusal.value).startswith("flash_attn2: ")
    for before, after in zip(caches, (args["k_cache"], args["v_cache"])):
        assert torch.equal(before.nan_to_num(), after.nan_to_num())


CUDA_ONLY_REFUSALS = [
    ("head-dim-multiple", dict(q=torch.randn(2, 1, NHEADS, 12, dtype=torch.bfloat16),
                               k_cache=torch.randn(2, 16, 2, 12, dtype=torch.bfloat16),
                               v_cache=torch.randn(2, 16, 2, 12, dtype=torch.bfloat16), k=None, v=None),
     ValueError, r"head dim must be a multiple of 8 on CUDA, got 12"),
    ("rotary-dim-16", _rotary(half=4, dtype=torch.bfloat16), ValueError,
     r"on CUDA rotary_dim = 2 \* rotary_cos.shape\[1\] must be a multiple of 16, got 8"),
    ("cache-last-dim", dict(k_cache=torch.randn(2, 16, HEAD_DIM, 2, dtype=torch.bfloat16).transpose(2, 3),
                            v_cache=torch.randn(2, 16, HEAD_DIM, 2, dtype=torch.bfloat16).transpose(2, 3)),
     ValueError, r"k_cache must have a contiguous last dim on CUDA"),
    ("float32", dict(q=torch.randn(2, 1, NHEADS, HEAD_DIM), k_cache=torch.randn(2, 16, 2, HEAD_DIM),
                     v_cache=torch.randn(2, 16, 2, HEAD_DIM), k=None, v=None),
     TypeError, r"on CUDA the dtype must be one of float16, bfloat16, got torch.float32"),
]


@pytest.mark.parametrize("overrides,error,match", [case[1:] for case in CUDA_ONLY_REFUSALS],
                         ids=[case[0] for case in CUDA_ONLY_REFUSALS])
def test_cuda_only_limits_are_refused_on_the_cuda_branch(cuda_branch, overrides, error, match):
    with pytest.raises(error, match=match) as refusal:
        flash_attn_with_kvcache(**_call(dtype=torch.bfloat16, **overrides))
    assert str(refusal.value).startswith("flash_attn2: ")
    assert cuda_branch.calls == []


@pytest.mark.parametrize(
    "outs,lses,error,match",
    [
        ([], [], TypeError, r"outs must be a non-empty list of tensors"),
        (torch.randn(1, 1, 1, 8), [torch.randn(1, 1, 1)], TypeError, r"outs must be a non-empty list"),
        ([torch.randn(1, 1, 1, 8)] * 2, [torch.randn(1, 1, 1)], ValueError, r"one length .* got 2 and 1"),
        ([torch.randn(1, 1, 8)], [torch.randn(1, 1)], ValueError, r"outs must be \(batch, seqlen_q, nheads, headdim\)"),
        ([torch.randn(1, 1, 1, 8), torch.randn(1, 2, 1, 8)], [torch.randn(1, 1, 1)] * 2, ValueError, r"outs\[1\] is"),
        ([torch.randn(1, 1, 1, 8)], [torch.randn(1, 1, 1, dtype=torch.float64)], TypeError, r"lses\[0\] must be float32"),
        ([torch.randn(1, 2, 1, 8)], [torch.randn(1, 2, 1)], ValueError, r"lses\[0\] must be \(batch, nheads, seqlen_q\)"),
    ],
    ids=["empty", "tensor", "lengths", "out-3d", "out-shapes", "lse-dtype", "lse-layout"],
)
def test_merge_attention_refusals(outs, lses, error, match):
    with pytest.raises(error, match=match) as refusal:
        merge_attention(outs, lses)
    assert str(refusal.value).startswith("flash_attn2: ")
