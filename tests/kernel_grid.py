"""Parametrization helpers shared by the GPU test modules: ids for compiled kernels, a grid that
explains itself when the build yields no case, and one representative kernel per (dtype, mask)."""

import pytest

from flash_attn2 import _ops


def plain_kernels(direction="fwd"):
    """The compiled kernels without window and modifiers (masks none and causal, "plain"), sorted: what
    the tests of the plain paths iterate over (tests/test_modifiers_gpu.py covers the others)."""
    return sorted(k for k in _ops.built_kernels(direction) if k.mask in ("none", "causal") and k.modifiers == "plain")


def kernel_id(kernel):
    return f"{kernel.dtype}-d{kernel.head_dim}-{kernel.mask}"


def grid_or_skip(params, reason="no compiled kernel fits this test"):
    """Parametrization that explains itself when the build (or its absence) yields no case."""
    return params or [pytest.param(None, marks=pytest.mark.skip(reason=reason))]


def one_kernel_per_dtype_and_mask(kernels, mask=None, reason="no compiled kernel fits this test"):
    """Per (dtype, mask) among ``kernels``, the head dim closest to 128."""
    best = {}
    for kernel in kernels:
        if mask is not None and kernel.mask != mask:
            continue
        key = (kernel.dtype, kernel.mask)
        if key not in best or abs(kernel.head_dim - 128) < abs(best[key].head_dim - 128):
            best[key] = kernel
    return grid_or_skip([pytest.param(k, id=kernel_id(k)) for k in sorted(best.values())], reason)
