"""Plain PyTorch attention with flash_attn2's semantics.

Two implementations, for two jobs:

* ``attention_ref`` is the oracle the tests trust: it materialises the full score matrix and
  repeats the kv heads, so every step is visible and nothing is clever.
* ``attention_cpu`` is what the public API runs on CPU tensors: the same online softmax as the
  kernels, over blocks of keys, so memory stays at ``seqlen_q x block_size`` scores per head.
  It is ordinary differentiable torch code; autograd gives its backward.

Semantics shared with the CUDA op (layout ``(batch, seqlen, nheads, headdim)``), in the order they apply
(flash-attn 2.x's):

* GQA/MQA: query head ``i`` reads kv head ``i // (nheads // nheads_k)``.
* Scores ``z = q . k * softmax_scale``.
* Softcapping (``softcap > 0``): ``z = softcap * tanh(z / softcap)``.
* ALiBi (``alibi_slopes`` of shape ``(nheads,)`` or ``(batch, nheads)``):
  ``z -= slope[b, h] * |i + seqlen_k - seqlen_q - j|``.
* Masking (scores of keys a query does not see are ``-inf``), bottom-right aligned: with
  ``off = seqlen_k - seqlen_q`` and ``window_size = (left, right)``, query ``i`` sees key ``j`` iff
  ``j >= i + off - left`` (when ``left >= 0``) and ``j <= i + off + right`` (when ``right >= 0``);
  ``-1`` is unbounded. ``causal`` is the window's right edge on the diagonal (``right = 0``).
* ``lse`` is the natural-log log-sum-exp of these scores, shape ``(batch, nheads, seqlen_q)``, and the
  probabilities are ``P = exp(z - lse)``.
* Dropout (``dropout_p > 0``): ``P_ij * keep_ij / (1 - dropout_p)``; ``lse`` is that of the scores, without dropout.
* A row that sees no key has output 0 and log-sum-exp ``+inf``. ``+inf`` (not ``-inf``) so that
  ``exp(score - lse)`` is 0 for every key of that row, which is what a backward pass recomputes.
"""

import math

import torch

DEFAULT_CPU_BLOCK_SIZE = 256
"""Keys per step of ``attention_cpu``: large enough that the Python loop is not the cost,
small enough that a block of scores for a long query sequence stays a few MiB."""

UNBOUNDED = -1
"""A window edge of -1 lets a query see every key on that side (flash-attn's convention)."""


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit and float32 inputs, float64 for float64 (so gradcheck sees float64 math)."""
    return torch.promote_types(dtype, torch.float32)


def effective_window(causal: bool, window_size) -> tuple:
    """``(left, right)`` with ``causal`` folded in: causal attention is a window whose right edge is the
    diagonal, so ``causal`` sets ``right = 0`` and keeps ``left`` (flash-attn's rule)."""
    left, right = window_size
    return (left, 0 if causal else right)


def _key_distance(seqlen_q: int, key_start: int, key_end: int, seqlen_k: int, device) -> torch.Tensor:
    """``i + seqlen_k - seqlen_q - j`` for query rows ``i`` and keys ``j`` in ``[key_start, key_end)``: how far
    key ``j`` lies left of row ``i``'s bottom-right aligned diagonal. int64 ``(seqlen_q, key_end - key_start)``."""
    rows = torch.arange(seqlen_q, device=device).unsqueeze(1)
    cols = torch.arange(key_start, key_end, device=device).unsqueeze(0)
    return rows + (seqlen_k - seqlen_q) - cols


def _visible_keys(seqlen_q: int, key_start: int, key_end: int, seqlen_k: int, device,
                  window_size=(UNBOUNDED, 0)) -> torch.Tensor:
    """The one visibility rule: which of the keys ``[key_start, key_end)`` each query row sees under
    ``window_size = (left, right)`` (see the module docstring), bool ``(seqlen_q, key_end - key_start)``.
    The default window ``(-1, 0)`` is the causal mask."""
    distance = _key_distance(seqlen_q, key_start, key_end, seqlen_k, device)
    left, right = window_size
    visible = torch.ones_like(distance, dtype=torch.bool)
    if left != UNBOUNDED:
        visible &= distance <= left
    if right != UNBOUNDED:
        visible &= distance >= -right
    return visible


def _first_seen_key(seqlen_q: int, seqlen_k: int, window_size) -> int:
    """No query row sees a key before this one under the window (row 0 reaches furthest left), so those
    keys need no work (the kernels' block range). The last key is always seen (by the last row, on its
    diagonal), so there is no such bound on the right."""
    left = window_size[0]
    return 0 if left == UNBOUNDED else max(0, seqlen_k - seqlen_q - left)


def _slopes_per_head(alibi_slopes, batch: int, nheads: int, dtype):
    """ALiBi slopes as ``(batch, nheads)`` in ``dtype``, whether given per head or per (sequence, head)."""
    return None if alibi_slopes is None else alibi_slopes.to(dtype).expand(batch, nheads)


def _modified_scores(scores, key_start: int, seqlen_k: int, window_size, softcap: float, slopes):
    """Softcap, ALiBi bias and window mask, in that order, on scaled scores ``(..., seqlen_q, n)`` of the
    keys ``[key_start, key_start + n)``. ``slopes`` broadcasts against ``scores.shape[:-2] + (1, 1)``, or None."""
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    seqlen_q, key_end = scores.shape[-2], key_start + scores.shape[-1]
    if slopes is not None:
        distance = _key_distance(seqlen_q, key_start, key_end, seqlen_k, scores.device)
        scores = scores - slopes * distance.abs().to(scores.dtype)
    if tuple(window_size) != (UNBOUNDED, UNBOUNDED):
        visible = _visible_keys(seqlen_q, key_start, key_end, seqlen_k, scores.device, window_size)
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def _scores(q, k, softmax_scale, causal, window_size, softcap, alibi_slopes):
    """The full modified score matrix ``(batch, nheads, seqlen_q, seqlen_k)``: ``q . k`` in q's dtype (the
    caller picks it), everything after in the math dtype."""
    batch, seqlen_q, nheads, headdim = q.shape
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(headdim)
    k = k.repeat_interleave(nheads // k.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
    scores = scores.to(_math_dtype(scores.dtype))
    slopes = _slopes_per_head(alibi_slopes, batch, nheads, scores.dtype)
    return _modified_scores(scores, 0, k.shape[1], effective_window(causal, window_size), softcap,
                            None if slopes is None else slopes[:, :, None, None])


def _row_lse(scores):
    """log-sum-exp over the keys; +inf (the empty-row convention) where logsumexp gives -inf: no key seen."""
    lse = torch.logsumexp(scores, dim=-1)
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def _check_dropout_mask(dropout_p, dropout_mask, shape) -> None:
    if dropout_mask is None:
        raise ValueError(
            f"flash_attn2: dropout_p={dropout_p} needs dropout_mask, the bool keep mask (batch, nheads, seqlen_q, "
            f"seqlen_k) = {tuple(shape)}"
        )
    if dropout_mask.dtype != torch.bool or tuple(dropout_mask.shape) != tuple(shape):
        raise ValueError(
            f"flash_attn2: dropout_mask must be bool {tuple(shape)} (batch, nheads, seqlen_q, seqlen_k), got "
            f"{dropout_mask.dtype} {tuple(dropout_mask.shape)}"
        )


def _drop(probs, dropout_p, keep):
    """Dropout of the probabilities: dropped ones are 0, kept ones scaled by ``1 / (1 - dropout_p)`` so the
    expected output is unchanged. ``probs * keep`` (not an in-place fill) stays differentiable."""
    return probs * keep.to(probs.dtype) * (1.0 / (1.0 - dropout_p))


def attention_ref(q, k, v, softmax_scale=None, causal=False, upcast=True, window_size=(-1, -1), softcap=0.0,
                  alibi_slopes=None, dropout_p=0.0, dropout_mask=None):
    """Naive attention: full score matrix, kv heads repeated, softmax, weighted sum.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k, v: ``(batch, seqlen_k, nheads_k, headdim)``, ``nheads % nheads_k == 0``.
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        causal: bottom-right aligned causal mask (the window's ``right = 0``).
        upcast: compute in float32 (float64 stays float64). ``False`` does the matrix products and
            the rounding of the probabilities in the input precision: the "same math in the same
            precision" baseline that the kernels' error is measured against. (The modifiers then act
            on float32 scores, as in the kernels' registers.)
        window_size, softcap, alibi_slopes, dropout_p: see the module docstring.
        dropout_mask: bool ``(batch, nheads, seqlen_q, seqlen_k)``, True = kept; required when
            ``dropout_p > 0``, ignored otherwise.

    Returns:
        ``(out, lse)``. ``out`` is ``(batch, seqlen_q, nheads, headdim)`` in the math dtype, i.e.
        float32 (float64 for float64 input) when ``upcast``, else the input dtype; the caller casts.
        ``lse`` is ``(batch, nheads, seqlen_q)`` float32 (float64 for float64 input), without dropout.
    """
    dtype = _math_dtype(q.dtype) if upcast else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scores = _scores(q, k, softmax_scale, causal, window_size, softcap, alibi_slopes)  # (b, h, s_q, s_k)
    lse = _row_lse(scores)  # (b, h, s_q)
    probs = torch.exp(scores - lse.unsqueeze(-1))  # empty rows: exp(-inf) = 0
    if dropout_p > 0:
        _check_dropout_mask(dropout_p, dropout_mask, scores.shape)
        probs = _drop(probs, dropout_p, dropout_mask)
    v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(dtype), v)
    return out, lse


def attention_probs(q, k, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                    lse=None):
    """The softmax probabilities ``exp(z - lse)`` (before dropout), ``(batch, nheads, seqlen_q, seqlen_k)`` in the
    math dtype: flash-attn's ``S_dmask`` without the signs. Given ``lse`` (e.g. a kernel's), the rows are
    normalised by it, so they show what that forward pass used; without, by their own log-sum-exp.
    Materialises seqlen_q x seqlen_k per head: for tests and debugging."""
    dtype = _math_dtype(q.dtype)
    scores = _scores(q.to(dtype), k.to(dtype), softmax_scale, causal, window_size, softcap, alibi_slopes)
    if lse is None:
        lse = _row_lse(scores)
    return torch.exp(scores - lse.to(dtype).unsqueeze(-1))


def attention_cpu(q, k, v, softmax_scale, causal, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                  dropout_mask=None, block_size=DEFAULT_CPU_BLOCK_SIZE):
    """Memory-efficient attention in plain PyTorch (the public API's CPU path).

    Loops over blocks of ``block_size`` keys keeping a running row max ``m``, a running sum ``l``
    of ``exp(score - m)`` and an unnormalised output, rescaling both when the max grows (the
    online softmax of FlashAttention). Keys left of every row's window are skipped.
    GQA reads the kv heads through a broadcast view instead of repeating them. Accepts
    float16/bfloat16/float32/float64; computes in float32 (float64 for float64).

    window_size, softcap, alibi_slopes and dropout_p as in the module docstring. With ``dropout_p > 0``
    the keep mask is sampled per block of keys from torch's default generator on q's device
    (``torch.manual_seed`` makes it reproducible), unless ``dropout_mask`` (bool
    ``(batch, nheads, seqlen_q, seqlen_k)``, True = kept) gives it. Either way the mask is a constant
    of the autograd graph, so the backward drops the same entries.

    Returns:
        ``(out, lse)``: ``out`` ``(batch, seqlen_q, nheads, headdim)`` in the input dtype, ``lse``
        ``(batch, nheads, seqlen_q)`` in float32 (float64 for float64 input), without dropout.
    """
    if block_size < 1:
        raise ValueError(f"flash_attn2: block_size must be >= 1, got {block_size}")
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    dtype = _math_dtype(q.dtype)
    window_size = effective_window(causal, window_size)
    if dropout_p > 0 and dropout_mask is not None:
        _check_dropout_mask(dropout_p, dropout_mask, (batch, nheads, seqlen_q, seqlen_k))
        dropout_mask = dropout_mask.reshape(batch, nheads_k, group, seqlen_q, seqlen_k)
    slopes = _slopes_per_head(alibi_slopes, batch, nheads, dtype)
    if slopes is not None:
        slopes = slopes.reshape(batch, nheads_k, group, 1, 1)

    # (b, h_k, group, s_q, d): query heads of one kv head side by side; kv heads broadcast over group.
    q_grouped = q.to(dtype).reshape(batch, seqlen_q, nheads_k, group, headdim).permute(0, 2, 3, 1, 4)
    k_heads = k.to(dtype).permute(0, 2, 1, 3).unsqueeze(2)  # (b, h_k, 1, s_k, d)
    v_heads = v.to(dtype).permute(0, 2, 1, 3).unsqueeze(2)  # (b, h_k, 1, s_k, d)

    row_shape = (batch, nheads_k, group, seqlen_q, 1)
    row_max = torch.full(row_shape, float("-inf"), dtype=dtype, device=q.device)
    row_sum = torch.zeros(row_shape, dtype=dtype, device=q.device)
    acc = torch.zeros((batch, nheads_k, group, seqlen_q, headdim), dtype=dtype, device=q.device)

    for start in range(_first_seen_key(seqlen_q, seqlen_k, window_size), seqlen_k, block_size):
        end = min(start + block_size, seqlen_k)
        k_block, v_block = k_heads[:, :, :, start:end], v_heads[:, :, :, start:end]
        scores = torch.matmul(q_grouped, k_block.transpose(-1, -2)) * softmax_scale  # (b, h_k, g, s_q, blk)
        scores = _modified_scores(scores, start, seqlen_k, window_size, softcap, slopes)
        # The max is only a shift that cancels between numerator and denominator, so no gradient
        # needs to flow through it. A row that has seen no key yet has max -inf; shifting by 0
        # instead keeps exp(-inf - shift) = 0 rather than exp(-inf + inf) = nan.
        new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True)).detach()
        shift = new_max.masked_fill(new_max == float("-inf"), 0.0)
        probs = torch.exp(scores - shift)
        rescale = torch.exp(row_max - shift)
        row_sum = row_sum * rescale + probs.sum(dim=-1, keepdim=True)  # lse is of the scores without dropout
        if dropout_p > 0:
            keep = (dropout_mask[..., start:end] if dropout_mask is not None
                    else torch.rand(probs.shape, dtype=dtype, device=q.device) < 1.0 - dropout_p)
            probs = _drop(probs, dropout_p, keep)
        acc = acc * rescale + torch.matmul(probs, v_block)
        row_max = new_max

    seen_a_key = row_sum > 0
    safe_sum = torch.where(seen_a_key, row_sum, torch.ones_like(row_sum))  # avoids 0/0 in out and its gradient
    out = acc / safe_sum  # rows that saw no key: acc is 0, so out is 0
    lse = torch.where(seen_a_key, row_max + torch.log(safe_sum), torch.full_like(row_sum, float("inf")))

    out = out.permute(0, 3, 1, 2, 4).reshape(batch, seqlen_q, nheads, headdim).to(q.dtype)
    lse = lse.reshape(batch, nheads, seqlen_q)
    return out, lse


def sequence_bounds(cu_seqlens, total: int, name: str = "cu_seqlens"):
    """``[(start, end), ...]`` of a packed batch, with a clear error for values that cannot be right.
    Reads the tensor on the host: for the CPU path and tests (the CUDA path never syncs)."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or any(b > e for b, e in zip(bounds, bounds[1:])) or bounds[-1] > total:
        raise ValueError(
            f"flash_attn2: {name} must start at 0, not decrease, and end at most at {total} (the number of "
            f"tokens), got {bounds if len(bounds) <= 16 else bounds[:8] + ['...'] + bounds[-8:]}"
        )
    return list(zip(bounds[:-1], bounds[1:]))


def _sequence_slopes(alibi_slopes, b: int):
    """Sequence ``b``'s ALiBi slopes: its row of ``(batch, nheads)`` slopes, or the shared ``(nheads,)`` ones."""
    return alibi_slopes[b : b + 1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes


def _check_padded_size(name: str, size, bounds_q, bounds_k) -> None:
    """A padded per-sequence tensor ``(batch, nheads, >= len_q, >= len_k)`` must hold every sequence."""
    longest_q = max((e - s for s, e in bounds_q), default=0)
    longest_k = max((e - s for s, e in bounds_k), default=0)
    if size[0] != len(bounds_q) or size[2] < longest_q or size[3] < longest_k:
        raise ValueError(
            f"flash_attn2: {name} of shape {tuple(size)} must be (batch={len(bounds_q)}, nheads, >= {longest_q}, "
            f">= {longest_k}): one (max_seqlen_q, max_seqlen_k) block per sequence, holding the longest"
        )


def _per_sequence(attention, q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes=None, dropout_mask=None, **kwargs):
    """Runs ``attention`` on each sequence of a packed batch. Rows past ``cu_seqlens_q[-1]`` belong to
    no sequence: out 0, lse +inf. Sequence ``b`` gets its own row of ``(batch, nheads)`` ALiBi slopes and
    ``dropout_mask[b, :, :len_q, :len_k]`` of a padded ``(batch, nheads, max_seqlen_q, max_seqlen_k)`` mask."""
    bounds_q = sequence_bounds(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    bounds_k = sequence_bounds(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
    if dropout_mask is not None:
        _check_padded_size("dropout_mask", dropout_mask.shape, bounds_q, bounds_k)
    outs, lses = [], []
    for b, ((q0, q1), (k0, k1)) in enumerate(zip(bounds_q, bounds_k)):
        mask = None if dropout_mask is None else dropout_mask[b : b + 1, :, : q1 - q0, : k1 - k0]
        out, lse = attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], alibi_slopes=_sequence_slopes(alibi_slopes, b),
                             dropout_mask=mask, **kwargs)
        outs.append(out[0])
        lses.append(lse[0])
    rest = q.shape[0] - (bounds_q[-1][1] if bounds_q else 0)
    outs.append(q.new_zeros((rest,) + tuple(q.shape[1:]), dtype=outs[0].dtype if outs else q.dtype))
    lse_dtype = lses[0].dtype if lses else torch.float32
    lses.append(torch.full((q.shape[1], rest), float("inf"), dtype=lse_dtype, device=q.device))
    return torch.cat(outs), torch.cat(lses, dim=-1)


def attention_cpu_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_size=(-1, -1), softcap=0.0,
                         alibi_slopes=None, dropout_p=0.0, dropout_mask=None, block_size=DEFAULT_CPU_BLOCK_SIZE):
    """The CPU path of ``flash_attn_varlen_func``: ``attention_cpu`` on each sequence of the packed batch.

    Positions (causal, window, ALiBi) are bottom-right aligned per sequence; ``alibi_slopes`` is
    ``(nheads,)`` or ``(batch, nheads)``; ``dropout_mask``, if given, is padded
    ``(batch, nheads, max_seqlen_q, max_seqlen_k)`` (sequence ``b`` uses ``[b, :, :len_q, :len_k]``).
    Returns ``(out (total_q, nheads, headdim), lse (nheads, total_q))``.
    """
    return _per_sequence(attention_cpu, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=softmax_scale,
                         causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                         dropout_p=dropout_p, dropout_mask=dropout_mask, block_size=block_size)


def attention_ref_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False, upcast=True,
                         window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_mask=None):
    """``attention_ref`` on each sequence of a packed batch (the oracle of the variable-length tests).
    ``alibi_slopes`` and ``dropout_mask`` per sequence as in ``attention_cpu_varlen``."""
    return _per_sequence(attention_ref, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=softmax_scale,
                         causal=causal, upcast=upcast, window_size=window_size, softcap=softcap,
                         alibi_slopes=alibi_slopes, dropout_p=dropout_p, dropout_mask=dropout_mask)


def attention_probs_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                           causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, lse=None):
    """``attention_probs`` of each sequence of a packed batch, padded to ``(batch, nheads, max_seqlen_q,
    max_seqlen_k)``: sequence ``b``'s at ``[b, :, :len_q, :len_k]``, zeros elsewhere (the layout of the
    varlen ``S_dmask`` and keep masks). ``lse``: ``(nheads, total_q)`` or None."""
    bounds_q = sequence_bounds(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    bounds_k = sequence_bounds(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
    size = (len(bounds_q), q.shape[1], max_seqlen_q, max_seqlen_k)
    _check_padded_size("the probabilities (max_seqlen_q, max_seqlen_k)", size, bounds_q, bounds_k)
    probs = torch.zeros(size, dtype=_math_dtype(q.dtype), device=q.device)
    for b, ((q0, q1), (k0, k1)) in enumerate(zip(bounds_q, bounds_k)):
        probs[b, :, : q1 - q0, : k1 - k0] = attention_probs(
            q[None, q0:q1], k[None, k0:k1], softmax_scale, causal, window_size, softcap,
            _sequence_slopes(alibi_slopes, b), None if lse is None else lse[None, :, q0:q1],
        )[0]
    return probs


# The KV cache (flash_attn_with_kvcache): rotary embedding, the append, and attention over each sequence's cached keys.
#
# A sequence's keys live in a dense cache ``(batch_cache, seqlen_cache, nheads_k, headdim)`` (row
# ``cache_batch_idx[b]``, or ``b``) or a paged one ``(num_blocks, page_size, nheads_k, headdim)``, where its
# logical row ``r`` is at ``[block_table[b, r // page_size], r % page_size]``. The new keys ``k[b]`` go to
# logical rows ``cache_seqlens[b] ..`` (+ ``seqlen_new``); the sequence then attends to rows
# ``cache_leftpad[b] .. cache_seqlens[b] + seqlen_new`` (leftpad 0 when not given), with positions (mask,
# ALiBi, rotary) counted from ``cache_leftpad[b]``.
# These helpers read index tensors on the host (``.tolist()``): they are for the CPU path and the tests.


def apply_rotary(x, cos, sin, positions, interleaved=True):
    """Rotary embedding of the first ``rotary_dim = 2 * cos.shape[-1]`` features of ``x``.

    Args:
        x: ``(batch, seqlen, nheads, headdim)``.
        cos, sin: ``(seqlen_ro, rotary_dim / 2)``: row ``p`` holds ``cos``/``sin`` of position ``p``'s angles.
        positions: int ``(batch, seqlen)``, the position of each row of ``x``.
        interleaved: rotate the pairs ``(2i, 2i + 1)`` (GPT-J); else the halves ``(i, i + rotary_dim / 2)``
            (GPT-NeoX).

    Each pair ``(x1, x2)`` becomes ``(x1 cos - x2 sin, x1 sin + x2 cos)``, computed in float32 (float64 for
    float64) and rounded back to x's dtype, as the kernel rounds the rotated keys it writes into the cache
    and the rotated queries it keeps in shared memory. Features past rotary_dim pass through unchanged.
    """
    rotary_dim = 2 * cos.shape[-1]
    dtype = _math_dtype(x.dtype)
    cos_p = cos.to(dtype)[positions].unsqueeze(-2)  # (b, s, 1, rotary_dim / 2): the same angles for every head
    sin_p = sin.to(dtype)[positions].unsqueeze(-2)
    rotated = x[..., :rotary_dim].to(dtype)
    if interleaved:
        x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
    else:
        x1, x2 = rotated.chunk(2, dim=-1)
    y1, y2 = x1 * cos_p - x2 * sin_p, x1 * sin_p + x2 * cos_p
    rotated = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def _per_batch(values, batch: int, default: int = 0) -> list:
    """A per-sequence int tensor as a host list, or ``default`` for each sequence when it is None."""
    return [default] * batch if values is None else [int(x) for x in values.tolist()]


def rotary_positions(cache_seqlens, cache_leftpad, count: int, consecutive: bool = True):
    """int64 ``(batch, count)`` rotary positions of ``count`` rows that start at each sequence's current end:
    ``cache_seqlens[b] - leftpad[b] + i``, or, when not ``consecutive``, ``cache_seqlens[b] - leftpad[b]`` for
    every row (the queries of non-causal, non-local attention all sit at the end, as in flash-attn)."""
    start = cache_seqlens.to(torch.int64)
    if cache_leftpad is not None:
        start = start - cache_leftpad.to(torch.int64)
    offsets = torch.arange(count, device=start.device) if consecutive else torch.zeros(count, dtype=torch.int64,
                                                                                       device=start.device)
    return start[:, None] + offsets[None, :]


def _cache_slots(b: int, rows, cache_batch_idx, block_table, page_size: int):
    """The cache indices ``(first, second)`` of sequence ``b``'s logical rows ``rows`` (int64 ``(n,)``): its
    dense cache row and ``rows``, or the pages its block table names and the offsets within them."""
    if block_table is not None:
        pages = block_table[b].to(torch.int64)[torch.div(rows, page_size, rounding_mode="floor")]
        return pages, rows % page_size
    batch_row = b if cache_batch_idx is None else int(cache_batch_idx[b])
    return torch.full_like(rows, batch_row), rows


def append_kv_cache(k_cache, v_cache, k, v, cache_seqlens, rotary_cos=None, rotary_sin=None, cache_batch_idx=None,
                    cache_leftpad=None, block_table=None, rotary_interleaved=True):
    """Write ``k`` and ``v`` ``(batch, seqlen_new, nheads_k, headdim)`` into the caches, in place, at logical rows
    ``cache_seqlens[b] ..`` of each sequence, k rotated first when ``rotary_cos`` is given (positions from
    ``rotary_positions``). Nothing else of the caches is touched."""
    if k is None:
        return
    if rotary_cos is not None:
        k = apply_rotary(k, rotary_cos, rotary_sin, rotary_positions(cache_seqlens, cache_leftpad, k.shape[1]),
                         rotary_interleaved)
    page_size = k_cache.shape[1]
    for b, start in enumerate(_per_batch(cache_seqlens, k.shape[0])):
        rows = torch.arange(start, start + k.shape[1], device=k_cache.device)
        slots = _cache_slots(b, rows, cache_batch_idx, block_table, page_size)
        k_cache.index_put_(slots, k[b].to(k_cache.dtype))
        v_cache.index_put_(slots, v[b].to(v_cache.dtype))


def gather_kv_cache(cache, seqlens_k, cache_batch_idx=None, cache_leftpad=None, block_table=None) -> list:
    """Each sequence's keys (or values) from a dense or paged cache: a list of ``(1, n_b, nheads_k, headdim)``
    tensors holding logical rows ``cache_leftpad[b] .. seqlens_k[b]`` (``seqlens_k`` = cache_seqlens + seqlen_new,
    int ``(batch,)``). Reads only those rows, so whatever fills the rest of the cache never matters."""
    ends = _per_batch(seqlens_k, seqlens_k.shape[0])
    starts = _per_batch(cache_leftpad, len(ends))
    gathered = []
    for b, (start, end) in enumerate(zip(starts, ends)):
        rows = torch.arange(start, end, device=cache.device)
        gathered.append(cache[_cache_slots(b, rows, cache_batch_idx, block_table, cache.shape[1])].unsqueeze(0))
    return gathered


def kvcache_attention(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos=None, rotary_sin=None,
                      cache_batch_idx=None, cache_leftpad=None, block_table=None, causal=False, window_size=(-1, -1),
                      rotary_interleaved=True, alibi_slopes=None, attention=None, **attention_kwargs):
    """``flash_attn_with_kvcache``'s semantics in plain PyTorch, appending to the caches IN PLACE: append
    ``k``/``v`` (``append_kv_cache``), rotate q, then run ``attention`` (``attention_cpu`` or ``attention_ref``,
    which gets ``attention_kwargs`` too) on each sequence and its gathered keys, bottom-right aligned with the
    sequence's key count. ``cache_seqlens`` is an int tensor ``(batch,)``. Returns ``(out, lse)`` as ``attention``
    does, concatenated over the batch."""
    attention = attention_cpu if attention is None else attention
    window_size = effective_window(causal, window_size)
    append_kv_cache(k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad,
                    block_table, rotary_interleaved)
    if rotary_cos is not None:
        consecutive = tuple(window_size) != (UNBOUNDED, UNBOUNDED)  # causal or local: each query at its own position
        q = apply_rotary(q, rotary_cos, rotary_sin, rotary_positions(cache_seqlens, cache_leftpad, q.shape[1],
                                                                     consecutive), rotary_interleaved)
    seqlens_k = cache_seqlens.to(torch.int64) + (0 if k is None else k.shape[1])
    keys = gather_kv_cache(k_cache, seqlens_k, cache_batch_idx, cache_leftpad, block_table)
    values = gather_kv_cache(v_cache, seqlens_k, cache_batch_idx, cache_leftpad, block_table)
    outs, lses = [], []
    for b in range(q.shape[0]):
        out, lse = attention(q[b : b + 1], keys[b], values[b], causal=causal, window_size=window_size,
                             alibi_slopes=_sequence_slopes(alibi_slopes, b), **attention_kwargs)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def kvcache_attention_ref(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                          cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                          window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, upcast=True):
    """The oracle of the kv-cache tests: ``kvcache_attention`` with ``attention_ref`` on copies of the caches
    (the caller's are left as they are). ``cache_seqlens``: an int tensor ``(batch,)``. Returns ``(out, lse)``:
    out ``(batch, seqlen_q, nheads, headdim)`` in float32 (float64 for float64) with ``upcast``, else in q's dtype
    (the same math in the input precision: the baseline of flash-attn's error rule); lse float32 ``(batch,
    nheads, seqlen_q)``, ``+inf`` on rows that see no key."""
    return kvcache_attention(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens, rotary_cos, rotary_sin,
                             cache_batch_idx, cache_leftpad, block_table, causal, window_size, rotary_interleaved,
                             alibi_slopes, attention=attention_ref, softmax_scale=softmax_scale, upcast=upcast,
                             softcap=softcap)
