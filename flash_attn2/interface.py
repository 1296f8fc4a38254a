"""The public API, with flash-attn 2.x's names, arguments and defaults.

The Python layer only normalises arguments: it validates shapes, dtypes and devices with messages
that name the offending value, pads head dims to a multiple of 8, and sends CUDA tensors to the
kernels (through ``torch.ops.flash_attn2.fwd``, which torch.compile traces without a graph break)
and CPU tensors to ``reference.attention_cpu``. Validation reads only shapes, dtypes and devices,
never tensor data, so the CUDA path has no data-dependent control flow.
"""

import torch
import torch.nn.functional as F

from flash_attn2 import _ops
from flash_attn2._autograd import FlashAttnFunction
from flash_attn2.reference import attention_cpu

MAX_HEAD_DIM = 256
"""The largest head dim any kernel is written for."""

HEAD_DIM_MULTIPLE = 8
"""Kernels load rows of 8 16-bit elements (16 bytes); smaller head dims are zero-padded up to it.
Zero columns add nothing to q.k and give zero output columns, which are sliced off."""

CUDA_DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _check_inputs(q, k, v) -> None:
    """Raise TypeError/ValueError naming the problem; reads shapes, dtypes and devices only."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attn2: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"flash_attn2: {name} must be 4-d (batch, seqlen, nheads, headdim), "
                f"got shape {tuple(t.shape)} ({t.dim()}-d)"
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

    batch, seqlen_q, nheads, head_dim = q.shape
    _, seqlen_k, nheads_k, _ = k.shape
    if not (batch == k.shape[0] == v.shape[0]):
        raise ValueError(f"flash_attn2: batch sizes differ: q {batch}, k {k.shape[0]}, v {v.shape[0]}")
    if seqlen_k != v.shape[1]:
        raise ValueError(f"flash_attn2: k and v must have the same seqlen, got k {seqlen_k} and v {v.shape[1]}")
    if nheads_k != v.shape[2]:
        raise ValueError(
            f"flash_attn2: k and v must have the same number of heads, got k {nheads_k} and v {v.shape[2]}"
        )
    if not (head_dim == k.shape[3] == v.shape[3]):
        raise ValueError(
            f"flash_attn2: q, k, v must have one head dim, got q {head_dim}, k {k.shape[3]}, v {v.shape[3]}"
        )
    if not (0 < head_dim <= MAX_HEAD_DIM):
        raise ValueError(f"flash_attn2: head dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(
            f"flash_attn2: the number of query heads ({nheads}) must be a multiple of "
            f"the number of kv heads ({nheads_k})"
        )


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


def _kernel_ready(t):
    """The kernels read rows with 16-byte loads: the last dim contiguous, and the start and every other
    stride a multiple of 8 elements. Any strides meeting that run as they are; others get one copy.
    (storage_offset, not data_ptr, so torch.compile can trace it; allocations themselves are aligned.)"""
    aligned = t.stride(-1) == 1 and t.storage_offset() % HEAD_DIM_MULTIPLE == 0 and all(
        stride % HEAD_DIM_MULTIPLE == 0 for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size > 1
    )
    return t if aligned else t.clone(memory_format=torch.contiguous_format)


def _attention_cuda(q, k, v, softmax_scale, causal):
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
        q, k, v = (_kernel_ready(t) for t in (q, k, v))

    out, lse = FlashAttnFunction.apply(q, k, v, softmax_scale, causal)
    if padded_dim != head_dim:
        out = out[..., :head_dim]
    return out, lse


def _attention(q, k, v, softmax_scale, causal):
    """Validate, then run on the tensors' device. Returns ``(out, lse)``."""
    _check_inputs(q, k, v)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5  # the real head dim, not the padded one
    if q.device.type == "cuda":
        return _attention_cuda(q, k, v, softmax_scale, causal)
    return attention_cpu(q, k, v, softmax_scale, causal)


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
        deterministic: accepted; the forward pass is deterministic regardless.
        return_attn_probs: also return the log-sum-exp.

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim)`` in q's dtype (on CUDA with a head dim that is
        not a multiple of 8, a view that slices the padding off, as in flash-attn); with ``return_attn_probs``,
        ``(out, softmax_lse, None)``: ``softmax_lse`` is float32 ``(batch, nheads, seqlen_q)``
        (``+inf`` on rows that see no key), and the third element, flash-attn's dropout mask
        ``S_dmask``, is None because there is no dropout.
    """
    _refuse_unimplemented(dropout_p, window_size, softcap, alibi_slopes)
    out, lse = _attention(q, k, v, softmax_scale, causal)
    return (out, lse, None) if return_attn_probs else out


def _unpack(packed, name: str, count: int, layout: str):
    """Split dim 2 of a packed tensor into ``count`` views (no copies)."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"flash_attn2: {name} must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dim() != 5 or packed.shape[2] != count:
        raise ValueError(f"flash_attn2: {name} must have shape {layout}, got {tuple(packed.shape)}")
    return packed.unbind(dim=2)


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
