"""Plain PyTorch attention with flash_attn2's semantics.

Two implementations, for two jobs:

* ``attention_ref`` is the oracle the tests trust: it materialises the full score matrix and
  repeats the kv heads, so every step is visible and nothing is clever.
* ``attention_cpu`` is what the public API runs on CPU tensors: the same online softmax as the
  kernels, over blocks of keys, so memory stays at ``seqlen_q x block_size`` scores per head.
  It is ordinary differentiable torch code; autograd gives its backward.

Semantics shared with the CUDA op (layout ``(batch, seqlen, nheads, headdim)``):

* GQA/MQA: query head ``i`` reads kv head ``i // (nheads // nheads_k)``.
* ``causal`` is bottom-right aligned: query row ``i`` sees key ``j`` iff ``j <= i + seqlen_k - seqlen_q``.
* A row that sees no key has output 0 and log-sum-exp ``+inf``. ``+inf`` (not ``-inf``) so that
  ``exp(score - lse)`` is 0 for every key of that row, which is what a backward pass recomputes.
* ``lse`` is the natural-log log-sum-exp of the scaled scores, shape ``(batch, nheads, seqlen_q)``.
"""

import math

import torch

DEFAULT_CPU_BLOCK_SIZE = 256
"""Keys per step of ``attention_cpu``: large enough that the Python loop is not the cost,
small enough that a block of scores for a long query sequence stays a few MiB."""


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit and float32 inputs, float64 for float64 (so gradcheck sees float64 math)."""
    return torch.promote_types(dtype, torch.float32)


def _visible_keys(seqlen_q: int, key_start: int, key_end: int, seqlen_k: int, device) -> torch.Tensor:
    """Bottom-right causal mask for keys ``[key_start, key_end)``: bool ``(seqlen_q, key_end - key_start)``."""
    rows = torch.arange(seqlen_q, device=device).unsqueeze(1)
    cols = torch.arange(key_start, key_end, device=device).unsqueeze(0)
    return cols <= rows + (seqlen_k - seqlen_q)


def attention_ref(q, k, v, softmax_scale=None, causal=False, upcast=True):
    """Naive attention: full score matrix, kv heads repeated, softmax, weighted sum.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k, v: ``(batch, seqlen_k, nheads_k, headdim)``, ``nheads % nheads_k == 0``.
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        causal: bottom-right aligned causal mask.
        upcast: compute in float32 (float64 stays float64). ``False`` does the matrix products and
            the rounding of the probabilities in the input precision: the "same math in the same
            precision" baseline that the kernels' error is measured against.

    Returns:
        ``(out, lse)``. ``out`` is ``(batch, seqlen_q, nheads, headdim)`` in the math dtype, i.e.
        float32 (float64 for float64 input) when ``upcast``, else the input dtype; the caller casts.
        ``lse`` is ``(batch, nheads, seqlen_q)`` float32 (float64 for float64 input).
    """
    headdim = q.shape[-1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(headdim)
    dtype = _math_dtype(q.dtype) if upcast else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)

    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale  # (b, h, s_q, s_k)
    if causal:
        seqlen_q, seqlen_k = q.shape[1], k.shape[1]
        visible = _visible_keys(seqlen_q, 0, seqlen_k, seqlen_k, q.device)
        scores = scores.masked_fill(~visible, float("-inf"))

    scores = scores.to(_math_dtype(scores.dtype))
    lse = torch.logsumexp(scores, dim=-1)  # (b, h, s_q); -inf exactly where a row sees no key
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    probs = torch.exp(scores - lse.unsqueeze(-1)).to(dtype)  # empty rows: exp(-inf) = 0
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out, lse


def attention_cpu(q, k, v, softmax_scale, causal, block_size=DEFAULT_CPU_BLOCK_SIZE):
    """Memory-efficient attention in plain PyTorch (the public API's CPU path).

    Loops over blocks of ``block_size`` keys keeping a running row max ``m``, a running sum ``l``
    of ``exp(score - m)`` and an unnormalised output, rescaling both when the max grows (the
    online softmax of FlashAttention). GQA reads the kv heads through a broadcast view instead
    of repeating them. Accepts float16/bfloat16/float32/float64; computes in float32 (float64
    for float64).

    Returns:
        ``(out, lse)``: ``out`` ``(batch, seqlen_q, nheads, headdim)`` in the input dtype, ``lse``
        ``(batch, nheads, seqlen_q)`` in float32 (float64 for float64 input).
    """
    if block_size < 1:
        raise ValueError(f"flash_attn2: block_size must be >= 1, got {block_size}")
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    dtype = _math_dtype(q.dtype)

    # (b, h_k, group, s_q, d): query heads of one kv head side by side; kv heads broadcast over group.
    q_grouped = q.to(dtype).reshape(batch, seqlen_q, nheads_k, group, headdim).permute(0, 2, 3, 1, 4)
    k_heads = k.to(dtype).permute(0, 2, 1, 3).unsqueeze(2)  # (b, h_k, 1, s_k, d)
    v_heads = v.to(dtype).permute(0, 2, 1, 3).unsqueeze(2)  # (b, h_k, 1, s_k, d)

    row_shape = (batch, nheads_k, group, seqlen_q, 1)
    row_max = torch.full(row_shape, float("-inf"), dtype=dtype, device=q.device)
    row_sum = torch.zeros(row_shape, dtype=dtype, device=q.device)
    acc = torch.zeros((batch, nheads_k, group, seqlen_q, headdim), dtype=dtype, device=q.device)

    for start in range(0, seqlen_k, block_size):
        end = min(start + block_size, seqlen_k)
        k_block, v_block = k_heads[:, :, :, start:end], v_heads[:, :, :, start:end]
        scores = torch.matmul(q_grouped, k_block.transpose(-1, -2)) * softmax_scale  # (b, h_k, g, s_q, blk)
        if causal:
            visible = _visible_keys(seqlen_q, start, end, seqlen_k, q.device)
            scores = scores.masked_fill(~visible, float("-inf"))
        # The max is only a shift that cancels between numerator and denominator, so no gradient
        # needs to flow through it. A row that has seen no key yet has max -inf; shifting by 0
        # instead keeps exp(-inf - shift) = 0 rather than exp(-inf + inf) = nan.
        new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True)).detach()
        shift = new_max.masked_fill(new_max == float("-inf"), 0.0)
        probs = torch.exp(scores - shift)
        rescale = torch.exp(row_max - shift)
        row_sum = row_sum * rescale + probs.sum(dim=-1, keepdim=True)
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


def _per_sequence(attention, q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs):
    """Runs ``attention`` on each sequence of a packed batch. Rows past ``cu_seqlens_q[-1]`` belong to
    no sequence: out 0, lse +inf."""
    bounds_q = sequence_bounds(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    bounds_k = sequence_bounds(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
    outs, lses = [], []
    for (q0, q1), (k0, k1) in zip(bounds_q, bounds_k):
        out, lse = attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], **kwargs)
        outs.append(out[0])
        lses.append(lse[0])
    rest = q.shape[0] - (bounds_q[-1][1] if bounds_q else 0)
    outs.append(q.new_zeros((rest,) + tuple(q.shape[1:]), dtype=outs[0].dtype if outs else q.dtype))
    lse_dtype = lses[0].dtype if lses else torch.float32
    lses.append(torch.full((q.shape[1], rest), float("inf"), dtype=lse_dtype, device=q.device))
    return torch.cat(outs), torch.cat(lses, dim=-1)


def attention_cpu_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, block_size=DEFAULT_CPU_BLOCK_SIZE):
    """The CPU path of ``flash_attn_varlen_func``: ``attention_cpu`` on each sequence of the packed batch.

    Returns ``(out (total_q, nheads, headdim), lse (nheads, total_q))``; causal is bottom-right per sequence.
    """
    return _per_sequence(attention_cpu, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=softmax_scale,
                         causal=causal, block_size=block_size)


def attention_ref_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False, upcast=True):
    """``attention_ref`` on each sequence of a packed batch (the oracle of the variable-length tests)."""
    return _per_sequence(attention_ref, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=softmax_scale,
                         causal=causal, upcast=upcast)
