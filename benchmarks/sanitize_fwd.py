#!/usr/bin/env python3
"""A tiny forward workload for compute-sanitizer (memcheck, racecheck): run_on_device.sh runs it.

Shapes are small (batch 1, 2 heads) and chosen to end mid-tile (65) as well as on a tile boundary
(128), with and without the causal mask, plus s_q != s_k in both directions (bottom-right causal
alignment, rows that see no key). It uses the first dtype and the smallest head dim of this build.

Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so each tensor is its own allocation: otherwise an
out-of-bounds access that lands inside PyTorch's cached pool is invisible to memcheck.
"""

import os
import sys

import torch

SHAPES = ((65, 65), (128, 128), (65, 128), (128, 65))  # (seqlen_q, seqlen_k)
BATCH, NHEADS = 1, 2
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def import_flash_attn2():
    try:
        import flash_attn2
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import flash_attn2
    return flash_attn2


def main():
    flash_attn2 = import_flash_attn2()
    kernels = sorted(flash_attn2.built_kernels(), key=lambda key: (key.head_dim, key.dtype))
    if not kernels:
        raise SystemExit("sanitize_fwd.py: this build has no forward kernels (is flash_attn2._C built?)")
    dtype_name, head_dim = kernels[0].dtype, kernels[0].head_dim
    dtype = DTYPES[dtype_name]
    worst = 0.0
    for seqlen_q, seqlen_k in SHAPES:
        for causal in (False, True):
            if (dtype_name, head_dim, "causal" if causal else "none") not in {tuple(key) for key in kernels}:
                continue
            torch.manual_seed(0)
            q = torch.randn(BATCH, seqlen_q, NHEADS, head_dim, device="cuda", dtype=dtype)
            k, v = (torch.randn(BATCH, seqlen_k, NHEADS, head_dim, device="cuda", dtype=dtype) for _ in range(2))
            out = flash_attn2.flash_attn_func(q, k, v, causal=causal)
            torch.cuda.synchronize()
            ref, _ = flash_attn2.reference.attention_ref(q, k, v, causal=causal)
            err = (out.float() - ref.float()).abs().max().item()
            worst = max(worst, err)
            print(f"{dtype_name} hdim {head_dim} s_q {seqlen_q:3d} s_k {seqlen_k:3d} causal {causal!s:5s}: "
                  f"max |out - fp32 ref| {err:.2e}", flush=True)
    print(f"done; worst error {worst:.2e}")


if __name__ == "__main__":
    main()
