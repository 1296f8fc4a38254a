"""Shared test setup: the ``requires_cuda`` marker and per-test seeding.

GPU tests carry ``pytestmark = pytest.mark.requires_cuda``; they are skipped, with the reason, on
machines without a CUDA GPU of compute capability >= 8.0 or without the built extension.
"""

import zlib

import pytest
import torch

from flash_attn2 import _ops


def cuda_skip_reason():
    """Why the GPU tests cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if not _ops.extension_available():
        return f"flash_attn2._C is not built ({_ops.extension_import_error()})"
    if torch.cuda.get_device_capability() < _ops.MIN_COMPUTE_CAPABILITY:
        return f"GPU compute capability {torch.cuda.get_device_capability()} < {_ops.MIN_COMPUTE_CAPABILITY}"
    return None


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "requires_cuda: needs a CUDA GPU (sm80+) and the built flash_attn2._C; skipped otherwise"
    )


def pytest_collection_modifyitems(config, items):
    reason = cuda_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip, append=False)  # ahead of a parametrization's own skip: this reason is the real one


@pytest.fixture(autouse=True)
def seed(request):
    """Seed torch (CPU and CUDA) from the test's id: reproducible inputs that differ between tests."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value
