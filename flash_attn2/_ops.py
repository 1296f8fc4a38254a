"""The bridge to the compiled extension ``flash_attn2._C``.

Importing ``_C`` registers the ops ``torch.ops.flash_attn2.fwd``, ``bwd``, ``dropout_mask`` and
``fwd_kvcache``; the
plain function ``_C.built_kernels()`` lists the compiled kernels (it takes no tensors, so it is not an op).
This module remembers whether the import worked (``import flash_attn2`` must work without it, e.g.
on CPU-only machines), reads back which kernels the build contains, registers the fake (meta)
implementations that torch.compile and ``torch.library.opcheck`` need, and explains refusals.
"""

import functools
from typing import NamedTuple

import torch

try:
    from flash_attn2 import _C  # noqa: F401  (imported for its side effect: the op registrations)
except ImportError as _error:
    _C = None
    _IMPORT_ERROR = _error
else:
    _IMPORT_ERROR = None

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
"""The dtypes the kernels are built for, by the names ``built_kernels()`` uses."""

DIRECTIONS = ("fwd", "bwd", "kvcache")
"""The first field of a ``built_kernels()`` line: forward, backward, or KV-cache (forward) kernel."""

MASKS = ("none", "causal", "local")
"""The mask field: every key, bottom-right causal, sliding window (which also serves causal + window)."""

MODIFIERS = ("plain", "softcap", "alibi", "mod")
"""The last field, the modifier family: "softcap" and "alibi" kernels apply that one modifier; "mod" kernels
apply softcap, ALiBi and dropout in any combination (each switched at run time), so they also serve the
calls of the one-modifier families (``serving_families``)."""

VECTOR_ELEMENTS = 8
"""The kernels move rows in 16-byte vectors of 8 elements of a 16-bit dtype."""

MIN_COMPUTE_CAPABILITY = (8, 0)
"""The kernels use sm80 instructions (cp.async, bf16 mma)."""

BUILD_HINT = (
    "Build it from a source checkout with `pip install --no-build-isolation .` or "
    "`python setup.py build_ext --inplace`. FLASH_ATTN2_HEAD_DIMS, FLASH_ATTN2_DTYPES and "
    "FLASH_ATTN2_ARCHS restrict the build (e.g. FLASH_ATTN2_HEAD_DIMS=64,128 FLASH_ATTN2_DTYPES=bf16) "
    "and so must include what you want to run."
)


class KernelKey(NamedTuple):
    """One compiled kernel of one direction: ``dtype`` in {"fp16", "bf16"}, ``mask`` in MASKS,
    ``modifiers`` in MODIFIERS."""

    dtype: str
    head_dim: int
    mask: str
    modifiers: str = "plain"


def extension_available() -> bool:
    """Whether ``flash_attn2._C`` imported, i.e. the CUDA path can run at all."""
    return _C is not None


def extension_import_error():
    """The ``ImportError`` raised by importing ``flash_attn2._C``, or None if it imported."""
    return _IMPORT_ERROR


def _missing_extension_message() -> str:
    return f"flash_attn2: the CUDA extension flash_attn2._C is not available ({_IMPORT_ERROR}). {BUILD_HINT}"


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"flash_attn2: direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")


def parse_built_kernels(text: str, direction: str = "fwd") -> frozenset:
    """Parse the lines ``<direction> <dtype> <hdim> <mask> <modifiers>`` of ``built_kernels()`` (direction one of
    DIRECTIONS) and return the KernelKeys of ``direction``.

    Every line of a known direction is checked, whichever is asked for: a malformed one is an error,
    because a misread build would make dispatch refuse or accept the wrong calls. Lines of other
    directions are skipped.
    """
    _check_direction(direction)
    kernels = set()
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0] not in DIRECTIONS:
            continue
        if len(fields) != 5 or fields[1] not in DTYPE_NAMES.values() or not fields[2].isdigit() \
                or fields[3] not in MASKS or fields[4] not in MODIFIERS:
            raise RuntimeError(f"flash_attn2: cannot parse built_kernels() line {line!r}")
        if fields[0] == direction:
            kernels.add(KernelKey(fields[1], int(fields[2]), fields[3], fields[4]))
    return frozenset(kernels)


@functools.cache
def built_kernels(direction: str = "fwd") -> frozenset:
    """The kernels this build compiled for ``direction`` (``"fwd"``, the default, ``"bwd"`` or ``"kvcache"``), as a
    frozenset of KernelKey (empty without ``_C``)."""
    _check_direction(direction)
    if _C is None:
        return frozenset()
    return parse_built_kernels(_C.built_kernels(), direction)


# Functions marked assume_constant_result are evaluated once by torch.compile at trace time (they read
# the GPU and the build, which a graph cannot) instead of breaking the graph. Their arguments are
# therefore never shapes, which may be symbolic under dynamic shapes.


@torch.compiler.assume_constant_result
def describe_build() -> str:
    """One line listing the compiled kernels, for refusal messages."""
    kernels = sorted(built_kernels())
    listed = ", ".join(f"{k.dtype} hdim {k.head_dim} {k.mask} {k.modifiers}" for k in kernels) or "none"
    return f"This build has: {listed}."


def kernel_mask(causal: bool, window_left: int, window_right: int) -> str:
    """The mask kernel that serves (causal, window), as the op decides: causal is the window (left, 0),
    no window is "none", a window that is only right = 0 is plain "causal"; anything else "local"."""
    if causal:
        window_right = 0
    if window_left < 0 and window_right < 0:
        return "none"
    if window_left < 0 and window_right == 0:
        return "causal"
    return "local"


def kernel_modifiers(softcap: float, alibi_slopes, dropout_p: float) -> str:
    """The modifier family a call needs (as the C++ dispatcher decides): "plain" without modifiers, "softcap"
    or "alibi" when that is the only one, "mod" for dropout or for softcap with ALiBi."""
    capped, biased = softcap > 0, alibi_slopes is not None
    if dropout_p > 0 or (capped and biased):
        return "mod"
    return "softcap" if capped else "alibi" if biased else "plain"


def serving_families(modifiers: str) -> tuple:
    """The kernel families that run a call needing family ``modifiers``, preferred first: its own, then "mod"
    (which serves every modifier) for the one-modifier families."""
    return (modifiers, "mod") if modifiers in ("softcap", "alibi") else (modifiers,)


@torch.compiler.assume_constant_result
def cuda_refusal(device: torch.device, dtype: torch.dtype, mask: str, modifiers: str = "plain") -> str:
    """Why no kernel of this build can run (dtype, mask, modifiers) on this GPU at all; '' when one can."""
    if _C is None:
        return _missing_extension_message()
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_COMPUTE_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (
            f"flash_attn2: {device} ({name}) has compute capability {capability[0]}.{capability[1]}; "
            f"the kernels need {MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} or newer (Ampere, Ada, Hopper)."
        )
    if largest_head_dim(dtype, mask, modifiers) == 0:
        return (
            f"flash_attn2: no kernel for dtype {DTYPE_NAMES[dtype]} with mask {mask} and modifiers {modifiers} "
            f"was compiled. {describe_build()} {BUILD_HINT} (FLASH_ATTN2_MASKS / FLASH_ATTN2_MODIFIERS too)"
        )
    return ""


@torch.compiler.assume_constant_result
def largest_head_dim(dtype: torch.dtype, mask: str, modifiers: str = "plain") -> int:
    """The largest head dim compiled for (dtype, mask, modifiers), 0 if none. A head dim d (padded to a
    multiple of 8) runs on the smallest compiled kernel whose head dim is >= d, so this is the limit.
    Forward and backward kernels are built together, so the forward's list speaks for both."""
    families = serving_families(modifiers)
    served = [k.head_dim for k in built_kernels()
              if k.dtype == DTYPE_NAMES[dtype] and k.mask == mask and k.modifiers in families]
    return max(served, default=0)


def head_dim_refusal(dtype: torch.dtype, head_dim: int, mask: str, modifiers: str = "plain") -> str:
    """The message for a head dim larger than every kernel compiled for (dtype, mask, modifiers)."""
    return (
        f"flash_attn2: head dim {head_dim} needs a kernel with head dim >= {head_dim} for dtype "
        f"{DTYPE_NAMES[dtype]} with mask {mask} and modifiers {modifiers}, and this build's largest is "
        f"{largest_head_dim(dtype, mask, modifiers)}. {describe_build()} {BUILD_HINT}"
    )


def kernel_ready(t):
    """``t`` if the kernels can read it as it is, else a contiguous copy. The kernels read rows with
    16-byte loads: the last dim contiguous, and the start and every other stride a multiple of 8
    elements. Any strides meeting that run as they are (a stride of 0 too: a broadcast dim).
    (Allocations themselves are aligned. torch.compile cannot trace ``storage_offset()``, an
    int-returning call: compiled code checks the strides here and leaves a misaligned start to the
    op, which refuses it with a clear error.)"""
    aligned = t.stride(-1) == 1 and all(
        stride % VECTOR_ELEMENTS == 0 for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size > 1
    )
    if aligned and not torch.compiler.is_compiling():
        aligned = t.storage_offset() % VECTOR_ELEMENTS == 0
    return t if aligned else t.clone(memory_format=torch.contiguous_format)


def _lse_shape(q, varlen: bool):
    """softmax_lse is (batch, nheads, seqlen_q) dense and (nheads, total_q) for a packed batch."""
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def new_rng_state(device) -> torch.Tensor:
    """A fresh dropout rng state: int64 ``(2,)`` = (seed, offset) on ``device``, the seed drawn from
    PyTorch's generator for that device (so ``torch.manual_seed`` reproduces it) by a device-side op
    (no host sync: capturable in a CUDA graph). The kernels read it on the device; the backward gets
    the forward's, so it regenerates the same mask."""
    state = torch.zeros(2, dtype=torch.int64, device=device)
    state[0].random_()  # [0, 2^63): a 63-bit Philox key
    return state


def dropout_keep_mask(rng_state, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, dropout_p: float,
                      cu_seqlens_q=None, cu_seqlens_k=None) -> torch.Tensor:
    """The keep mask (bool ``(batch, nheads, seqlen_q, seqlen_k)``, True = kept) that the kernels apply
    for ``rng_state`` and ``dropout_p``. With cu_seqlens, seqlen_q/k are the bounds and entries past a
    sequence are False. For tests and ``return_attn_probs``: it is N x N."""
    if _C is None:
        raise RuntimeError(_missing_extension_message())
    return torch.ops.flash_attn2.dropout_mask(rng_state, batch, nheads, seqlen_q, seqlen_k, dropout_p,
                                              cu_seqlens_q, cu_seqlens_k)


def fwd(q, k, v, softmax_scale: float, causal: bool, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
        max_seqlen_k=0, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, dropout_p=0.0,
        rng_state=None):
    """``torch.ops.flash_attn2.fwd``: kernel-ready q, k, v (CUDA, fp16/bf16, head dim a multiple of
    8, 16-byte aligned) to ``(out, lse)``; with cu_seqlens, packed (total, heads, head_dim) tensors.
    The window (-1: unbounded) and the modifiers (softcap, alibi_slopes, dropout_p with rng_state)
    follow flash-attn's conventions. Raises a RuntimeError saying how to build if ``_C`` is absent.

    An empty output is returned without a launch: there is nothing to compute, and a grid with a
    zero dimension is an invalid CUDA launch configuration.
    """
    if _C is None:
        raise RuntimeError(_missing_extension_message())
    if q.numel() == 0:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        return out, q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)
    return torch.ops.flash_attn2.fwd(q, k, v, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, window_left, window_right, softcap, alibi_slopes, dropout_p,
                                     rng_state)


def bwd(dout, q, k, v, out, softmax_lse, softmax_scale: float, causal: bool, deterministic: bool,
        cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, window_left=-1, window_right=-1,
        softcap=0.0, alibi_slopes=None, dropout_p=0.0, rng_state=None):
    """``torch.ops.flash_attn2.bwd``: the gradients ``(dq, dk, dv)`` of ``fwd``'s out, for the tensors
    ``fwd`` got and returned and a kernel-ready ``dout`` of out's shape. dq, dk, dv are contiguous, with
    q's, k's and v's shapes (GQA: the query heads of a kv head are summed in the op). ``deterministic``
    makes them bitwise reproducible; otherwise dq is accumulated with atomic adds, in an order that
    varies. Raises a RuntimeError saying how to build if ``_C`` is absent.

    Without queries or without keys nothing is launched (a grid with a zero dimension is an invalid
    launch configuration): without queries no row reads k and v, so dk and dv are zero; without keys
    every row is the constant 0, so dq is zero.
    """
    if _C is None:
        raise RuntimeError(_missing_extension_message())
    if q.numel() == 0 or k.numel() == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    return torch.ops.flash_attn2.bwd(dout, q, k, v, out, softmax_lse, softmax_scale, causal, deterministic,
                                     cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left,
                                     window_right, softcap, alibi_slopes, dropout_p, rng_state)


def fwd_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                block_table, softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
                rotary_interleaved: bool, alibi_slopes, num_splits: int):
    """``torch.ops.flash_attn2.fwd_kvcache``: appends k, v (rotated) to the caches in place, then attends q to
    each sequence's cached keys; returns ``(out, lse)``, out like q, lse float32 (b, h, s_q). Arguments as in
    ``flash_attn_with_kvcache`` (``cache_seqlens`` always an int32 tensor here). Raises a RuntimeError saying
    how to build if ``_C`` is absent."""
    if _C is None:
        raise RuntimeError(_missing_extension_message())
    if q.numel() == 0:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return torch.ops.flash_attn2.fwd_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                                             cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
                                             window_left, window_right, softcap, rotary_interleaved, alibi_slopes,
                                             num_splits)


if _C is not None and hasattr(torch.ops.flash_attn2, "fwd_kvcache"):  # an older build may lack it

    @torch.library.register_fake("flash_attn2::fwd_kvcache")
    def _fwd_kvcache_fake(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                          cache_leftpad, block_table, softmax_scale, causal, window_left, window_right, softcap,
                          rotary_interleaved, alibi_slopes, num_splits):
        """Shapes of the op's outputs: ``out`` like q but contiguous, ``lse`` float32 (b, h, s_q); the caches
        are mutated in place (the schema says so), so nothing else is returned."""
        return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


if _C is not None:

    @torch.library.register_fake("flash_attn2::fwd")
    def _fwd_fake(q, k, v, softmax_scale, causal, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
                  max_seqlen_k=0, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                  rng_state=None):
        """Shapes of the op's outputs: ``out`` like q but contiguous, ``lse`` float32 (see _lse_shape)."""
        out = q.new_empty(q.shape)
        lse = q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)
        return out, lse

    @torch.library.register_fake("flash_attn2::bwd")
    def _bwd_fake(dout, q, k, v, out, softmax_lse, softmax_scale, causal, deterministic, cu_seqlens_q=None,
                  cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, window_left=-1, window_right=-1, softcap=0.0,
                  alibi_slopes=None, dropout_p=0.0, rng_state=None):
        """Shapes of the op's outputs: dq, dk, dv like q, k, v (GQA reduced in the op), contiguous."""
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("flash_attn2::dropout_mask")
    def _dropout_mask_fake(rng_state, batch, num_heads, seqlen_q, seqlen_k, dropout_p, cu_seqlens_q=None,
                           cu_seqlens_k=None):
        """The keep mask's shape: bool (batch, num_heads, seqlen_q, seqlen_k)."""
        return rng_state.new_empty((batch, num_heads, seqlen_q, seqlen_k), dtype=torch.bool)
