"""The one autograd path of the CUDA kernels.

``FlashAttnFunction`` takes kernel-ready tensors (see ``_ops.fwd``); argument normalisation,
head-dim padding and GQA stay in ``interface.py`` as ordinary differentiable torch ops, so their
gradients come from autograd and the backward kernel only ever sees what the forward kernel saw.
The backward op arrives in a later change: ``backward`` then calls it with the tensors saved here.
"""

import torch

from flash_attn2 import _ops


class FlashAttnFunction(torch.autograd.Function):
    """``(q, k, v, softmax_scale, causal[, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k])
    -> (out, lse)`` through ``torch.ops.flash_attn2.fwd``; the last four describe a packed batch."""

    @staticmethod
    def forward(q, k, v, softmax_scale, causal, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
        return _ops.fwd(q, k, v, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, softmax_scale, causal = inputs[:5]
        out, lse = output
        # Everything the FA2 backward needs: it recomputes the probabilities from q, k and lse
        # instead of storing them, and uses out for the row sums of dout * out.
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.softmax_scale = softmax_scale
        ctx.causal = causal
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        raise NotImplementedError(
            "flash_attn2: the CUDA backward pass is not implemented yet; the forward works, so run "
            "inference under torch.no_grad() / torch.inference_mode(), or detach q, k and v. "
            "CPU tensors have a backward (plain autograd through flash_attn2.reference.attention_cpu)."
        )
