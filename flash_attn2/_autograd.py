"""The one autograd path of the CUDA kernels.

``FlashAttnFunction`` takes kernel-ready tensors (see ``_ops.fwd``); argument normalisation,
head-dim padding and GQA stay in ``interface.py`` as ordinary differentiable torch ops, so their
gradients come from autograd and the backward kernel only ever sees what the forward kernel saw.
The Function is written in the ``setup_context`` style, which torch.compile traces (forward and
backward) into one graph.
"""

import torch

from flash_attn2 import _ops


class FlashAttnFunction(torch.autograd.Function):
    """``(q, k, v, softmax_scale, causal, deterministic[, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k]) -> (out, lse)`` through ``torch.ops.flash_attn2.fwd``, with its gradient through
    ``torch.ops.flash_attn2.bwd``; the last four describe a packed batch. ``deterministic`` only
    concerns the backward (the forward is deterministic anyway). lse is not differentiable."""

    @staticmethod
    def forward(q, k, v, softmax_scale, causal, deterministic=False, cu_seqlens_q=None, cu_seqlens_k=None,
                max_seqlen_q=0, max_seqlen_k=0):
        return _ops.fwd(q, k, v, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # apply() binds forward's defaults, so inputs holds all ten arguments.
        q, k, v, softmax_scale, causal, deterministic, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = inputs
        out, lse = output
        # Everything the FA2 backward needs: it recomputes the probabilities from q, k and lse
        # instead of storing them, and uses out for the row sums of dout * out.
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.softmax_scale = softmax_scale
        ctx.causal = causal
        ctx.deterministic = deterministic
        ctx.max_seqlen_q = max_seqlen_q
        ctx.max_seqlen_k = max_seqlen_k
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        # grad_lse is ignored: lse is marked non-differentiable, so it is None or zeros.
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        # Gradients from autograd can have any strides, e.g. the stride-0 expansion of a sum's gradient.
        dout = _ops.kernel_ready(grad_out)
        dq, dk, dv = _ops.bwd(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.causal, ctx.deterministic,
                              cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q, ctx.max_seqlen_k)
        # One gradient per input of forward: none for the scale, the flags and the packed-batch description.
        return dq, dk, dv, None, None, None, None, None, None, None
