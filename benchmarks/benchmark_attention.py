#!/usr/bin/env python3
"""Attention throughput: flash_attn2 beside PyTorch's SDPA backends, measured in the same run.

Shapes follow the FlashAttention-2 benchmark: a fixed number of tokens per step (batch = tokens //
seqlen) and a fixed model width (nheads = width // hdim), so every config moves the same number of
bytes per tensor and only the N^2 term grows. FLOPs = 4 * batch * nheads * seqlen^2 * hdim (two
matmuls of 2*N^2*d each), halved when causal; the backward pass counts 2.5x that (FA2's convention).
Times are triton.testing.do_bench medians (CUDA events, L2 flushed between runs) over at least --min-iters
calls (do_bench alone runs --rep ms worth: 5 calls of a 20 ms backward).

Before each config is timed, our output is checked against a float64 reference on a slice (batch 0,
two heads, the first and last query rows), and for a backward pass so are our gradients (batch 0, two
heads, the first CHECK_GRAD_SEQLEN positions: a gradient depends on every row): a kernel that is wrong
gets no speed figure.

Modifiers (--window, --softcap, --alibi, --dropout) change what flash_attn2 computes, and no SDPA backend
takes them. With any of them, `ours` runs with the modifiers, `ours_plain` is flash_attn2 on the same data
without them, and the SDPA backends stay plain; the modifier cost is time(ours) / time(ours_plain). FA2's
FLOP convention has no term for a window, so a windowed run is credited with its useful work, 4 * hdim
FLOPs per visible (query, key) pair, counted exactly; beside the measured speed-up time(ours_plain) /
time(ours) the summary prints the ideal one, the ratio of visible pairs. Every row's CSV also carries
useful_flops, the exact count, whatever its mask. The check covers the modifiers: the long rows run
without dropout, and dropout is checked on the gradient crop under the kernel's own mask (read from the
S_dmask that return_attn_probs=True returns, the generator reseeded so every call draws the same mask).

--varlen runs flash_attn_varlen_func as `ours` on a packed batch. `equal` packs tokens // seqlen
sequences of each seqlen; `ours_dense` is flash_attn_func on the same data as a (b, s, h, d) batch, and
varlen/dense is time(ours) / time(ours_dense). `mixed` draws lengths uniform in [128, 8192] (seeded;
the last one cut to the total) until --tokens (default 65536) are packed; the
SDPA backends run on the batch padded to the longest sequence and are credited with the same useful
FLOPs (the sum over sequences of 4 * s_i^2 * h * d, halved when causal), so their TFLOP/s show what the
padding costs. `torch_varlen` is PyTorch's own varlen attention (torch.nn.attention.varlen.varlen_attn)
where the installed torch has one.

    python benchmarks/benchmark_attention.py                              # the default grid
    python benchmarks/benchmark_attention.py --hdims 128 --causal false --csv fwd.csv --plot fwd.png
    python benchmarks/benchmark_attention.py --pass bwd --csv bwd.csv --plot bwd.png
    python benchmarks/benchmark_attention.py --memory                     # peak memory of our forward
    python benchmarks/benchmark_attention.py --memory --pass fwd_bwd      # ... of forward + backward
    python benchmarks/benchmark_attention.py --hdims 128 --seqlens 4096 --softcap 30     # modifier cost
    python benchmarks/benchmark_attention.py --hdims 128 --seqlens 32768 --causal true --window 4096,0
    python benchmarks/benchmark_attention.py --hdims 128 --varlen equal   # varlen vs dense, same data
    python benchmarks/benchmark_attention.py --hdims 128 --varlen mixed --pass bwd
"""

import argparse
import contextlib
import csv
import dataclasses
import functools
import inspect
import itertools
import math
import os
import random
import sys

import torch
import torch.nn.functional as F
from checkout import import_flash_attn2

BACKENDS = ("ours", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math")
SDPA_BACKENDS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_math": "MATH",
}
# Reference points that a mode adds beside `ours` (and what they need).
COMPANION_BACKENDS = {
    "ours_plain": "flash_attn2 without the modifiers, same layout (needs --window, --softcap, --alibi or --dropout)",
    "ours_dense": "flash_attn_func on the packed data as a (b, s, h, d) batch, same modifiers (needs --varlen equal)",
    "torch_varlen": "torch.nn.attention.varlen.varlen_attn on the packed batch (needs --varlen)",
    "ours_det": "ours with deterministic=True, timed right after ours on the same inputs (needs --pass bwd or fwd_bwd)",
}
OURS_BACKENDS = ("ours", "ours_plain", "ours_dense", "ours_det")
ALL_BACKENDS = BACKENDS + tuple(COMPANION_BACKENDS)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# FA2's FLOP convention: the backward pass does 2.5x the forward's matmul work.
PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
# Time ratios of one config, set on the `ours` row: (CSV field, summary column).
RATIO_FIELDS = (
    ("modifier_cost", "cost"),  # time(ours) / time(ours_plain)
    ("window_speedup", "speedup"),  # time(ours_plain) / time(ours), windowed ours
    ("window_ideal_speedup", "ideal"),  # visible pairs without the window / with it
    ("varlen_vs_dense", "vl/dense"),  # time(ours) / time(ours_dense), --varlen equal
    ("det_cost", "det"),  # time(ours_det) / time(ours): what deterministic=True costs
)
CSV_FIELDS = (
    "backend", "pass", "dtype", "hdim", "causal", "seqlen", "batch", "nheads", "ms", "tflops", "deterministic",
    "varlen", "tokens", "modifier", "window", "softcap", "alibi", "dropout", "useful_flops", "useful_tflops",
) + tuple(field for field, _ in RATIO_FIELDS)
PASS_NAMES = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward + backward"}

# The spot check: rows at both ends of the sequence (the last rows see every key under causal).
CHECK_HEADS = 2
CHECK_ROWS_EACH_END = 256
# flash-attn's test rule: error against a high-precision oracle within 2x the error of PyTorch doing the
# same math in the input precision. The floor keeps a near-exact baseline from failing a near-exact kernel.
CHECK_ERROR_RATIO = 2.0
CHECK_ERROR_FLOOR = 1e-5
# Gradients (and, with dropout, the output under the kernel's keep mask) are checked on a crop of the config
# (batch 0, CHECK_HEADS heads, the first CHECK_GRAD_SEQLEN positions), since the float64 oracle materialises
# the seqlen^2 scores and their gradient. As in the tests
# (tests/test_backward_gpu.py says why) the ratio is 3, and the floor is larger: where PyTorch's gradient
# is exact (one key: dq = dk = 0), the kernel's is within float32 rounding.
CHECK_GRAD_SEQLEN = 4096
CHECK_GRAD_ERROR_RATIO = 3.0
CHECK_GRAD_ERROR_FLOOR = 1e-4

# --varlen mixed: the range of the drawn lengths and the default number of packed tokens.
MIXED_MIN_SEQLEN, MIXED_MAX_SEQLEN = 128, 8192
TOKENS = {"mixed": 65536, None: 16384}

MEMORY_SEQLENS = {"fwd": (16384, 65536, 131072), "fwd_bwd": (32768, 65536, 131072)}
MEMORY_BATCH, MEMORY_NHEADS, MEMORY_HDIM = 1, 16, 128
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Modifiers:
    """What --window, --softcap, --alibi and --dropout ask of flash_attn2; the defaults are plain attention.
    `window` is flash-attn's (left, right), -1 for unlimited; under causal the right bound is 0."""

    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False
    dropout: float = 0.0

    @property
    def active(self):
        return self != PLAIN

    @property
    def windowed(self):
        return tuple(self.window) != (-1, -1)

    def exact(self):
        """The same without dropout: the long rows' check has no keep mask (spot_check_crop has one)."""
        return dataclasses.replace(self, dropout=0.0)

    def label(self):
        parts = [f"window{self.window[0]}:{self.window[1]}"] if self.windowed else []
        parts += [f"softcap{self.softcap:g}"] if self.softcap else []
        parts += ["alibi"] if self.alibi else []
        parts += [f"dropout{self.dropout:g}"] if self.dropout else []
        return "+".join(parts)


PLAIN = Modifiers()


def parse_list(text, convert=str):
    return [convert(item.strip()) for item in text.split(",") if item.strip()]


def parse_window(text):
    """--window L,R: flash-attn's window_size, each bound an int >= -1 (-1: unlimited)."""
    try:
        left, right = (int(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected L,R (two integers, -1 for unlimited), got {text!r}") from None
    if min(left, right) < -1:
        raise argparse.ArgumentTypeError(f"window bounds must be >= -1 (-1: unlimited), got {text!r}")
    return left, right


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hdims", default="64,128,256", help="head dims, comma-separated (default: %(default)s)")
    parser.add_argument(
        "--seqlens", help="default: 512,1024,2048,4096,8192,16384 (--varlen mixed draws its own lengths)"
    )
    parser.add_argument(
        "--tokens", type=int,
        help=f"batch = tokens // seqlen (default {TOKENS[None]}); with --varlen mixed, the tokens packed "
        f"(default {TOKENS['mixed']})",
    )
    parser.add_argument("--width", type=int, default=2048, help="nheads = width // hdim (default: %(default)s)")
    parser.add_argument("--causal", choices=("both", "true", "false"), default="both")
    parser.add_argument("--dtypes", default="bf16,fp16", help=f"from {', '.join(DTYPES)} (default: %(default)s)")
    parser.add_argument(
        "--pass", dest="direction", choices=tuple(PASS_FLOP_FACTOR), default="fwd",
        help="fwd (default), bwd (the gradients of q, k, v for a given dout, forward not timed) or fwd_bwd; "
        "every backend, ours included",
    )
    parser.add_argument(
        "--deterministic", action="store_true",
        help="run our backward with deterministic=True (bitwise reproducible; dq without atomic adds)",
    )
    parser.add_argument(
        "--backends",
        help=f"from {', '.join(ALL_BACKENDS)} (default: {', '.join(BACKENDS)}, plus the companions the mode "
        "adds: " + "; ".join(f"{name}: {what}" for name, what in COMPANION_BACKENDS.items()) + ")",
    )
    parser.add_argument(
        "--skip-math-above", type=int, default=4096,
        help="sdpa_math materialises the N^2 scores: skip it above this seqlen (default: %(default)s)",
    )
    modifiers = parser.add_argument_group(
        "modifiers (ours only; ours_plain runs without them, the SDPA backends stay plain)"
    )
    modifiers.add_argument(
        "--window", type=parse_window, default=(-1, -1), metavar="L,R",
        help="window_size=(L, R): query i sees keys i-L .. i+R (-1: unlimited; R is 0 under causal), e.g. 4096,0; "
        "with L = -1 write --window=-1,R (argparse reads a leading '-' as an option)",
    )
    modifiers.add_argument("--softcap", type=float, default=0.0, metavar="X", help="softcap=X (tanh capping)")
    modifiers.add_argument(
        "--alibi", action="store_true", help="alibi_slopes: fp32 (nheads,), ALiBi's geometric 2^(-8 i / nheads)"
    )
    modifiers.add_argument("--dropout", type=float, default=0.0, metavar="P", help="dropout_p=P")
    parser.add_argument(
        "--varlen", choices=("equal", "mixed"),
        help="ours runs flash_attn_varlen_func on a packed batch: equal, tokens // seqlen sequences of each "
        f"seqlen (against ours_dense on the same data); mixed, lengths uniform in [{MIXED_MIN_SEQLEN}, "
        f"{MIXED_MAX_SEQLEN}] (seeded) totalling --tokens (against SDPA on the padded batch)",
    )
    parser.add_argument("--csv", help="write one row per measurement to this CSV file")
    parser.add_argument("--plot", help="write TFLOP/s vs seqlen plots to this PNG file (needs matplotlib)")
    parser.add_argument("--warmup", type=float, default=25, help="do_bench warm-up, ms (default: %(default)s)")
    parser.add_argument("--rep", type=float, default=100, help="do_bench measuring time, ms (default: %(default)s)")
    parser.add_argument(
        "--min-iters", type=int, default=30,
        help="time at least this many calls: the measuring time grows past --rep for long calls (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--memory", action="store_true",
        help=f"instead of timing: peak memory of our forward at seqlens {', '.join(map(str, MEMORY_SEQLENS['fwd']))} "
        f"(b={MEMORY_BATCH}, h={MEMORY_NHEADS}, d={MEMORY_HDIM}) against the size of q, k, v, o; with --pass "
        f"bwd or fwd_bwd, of forward + backward at seqlens {', '.join(map(str, MEMORY_SEQLENS['fwd_bwd']))} "
        "against the size of q, k, v, o and their gradients",
    )
    args = parser.parse_args(argv)

    args.modifiers = Modifiers(args.window, args.softcap, args.alibi, args.dropout)
    if args.min_iters < 1:
        parser.error(f"--min-iters must be >= 1, got {args.min_iters}")
    if args.softcap < 0 or not 0 <= args.dropout < 1:
        parser.error(f"--softcap must be >= 0 and --dropout in [0, 1), got {args.softcap:g} and {args.dropout:g}")
    if args.memory and (args.modifiers.active or args.varlen):
        parser.error("--memory measures plain dense attention: no --window, --softcap, --alibi, --dropout or --varlen")
    if args.varlen == "mixed" and args.seqlens is not None:
        parser.error("--varlen mixed draws its own lengths: drop --seqlens (--tokens sets the total)")
    args.hdims = parse_list(args.hdims, int)
    args.seqlens = [] if args.varlen == "mixed" else parse_list(args.seqlens or "512,1024,2048,4096,8192,16384", int)
    args.tokens = TOKENS["mixed" if args.varlen == "mixed" else None] if args.tokens is None else args.tokens
    args.causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    args.dtypes = parse_list(args.dtypes)
    args.backends = parse_list(args.backends) if args.backends is not None else default_backends(args)
    for name, chosen, valid in (("dtype", args.dtypes, DTYPES), ("backend", args.backends, ALL_BACKENDS)):
        unknown = [item for item in chosen if item not in valid]
        if unknown or not chosen:
            parser.error(f"unknown {name} {unknown or '(none given)'}; choose from {', '.join(valid)}")
    available = {"ours_plain": args.modifiers.active, "ours_dense": args.varlen == "equal",
                 "torch_varlen": args.varlen is not None, "ours_det": args.direction != "fwd"}
    for backend in args.backends:
        if not available.get(backend, True):
            parser.error(f"backend {backend} is {COMPANION_BACKENDS[backend]}")
    if min(args.hdims + args.seqlens) <= 0 or args.width < max(args.hdims):
        parser.error("head dims and seqlens must be positive, and --width at least the largest head dim")
    if args.tokens < (MIXED_MIN_SEQLEN if args.varlen == "mixed" else 1):
        parser.error(f"--tokens must be at least {MIXED_MIN_SEQLEN if args.varlen == 'mixed' else 1}")
    return args


def default_backends(args):
    """ours, the companions its mode compares it with, then PyTorch's backends."""
    ours = ["ours"] + ["ours_plain"] * args.modifiers.active + ["ours_dense"] * (args.varlen == "equal")
    return ours + list(SDPA_BACKENDS) + ["torch_varlen"] * (args.varlen is not None)


def effective_window(window, causal):
    """flash-attn's (left, right) as the kernel applies it: causal forces the right bound to 0."""
    return (window[0], 0) if causal else tuple(window)


@functools.cache
def visible_pairs(seqlen_q, seqlen_k, causal, window=(-1, -1)):
    """The exact number of (query, key) pairs attention computes. Bottom-right aligned as in flash-attn:
    query i sees key j iff i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right, a bound
    of -1 unlimited (causal: right = 0). One sum per query row, so exact for every shape."""
    left, right = effective_window(window, causal)
    shift, total = seqlen_k - seqlen_q, 0
    for row in range(seqlen_q):
        first = 0 if left < 0 else max(0, row + shift - left)
        last = seqlen_k - 1 if right < 0 else min(seqlen_k - 1, row + shift + right)
        total += max(0, last - first + 1)
    return total


def flops(lengths, nheads, hdim, causal, direction):
    """FA2's convention over a batch of self-attention sequences: 4 * nheads * s^2 * hdim each, halved
    when causal; the backward pass counts 2.5x."""
    forward = sum(4 * nheads * seqlen * seqlen * hdim / (2 if causal else 1) for seqlen in lengths)
    return forward * PASS_FLOP_FACTOR[direction]


def useful_flops(lengths, nheads, hdim, causal, window, direction):
    """4 * nheads * hdim FLOPs per visible (query, key) pair (visible_pairs), summed over the sequences."""
    pairs = sum(visible_pairs(seqlen, seqlen, causal, tuple(window)) for seqlen in lengths)
    return 4 * nheads * hdim * pairs * PASS_FLOP_FACTOR[direction]


def mixed_lengths(tokens, seed):
    """--varlen mixed: lengths uniform in [MIXED_MIN_SEQLEN, MIXED_MAX_SEQLEN] from a seeded generator of
    Python's own (the same on every machine), the last one cut so that they sum to `tokens` (short of it by
    less than MIXED_MIN_SEQLEN)."""
    rng, lengths = random.Random(seed), []
    while tokens - sum(lengths) >= MIXED_MIN_SEQLEN:
        lengths.append(min(rng.randint(MIXED_MIN_SEQLEN, MIXED_MAX_SEQLEN), tokens - sum(lengths)))
    return lengths


def alibi_slopes(nheads, device):
    """ALiBi's geometric slopes 2^(-8 i / nheads), i = 1 .. nheads: fp32 (nheads,), as flash-attn takes them."""
    return torch.tensor([2.0 ** (-8.0 * i / nheads) for i in range(1, nheads + 1)], dtype=torch.float32, device=device)


def reference_attention(q, k, v, causal, mods, slopes, dtype, rows=None, keep=None):
    """Attention output at query `rows` (all when None) for q/k/v (h, s, d), computed in `dtype` with the
    softmax in at least fp32: float64 for the oracle, PyTorch's own same-precision math for a 16-bit dtype.
    The scores are modified as flash-attn does, in the softmax's precision (the kernels' registers):
    softcap, ALiBi bias -slope * |i - j| (`slopes`: (h,) or None), window/causal mask. `keep`: the dropout
    keep mask (h, rows, s_k) or None; kept probabilities are scaled by 1 / (1 - mods.dropout)."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    rows = torch.arange(seqlen_q, device=q.device) if rows is None else rows
    scale = q.shape[-1] ** -0.5
    q, k, v = q[:, rows].to(dtype), k.to(dtype), v.to(dtype)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (h, rows, s_k)
    scores = scores.to(torch.promote_types(dtype, torch.float32))
    if mods.softcap:
        scores = torch.tanh(scores / mods.softcap) * mods.softcap
    keys = torch.arange(seqlen_k, device=q.device)
    distance = rows[:, None] + (seqlen_k - seqlen_q) - keys[None, :]  # (rows, s_k): i - j, bottom-right aligned
    if slopes is not None:
        scores = scores - slopes.to(scores.dtype)[:, None, None] * distance.abs().to(scores.dtype)
    left, right = effective_window(mods.window, causal)
    hidden = torch.zeros_like(distance, dtype=torch.bool)
    if left >= 0:
        hidden |= distance > left
    if right >= 0:
        hidden |= distance < -right
    probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
    if keep is not None:
        probs = probs * keep.to(probs.dtype) / (1 - mods.dropout)
    return torch.matmul(probs.to(dtype), v)  # (h, rows, d)


def within_limit(ours, oracle, same_precision, ratio, floor):
    """flash-attn's rule: (passed, our max error, PyTorch's) against the oracle."""
    err = (ours.double() - oracle).abs().max().item()
    baseline_err = (same_precision.double() - oracle).abs().max().item()
    return math.isfinite(err) and err <= ratio * baseline_err + floor, err, baseline_err


def spot_check(out, q, k, v, causal, mods, slopes):
    """Compare our output for one sequence, (s, h, d) like q, k, v, with a float64 oracle on CHECK_HEADS
    heads and the rows at both ends (float64, so TF32 settings cannot blur it). Returns (passed, message)."""
    seqlen, heads = q.shape[0], min(CHECK_HEADS, q.shape[1])
    ends = min(CHECK_ROWS_EACH_END, seqlen)
    rows = torch.cat([torch.arange(ends), torch.arange(seqlen - ends, seqlen)]).unique().to(q.device)
    q0, k0, v0 = (t[:, :heads].transpose(0, 1) for t in (q, k, v))  # (h, s, d)
    slopes0 = slopes[:heads] if slopes is not None else None
    ours = out[:, :heads].transpose(0, 1)[:, rows]  # (h, rows, d)
    oracle = reference_attention(q0, k0, v0, causal, mods, slopes0, torch.float64, rows)
    same_precision = reference_attention(q0, k0, v0, causal, mods, slopes0, q.dtype, rows)
    passed, err, baseline_err = within_limit(ours, oracle, same_precision, CHECK_ERROR_RATIO, CHECK_ERROR_FLOOR)
    verdict = "ok" if passed else f"FAILED (limit {CHECK_ERROR_RATIO:g}x)"
    return passed, f"max |ours - fp64| {err:.2e}, PyTorch {str(q.dtype)[6:]} {baseline_err:.2e}: {verdict}"


def spot_check_crop(crop, bounds, attention, causal, mods, slopes, seed, backward):
    """Checks on a crop (q, k, v packed (n, heads, d), holding the sequences `bounds`), where the float64
    oracle can afford every row; `attention(mods, q, k, v, return_attn_probs=False)` runs ours on it.
    With dropout: our output against the reference under the kernel's own keep mask, read from S_dmask
    (flash-attn negates the dropped probabilities; the sign bit survives rounding to 0), the mask
    reproduced by reseeding torch's generator before each call. For a backward pass: our dq, dk, dv against
    float64 autograd through the reference, within CHECK_GRAD_ERROR_RATIO of PyTorch's autograd in the
    input precision. Returns (passed, notes)."""
    dtype, tokens = crop[0].dtype, crop[0].shape[0]
    where = f"s={tokens}" if len(bounds) == 1 else f"{tokens} tokens in {len(bounds)} sequences"
    keep, passed, notes = None, True, []
    if mods.dropout:
        torch.manual_seed(seed)
        with torch.no_grad():
            out, _, s_dmask = attention(mods, *crop, return_attn_probs=True)
        if s_dmask is None:
            return False, ["dropout: return_attn_probs=True gave no S_dmask, so the mask cannot be checked: FAILED"]
        keep = ~torch.signbit(s_dmask)  # (sequences, h, max_s, max_s)

    def reference(math_dtype):
        def per_sequence(*qkv):
            return torch.cat([
                reference_attention(*(t[start:end].transpose(0, 1) for t in qkv), causal, mods, slopes, math_dtype,
                                    keep=None if keep is None else keep[index, :, : end - start, : end - start])
                .transpose(0, 1)
                for index, (start, end) in enumerate(bounds)
            ])
        return per_sequence

    if mods.dropout:
        with torch.no_grad():
            oracle, same_precision = reference(torch.float64)(*crop), reference(dtype)(*crop)
        ok, err, baseline_err = within_limit(out, oracle, same_precision, CHECK_ERROR_RATIO, CHECK_ERROR_FLOOR)
        passed &= ok
        verdict = "ok" if ok else f"FAILED (limit {CHECK_ERROR_RATIO:g}x)"
        notes.append(f"with our dropout mask ({where}): max |ours - fp64| {err:.2e}, PyTorch {baseline_err:.2e}: "
                     f"{verdict}")
    if backward:
        grad_out = torch.randn_like(crop[0])

        def ours_fn(*qkv):  # with dropout, the very call that gave S_dmask, so the CPU path draws the same mask too
            return attention(mods, *qkv, return_attn_probs=True)[0] if mods.dropout else attention(mods, *qkv)

        def grads(math_dtype, fn):
            leaves = [t.detach().to(math_dtype).requires_grad_() for t in crop]
            if mods.dropout:
                torch.manual_seed(seed)  # the mask read from S_dmask
            return torch.autograd.grad(fn(*leaves), leaves, grad_out.to(math_dtype))

        ours = grads(dtype, ours_fn)
        oracle = grads(torch.float64, reference(torch.float64))
        same_precision = grads(dtype, reference(dtype))
        ok, parts = True, []
        for name, grad, want, baseline in zip(("dq", "dk", "dv"), ours, oracle, same_precision):
            grad_ok, err, baseline_err = within_limit(grad, want, baseline, CHECK_GRAD_ERROR_RATIO,
                                                      CHECK_GRAD_ERROR_FLOOR)
            ok &= grad_ok
            parts.append(f"{name} {err:.1e}/{baseline_err:.1e}")
        passed &= ok
        verdict = "ok" if ok else f"FAILED (limit {CHECK_GRAD_ERROR_RATIO:g}x)"
        notes.append(f"grads (ours/PyTorch vs fp64, {where}): {', '.join(parts)}: {verdict}")
    return passed, notes


@dataclasses.dataclass
class Workload:
    """One config's data. `batched`: q, k, v (b, s, h, d) for flash_attn_func and SDPA (under --varlen
    equal, views of the packed data; under --varlen mixed, the sequences padded to the longest with random
    tokens). `packed`: q, k, v (total, h, d) for the varlen runs, None without --varlen."""

    lengths: list
    batched: tuple
    packed: tuple = None
    cu_seqlens: torch.Tensor = None
    slopes: torch.Tensor = None

    @property
    def bounds(self):
        """[(start, end)] of each sequence in the packed batch."""
        ends = list(itertools.accumulate(self.lengths))
        return list(zip([0] + ends[:-1], ends))


def make_inputs(batch, seqlen, nheads, hdim, dtype, requires_grad):
    shape = (batch, seqlen, nheads, hdim)
    return [torch.randn(shape, device="cuda", dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def make_workload(lengths, nheads, hdim, dtype, varlen, requires_grad, alibi):
    slopes = alibi_slopes(nheads, "cuda") if alibi else None
    if varlen is None:
        batched = make_inputs(len(lengths), lengths[0], nheads, hdim, dtype, requires_grad)
        return Workload(lengths, batched, slopes=slopes)
    packed = [torch.randn((sum(lengths), nheads, hdim), device="cuda", dtype=dtype) for _ in range(3)]
    work = Workload(lengths, None, packed, slopes=slopes)
    work.cu_seqlens = torch.tensor([0] + [end for _, end in work.bounds], dtype=torch.int32, device="cuda")
    if varlen == "equal":  # the same storage: ours and ours_dense read the same bytes
        work.batched = [t.detach().view(len(lengths), lengths[0], nheads, hdim) for t in packed]
    else:
        work.batched = [torch.randn((len(lengths), max(lengths), nheads, hdim), device="cuda", dtype=dtype)
                        for _ in range(3)]
        for index, (start, end) in enumerate(work.bounds):
            for padded, tokens in zip(work.batched, packed):
                padded[index, : end - start] = tokens[start:end]
    for t in list(work.packed) + list(work.batched):
        t.requires_grad_(requires_grad)
    return work


def ours_inputs(backend, work):
    """(q, k, v, cu_seqlens, max_seqlen) that our `backend` runs on: the packed batch for ours and
    ours_plain under --varlen, else the (b, s, h, d) batch (cu_seqlens and max_seqlen None)."""
    if backend != "ours_dense" and work.packed is not None:
        return (*work.packed, work.cu_seqlens, max(work.lengths))
    return (*work.batched, None, None)


def flash_attention(flash_attn2, q, k, v, causal, mods, slopes, deterministic, cu_seqlens=None, max_seqlen=None,
                    return_attn_probs=False):
    """flash_attn_func on (b, s, h, d), or flash_attn_varlen_func on packed (total, h, d) given cu_seqlens."""
    kwargs = dict(causal=causal, deterministic=deterministic, window_size=tuple(mods.window), softcap=mods.softcap,
                  alibi_slopes=slopes if mods.alibi else None, dropout_p=mods.dropout,
                  return_attn_probs=return_attn_probs)
    if cu_seqlens is None:
        return flash_attn2.flash_attn_func(q, k, v, **kwargs)
    return flash_attn2.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def torch_varlen_attn(causal):
    """PyTorch's own varlen attention and the keywords that make it causal (torch 2.10 takes is_causal,
    later versions window_size=(-1, 0)). Raises RuntimeError, recorded as unavailable, where torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn") from None
    try:
        params = inspect.signature(varlen_attn).parameters
    except (TypeError, ValueError):
        params = {}
    if "is_causal" in params:
        return varlen_attn, dict(is_causal=causal)
    if "window_size" in params:
        return varlen_attn, dict(window_size=(-1, 0) if causal else (-1, -1))
    if causal:
        raise RuntimeError("this torch's varlen_attn takes neither is_causal nor window_size")
    return varlen_attn, {}


def forward_fn(backend, work, causal, mods, flash_attn2, deterministic=False):
    """(callable running one forward of `backend`, the tensors it reads). `mods` apply to ours' variants
    (the caller passes PLAIN for ours_plain); `deterministic` selects our backward's mode (it is recorded by
    the forward)."""
    if backend in OURS_BACKENDS:
        q, k, v, cu_seqlens, max_seqlen = ours_inputs(backend, work)
        return (lambda: flash_attention(flash_attn2, q, k, v, causal, mods, work.slopes, deterministic, cu_seqlens,
                                        max_seqlen)), (q, k, v)
    if backend == "torch_varlen":
        varlen_attn, causal_kwargs = torch_varlen_attn(causal)
        q, k, v = work.packed
        longest = max(work.lengths)
        return (lambda: varlen_attn(q, k, v, work.cu_seqlens, work.cu_seqlens, longest, longest, **causal_kwargs)), (
            q, k, v)
    # SDPA takes (b, h, s, d). Contiguous copies, so it is timed on its preferred layout.
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in work.batched)
    return (lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)), (qt, kt, vt)


def deterministic(backend, args):
    """Our backward's mode for `backend`: ours_det always deterministic, the others as --deterministic says."""
    return backend == "ours_det" or args.deterministic


def check_ours(backend, work, causal, mods, flash_attn2, args, deterministic=False):
    """The gate before one of our rows is timed: without dropout, the output of the sequences the spot
    check reads (batch 0 of a (b, s, h, d) batch; the first and last of a packed one); then, for dropout or
    a backward pass, spot_check_crop on the first CHECK_GRAD_SEQLEN tokens and CHECK_HEADS heads. Returns
    (passed, message)."""
    q, k, v, cu_seqlens, max_seqlen = ours_inputs(backend, work)
    slopes = work.slopes if mods.alibi else None

    def run(mods, q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, slopes=slopes, return_attn_probs=False):
        return flash_attention(flash_attn2, q, k, v, causal, mods, slopes, deterministic, cu_seqlens, max_seqlen,
                               return_attn_probs)

    with torch.no_grad():
        out = run(mods.exact(), q, k, v)
        if cu_seqlens is None:
            checked = {0: tuple(t[0] for t in (out, q, k, v))}
        else:
            checked = {index: tuple(t[work.bounds[index][0]:work.bounds[index][1]] for t in (out, q, k, v))
                       for index in sorted({0, len(work.lengths) - 1})}
        results = [spot_check(*sequence, causal, mods.exact(), slopes) for sequence in checked.values()]
    passed = all(ok for ok, _ in results)
    notes = [note if len(checked) == 1 else f"seq {index}: {note}" for index, (_, note) in zip(checked, results)]
    if passed and (mods.dropout or args.direction != "fwd"):
        tokens = min(CHECK_GRAD_SEQLEN, q.shape[0] if cu_seqlens is not None else q.shape[1])
        heads = min(CHECK_HEADS, q.shape[-2])
        crop_slopes = slopes[:heads] if slopes is not None else None
        if cu_seqlens is None:
            crop = [t.detach()[0, :tokens, :heads].contiguous() for t in (q, k, v)]
            bounds = [(0, tokens)]

            def attention(mods, *qkv, return_attn_probs=False):
                result = run(mods, *(t[None] for t in qkv), slopes=crop_slopes, return_attn_probs=return_attn_probs)
                return (result[0][0], *result[1:]) if return_attn_probs else result[0]
        else:
            crop = [t.detach()[:tokens, :heads].contiguous() for t in (q, k, v)]
            bounds = [(start, min(end, tokens)) for start, end in work.bounds if start < tokens]
            crop_cu = torch.tensor([0] + [end for _, end in bounds], dtype=torch.int32, device=q.device)
            longest = max(end - start for start, end in bounds)

            def attention(mods, *qkv, return_attn_probs=False):
                return run(mods, *qkv, cu_seqlens=crop_cu, max_seqlen=longest, slopes=crop_slopes,
                           return_attn_probs=return_attn_probs)
        crop_passed, crop_notes = spot_check_crop(crop, bounds, attention, causal, mods, crop_slopes, args.seed,
                                                  backward=args.direction != "fwd")
        passed &= crop_passed
        notes += crop_notes
    return passed, "; ".join(notes)


def backend_context(backend):
    """SDPA's backend is chosen by a context around the call; the others need none."""
    if backend not in SDPA_BACKENDS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[backend]))


def timed_fn(forward, inputs, direction):
    """The callable do_bench times for this pass (backward: gradients of q, k, v for a random dO)."""
    if direction == "fwd":
        return forward
    out = forward()
    grad_out = torch.randn_like(out)
    if direction == "bwd":
        return lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), inputs, grad_out)


def median_ms(do_bench, fn, args):
    """do_bench's median time of fn over at least args.min_iters calls. do_bench runs as many calls as fit in
    its rep (ms) by its own estimate of one call, so the rep grows with one timed call of fn."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    rep = max(args.rep, args.min_iters * start.elapsed_time(end))
    return do_bench(fn, warmup=args.warmup, rep=rep, return_mode="median")


def is_sticky_cuda_error(err):
    """After an illegal access or a launch failure the CUDA context is unusable: stop, don't record NaNs."""
    return "CUDA error" in str(err) and "out of memory" not in str(err)


def first_line(err):
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:120]


def config_batches(args):
    """(seqlen, the lengths of the batch's sequences) per point of the seqlen axis: tokens // seqlen
    sequences of each seqlen; under --varlen mixed one drawn batch, its seqlen the longest sequence."""
    if args.varlen == "mixed":
        lengths = mixed_lengths(args.tokens, args.seed)
        return [(max(lengths), lengths)]
    return [(seqlen, [seqlen] * max(1, args.tokens // seqlen)) for seqlen in args.seqlens]


def describe_config(config, lengths, mods):
    mask = "causal" if config["causal"] else "non-causal"
    text = f"-- {config['dtype']} hdim {config['hdim']} {mask} "
    if config["varlen"] == "mixed":
        text += (f"varlen mixed: {len(lengths)} sequences of {min(lengths)}..{max(lengths)} ({sum(lengths)} tokens; "
                 f"SDPA pads to {len(lengths)} x {max(lengths)}) nheads {config['nheads']}")
    else:
        text += f"seqlen {config['seqlen']} batch {config['batch']} nheads {config['nheads']}"
        text += ", varlen equal (packed)" if config["varlen"] else ""
    return text + (f"; ours with {mods.label()}" if mods.active else "")


def run_grid(args, flash_attn2, do_bench):
    rows, failures = [], 0
    writer, csv_file = None, None
    if args.csv:
        csv_file = open(args.csv, "w", newline="")
        writer = csv.DictWriter(csv_file, fieldnames=CSV_FIELDS)
        writer.writeheader()
    for dtype_name in args.dtypes:
        for hdim in args.hdims:
            for causal in args.causals:
                for seqlen, lengths in config_batches(args):
                    config = dict(dtype=dtype_name, hdim=hdim, causal=causal, seqlen=seqlen, batch=len(lengths),
                                  nheads=args.width // hdim, varlen=args.varlen or "", tokens=sum(lengths))
                    print(describe_config(config, lengths, args.modifiers), flush=True)
                    measured, failed = measure_config(args, config, lengths, flash_attn2, do_bench)
                    failures += failed
                    for row in measured:
                        rows.append(row)
                        if writer:
                            writer.writerow(row)
                            csv_file.flush()
    if csv_file:
        csv_file.close()
    return rows, failures


def measure_config(args, config, lengths, flash_attn2, do_bench):
    """Time every backend on one config. Returns (csv rows, 1 if one of our outputs failed its check else 0)."""
    torch.manual_seed(args.seed)
    dtype, causal, hdim, nheads = DTYPES[config["dtype"]], config["causal"], config["hdim"], config["nheads"]
    work = make_workload(lengths, nheads, hdim, dtype, args.varlen, args.direction != "fwd", args.modifiers.alibi)
    rows, failed = [], 0
    for backend in args.backends:
        mods = args.modifiers if backend in ("ours", "ours_dense") else PLAIN
        ms, note = float("nan"), ""
        if backend == "sdpa_math" and config["seqlen"] > args.skip_math_above:
            note = f"skipped (seqlen > --skip-math-above {args.skip_math_above})"
        else:
            try:
                with backend_context(backend):
                    forward, inputs = forward_fn(backend, work, causal, mods, flash_attn2, deterministic(backend, args))
                    passed = True
                    if backend in OURS_BACKENDS:
                        passed, note = check_ours(backend, work, causal, mods, flash_attn2, args,
                                                  deterministic(backend, args))
                        failed = max(failed, int(not passed))
                    if passed:
                        ms = median_ms(do_bench, timed_fn(forward, inputs, args.direction), args)
            except Exception as err:  # an unsupported backend/config is a NaN, not the end of the run
                if is_sticky_cuda_error(err):
                    raise
                note = f"unavailable: {first_line(err)}"
            torch.cuda.empty_cache()
        # A window has no FA2 convention: a windowed row is credited with exactly its visible pairs.
        useful = useful_flops(lengths, nheads, hdim, causal, mods.window, args.direction)
        credited = useful if mods.windowed else flops(lengths, nheads, hdim, causal, args.direction)
        tflops, useful_tflops = ((work_flops / (ms * 1e-3) / 1e12 if math.isfinite(ms) else float("nan"))
                                 for work_flops in (credited, useful))
        speed = f"{ms:8.3f} ms {tflops:7.1f} TFLOP/s" if math.isfinite(ms) else f"{'-':>8}"
        print(f"   {backend:15s} {speed}  {note}".rstrip(), flush=True)
        rows.append(dict(backend=backend, **{"pass": args.direction}, **config, ms=ms, tflops=tflops,
                         deterministic=deterministic(backend, args) if backend in OURS_BACKENDS
                         and args.direction != "fwd" else "",
                         modifier=mods.label(), window=f"{mods.window[0]},{mods.window[1]}", softcap=mods.softcap,
                         alibi=mods.alibi, dropout=mods.dropout, useful_flops=useful, useful_tflops=useful_tflops))
    add_ratios(rows, lengths, causal, args.modifiers)
    return rows, failed


def add_ratios(rows, lengths, causal, mods):
    """Set the RATIO_FIELDS on the `ours` row (NaN where a side has no time) and print them."""
    ours = next((row for row in rows if row["backend"] == "ours"), None)
    ms = {row["backend"]: row["ms"] for row in rows}
    if ours is None:
        return
    parts = []
    if "ours_plain" in ms:
        ours["modifier_cost"] = ms["ours"] / ms["ours_plain"]
        parts.append(f"cost ours/ours_plain {ours['modifier_cost']:.3f}")
        if mods.windowed:
            ours["window_speedup"] = ms["ours_plain"] / ms["ours"]
            ours["window_ideal_speedup"] = (sum(visible_pairs(s, s, causal) for s in lengths)
                                            / sum(visible_pairs(s, s, causal, tuple(mods.window)) for s in lengths))
            parts.append(f"speed-up ours_plain/ours {ours['window_speedup']:.2f} (ideal, from the visible pairs: "
                         f"{ours['window_ideal_speedup']:.2f})")
    if "ours_dense" in ms:
        ours["varlen_vs_dense"] = ms["ours"] / ms["ours_dense"]
        parts.append(f"varlen/dense ours/ours_dense {ours['varlen_vs_dense']:.3f}")
    if "ours_det" in ms:
        ours["det_cost"] = ms["ours_det"] / ms["ours"]
        parts.append(f"deterministic ours_det/ours {ours['det_cost']:.3f}")
    if parts:
        print(f"   {'time ratios':15s} {'; '.join(parts)}".replace("nan", "-"), flush=True)


def print_summary(rows, args):
    """Per config: every backend's TFLOP/s, then ours over each other backend, then the time ratios."""
    backends, direction = args.backends, args.direction
    baselines = [b for b in backends if b != "ours"]
    ratio_columns = baselines if "ours" in backends else []
    time_ratios = [(field, name) for field, name in RATIO_FIELDS if any(field in row for row in rows)]
    by_config, ratios_by_config = {}, {}
    for row in rows:
        key = (row["dtype"], row["hdim"], row["causal"], row["seqlen"])
        by_config.setdefault(key, {})[row["backend"]] = row["tflops"]
        if row["backend"] == "ours":
            ratios_by_config[key] = row
    short = {b: b.replace("sdpa_", "") for b in backends}
    header = f"{'dtype':5s} {'hdim':>4s} {'causal':6s} {'seqlen':>6s} | " + " ".join(
        f"{short[b]:>9s}" for b in backends
    )
    if ratio_columns:
        header += " | " + " ".join(f"{'/' + short[b]:>9s}" for b in ratio_columns)
    if time_ratios:
        header += " | " + " ".join(f"{name:>9s}" for _, name in time_ratios)
    ratios = "; then ours / each baseline" if ratio_columns else ""
    print(f"\nTFLOP/s per backend, {PASS_NAMES[direction]} pass{ratios}")
    if args.modifiers.active:
        window = (", a windowed row credited with its visible pairs only; speedup = time(ours_plain) / time(ours), "
                  "ideal = the ratio of visible pairs") if args.modifiers.windowed else ""
        print(f"ours: flash_attn2 with {args.modifiers.label()}; ours_plain: without; SDPA plain. "
              f"cost = time(ours) / time(ours_plain){window}")
    if args.varlen == "equal":
        print("ours: flash_attn_varlen_func on the packed batch; ours_dense: flash_attn_func on the same data; "
              "vl/dense = time(ours) / time(ours_dense)")
    if args.varlen == "mixed":
        print("ours: flash_attn_varlen_func on the packed batch; SDPA on the batch padded to the longest (seqlen), "
              "credited with the same useful FLOPs")
    print(header)
    print("-" * len(header))
    for key, speeds in by_config.items():
        dtype, hdim, causal, seqlen = key
        line = f"{dtype:5s} {hdim:4d} {str(causal):6s} {seqlen:6d} | " + " ".join(
            f"{speeds.get(b, float('nan')):9.1f}" for b in backends
        )
        if ratio_columns:
            ours = speeds.get("ours", float("nan"))
            line += " | " + " ".join(f"{ours / speeds.get(b, float('nan')):9.2f}" for b in ratio_columns)
        if time_ratios:
            ours_row = ratios_by_config.get(key, {})
            line += " | " + " ".join(f"{ours_row.get(field, float('nan')):9.3f}" for field, _ in time_ratios)
        print(line.replace("nan", "  -"))


def plot(rows, args):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {args.plot}")
        return
    panels = [(d, c) for d in args.dtypes for c in args.causals]
    fig, axes = plt.subplots(len(panels), len(args.hdims), squeeze=False,
                             figsize=(4.5 * len(args.hdims), 3.5 * len(panels)))
    for r, (dtype, causal) in enumerate(panels):
        for c, hdim in enumerate(args.hdims):
            ax = axes[r][c]
            mine = [row for row in rows if row["dtype"] == dtype and row["hdim"] == hdim and row["causal"] == causal]
            if args.varlen == "mixed":  # one batch per panel: a bar per backend
                speeds = [next((row["tflops"] for row in mine if row["backend"] == b), float("nan"))
                          for b in args.backends]
                ax.bar(range(len(args.backends)), [y if math.isfinite(y) else 0 for y in speeds])
                ax.set_xticks(range(len(args.backends)), args.backends, rotation=30, ha="right", fontsize="small")
            else:
                for backend in args.backends:
                    points = sorted((row["seqlen"], row["tflops"]) for row in mine if row["backend"] == backend)
                    if any(math.isfinite(y) for _, y in points):
                        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=backend,
                                linewidth=2.5 if backend == "ours" else 1.2)
                ax.set_xscale("log", base=2)
                ax.set_xticks(args.seqlens, [f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
                                             for n in args.seqlens])
                ax.minorticks_off()
                ax.set_xlabel("seqlen")
                ax.legend(fontsize="small")
            ax.set_title(f"{args.direction} {dtype} hdim {hdim} {'causal' if causal else 'non-causal'}")
            ax.set_ylabel("TFLOP/s")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
    mode = ", ours deterministic" if args.deterministic and args.direction != "fwd" else ""
    mode += f", ours with {args.modifiers.label()}" if args.modifiers.active else ""
    mode += f", varlen {args.varlen}" if args.varlen else ""
    fig.suptitle(f"{torch.cuda.get_device_name()}: {PASS_NAMES[args.direction]} pass{mode}, {args.tokens} tokens, "
                 f"width {args.width}", wrap=True)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot written to {args.plot}")


def measure_memory(args, flash_attn2):
    """Peak memory of one forward of ours against the size of q, k, v, o; with --pass bwd or fwd_bwd, of
    one forward + backward against the size of q, k, v, o, dout and dq, dk, dv. FlashAttention keeps no
    N^2 buffer, so the forward's peak should be q+k+v+o plus the O(N) log-sum-exp, and the backward's
    those eight tensors plus O(N) row sums and its float32 dq accumulator (twice dq's size, more when
    deterministic)."""
    dtype = DTYPES[args.dtypes[0]]
    causal = args.causals[0]
    backward = args.direction != "fwd"
    tensors = "q+k+v+o+do+dq+dk+dv" if backward else "q+k+v+o"
    rows = []
    mode = f", deterministic={args.deterministic}" if backward else ""
    print(f"peak memory of our {'forward + backward' if backward else 'forward'}, {args.dtypes[0]}, "
          f"{'causal' if causal else 'non-causal'}{mode}, b={MEMORY_BATCH} h={MEMORY_NHEADS} d={MEMORY_HDIM}")
    print(f"{'seqlen':>7s} {tensors + ' MiB':>{max(12, len(tensors) + 4)}s} {'peak MiB':>10s} {'peak/tensors':>12s} "
          f"{'beyond MiB':>11s}")
    for seqlen in MEMORY_SEQLENS["fwd_bwd" if backward else "fwd"]:
        torch.manual_seed(args.seed)
        q, k, v = make_inputs(MEMORY_BATCH, seqlen, MEMORY_NHEADS, MEMORY_HDIM, dtype, requires_grad=backward)
        grad_out = torch.randn_like(q) if backward else None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        out = flash_attn2.flash_attn_func(q, k, v, causal=causal, deterministic=args.deterministic)
        if backward:
            out.backward(grad_out)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        measured = [q, k, v, out] + ([grad_out, q.grad, k.grad, v.grad] if backward else [])
        size = sum(t.numel() * t.element_size() for t in measured)
        print(f"{seqlen:7d} {size / MIB:{max(12, len(tensors) + 4)}.1f} {peak / MIB:10.1f} {peak / size:12.3f} "
              f"{(peak - size) / MIB:11.1f}")
        rows.append(dict(backend="ours", **{"pass": "fwd_bwd" if backward else "fwd"}, dtype=args.dtypes[0],
                         causal=causal, seqlen=seqlen, batch=MEMORY_BATCH, nheads=MEMORY_NHEADS, hdim=MEMORY_HDIM,
                         tensors=tensors, tensors_mib=size / MIB, peak_mib=peak / MIB))
        del q, k, v, out, grad_out, measured
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmark_attention.py needs a CUDA GPU (torch.cuda.is_available() is False).")
    flash_attn2 = import_flash_attn2() if ("ours" in args.backends or args.memory) else None
    print(f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    if flash_attn2 is not None:
        print(f"flash_attn2 {flash_attn2.__version__} from {os.path.dirname(flash_attn2.__file__)}")
    if args.memory:
        measure_memory(args, flash_attn2)
        return 0
    from triton.testing import do_bench

    rows, failures = run_grid(args, flash_attn2, do_bench)
    print_summary(rows, args)
    if args.plot:
        plot(rows, args)
    if failures:
        print(f"\n{failures} config(s) where our output FAILED its check (no time recorded for them).")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
