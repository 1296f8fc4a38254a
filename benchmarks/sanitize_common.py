"""What sanitize_fwd.py and sanitize_bwd.py share: the small shapes, the kernel families, and the
choice of cases from a build's kernels."""

import torch
from checkout import import_flash_attn2  # noqa: F401  (the sanitizers import it from here)

SHAPES = ((65, 65), (128, 128), (65, 128), (128, 65))  # (seqlen_q, seqlen_k)
BATCH, NHEADS = 1, 2
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
FAMILIES = ((64, 32, 128), (96,), (256, 192))  # kernel head dims sharing one code shape; first built wins


def choose_cases(kernels, script):
    """From a build's kernels (KernelKeys of one direction): the dtype to run, the set of
    (dtype, head_dim, mask) built, and the (head_dim, nheads_k) cases: per family, the kernel's own head
    dim with GQA, and 8 below it (the predicated-column path)."""
    kernels = sorted(kernels, key=lambda key: (key.head_dim, key.dtype))
    if not kernels:
        raise SystemExit(f"{script}: this build has no kernels for it (is flash_attn2._C built?)")
    dtype_name = kernels[0].dtype
    built = {(key.dtype, key.head_dim, key.mask) for key in kernels}
    cases = []
    for family in FAMILIES:
        found = [d for d in family if any(key.head_dim == d and key.dtype == dtype_name for key in kernels)]
        if found:
            cases += [(found[0], 1), (found[0] - 8, NHEADS)]
    return dtype_name, built, cases
