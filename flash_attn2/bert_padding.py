"""Between padded batches and the packed layout of the variable-length functions, as in flash-attn.

    hidden_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(hidden, attention_mask)
    out_unpad = flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    out = pad_input(out_unpad, indices, batch, seqlen)

Both are differentiable (plain indexing). ``unpad_input`` reads the mask on the host once (for
``max_seqlen``), like flash-attn's; call it outside captured regions.
"""

import torch
import torch.nn.functional as F


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """Keep the tokens that the mask marks.

    Args:
        hidden_states: ``(batch, seqlen, ...)``.
        attention_mask: ``(batch, seqlen)``, bool or 0/1: 1 marks a real token.
        unused_mask: optional ``(batch, seqlen)``: tokens kept in the packed tensor (and counted in
            cu_seqlens) but not in ``seqused``, as in flash-attn.

    Returns:
        ``(hidden_unpad (total, ...), indices (total,) int64 into batch * seqlen, cu_seqlens int32
        (batch + 1,), max_seqlen int, seqused int32 (batch,))``.
    """
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(
            f"flash_attn2: attention_mask must be (batch, seqlen) = {tuple(hidden_states.shape[:2])}, "
            f"got {tuple(attention_mask.shape)}"
        )
    kept = attention_mask.bool() if unused_mask is None else attention_mask.bool() | unused_mask.bool()
    seqlens = kept.sum(dim=-1, dtype=torch.int32)
    seqused = attention_mask.bool().sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(kept.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    hidden_unpad = hidden_states.reshape(-1, *hidden_states.shape[2:])[indices]
    return hidden_unpad, indices, cu_seqlens, max_seqlen, seqused


def pad_input(hidden_states, indices, batch, seqlen):
    """Inverse of ``unpad_input``: ``(total, ...)`` back to ``(batch, seqlen, ...)`` with zeros at padding."""
    out = hidden_states.new_zeros((batch * seqlen, *hidden_states.shape[1:]))
    out = out.index_put((indices,), hidden_states)
    return out.reshape(batch, seqlen, *hidden_states.shape[1:])
