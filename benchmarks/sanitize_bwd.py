#!/usr/bin/env python3
"""A tiny backward workload for compute-sanitizer (memcheck, racecheck): run_on_device.sh runs it after
sanitize_fwd.py.

The shapes are sanitize_fwd.py's: batch 1, 2 query heads, lengths that end mid-tile (65) and on a tile
boundary (128), s_q != s_k both ways (bottom-right causal alignment, rows that see no key), with and
without the causal mask. Per kernel family of this build (the same families as sanitize_fwd.py): the
kernel's own head dim with GQA (2 query heads on 1 KV head, so the per-query-head dk/dv are summed),
and 8 below it (the predicated-column path). Each case runs the backward in both modes: dq by atomic
adds, and deterministic (per-split accumulators). A packed variable-length batch with lengths 0, 1 and
a mid-tile tail runs once per family and mask, and so does a deterministic backward whose one split per
head walks three key blocks (FLASH_ATTN2_BWD_DET_SPLITS=1: the first stores its dq tiles into the private
slice, the later ones add, walking the query blocks down and up).

Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so each tensor is its own allocation: otherwise an
out-of-bounds access that lands inside PyTorch's cached pool is invisible to memcheck.
"""

import itertools
import os

import torch
from sanitize_common import BATCH, DTYPES, NHEADS, SHAPES, choose_cases, import_flash_attn2

VARLEN_LENGTHS = ([65, 0, 1, 130], [70, 3, 0, 130])  # (q, k) per sequence: empty ones, one query, tails
ROUNDS_SHAPE = (200, 300)  # (seqlen_q, seqlen_k): three key blocks of 128, rows past the tile at both ends


def make_inputs(layout, lengths, head_dim, nheads_k, dtype):
    """q, k, v (requiring grad) and the varlen arguments (empty for a dense batch)."""
    if layout != "varlen":  # dense, rounds
        (seqlen_q, seqlen_k), varlen_args = lengths, ()
        q_shape, kv_shape = (BATCH, seqlen_q, NHEADS, head_dim), (BATCH, seqlen_k, nheads_k, head_dim)
    else:
        lens_q, lens_k = lengths
        cu_q, cu_k = (torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
                      for lens in lengths)
        varlen_args = (cu_q, cu_k, max(lens_q), max(lens_k))
        q_shape, kv_shape = (sum(lens_q), NHEADS, head_dim), (sum(lens_k), nheads_k, head_dim)
    q = torch.randn(q_shape, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(kv_shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    return q, k, v, varlen_args


def attention(flash_attn2, q, k, v, causal, deterministic, varlen_args):
    if varlen_args:
        return flash_attn2.flash_attn_varlen_func(q, k, v, *varlen_args, causal=causal, deterministic=deterministic)
    return flash_attn2.flash_attn_func(q, k, v, causal=causal, deterministic=deterministic)


def max_grad_error(flash_attn2, grads, q, k, v, grad_out, causal, varlen_args):
    """Max |ours - float32 reference| over dq, dk, dv, the reference by autograd on float32 copies."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    if varlen_args:
        out = flash_attn2.reference.attention_ref_varlen(*leaves, *varlen_args[:2], causal=causal)[0]
    else:
        out = flash_attn2.reference.attention_ref(*leaves, causal=causal)[0]
    expected = torch.autograd.grad(out, leaves, grad_out.float())
    return max(((g.float() - e).abs().max().item() if g.numel() else 0.0) for g, e in zip(grads, expected))


def main():
    flash_attn2 = import_flash_attn2()
    dtype_name, built, cases = choose_cases(flash_attn2.built_kernels("bwd"), "sanitize_bwd.py")
    dtype = DTYPES[dtype_name]
    worst = 0.0
    for (head_dim, nheads_k), causal in itertools.product(cases, (False, True)):
        kernel_head_dim = min(d for (dt, d, _) in built if dt == dtype_name and d >= head_dim)
        if (dtype_name, kernel_head_dim, "causal" if causal else "none") not in built:
            continue
        runs = [("dense", shape, deterministic) for shape in SHAPES for deterministic in (False, True)]
        if nheads_k == 1:  # one varlen batch per family and mask
            runs.append(("varlen", VARLEN_LENGTHS, False))
            runs.append(("rounds", ROUNDS_SHAPE, True))
        for layout, lengths, deterministic in runs:
            if layout == "rounds":
                os.environ["FLASH_ATTN2_BWD_DET_SPLITS"] = "1"
            else:
                os.environ.pop("FLASH_ATTN2_BWD_DET_SPLITS", None)
            torch.manual_seed(0)
            q, k, v, varlen_args = make_inputs(layout, lengths, head_dim, nheads_k, dtype)
            grad_out = torch.randn_like(q)
            out = attention(flash_attn2, q, k, v, causal, deterministic, varlen_args)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
            torch.cuda.synchronize()
            err = max_grad_error(flash_attn2, grads, q, k, v, grad_out, causal, varlen_args)
            worst = max(worst, err)
            what = f"varlen {lengths}" if layout == "varlen" else f"s_q {lengths[0]:3d} s_k {lengths[1]:3d}"
            if layout == "rounds":
                what += " (one split)"
            print(f"{dtype_name} hdim {head_dim} h_k {nheads_k} {what} causal {causal!s:5s} "
                  f"deterministic {deterministic!s:5s}: max |grad - fp32 ref| {err:.2e}", flush=True)
    print(f"done; worst error {worst:.2e}")


if __name__ == "__main__":
    main()
