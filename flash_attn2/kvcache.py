"""Inference with a KV cache: ``flash_attn_with_kvcache`` (flash-attn 2.x's API) and ``merge_attention``.

A decode step appends the new keys and values to a cache and attends to everything cached so far. The
cache is dense ``(batch_cache, seqlen_cache, nheads_k, headdim)`` or paged ``(num_blocks, page_size,
nheads_k, headdim)`` with a block table; it is written IN PLACE (it cannot be copied: the point is that it
persists between steps), so unlike ``flash_attn_func`` nothing here pads or copies the caches, and a cache
the kernel cannot read as it is is refused.

As in ``interface``, validation reads only shapes, dtypes and devices, never tensor data, so the CUDA path
has no host sync and a decode step can be captured in a CUDA graph (with ``cache_seqlens`` a tensor that is
updated between replays) or compiled with ``torch.compile(fullgraph=True)``. The CPU path (CPU tensors)
runs ``reference.kvcache_attention`` with ``attention_cpu``; since it reads the index tensors anyway, it
also checks their values.
"""

import math
import numbers

import torch

from flash_attn2 import _ops, interface
from flash_attn2.interface import CPU_DTYPES, CUDA_DTYPES, HEAD_DIM_MULTIPLE, MAX_HEAD_DIM, _dtype_names, _is_number
from flash_attn2.reference import UNBOUNDED, attention_cpu, effective_window, kvcache_attention

PAGE_SIZE_MULTIPLE = 16
"""A page holds a whole number of the kernel's 16-row key tiles, so no tile straddles two pages."""

ROTARY_DIM_MULTIPLE = 16
"""The kernel rotates rotary_dim in 16-byte vectors of 8 pairs' halves (CUDA only; the CPU path takes any even
rotary_dim)."""

INDEX_DTYPE = torch.int32
"""cache_seqlens, cache_batch_idx, cache_leftpad and block_table are int32, as in flash-attn."""


def _check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"flash_attn2: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"flash_attn2: {name} must be {ndim}-d {layout}, got shape {tuple(t.shape)} ({t.dim()}-d)")


def _check_index(name: str, t, shape: tuple, layout: str, device) -> None:
    """An int32 index tensor of exactly ``shape`` on q's device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"flash_attn2: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype != INDEX_DTYPE:
        raise TypeError(f"flash_attn2: {name} must be int32 (as in flash-attn), got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"flash_attn2: {name} must have shape {layout} = {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"flash_attn2: {name} is on {t.device} but q is on {device}")


def _check_tensors(q, k_cache, v_cache, k, v, on_kernels: bool) -> None:
    """Ranks, devices, dtypes and the shapes that q, the caches and the new keys share."""
    _check_tensor("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, t, 4, "(batch_cache, seqlen_cache, nheads_k, headdim) or (num_blocks, page_size, "
                      "nheads_k, headdim)")
    if (k is None) != (v is None):
        raise ValueError("flash_attn2: pass k and v both (the new keys and values to append) or neither, got "
                         f"k {'None' if k is None else 'a tensor'} and v {'None' if v is None else 'a tensor'}")
    new = [] if k is None else [("k", k), ("v", v)]
    for name, t in new:
        _check_tensor(name, t, 4, "(batch, seqlen_new, nheads_k, headdim)")
    tensors = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)] + new
    for name, t in tensors[1:]:
        if t.device != q.device:
            raise ValueError(f"flash_attn2: {name} is on {t.device} but q is on {q.device}; all must be on one device")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(
            f"flash_attn2: tensors on {q.device} are not supported; use CUDA (kernels) or CPU (reference) tensors"
        )
    for name, t in tensors[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"flash_attn2: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    allowed = CUDA_DTYPES if on_kernels else CPU_DTYPES
    if q.dtype not in allowed:
        raise TypeError(f"flash_attn2: on {'CUDA' if on_kernels else 'CPU'} the dtype must be one of {_dtype_names(allowed)}, "
                        f"got {q.dtype}")

    batch, _, nheads, head_dim = q.shape
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"flash_attn2: k_cache and v_cache must have one shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    nheads_k = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"flash_attn2: q and k_cache must have one head dim, got q {head_dim} and k_cache "
                         f"{k_cache.shape[3]}")
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"flash_attn2: head dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    if on_kernels and head_dim % HEAD_DIM_MULTIPLE:
        raise ValueError(
            f"flash_attn2: with a KV cache the head dim must be a multiple of {HEAD_DIM_MULTIPLE} on CUDA, got "
            f"{head_dim} (the cache is written in place, so it cannot be zero-padded as flash_attn_func pads)"
        )
    if nheads_k == 0 or nheads % nheads_k:
        raise ValueError(f"flash_attn2: the number of query heads ({nheads}) must be a multiple of the number of "
                         f"kv heads of k_cache ({nheads_k})")
    if k is not None:
        if tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"flash_attn2: k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        expected = (batch, k.shape[1], nheads_k, head_dim)
        if k.shape[0] != batch or tuple(k.shape[2:]) != expected[2:]:
            raise ValueError(f"flash_attn2: k must be (batch, seqlen_new, nheads_k, headdim) = (batch={batch}, "
                             f"seqlen_new, {nheads_k}, {head_dim}) to match q and k_cache, got {tuple(k.shape)}")
    if on_kernels:
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if t.stride(-1) != 1:
                raise ValueError(f"flash_attn2: {name} must have a contiguous last dim on CUDA (stride 1, got "
                                 f"{t.stride(-1)}); it is written in place, so it cannot be copied")


def _check_layout(q, k_cache, k, cache_seqlens, cache_batch_idx, cache_leftpad, block_table) -> int:
    """The cache layout (dense or paged) and the per-sequence index tensors; returns the cache capacity per
    sequence, in rows: seqlen_cache (dense) or max_pages * page_size (paged)."""
    batch = q.shape[0]
    if block_table is not None:
        for name, t in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
            if t is not None:
                raise ValueError(f"flash_attn2: {name} cannot be combined with block_table (a paged cache); the block "
                                 f"table already says where each sequence's rows are")
        if not isinstance(block_table, torch.Tensor):
            raise TypeError(f"flash_attn2: block_table must be a torch.Tensor or None, got {type(block_table).__name__}")
        if block_table.dim() != 2:
            raise ValueError(f"flash_attn2: block_table must be 2-d (batch, max_pages), got shape "
                             f"{tuple(block_table.shape)}")
        _check_index("block_table", block_table, (batch, block_table.shape[1]), "(batch, max_pages)", q.device)
        page_size = k_cache.shape[1]
        if page_size % PAGE_SIZE_MULTIPLE:
            raise ValueError(f"flash_attn2: the page size (k_cache.shape[1] with a block_table) must be a multiple of "
                             f"{PAGE_SIZE_MULTIPLE}, got {page_size}")
        capacity = block_table.shape[1] * page_size
    else:
        if cache_batch_idx is None and k_cache.shape[0] != batch:
            raise ValueError(f"flash_attn2: k_cache has {k_cache.shape[0]} sequences but q has batch {batch}; pass "
                             f"cache_batch_idx to pick a cache row per sequence")
        for name, t in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
            if t is not None:
                _check_index(name, t, (batch,), "(batch,)", q.device)
        capacity = k_cache.shape[1]

    seqlen_new = 0 if k is None else k.shape[1]
    if seqlen_new > capacity:
        raise ValueError(f"flash_attn2: k has seqlen_new={seqlen_new} rows but the cache holds only {capacity} per "
                         f"sequence")
    if isinstance(cache_seqlens, torch.Tensor):
        _check_index("cache_seqlens", cache_seqlens, (batch,), "(batch,)", q.device)
    elif cache_seqlens is not None:
        if not _is_number(cache_seqlens, numbers.Integral):
            raise TypeError(f"flash_attn2: cache_seqlens must be an int, an int32 tensor (batch,) or None, got "
                            f"{type(cache_seqlens).__name__}")
        if not 0 <= cache_seqlens <= capacity - seqlen_new:
            raise ValueError(f"flash_attn2: cache_seqlens={cache_seqlens} plus seqlen_new={seqlen_new} must fit in "
                             f"the cache's {capacity} rows per sequence (and cache_seqlens must be >= 0)")
    elif seqlen_new:
        raise ValueError(f"flash_attn2: cache_seqlens=None means every cache is full ({capacity} rows), which leaves "
                         f"no room for k's {seqlen_new} new rows; pass cache_seqlens")
    return capacity


def _check_rotary(q, k, rotary_cos, rotary_sin, on_kernels: bool) -> None:
    if rotary_cos is None and rotary_sin is None:
        return
    if rotary_cos is None or rotary_sin is None:
        raise ValueError("flash_attn2: pass rotary_cos and rotary_sin both or neither")
    if k is None:
        raise ValueError("flash_attn2: rotary_cos/rotary_sin need k and v: rotary embedding is applied to the new "
                         "keys as they are appended (the cached ones are already rotated), as in flash-attn")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        _check_tensor(name, t, 2, "(seqlen_ro, rotary_dim / 2)")
        if t.dtype != q.dtype:
            raise TypeError(f"flash_attn2: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"flash_attn2: {name} is on {t.device} but q is on {q.device}")
    if rotary_sin.shape != rotary_cos.shape:
        raise ValueError(f"flash_attn2: rotary_cos and rotary_sin must have one shape, got {tuple(rotary_cos.shape)} "
                         f"and {tuple(rotary_sin.shape)}")
    rotary_dim, head_dim = 2 * rotary_cos.shape[1], q.shape[-1]
    if not 0 < rotary_dim <= head_dim:
        raise ValueError(f"flash_attn2: rotary_dim = 2 * rotary_cos.shape[1] = {rotary_dim} must be in 1..head dim "
                         f"{head_dim}")
    if on_kernels and rotary_dim % ROTARY_DIM_MULTIPLE:
        raise ValueError(f"flash_attn2: on CUDA rotary_dim = 2 * rotary_cos.shape[1] must be a multiple of "
                         f"{ROTARY_DIM_MULTIPLE}, got {rotary_dim}")


def _check_num_splits(num_splits) -> None:
    if not _is_number(num_splits, numbers.Integral):
        raise TypeError(f"flash_attn2: num_splits must be an int (0: heuristic, 1: no split), got "
                        f"{type(num_splits).__name__}")
    if num_splits < 0:
        raise ValueError(f"flash_attn2: num_splits must be >= 0 (0: heuristic, 1: no split), got {num_splits}")


def _check_values(q, k_cache, k, rotary_cos, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                  capacity: int, causal: bool, window_size) -> None:
    """The CPU path's checks of index values (they read the tensors, which the CUDA path never does): every
    sequence's rows fit, leftpad is within its sequence, cache rows and pages exist, rotary covers the positions."""
    seqlen_new = 0 if k is None else k.shape[1]
    seqlens = cache_seqlens.tolist()
    if any(not 0 <= n <= capacity - seqlen_new for n in seqlens):
        raise ValueError(f"flash_attn2: every cache_seqlens[b] + seqlen_new={seqlen_new} must fit in the cache's "
                         f"{capacity} rows per sequence (and be >= 0), got cache_seqlens={seqlens}")
    leftpad = [0] * len(seqlens) if cache_leftpad is None else cache_leftpad.tolist()
    if any(not 0 <= pad <= n for pad, n in zip(leftpad, seqlens)):
        raise ValueError(f"flash_attn2: every cache_leftpad[b] must be in 0..cache_seqlens[b], got cache_leftpad="
                         f"{leftpad} and cache_seqlens={seqlens}")
    if cache_batch_idx is not None and any(not 0 <= i < k_cache.shape[0] for i in cache_batch_idx.tolist()):
        raise ValueError(f"flash_attn2: cache_batch_idx must index k_cache's {k_cache.shape[0]} sequences, got "
                         f"{cache_batch_idx.tolist()}")
    if block_table is not None:
        page_size = k_cache.shape[1]
        for b, n in enumerate(seqlens):
            pages = block_table[b, : -(-(n + seqlen_new) // page_size)].tolist()
            if any(not 0 <= p < k_cache.shape[0] for p in pages):
                raise ValueError(f"flash_attn2: block_table[{b}] names pages {pages} for its {n + seqlen_new} rows, "
                                 f"but k_cache has {k_cache.shape[0]} pages")
    if rotary_cos is not None:
        rows = max(seqlen_new, q.shape[1] if tuple(effective_window(causal, window_size)) != (UNBOUNDED, UNBOUNDED) else 1)
        needed = max((n - pad + rows for n, pad in zip(seqlens, leftpad)), default=0)
        if rotary_cos.shape[0] < needed:
            raise ValueError(f"flash_attn2: rotary_cos/rotary_sin have {rotary_cos.shape[0]} positions but this call "
                             f"rotates positions up to {needed - 1}")


def _kvcache_op():
    """``_ops.fwd_kvcache``, or a RuntimeError that says why it is missing."""
    op = getattr(_ops, "fwd_kvcache", None)
    if op is None:
        reason = _ops._missing_extension_message() if not _ops.extension_available() else (
            "flash_attn2: this build of flash_attn2._C has no kv-cache op (fwd_kvcache); rebuild from a checkout "
            f"that has it. {_ops.BUILD_HINT}")
        raise RuntimeError(reason)
    return op


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """Attention of ``q`` over a KV cache, after appending ``k``/``v`` to it in place, as in flash-attn 2.x.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; decode is ``seqlen_q = 1``.
        k_cache, v_cache: dense ``(batch_cache, seqlen_cache, nheads_k, headdim)``, or paged
            ``(num_blocks, page_size, nheads_k, headdim)`` with ``block_table``; ``nheads % nheads_k == 0``.
            MUTATED: ``k``/``v`` are written into them. CUDA: fp16/bf16, headdim a multiple of 8 (<= 256), last
            dim contiguous. CPU: also float32/float64.
        k, v: ``(batch, seqlen_new, nheads_k, headdim)`` or None: appended at rows ``cache_seqlens[b] ..`` of each
            sequence (k rotated first with rotary), then attended to.
        rotary_cos, rotary_sin: ``(seqlen_ro, rotary_dim / 2)`` in q's dtype, or None: rotary embedding of the
            first rotary_dim features of q and the new k (needs k). New key ``i`` sits at position
            ``cache_seqlens - leftpad + i``; so does query ``i`` when causal or local, otherwise every query
            is at ``cache_seqlens - leftpad``. On CUDA ``rotary_dim`` is a multiple of 16.
        cache_seqlens: int, int32 ``(batch,)`` or None: the rows already in each sequence's cache. None means
            every cache is full (``seqlen_cache``, or ``max_pages * page_size`` paged). An int is checked
            against the capacity here; a tensor's values are the caller's contract on CUDA (checking them
            would need a host sync) and are checked on CPU.
        cache_batch_idx: int32 ``(batch,)`` or None: sequence ``b`` uses dense cache row ``cache_batch_idx[b]``
            (default ``b``, and then ``batch_cache == batch``).
        cache_leftpad: int32 ``(batch,)`` or None: sequence ``b``'s keys start at cache row ``cache_leftpad[b]``
            (left padding); positions (mask, ALiBi, rotary) count from there. Dense caches only.
        block_table: int32 ``(batch, max_pages)`` or None: sequence ``b``'s logical row ``r`` is at
            ``k_cache[block_table[b, r // page_size], r % page_size]``; page_size a multiple of 16.
        softmax_scale, causal, window_size, softcap, alibi_slopes: as in ``flash_attn_func``, bottom-right aligned
            with ``seqlen_k = cache_seqlens + seqlen_new - leftpad``, the sequence's key count.
        rotary_interleaved: rotate pairs ``(2i, 2i + 1)`` (GPT-J, the default); False: halves
            ``(i, i + rotary_dim / 2)`` (GPT-NeoX).
        num_splits: the keys of a row are split into this many parts computed in parallel and merged (more
            blocks for a small batch); 0 lets a heuristic choose, 1 does not split; more than 256 is taken
            as 256 (it bounds the fp32 workspace). Ignored on CPU.
        return_softmax_lse: also return the log-sum-exp.

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim)`` in q's dtype; with ``return_softmax_lse``, ``(out,
        softmax_lse)``, the latter float32 ``(batch, nheads, seqlen_q)``, ``+inf`` on rows that see no key.
        No gradients (inference only, as in flash-attn).
    """
    on_kernels = interface._runs_on_kernels(q) if isinstance(q, torch.Tensor) else False
    _check_tensors(q, k_cache, v_cache, k, v, on_kernels)
    capacity = _check_layout(q, k_cache, k, cache_seqlens, cache_batch_idx, cache_leftpad, block_table)
    _check_rotary(q, k, rotary_cos, rotary_sin, on_kernels)
    window_size = interface._check_modifiers(q, q.shape[0], 0.0, window_size, softcap, alibi_slopes)
    _check_num_splits(num_splits)
    window_left, window_right = effective_window(causal, window_size)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if not isinstance(cache_seqlens, torch.Tensor):  # an int (or None: full) becomes the tensor the op takes
        filled = capacity if cache_seqlens is None else int(cache_seqlens)
        cache_seqlens = torch.full((q.shape[0],), filled, dtype=INDEX_DTYPE, device=q.device)

    if on_kernels:
        fwd_kvcache = _kvcache_op()
        ready = [None if t is None else _ops.kernel_ready(t) for t in (q, k, v, rotary_cos, rotary_sin)]
        q, k, v, rotary_cos, rotary_sin = ready
        out, lse = fwd_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                               cache_leftpad, block_table, float(softmax_scale), bool(causal), window_left,
                               window_right, float(softcap), bool(rotary_interleaved), alibi_slopes, int(num_splits))
    else:
        _check_values(q, k_cache, k, rotary_cos, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, capacity,
                      causal, window_size)
        with torch.no_grad():
            out, lse = kvcache_attention(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin,
                                         cache_batch_idx, cache_leftpad, block_table, causal,
                                         (window_left, window_right), rotary_interleaved, alibi_slopes,
                                         attention=attention_cpu, softmax_scale=softmax_scale, softcap=softcap)
    return (out, lse) if return_softmax_lse else out


def _check_parts(outs, lses) -> None:
    for name, parts in (("outs", outs), ("lses", lses)):
        if isinstance(parts, torch.Tensor) or not isinstance(parts, (list, tuple)) or not parts:
            raise TypeError(f"flash_attn2: {name} must be a non-empty list of tensors, got {type(parts).__name__}")
        if not all(isinstance(t, torch.Tensor) for t in parts):
            raise TypeError(f"flash_attn2: every entry of {name} must be a torch.Tensor")
    if len(outs) != len(lses):
        raise ValueError(f"flash_attn2: outs and lses must have one length (one of each per part), got {len(outs)} "
                         f"and {len(lses)}")
    first = outs[0]
    if first.dim() != 4:
        raise ValueError(f"flash_attn2: outs must be (batch, seqlen_q, nheads, headdim), got shape "
                         f"{tuple(first.shape)}")
    batch, seqlen_q, nheads, _ = first.shape
    for i, (out, lse) in enumerate(zip(outs, lses)):
        if out.shape != first.shape or out.dtype != first.dtype or out.device != first.device:
            raise ValueError(f"flash_attn2: outs[{i}] is {out.dtype} {tuple(out.shape)} on {out.device}, outs[0] "
                             f"{first.dtype} {tuple(first.shape)} on {first.device}: every part must match")
        if lse.dtype != torch.float32:
            raise TypeError(f"flash_attn2: lses[{i}] must be float32, got {lse.dtype}")
        if tuple(lse.shape) != (batch, nheads, seqlen_q) or lse.device != first.device:
            raise ValueError(f"flash_attn2: lses[{i}] must be (batch, nheads, seqlen_q) = {(batch, nheads, seqlen_q)} "
                             f"on {first.device}, got {tuple(lse.shape)} on {lse.device}")


def merge_attention(outs, lses):
    """Combine attention over disjoint key sets into attention over their union.

    Part ``i`` is ``(out_i, lse_i)`` of the same queries over its own keys: out ``(batch, seqlen_q, nheads,
    headdim)``, lse float32 ``(batch, nheads, seqlen_q)``. The union's ``lse = log(sum_i exp(lse_i))`` and
    ``out = sum_i exp(lse_i - lse) * out_i``, computed in float32 relative to the largest lse (so nothing
    overflows). An infinite lse marks a part in which the row saw no key (our convention is ``+inf``;
    ``-inf``, flash-attn's for its splits, is taken too): it gets weight 0 and its out is never read (so
    garbage there cannot leak). A row that sees no key in any part gets out 0 and lse ``+inf``.

    Returns ``(out, lse)``: out in the outs' dtype, lse float32.
    """
    _check_parts(outs, lses)
    lse = torch.stack(list(lses))  # (parts, b, h, s_q)
    empty = torch.isinf(lse)
    lse = lse.masked_fill(empty, float("-inf"))
    top = lse.amax(dim=0)
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows with every part empty: any shift
    weights = torch.exp(lse - shift)  # empty parts: exp(-inf) = 0
    total = weights.sum(dim=0)
    seen = total > 0
    merged_lse = torch.where(seen, shift + torch.log(torch.where(seen, total, torch.ones_like(total))),
                             torch.full_like(total, math.inf))
    weights = (weights / torch.where(seen, total, torch.ones_like(total))).permute(0, 1, 3, 2).unsqueeze(-1)
    parts = torch.stack([out.float() for out in outs])  # (parts, b, s_q, h, d)
    merged = torch.where(weights > 0, weights * parts, torch.zeros_like(parts)).sum(dim=0)
    return merged.to(outs[0].dtype), merged_lse


__all__ = ["flash_attn_with_kvcache", "merge_attention"]
