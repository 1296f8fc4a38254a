#!/usr/bin/env python3
"""A tiny workload of the masks and score modifiers (issue 4) for compute-sanitizer (memcheck,
racecheck): run_on_device.sh runs it after sanitize_fwd.py and sanitize_bwd.py.

Forward and backward of the sliding-window kernels ("local") and of the kernels with the score
modifiers (the "softcap" and "alibi" families alone, "mod" for dropout and combinations), at sanitize_fwd.py's shapes (lengths that
end mid-tile and on a tile boundary, s_q != s_k both ways), dense and as a packed batch with empty
sequences. One head dim: 8 below the smallest built kernel of the first dtype (predicated columns), with
GQA (2 query heads on 1 KV head). Windows narrower than a tile, and one wider than a tile whose left edge skips
whole key blocks, exercise both ends of the block ranges.

Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so each tensor is its own allocation.
"""

import itertools

import torch
from sanitize_common import BATCH, DTYPES, NHEADS, SHAPES, import_flash_attn2

CASES = (  # (causal, window_size, softcap, alibi, dropout_p)
    (False, (20, 10), 0.0, False, 0.0),
    (True, (70, 0), 0.0, False, 0.0),
    (False, (-1, 5), 0.0, False, 0.0),
    (False, (-1, -1), 30.0, False, 0.0),
    (True, (-1, -1), 0.0, True, 0.0),
    (False, (-1, -1), 0.0, True, 0.0),
    (False, (20, 30), 0.0, True, 0.0),
    (False, (40, 10), 30.0, False, 0.0),
    (False, (-1, -1), 0.0, False, 0.2),
    (True, (40, 0), 30.0, True, 0.2),
)
VARLEN_LENGTHS = ([65, 0, 1, 130], [70, 3, 0, 130])


def main():
    flash_attn2 = import_flash_attn2()
    kernels = [key for key in flash_attn2.built_kernels("bwd") if key.modifiers == "mod" and key.mask == "local"]
    if not kernels:
        raise SystemExit("sanitize_modifiers.py: this build has no 'local'/'mod' kernels")
    first = min(kernels, key=lambda key: (key.head_dim, key.dtype))
    dtype = DTYPES[first.dtype]
    head_dim, nheads_k = first.head_dim - 8, 1  # predicated columns and GQA at once
    for (causal, window, softcap, alibi, dropout_p), layout in itertools.product(CASES, ("dense", "varlen")):
        shapes = SHAPES[2:] if layout == "dense" else (VARLEN_LENGTHS,)  # s_q != s_k both ways, mid-tile ends
        for lengths in shapes:
            torch.manual_seed(0)
            if layout == "dense":
                seqlen_q, seqlen_k = lengths
                q = torch.randn(BATCH, seqlen_q, NHEADS, head_dim, device="cuda", dtype=dtype, requires_grad=True)
                k, v = (torch.randn(BATCH, seqlen_k, nheads_k, head_dim, device="cuda", dtype=dtype,
                                    requires_grad=True) for _ in range(2))
                batch = BATCH
            else:
                lens_q, lens_k = lengths
                cu = [torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
                      for lens in lengths]
                q = torch.randn(sum(lens_q), NHEADS, head_dim, device="cuda", dtype=dtype, requires_grad=True)
                k, v = (torch.randn(sum(lens_k), nheads_k, head_dim, device="cuda", dtype=dtype,
                                    requires_grad=True) for _ in range(2))
                batch = len(lens_q)
            slopes = torch.rand(batch, NHEADS, device="cuda") * 0.25 if alibi else None
            kwargs = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes,
                          dropout_p=dropout_p)
            if layout == "dense":
                out = flash_attn2.flash_attn_func(q, k, v, **kwargs)
            else:
                out = flash_attn2.flash_attn_varlen_func(q, k, v, cu[0], cu[1], max(lens_q), max(lens_k),
                                                         **kwargs)
            grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
            torch.cuda.synchronize()
            finite = all(bool(torch.isfinite(t).all()) for t in (out, *grads))
            print(f"{first.dtype} hdim {head_dim} h_k {nheads_k} {layout} {lengths} {kwargs | dict(alibi_slopes=alibi)}: "
                  f"{'finite' if finite else 'NOT FINITE'}", flush=True)
    print("done")


if __name__ == "__main__":
    main()
