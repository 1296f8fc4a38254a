"""flash_attn_with_kvcache on the CUDA op (issue 5), against ``reference.kvcache_attention_ref``.

Every case poisons the cache: each row that is neither a sequence's valid row (leftpad .. cache_seqlens) nor
one the call should write (cache_seqlens .. + seqlen_new) holds NaN, spare pages included. After the call
the cache must equal the expected append (bitwise, or within one rounding of the rotated keys) with the NaN
exactly where it was, and the output must be finite: the kernel neither writes nor reads those rows.

Pass rule (flash-attn's, as in test_forward_gpu.py): the max error of out against the float32 reference is at
most twice the error of the same math done by PyTorch in the input precision (the reference with
``upcast=False``) plus 1e-5; lse within 1e-3 (``+inf`` where a row sees no key).

The grid is a few orthogonal sweeps around one decode case (bf16, hdim 128, dense, seqlen_q 1, one new
token, GQA 4), not their product. Cases skip, naming the reason, when the build has no ``fwd_kvcache`` op or
lists no matching kv-cache kernel (``_ops.built_kernels("kvcache")``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from test_modifiers_gpu import assert_out_within_rule as within_rule

from flash_attn2 import _ops, flash_attn_with_kvcache
from flash_attn2.reference import append_kv_cache, kvcache_attention_ref

pytestmark = pytest.mark.requires_cuda

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
BATCH = 3
NHEADS = 8
CAPACITY = 512
"""Rows per sequence: seqlen_cache (dense) or max_pages * page_size (paged)."""
SPARE_PAGES = 3
"""Pages of a paged cache that no sequence owns: they must stay poisoned."""
ROTARY_BASE = 10000.0
LSE_TOLERANCE = {"rtol": 1e-3, "atol": 1e-3}
ALIBI_MAX_SLOPE = 0.25
POISON = float("nan")


@dataclass(frozen=True)
class Case:
    dtype: str = "bf16"
    head_dim: int = 128
    page_size: int = 0  # 0: dense cache
    seqlen_q: int = 1
    seqlen_new: int = 1
    group: int = 4  # nheads // nheads_k
    causal: bool = False
    window: tuple = (-1, -1)
    rotary: str = ""  # "" none; "i" / "n" (interleaved / GPT-NeoX) + "full" / "half" rotary_dim
    batch_idx: bool = False
    leftpad: bool = False
    num_splits: int = 0
    softcap: float = 0.0
    alibi: str = ""  # "" / "h" / "bh"

    @property
    def id(self):
        parts = [self.dtype, f"d{self.head_dim}", f"p{self.page_size}" if self.page_size else "dense",
                 f"sq{self.seqlen_q}", f"new{self.seqlen_new}", f"g{self.group}"]
        parts += ["causal"] * self.causal + [f"w{self.window[0]}_{self.window[1]}"] * (self.window != (-1, -1))
        parts += [f"rot-{self.rotary}"] * bool(self.rotary) + ["bidx"] * self.batch_idx + ["lpad"] * self.leftpad
        parts += [f"split{self.num_splits}"] * bool(self.num_splits) + [f"cap{self.softcap:g}"] * bool(self.softcap)
        return "-".join(parts + [f"alibi-{self.alibi}"] * bool(self.alibi))

    @property
    def mask(self):
        left, right = self.window[0], 0 if self.causal else self.window[1]
        return "none" if (left, right) == (-1, -1) else "causal" if (left, right) == (-1, 0) else "local"

    @property
    def modifiers(self):
        return "mod"  # every KV-cache kernel is built with softcap and ALiBi (switched at run time)


def _sweeps():
    base = Case()
    cases = []
    for dtype in TORCH_DTYPES:  # layouts x query and append lengths, both dtypes
        for page_size in (0, 16, 32, 256):
            for seqlen_q, seqlen_new in ((1, 0), (1, 1), (1, 8), (4, 1), (4, 8), (128, 0), (128, 8)):
                cases.append(dataclasses.replace(base, dtype=dtype, page_size=page_size, seqlen_q=seqlen_q,
                                                 seqlen_new=seqlen_new, causal=seqlen_q > 1))
    for group in (1, 4, 8):  # GQA x masks
        for causal, window in ((False, (-1, -1)), (True, (-1, -1)), (True, (64, 0)), (False, (64, 16))):
            for seqlen_q in (1, 4):
                cases.append(dataclasses.replace(base, group=group, causal=causal, window=window, seqlen_q=seqlen_q))
    for rotary in ("ifull", "ihalf", "nfull", "nhalf"):
        for causal, seqlen_q, page_size in ((False, 1, 0), (True, 4, 0), (True, 4, 16), (False, 4, 32)):
            cases.append(dataclasses.replace(base, rotary=rotary, causal=causal, seqlen_q=seqlen_q,
                                             page_size=page_size, seqlen_new=4))
    for batch_idx, leftpad in ((True, False), (False, True), (True, True)):
        for seqlen_new, rotary, causal in ((0, "", False), (1, "ifull", False), (8, "nhalf", True)):
            cases.append(dataclasses.replace(base, batch_idx=batch_idx, leftpad=leftpad, seqlen_new=seqlen_new,
                                             rotary=rotary, causal=causal, seqlen_q=4 if causal else 1))
    for num_splits in (0, 1, 3, 8):
        for page_size, seqlen_q in ((0, 1), (16, 1), (256, 4)):
            cases.append(dataclasses.replace(base, num_splits=num_splits, page_size=page_size, seqlen_q=seqlen_q,
                                             causal=seqlen_q > 1))
    for softcap, alibi in ((30.0, ""), (0.0, "h"), (5.0, "bh")):
        for page_size, causal, window in ((0, False, (-1, -1)), (16, True, (64, 0))):
            cases.append(dataclasses.replace(base, softcap=softcap, alibi=alibi, page_size=page_size, causal=causal,
                                             window=window, seqlen_q=4))
    for dtype in TORCH_DTYPES:  # hdim 64: a few of everything
        for changes in (dict(), dict(page_size=16, seqlen_q=4, causal=True), dict(rotary="nfull", seqlen_new=2),
                        dict(leftpad=True, window=(64, 0)), dict(num_splits=3, page_size=32), dict(softcap=10.0)):
            cases.append(dataclasses.replace(base, dtype=dtype, head_dim=64, **changes))
    for head_dim in (32, 96, 192, 256):  # the other tile rows (192 and 256: a two-stage ring)
        for changes in (dict(), dict(page_size=16, seqlen_q=4, causal=True), dict(num_splits=3, seqlen_q=128)):
            cases.append(dataclasses.replace(base, head_dim=head_dim, **changes))
    return [pytest.param(case, id=case.id) for case in cases]


CASES = _sweeps()


def require_kvcache(case):
    """Skip unless the build has the op and lists a kv-cache kernel for the case's (dtype, head dim, mask, modifiers)."""
    if not hasattr(_ops, "fwd_kvcache") or not hasattr(torch.ops.flash_attn2, "fwd_kvcache"):
        pytest.skip("flash_attn2 has no fwd_kvcache op (the kv-cache op is not in this build)")
    try:
        kernels = _ops.built_kernels("kvcache")
    except ValueError:
        pytest.skip('_ops.built_kernels("kvcache") is not supported by this build')
    key = (case.dtype, case.head_dim, case.mask, case.modifiers)
    if not any((k.dtype, k.head_dim, k.mask, k.modifiers) == key for k in kernels):
        pytest.skip(f"no kvcache kernel {case.dtype} hdim {case.head_dim} mask {case.mask} modifiers {case.modifiers}")


# Inputs.


@dataclass
class Inputs:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k: torch.Tensor | None
    v: torch.Tensor | None
    kwargs: dict  # every other argument of flash_attn_with_kvcache


def rotary_tables(case, seqlen_ro):
    if not case.rotary:
        return None, None
    rotary_dim = case.head_dim if case.rotary.endswith("full") else case.head_dim // 2
    inv_freq = ROTARY_BASE ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cuda") / rotary_dim)
    angles = torch.arange(seqlen_ro, dtype=torch.float32, device="cuda")[:, None] * inv_freq[None]
    dtype = TORCH_DTYPES[case.dtype]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def make_inputs(case, seqlens=None):
    """A poisoned cache (NaN outside each sequence's valid rows) and the arguments of one call."""
    dtype = TORCH_DTYPES[case.dtype]
    nheads_k = NHEADS // case.group
    free = CAPACITY - case.seqlen_new
    if seqlens is None:  # a random length, a full cache, and a nearly empty one (rows with no key, when not appending)
        seqlens = [int(torch.randint(1, free + 1, ())), free, int(torch.randint(0, 3, ()))]
    leftpad = [int(torch.randint(0, n + 1, ())) for n in seqlens] if case.leftpad else [0] * BATCH
    block_table = batch_idx = None
    if case.page_size:
        pages = CAPACITY // case.page_size
        block_table = torch.randperm(BATCH * pages + SPARE_PAGES, device="cuda")[: BATCH * pages]
        block_table = block_table.reshape(BATCH, pages).to(torch.int32)
        shape = (BATCH * pages + SPARE_PAGES, case.page_size, nheads_k, case.head_dim)
    else:
        rows = BATCH + 2 * case.batch_idx
        if case.batch_idx:
            batch_idx = torch.randperm(rows, device="cuda")[:BATCH].to(torch.int32)
        shape = (rows, CAPACITY, nheads_k, case.head_dim)
    k_cache = torch.full(shape, POISON, dtype=dtype, device="cuda")
    v_cache = torch.full(shape, POISON, dtype=dtype, device="cuda")
    for b, (n, pad) in enumerate(zip(seqlens, leftpad)):
        rows = torch.arange(pad, n, device="cuda")
        if case.page_size:
            slots = (block_table[b].long()[rows // case.page_size], rows % case.page_size)
        else:
            slots = (torch.full_like(rows, b if batch_idx is None else int(batch_idx[b])), rows)
        for cache in (k_cache, v_cache):
            cache[slots] = torch.randn(len(rows), nheads_k, case.head_dim, dtype=dtype, device="cuda")
    q = torch.randn(BATCH, case.seqlen_q, NHEADS, case.head_dim, dtype=dtype, device="cuda")
    k = v = None
    if case.seqlen_new:
        k, v = (torch.randn(BATCH, case.seqlen_new, nheads_k, case.head_dim, dtype=dtype, device="cuda")
                for _ in range(2))
    cos, sin = rotary_tables(case, CAPACITY + case.seqlen_q)
    alibi = None
    if case.alibi:
        alibi = torch.rand((NHEADS,) if case.alibi == "h" else (BATCH, NHEADS), device="cuda") * ALIBI_MAX_SLOPE
    kwargs = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device="cuda"),
                  cache_batch_idx=batch_idx, block_table=block_table, causal=case.causal, window_size=case.window,
                  softcap=case.softcap, rotary_interleaved=case.rotary.startswith("i"), alibi_slopes=alibi,
                  cache_leftpad=torch.tensor(leftpad, dtype=torch.int32, device="cuda") if case.leftpad else None)
    return Inputs(q, k_cache, v_cache, k, v, kwargs)


def expected(inputs):
    """(k_cache, v_cache, out fp32, out in the input precision, lse) that the call should give."""
    kw = inputs.kwargs
    k_cache, v_cache = inputs.k_cache.clone(), inputs.v_cache.clone()
    append_kv_cache(k_cache, v_cache, inputs.k, inputs.v, kw["cache_seqlens"], kw["rotary_cos"], kw["rotary_sin"],
                    kw["cache_batch_idx"], kw["cache_leftpad"], kw["block_table"], kw["rotary_interleaved"])
    args = (inputs.q, inputs.k_cache, inputs.v_cache, inputs.k, inputs.v)
    out, lse = kvcache_attention_ref(*args, **kw)
    out_lowp, _ = kvcache_attention_ref(*args, **kw, upcast=False)
    return k_cache, v_cache, out, out_lowp, lse


def run(inputs, num_splits=0):
    return flash_attn_with_kvcache(inputs.q, inputs.k_cache, inputs.v_cache, inputs.k, inputs.v, **inputs.kwargs,
                                   num_splits=num_splits, return_softmax_lse=True)


def assert_cache(actual, want, rotated):
    """NaN exactly where expected (nothing outside the appended rows written); values bitwise equal, or within
    one rounding where the kernel rotated the new keys (its fp32 arithmetic may contract differently)."""
    assert torch.equal(torch.isnan(actual), torch.isnan(want)), "the call wrote outside the appended rows"
    if rotated:
        torch.testing.assert_close(actual, want, rtol=1e-2, atol=1e-2, equal_nan=True)
    else:
        assert torch.equal(actual.nan_to_num(), want.nan_to_num())


def assert_out_within_rule(out, ref, ref_lowp):
    assert torch.isfinite(out).all(), "NaN/inf in out: the kernel read a poisoned cache row"
    within_rule("out", out, ref, ref_lowp)


@pytest.mark.parametrize("case", CASES)
def test_kvcache_matches_reference(case):
    require_kvcache(case)
    inputs = make_inputs(case)
    k_cache, v_cache, ref, ref_lowp, ref_lse = expected(inputs)
    out, lse = run(inputs, case.num_splits)
    assert out.shape == inputs.q.shape and out.dtype == inputs.q.dtype
    assert lse.shape == (BATCH, NHEADS, case.seqlen_q) and lse.dtype == torch.float32
    assert_cache(inputs.k_cache, k_cache, rotated=bool(case.rotary))
    assert_cache(inputs.v_cache, v_cache, rotated=False)
    assert_out_within_rule(out, ref, ref_lowp)
    torch.testing.assert_close(lse, ref_lse, **LSE_TOLERANCE)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in (
    Case(), Case(page_size=16), Case(dtype="fp16", seqlen_q=4, causal=True, page_size=32), Case(window=(64, 0)))])
def test_num_splits_agree(case):
    """Splitting the keys changes only the order of the sums: 1 and 3 splits agree within rounding."""
    require_kvcache(case)
    inputs = make_inputs(case, seqlens=[CAPACITY - case.seqlen_new] * BATCH)
    saved = inputs.k_cache.clone(), inputs.v_cache.clone()
    out_1, lse_1 = run(inputs, num_splits=1)
    inputs.k_cache.copy_(saved[0])
    inputs.v_cache.copy_(saved[1])
    out_3, lse_3 = run(inputs, num_splits=3)
    torch.testing.assert_close(out_3.float(), out_1.float(), rtol=1e-2, atol=4e-3)
    torch.testing.assert_close(lse_3, lse_1, rtol=1e-5, atol=1e-4)


SMALL_GPU_SMEM = 99 * 1024
"""Shared memory per block of sm86/sm89/sm120 GPUs, where the KV-cache ring of head dims 64-256 does not fit."""


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in (
    Case(), Case(page_size=16), Case(num_splits=3, page_size=32), Case(seqlen_q=128, seqlen_new=8, causal=True),
    Case(window=(64, 0), seqlen_q=4), Case(dtype="fp16", head_dim=64, page_size=16, seqlen_q=4, causal=True))])
def test_compact_tiles_for_small_gpus(case, monkeypatch):
    """The two-stage tiles that GPUs with 99 KB of shared memory per block run (FLASH_ATTN2_KVCACHE_SMEM_LIMIT
    makes this GPU take them) pass the same checks as the ring."""
    require_kvcache(case)
    monkeypatch.setenv("FLASH_ATTN2_KVCACHE_SMEM_LIMIT", str(SMALL_GPU_SMEM))
    inputs = make_inputs(case)
    k_cache, v_cache, ref, ref_lowp, ref_lse = expected(inputs)
    out, lse = run(inputs, case.num_splits)
    assert_cache(inputs.k_cache, k_cache, rotated=bool(case.rotary))
    assert_cache(inputs.v_cache, v_cache, rotated=False)
    assert_out_within_rule(out, ref, ref_lowp)
    torch.testing.assert_close(lse, ref_lse, **LSE_TOLERANCE)


def decode_inputs(case):
    """Inputs of a decode step, without poison (the graph and compile tests compare against eager, bitwise)."""
    inputs = make_inputs(case, seqlens=[100, 200, 300])
    for cache in (inputs.k_cache, inputs.v_cache):
        cache.copy_(torch.randn_like(cache))
    return inputs


@pytest.mark.parametrize("page_size", [0, 16], ids=["dense", "paged16"])
def test_cuda_graph_decode_step_matches_eager(page_size):
    """Captured once with fixed shapes; each replay reads the cache_seqlens and q/k/v copied in before it."""
    case = Case(page_size=page_size, rotary="ifull")
    require_kvcache(case)
    graph_in = decode_inputs(case)
    eager_k, eager_v = graph_in.k_cache.clone(), graph_in.v_cache.clone()
    start_k, start_v = graph_in.k_cache.clone(), graph_in.v_cache.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (lazy initialisation)
        run(graph_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_lse = run(graph_in)
    graph_in.k_cache.copy_(start_k)
    graph_in.v_cache.copy_(start_v)
    seqlens = graph_in.kwargs["cache_seqlens"]
    for step in range(3):
        seqlens.copy_(torch.tensor([100 + step, 37 * step, 300 - step], dtype=torch.int32))
        for name in ("q", "k", "v"):
            getattr(graph_in, name).copy_(torch.randn_like(getattr(graph_in, name)))
        graph.replay()
        eager_in = dataclasses.replace(graph_in, k_cache=eager_k, v_cache=eager_v)
        out, lse = run(eager_in)
        torch.cuda.synchronize()
        assert torch.equal(static_out, out) and torch.equal(static_lse, lse)
        assert torch.equal(graph_in.k_cache, eager_k) and torch.equal(graph_in.v_cache, eager_v)


def test_compile_fullgraph_decode_step_mutates_the_cache():
    case = Case(page_size=16, rotary="nhalf", causal=True)
    require_kvcache(case)
    torch._dynamo.reset()
    inputs = decode_inputs(case)
    eager = dataclasses.replace(inputs, k_cache=inputs.k_cache.clone(), v_cache=inputs.v_cache.clone())
    before = inputs.k_cache.clone()

    def step(q, k_cache, v_cache, k, v, cache_seqlens):
        kwargs = dict(inputs.kwargs, cache_seqlens=cache_seqlens)
        return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **kwargs, return_softmax_lse=True)

    compiled = torch.compile(step, fullgraph=True)
    out, lse = compiled(inputs.q, inputs.k_cache, inputs.v_cache, inputs.k, inputs.v, inputs.kwargs["cache_seqlens"])
    want_out, want_lse = step(eager.q, eager.k_cache, eager.v_cache, eager.k, eager.v, eager.kwargs["cache_seqlens"])
    assert not torch.equal(inputs.k_cache, before), "the compiled step did not write the cache"
    assert torch.equal(inputs.k_cache, eager.k_cache) and torch.equal(inputs.v_cache, eager.v_cache)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    torch._dynamo.reset()
