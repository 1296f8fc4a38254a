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
    max_seqlen_k, window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state]) -> (out, lse)``
    through ``torch.ops.flash_attn2.fwd``, with its gradient through ``torch.ops.flash_attn2.bwd``;
    cu_seqlens and max_seqlen describe a packed batch, the rest are the window and the score
    modifiers (``_ops.fwd``). ``deterministic`` only concerns the backward (the forward is
    deterministic anyway). lse is not differentiable, nor are the alibi slopes and the rng state."""

    @staticmethod
    def forward(q, k, v, softmax_scale, causal, deterministic=False, cu_seqlens_q=None, cu_seqlens_k=None,
                max_seqlen_q=0, max_seqlen_k=0, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
                dropout_p=0.0, rng_state=None):
        return _ops.fwd(q, k, v, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # apply() binds forward's defaults, so inputs holds all sixteen arguments.
        (q, k, v, softmax_scale, causal, deterministic, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
         window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state) = inputs
        out, lse = output
        # Everything the FA2 backward needs: it recomputes the probabilities from q, k and lse
        # instead of storing them (and the dropout mask from rng_state), and uses out for the row sums
        # of dout * out.
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state)
        ctx.softmax_scale = softmax_scale
        ctx.causal = causal
        ctx.deterministic = deterministic
        ctx.max_seqlen_q = max_seqlen_q
        ctx.max_seqlen_k = max_seqlen_k
        ctx.window = (window_left, window_right)
        ctx.softcap = softcap
        ctx.dropout_p = dropout_p
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        # grad_lse is ignored: lse is marked non-differentiable, so it is None or zeros.
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state = ctx.saved_tensors
        # Gradients from autograd can have any strides, e.g. the stride-0 expansion of a sum's gradient.
        dout = _ops.kernel_ready(grad_out)
        dq, dk, dv = _ops.bwd(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.causal, ctx.deterministic,
                              cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q, ctx.max_seqlen_k, *ctx.window,
                              ctx.softcap, alibi_slopes, ctx.dropout_p, rng_state)
        # One gradient per input of forward: none for the scale, the flags, the packed-batch description,
        # the window and the modifiers.
        return (dq, dk, dv) + (None,) * 13
