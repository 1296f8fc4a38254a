#!/usr/bin/env python3
"""A tiny forward workload for compute-sanitizer (memcheck, racecheck): run_on_device.sh runs it.

Shapes are small (batch 1, 2 heads) and chosen to end mid-tile (65) as well as on a tile boundary
(128), with and without the causal mask, plus s_q != s_k in both directions (bottom-right causal
alignment, rows that see no key). It covers one head dim per kernel family of this build (4 warps with
the 64-column swizzle, d=96's 32-column swizzle, 8 warps), each also at a head dim 8 below the kernel's
(the predicated-column path) and with GQA (2 query heads on 1 KV head).

Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so each tensor is its own allocation: otherwise an
out-of-bounds access that lands inside PyTorch's cached pool is invisible to memcheck.
"""

import itertools

import torch
from sanitize_common import BATCH, DTYPES, NHEADS, SHAPES, choose_cases, import_flash_attn2


def main():
    flash_attn2 = import_flash_attn2()
    dtype_name, built, cases = choose_cases(flash_attn2.built_kernels(), "sanitize_fwd.py")
    dtype = DTYPES[dtype_name]
    worst = 0.0
    for (head_dim, nheads_k), (seqlen_q, seqlen_k), causal in itertools.product(cases, SHAPES, (False, True)):
        kernel_head_dim = min(d for (dt, d, _) in built if dt == dtype_name and d >= head_dim)
        if (dtype_name, kernel_head_dim, "causal" if causal else "none") not in built:
            continue
        torch.manual_seed(0)
        q = torch.randn(BATCH, seqlen_q, NHEADS, head_dim, device="cuda", dtype=dtype)
        k, v = (torch.randn(BATCH, seqlen_k, nheads_k, head_dim, device="cuda", dtype=dtype) for _ in range(2))
        out = flash_attn2.flash_attn_func(q, k, v, causal=causal)
        torch.cuda.synchronize()
        ref, _ = flash_attn2.reference.attention_ref(q, k, v, causal=causal)
        err = (out.float() - ref.float()).abs().max().item()
        worst = max(worst, err)
        print(f"{dtype_name} hdim {head_dim} h_k {nheads_k} s_q {seqlen_q:3d} s_k {seqlen_k:3d} "
              f"causal {causal!s:5s}: max |out - fp32 ref| {err:.2e}", flush=True)
    print(f"done; worst error {worst:.2e}")


if __name__ == "__main__":
    main()
