"""The public API, with flash-attn 2.x's names, arguments and defaults.

The Python layer only normalises arguments: it validates shapes, dtypes and devices with messages
that name the offending value, pads head dims to a multiple of 8, and sends CUDA tensors to the
kernels (through the ops ``torch.ops.flash_attn2.fwd`` and ``bwd``, which torch.compile traces without a
graph break) and CPU tensors to ``reference.attention_cpu``. Validation reads only shapes, dtypes and devices,
never tensor data, so the CUDA path has no data-dependent control flow.
"""

import math
import numbers

import torch
import torch.nn.functional as F

from flash_attn2 import _ops
from flash_attn2._autograd import FlashAttnFunction
from flash_attn2.reference import (
    UNBOUNDED,
    attention_cpu,
    attention_cpu_varlen,
    attention_probs,
    attention_probs_varlen,
    effective_window,
)

MAX_HEAD_DIM = 256
"""The largest head dim any kernel is written for."""

HEAD_DIM_MULTIPLE = _ops.VECTOR_ELEMENTS
"""Kernels load rows of 8 16-bit elements (16 bytes); other head dims are zero-padded up to a multiple of it.
Zero columns add nothing to q.k and give zero output columns, which are sliced off."""

CUDA_DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _check_inputs(q, k, v, varlen=False) -> None:
    """Raise TypeError/ValueError naming the problem; reads shapes, dtypes and devices only.

    Dense tensors are (batch, seqlen, nheads, headdim); variable-length ones (total, nheads, headdim)."""
    dims, layout = (3, "(total, nheads, headdim)") if varlen else (4, "(batch, seqlen, nheads, headdim)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attn2: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(
                f"flash_attn2: {name} must be {dims}-d {layout}, got shape {tuple(t.shape)} ({t.dim()}-d)"
            )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"flash_attn2: q, k, v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}"
        )
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(
            f"flash_attn2: tensors on {q.device} are not supported; use CUDA (kernels) or CPU (reference) tensors"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_attn2: q, k, v must have one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    on_cuda = q.device.type == "cuda"
    allowed = CUDA_DTYPES if on_cuda else CPU_DTYPES
    if q.dtype not in allowed:
        hint = " (cast with .to(torch.bfloat16) or .half())" if on_cuda and q.dtype.is_floating_point else ""
        raise TypeError(
            f"flash_attn2: on {q.device.type.upper()} the dtype must be one of {_dtype_names(allowed)}, "
            f"got {q.dtype}{hint}"
        )

    nheads, head_dim = q.shape[-2:]
    seqlen_k, nheads_k = k.shape[-3], k.shape[-2]
    if not varlen and not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"flash_attn2: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if seqlen_k != v.shape[-3]:
        what = "number of tokens" if varlen else "seqlen"
        raise ValueError(f"flash_attn2: k and v must have the same {what}, got k {seqlen_k} and v {v.shape[-3]}")
    if nheads_k != v.shape[-2]:
        raise ValueError(
            f"flash_attn2: k and v must have the same number of heads, got k {nheads_k} and v {v.shape[-2]}"
        )
    if not (head_dim == k.shape[-1] == v.shape[-1]):
        raise ValueError(
            f"flash_attn2: q, k, v must have one head dim, got q {head_dim}, k {k.shape[-1]}, v {v.shape[-1]}"
        )
    if not (0 < head_dim <= MAX_HEAD_DIM):
        raise ValueError(f"flash_attn2: head dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(
            f"flash_attn2: the number of query heads ({nheads}) must be a multiple of "
            f"the number of kv heads ({nheads_k})"
        )


def _check_cu_seqlens(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    """The cumulative-length vectors of a packed batch. Their values (from 0, non-decreasing, last entry
    = number of tokens) are the caller's contract: checking them would need a host sync, which the
    CUDA path never does (it must stay capturable in a CUDA graph)."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"flash_attn2: {name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"flash_attn2: {name} must be int32 (as in flash-attn), got {cu.dtype}")
        if cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"flash_attn2: {name} must be 1-d with batch + 1 entries, got shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"flash_attn2: {name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"flash_attn2: cu_seqlens_q and cu_seqlens_k must have one length (batch + 1), got "
            f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value < 0:
            raise ValueError(f"flash_attn2: {name} must be an int >= 0, got {value!r}")


def _is_number(value, kind) -> bool:
    """``isinstance(value, kind)`` without bool, which Python counts as an int but is never meant as one here."""
    return isinstance(value, kind) and not isinstance(value, bool)


def _check_modifiers(q, batch, dropout_p, window_size, softcap, alibi_slopes) -> tuple:
    """Validate the score modifiers (meanings in ``flash_attn_func``'s docstring) and return window_size as a
    tuple of two ints. ``batch`` is the number of sequences (of a packed batch too). Reads no tensor data."""
    if not _is_number(dropout_p, numbers.Real):
        raise TypeError(f"flash_attn2: dropout_p must be a number in [0, 1), got {type(dropout_p).__name__}")
    if not 0 <= dropout_p < 1:  # also refuses nan; 1 would drop everything and divide by 1 - p = 0
        raise ValueError(f"flash_attn2: dropout_p must be in [0, 1), got {dropout_p}")

    if isinstance(window_size, torch.Tensor) or not hasattr(window_size, "__len__") or len(window_size) != 2:
        raise TypeError(f"flash_attn2: window_size must be a pair (left, right) of ints, got {window_size!r}")
    if not all(_is_number(edge, numbers.Integral) for edge in window_size):
        raise TypeError(f"flash_attn2: window_size must be a pair (left, right) of ints, got {tuple(window_size)!r}")
    window_size = (int(window_size[0]), int(window_size[1]))
    if any(edge < UNBOUNDED for edge in window_size):
        raise ValueError(
            f"flash_attn2: each edge of window_size must be -1 (unbounded) or >= 0, got window_size={window_size}"
        )

    if not _is_number(softcap, numbers.Real):
        raise TypeError(f"flash_attn2: softcap must be a number, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"flash_attn2: softcap must be finite and >= 0 (0 turns it off), got {softcap}")

    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"flash_attn2: alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"flash_attn2: alibi_slopes must be float32 (as in flash-attn), got {alibi_slopes.dtype}")
        nheads = q.shape[-2]
        if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
            raise ValueError(
                f"flash_attn2: alibi_slopes must have shape (nheads,) = ({nheads},) or (batch, nheads) = "
                f"({batch}, {nheads}), got {tuple(alibi_slopes.shape)}"
            )
        if alibi_slopes.device != q.device:
            raise ValueError(f"flash_attn2: alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")
    return window_size


def _runs_on_kernels(q) -> bool:
    """CUDA tensors go to the kernels, CPU tensors to the PyTorch path. One named place, so that the CPU
    tests can send CPU tensors down the CUDA branch (with stand-ins) to check what it is called with."""
    return q.device.type == "cuda"


def _sample_keep_mask(shape, dropout_p, device):
    """A dropout keep mask (True = kept) from torch's generator, for the CPU path when the caller wants
    S_dmask: sampled once and handed to the CPU attention, so the output and S_dmask use the same mask."""
    return torch.rand(shape, device=device) < 1.0 - dropout_p


def _s_dmask(probs, keep, dtype):
    """flash-attn's ``S_dmask``: the probabilities, negated where dropout dropped them."""
    return torch.where(keep, probs, -probs).to(dtype)


def _attention_cuda(q, k, v, softmax_scale, causal, deterministic, varlen_args=(None, None, 0, 0), *,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0):
    """The CUDA path: pick the kernel family, pad the head dim, run the autograd Function.
    Returns ``(out, lse, rng_state)``; rng_state (the dropout seed the kernels used) is None without
    dropout."""
    window_left, window_right = (int(w) for w in window_size)
    mask = _ops.kernel_mask(causal, window_left, window_right)
    modifiers = _ops.kernel_modifiers(softcap, alibi_slopes, dropout_p)
    refusal = _ops.cuda_refusal(q.device, q.dtype, mask, modifiers)
    if refusal:
        raise RuntimeError(refusal)
    head_dim = q.shape[-1]
    padded_dim = (head_dim + HEAD_DIM_MULTIPLE - 1) // HEAD_DIM_MULTIPLE * HEAD_DIM_MULTIPLE
    if padded_dim > _ops.largest_head_dim(q.dtype, mask, modifiers):
        raise RuntimeError(_ops.head_dim_refusal(q.dtype, head_dim, mask, modifiers))

    if padded_dim != head_dim:  # the pad also makes each tensor contiguous
        pad = (0, padded_dim - head_dim)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
    else:
        q, k, v = (_ops.kernel_ready(t) for t in (q, k, v))
    rng_state = _ops.new_rng_state(q.device) if dropout_p > 0 else None

    out, lse = FlashAttnFunction.apply(q, k, v, softmax_scale, causal, deterministic, *varlen_args, window_left,
                                       window_right, float(softcap), alibi_slopes, float(dropout_p), rng_state)
    if padded_dim != head_dim:
        out = out[..., :head_dim]
    return out, lse, rng_state


def _attention(q, k, v, softmax_scale, causal, deterministic=False, window_size=(-1, -1), softcap=0.0,
               alibi_slopes=None, dropout_p=0.0, return_attn_probs=False):
    """Validate, then run on the tensors' device. Returns ``(out, lse, S_dmask)``, S_dmask None unless
    ``return_attn_probs`` with ``dropout_p > 0``. ``deterministic`` selects the CUDA backward's reproducible
    mode; the CPU path is deterministic anyway (given torch's seed, with dropout)."""
    _check_inputs(q, k, v)
    window_size = _check_modifiers(q, q.shape[0], dropout_p, window_size, softcap, alibi_slopes)
    window_size = effective_window(causal, window_size)  # every path gets the window with causal folded in
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5  # the real head dim, not the padded one
    batch, seqlen_q, nheads, _ = q.shape
    mask_shape = (batch, nheads, seqlen_q, k.shape[1])
    with_s_dmask = return_attn_probs and dropout_p > 0
    if _runs_on_kernels(q):
        out, lse, rng_state = _attention_cuda(q, k, v, softmax_scale, causal, deterministic, window_size=window_size,
                                              softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p)
        keep = _ops.dropout_keep_mask(rng_state, *mask_shape, dropout_p) if with_s_dmask else None
    else:
        keep = _sample_keep_mask(mask_shape, dropout_p, q.device) if with_s_dmask else None
        out, lse = attention_cpu(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes, dropout_p, keep)
    if keep is None:
        return out, lse, None
    with torch.no_grad():  # S_dmask is for inspection, not part of the autograd graph (as in flash-attn)
        probs = attention_probs(q, k, softmax_scale, causal, window_size, softcap, alibi_slopes, lse)
    return out, lse, _s_dmask(probs, keep, q.dtype)


def _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                      deterministic=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                      return_attn_probs=False):
    """Validate a packed batch, then run on the tensors' device. Returns ``(out, lse, S_dmask)`` as
    ``_attention`` does, lse (nheads, total_q), S_dmask padded (batch, nheads, max_seqlen_q, max_seqlen_k)."""
    _check_inputs(q, k, v, varlen=True)
    _check_cu_seqlens(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    batch = cu_seqlens_q.shape[0] - 1
    window_size = _check_modifiers(q, batch, dropout_p, window_size, softcap, alibi_slopes)
    window_size = effective_window(causal, window_size)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    mask_shape = (batch, q.shape[1], max_seqlen_q, max_seqlen_k)
    with_s_dmask = return_attn_probs and dropout_p > 0
    if _runs_on_kernels(q):
        varlen_args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        out, lse, rng_state = _attention_cuda(q, k, v, softmax_scale, causal, deterministic, varlen_args,
                                              window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                                              dropout_p=dropout_p)
        keep = _ops.dropout_keep_mask(rng_state, *mask_shape, dropout_p, cu_seqlens_q=cu_seqlens_q,
                                      cu_seqlens_k=cu_seqlens_k) if with_s_dmask else None
    else:
        keep = _sample_keep_mask(mask_shape, dropout_p, q.device) if with_s_dmask else None
        out, lse = attention_cpu_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_size,
                                        softcap, alibi_slopes, dropout_p, keep)
    if keep is None:
        return out, lse, None
    with torch.no_grad():
        probs = attention_probs_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                       causal, window_size, softcap, alibi_slopes, lse)
    return out, lse, _s_dmask(probs, keep, q.dtype)


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """Scaled dot-product attention, ``softmax(q k^T * softmax_scale) v``, as in flash-attn 2.x.

    The scores ``z = q . k * softmax_scale`` are modified in this order: softcap, ALiBi, mask (window and
    causal); then softmax, then dropout. Positions are bottom-right aligned: with ``off = seqlen_k - seqlen_q``,
    query ``i``'s diagonal is key ``i + off``.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k, v: ``(batch, seqlen_k, nheads_k, headdim)``; ``nheads % nheads_k == 0`` (GQA/MQA:
            query head ``i`` uses kv head ``i // (nheads // nheads_k)``).
            CUDA: float16 or bfloat16 on compute capability >= 8.0. CPU: also float32/float64.
            ``headdim <= 256``; any multiple of 8 runs as is, others are zero-padded.
        dropout_p: probability in ``[0, 1)`` of dropping each attention probability; kept ones are scaled by
            ``1 / (1 - dropout_p)``. Pass 0.0 in evaluation. The mask comes from torch's generator (CUDA: its
            seed and offset; CPU: ``torch.rand``), so ``torch.manual_seed`` makes it reproducible, and the
            backward pass drops the same entries.
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        causal: query ``i`` sees key ``j`` iff ``j <= i + off``, i.e. the window's ``right = 0``.
            Query rows that see no key (e.g. ``seqlen_q > seqlen_k``) output 0.
        window_size: ``(left, right)`` sliding-window (local) attention: query ``i`` sees key ``j`` iff
            ``i + off - left <= j <= i + off + right``; ``-1`` leaves that side unbounded (other negative
            values are an error). ``(-1, -1)``, the default, is full attention. With ``causal``, ``right`` is 0.
        softcap: if > 0, ``z = softcap * tanh(z / softcap)`` (Gemma 2, Grok); 0 turns it off.
        alibi_slopes: float32 ``(nheads,)`` or ``(batch, nheads)`` on q's device, or None: adds
            ``-slope * |i + off - j|`` to ``z`` (after softcapping).
        deterministic: make the CUDA backward pass bitwise reproducible. By default it accumulates dq
            with atomic adds, whose order varies between runs (so do the last bits of dq); True
            accumulates in a fixed order instead, at some cost in speed. The forward pass,
            and everything on CPU, is deterministic regardless.
        return_attn_probs: also return the log-sum-exp, and with dropout the probabilities ``S_dmask``.
            For testing only: ``S_dmask`` is seqlen_q x seqlen_k per head, recomputed after the pass.

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim)`` in q's dtype (on CUDA with a head dim that is
        not a multiple of 8, a view that slices the padding off, as in flash-attn); with ``return_attn_probs``,
        ``(out, softmax_lse, S_dmask)``: ``softmax_lse`` is float32 ``(batch, nheads, seqlen_q)``, the
        log-sum-exp of the modified scores without dropout (``+inf`` on rows that see no key).
        ``S_dmask`` is None without dropout (as in flash-attn); with ``dropout_p > 0`` it is
        ``(batch, nheads, seqlen_q, seqlen_k)`` in q's dtype: the probabilities ``exp(z - softmax_lse)``
        (without the ``1 / (1 - dropout_p)`` factor) with the dropped entries negated (flash-attn's
        convention). On CPU the output is computed with that same mask (sampled in one piece when
        S_dmask is asked for, per block of keys otherwise, so the two draw different masks from one seed).
    """
    out, lse, s_dmask = _attention(q, k, v, softmax_scale, causal, deterministic, window_size, softcap, alibi_slopes,
                                   dropout_p, return_attn_probs)
    return (out, lse, s_dmask) if return_attn_probs else out


def _unpack(packed, name: str, count: int, layout: str, dim: int = 2):
    """Split dim ``dim`` of a packed tensor into ``count`` views (no copies): dim 2 of a dense
    ``(batch, seqlen, count, ...)`` tensor, dim 1 of a variable-length ``(total, count, ...)`` one."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"flash_attn2: {name} must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dim() != dim + 3 or packed.shape[dim] != count:
        raise ValueError(f"flash_attn2: {name} must have shape {layout}, got {tuple(packed.shape)}")
    return packed.unbind(dim=dim)


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """``flash_attn_func`` on ``qkv`` of shape ``(batch, seqlen, 3, nheads, headdim)`` (views, no copy)."""
    q, k, v = _unpack(qkv, "qkv", 3, "(batch, seqlen, 3, nheads, headdim)")
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs
    )


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """``flash_attn_func`` on ``q`` and ``kv`` of shape ``(batch, seqlen_k, 2, nheads_k, headdim)`` (views, no copy)."""
    k, v = _unpack(kv, "kv", 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs
    )


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """``flash_attn_func`` on a packed batch of sequences of different lengths, as in flash-attn 2.x.

    Args:
        q: ``(total_q, nheads, headdim)``; k, v: ``(total_k, nheads_k, headdim)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)``, from 0, non-decreasing: sequence ``b`` owns
            rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` (not checked: that needs a host sync).
        max_seqlen_q: an int >= every query length (it sizes the grid; rows past it are not computed);
            max_seqlen_k: an int >= every key length. Larger bounds are fine.
        causal, window_size, alibi_slopes: positions bottom-right aligned per sequence; ``(batch, nheads)``
            slopes give sequence ``b`` row ``b``.
        block_table: paged KV is not implemented yet (NotImplementedError).
        Other arguments as in ``flash_attn_func``.

    Returns:
        ``out`` ``(total_q, nheads, headdim)``; with ``return_attn_probs``, ``(out, softmax_lse, S_dmask)``
        with ``softmax_lse`` float32 ``(nheads, total_q)`` and ``S_dmask`` None without dropout, else
        ``(batch, nheads, max_seqlen_q, max_seqlen_k)``: sequence ``b``'s at ``[b, :, :len_q, :len_k]``, 0 elsewhere.
    """
    if block_table is not None:
        raise NotImplementedError("flash_attn2: paged KV (block_table) is not implemented yet; pass block_table=None")
    out, lse, s_dmask = _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                          causal, deterministic, window_size, softcap, alibi_slopes, dropout_p,
                                          return_attn_probs)
    return (out, lse, s_dmask) if return_attn_probs else out


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """``flash_attn_varlen_func`` on ``qkv`` of shape ``(total, 3, nheads, headdim)`` (views, no copy)."""
    q, k, v = _unpack(qkv, "qkv", 3, "(total, 3, nheads, headdim)", dim=1)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
        window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
    )


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """``flash_attn_varlen_func`` on ``q`` and ``kv`` of shape ``(total_k, 2, nheads_k, headdim)`` (views, no copy)."""
    k, v = _unpack(kv, "kv", 2, "(total_k, 2, nheads_k, headdim)", dim=1)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
        window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
    )
