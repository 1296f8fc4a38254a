"""The public API, with flash-attn 2.x's names, arguments and defaults.

The Python layer only normalises arguments: it validates shapes, dtypes and devices with messages
that name the offending value, pads head dims to a multiple of 8, and sends CUDA tensors to the
kernels (through the ops ``torch.ops.flash_attn2.fwd`` and ``bwd``, which torch.compile traces without a
graph break) and CPU tensors to ``reference.attention_cpu``. Validation reads only shapes, dtypes and devices,
never tensor data, so the CUDA path has no data-dependent control flow.
"""

import torch
import torch.nn.functional as F

from flash_attn2 import _ops
from flash_attn2._autograd import FlashAttnFunction
from flash_attn2.reference import attention_cpu, attention_cpu_varlen

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


def _refuse_unimplemented(dropout_p, window_size, softcap, alibi_slopes) -> None:
    """Features of flash-attn's signature that arrive later: refuse rather than ignore them."""
    if dropout_p != 0.0:
        raise NotImplementedError(
            f"flash_attn2: dropout is not implemented yet (dropout_p={dropout_p}); pass dropout_p=0.0"
        )
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(
            "flash_attn2: sliding-window (local) attention is not implemented yet "
            f"(window_size={tuple(window_size)}); pass window_size=(-1, -1)"
        )
    if softcap != 0.0:
        raise NotImplementedError(
            f"flash_attn2: softcapping is not implemented yet (softcap={softcap}); pass softcap=0.0"
        )
    if alibi_slopes is not None:
        raise NotImplementedError("flash_attn2: ALiBi is not implemented yet; pass alibi_slopes=None")


def _attention_cuda(q, k, v, softmax_scale, causal, deterministic, varlen_args=(None, None, 0, 0)):
    refusal = _ops.cuda_refusal(q.device, q.dtype, causal)
    if refusal:
        raise RuntimeError(refusal)
    head_dim = q.shape[-1]
    padded_dim = (head_dim + HEAD_DIM_MULTIPLE - 1) // HEAD_DIM_MULTIPLE * HEAD_DIM_MULTIPLE
    if padded_dim > _ops.largest_head_dim(q.dtype, causal):
        raise RuntimeError(_ops.head_dim_refusal(q.dtype, head_dim, causal))

    if padded_dim != head_dim:  # the pad also makes each tensor contiguous
        pad = (0, padded_dim - head_dim)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
    else:
        q, k, v = (_ops.kernel_ready(t) for t in (q, k, v))

    out, lse = FlashAttnFunction.apply(q, k, v, softmax_scale, causal, deterministic, *varlen_args)
    if padded_dim != head_dim:
        out = out[..., :head_dim]
    return out, lse


def _attention(q, k, v, softmax_scale, causal, deterministic=False):
    """Validate, then run on the tensors' device. Returns ``(out, lse)``. ``deterministic`` selects the
    CUDA backward's reproducible mode; the CPU path is deterministic anyway."""
    _check_inputs(q, k, v)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5  # the real head dim, not the padded one
    if q.device.type == "cuda":
        return _attention_cuda(q, k, v, softmax_scale, causal, deterministic)
    return attention_cpu(q, k, v, softmax_scale, causal)


def _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                      deterministic=False):
    """Validate a packed batch, then run on the tensors' device. Returns ``(out, lse)``, lse (nheads, total_q)."""
    _check_inputs(q, k, v, varlen=True)
    _check_cu_seqlens(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if q.device.type == "cuda":
        varlen_args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        return _attention_cuda(q, k, v, softmax_scale, causal, deterministic, varlen_args)
    return attention_cpu_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)


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

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k, v: ``(batch, seqlen_k, nheads_k, headdim)``; ``nheads % nheads_k == 0`` (GQA/MQA:
            query head ``i`` uses kv head ``i // (nheads // nheads_k)``).
            CUDA: float16 or bfloat16 on compute capability >= 8.0. CPU: also float32/float64.
            ``headdim <= 256``; any multiple of 8 runs as is, others are zero-padded.
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        causal: bottom-right aligned mask: query ``i`` sees key ``j`` iff ``j <= i + seqlen_k - seqlen_q``.
            Query rows that see no key (``seqlen_q > seqlen_k``) output 0.
        dropout_p, window_size, softcap, alibi_slopes: accepted for signature compatibility; any
            value but the default raises NotImplementedError.
        deterministic: make the CUDA backward pass bitwise reproducible. By default it accumulates dq
            with atomic adds, whose order varies between runs (so do the last bits of dq); True
            accumulates in a fixed order instead, at some cost in speed. The forward pass,
            and everything on CPU, is deterministic regardless.
        return_attn_probs: also return the log-sum-exp.

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim)`` in q's dtype (on CUDA with a head dim that is
        not a multiple of 8, a view that slices the padding off, as in flash-attn); with ``return_attn_probs``,
        ``(out, softmax_lse, None)``: ``softmax_lse`` is float32 ``(batch, nheads, seqlen_q)``
        (``+inf`` on rows that see no key), and the third element, flash-attn's dropout mask
        ``S_dmask``, is None because there is no dropout.
    """
    _refuse_unimplemented(dropout_p, window_size, softcap, alibi_slopes)
    out, lse = _attention(q, k, v, softmax_scale, causal, deterministic)
    return (out, lse, None) if return_attn_probs else out


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
        causal: bottom-right aligned per sequence.
        block_table: paged KV is not implemented yet (NotImplementedError).
        Other arguments as in ``flash_attn_func``.

    Returns:
        ``out`` ``(total_q, nheads, headdim)``; with ``return_attn_probs``, ``(out, softmax_lse, None)``
        with ``softmax_lse`` float32 ``(nheads, total_q)``.
    """
    _refuse_unimplemented(dropout_p, window_size, softcap, alibi_slopes)
    if block_table is not None:
        raise NotImplementedError("flash_attn2: paged KV (block_table) is not implemented yet; pass block_table=None")
    out, lse = _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                                 deterministic)
    return (out, lse, None) if return_attn_probs else out


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
