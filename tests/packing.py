"""The packed-batch helper the CPU and GPU test modules share."""

import torch


def cu_seqlens(lengths, device="cpu"):
    """flash-attn's cu_seqlens for sequences of these lengths: int32 ``(len(lengths) + 1,)``, from 0."""
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)
