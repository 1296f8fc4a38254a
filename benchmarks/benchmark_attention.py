#!/usr/bin/env python3
"""Attention throughput: flash_attn2 beside PyTorch's SDPA backends, measured in the same run.

Shapes follow the FlashAttention-2 benchmark: a fixed number of tokens per step (batch = tokens //
seqlen) and a fixed model width (nheads = width // hdim), so every config moves the same number of
bytes per tensor and only the N^2 term grows. FLOPs = 4 * batch * nheads * seqlen^2 * hdim (two
matmuls of 2*N^2*d each), halved when causal; the backward pass counts 2.5x that (FA2's convention).
Times are triton.testing.do_bench medians (CUDA events, L2 flushed between runs).

Before each config is timed, our output is checked against a float64 reference on a slice (batch 0,
two heads, the first and last query rows), and for a backward pass so are our gradients (batch 0, two
heads, the first CHECK_GRAD_SEQLEN positions: a gradient depends on every row): a kernel that is wrong
gets no speed figure.

    python benchmarks/benchmark_attention.py                              # the default grid
    python benchmarks/benchmark_attention.py --hdims 128 --causal false --csv fwd.csv --plot fwd.png
    python benchmarks/benchmark_attention.py --pass bwd --csv bwd.csv --plot bwd.png
    python benchmarks/benchmark_attention.py --memory                     # peak memory of our forward
    python benchmarks/benchmark_attention.py --memory --pass fwd_bwd      # ... of forward + backward
"""

import argparse
import contextlib
import csv
import math
import os
import sys

import torch
import torch.nn.functional as F

BACKENDS = ("ours", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math")
SDPA_BACKENDS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_math": "MATH",
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# FA2's FLOP convention: the backward pass does 2.5x the forward's matmul work.
PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
CSV_FIELDS = (
    "backend", "pass", "dtype", "hdim", "causal", "seqlen", "batch", "nheads", "ms", "tflops", "deterministic"
)
PASS_NAMES = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward + backward"}

# The spot check: rows at both ends of the sequence (the last rows see every key under causal).
CHECK_HEADS = 2
CHECK_ROWS_EACH_END = 256
# flash-attn's test rule: error against a high-precision oracle within 2x the error of PyTorch doing the
# same math in the input precision. The floor keeps a near-exact baseline from failing a near-exact kernel.
CHECK_ERROR_RATIO = 2.0
CHECK_ERROR_FLOOR = 1e-5
# Gradients are checked on a crop of the config (batch 0, CHECK_HEADS heads, the first CHECK_GRAD_SEQLEN
# positions), since the float64 oracle materialises the seqlen^2 scores and their gradient. As in the tests
# (tests/test_backward_gpu.py says why) the ratio is 3, and the floor is larger: where PyTorch's gradient
# is exact (one key: dq = dk = 0), the kernel's is within float32 rounding.
CHECK_GRAD_SEQLEN = 4096
CHECK_GRAD_ERROR_RATIO = 3.0
CHECK_GRAD_ERROR_FLOOR = 1e-4

MEMORY_SEQLENS = {"fwd": (16384, 65536, 131072), "fwd_bwd": (32768, 65536, 131072)}
MEMORY_BATCH, MEMORY_NHEADS, MEMORY_HDIM = 1, 16, 128
MIB = 2**20


def parse_list(text, convert=str):
    return [convert(item.strip()) for item in text.split(",") if item.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hdims", default="64,128,256", help="head dims, comma-separated (default: %(default)s)")
    parser.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384", help="default: %(default)s")
    parser.add_argument("--tokens", type=int, default=16384, help="batch = tokens // seqlen (default: %(default)s)")
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
    parser.add_argument("--backends", default=",".join(BACKENDS), help="default: %(default)s")
    parser.add_argument(
        "--skip-math-above", type=int, default=4096,
        help="sdpa_math materialises the N^2 scores: skip it above this seqlen (default: %(default)s)",
    )
    parser.add_argument("--csv", help="write one row per measurement to this CSV file")
    parser.add_argument("--plot", help="write TFLOP/s vs seqlen plots to this PNG file (needs matplotlib)")
    parser.add_argument("--warmup", type=float, default=25, help="do_bench warm-up, ms (default: %(default)s)")
    parser.add_argument("--rep", type=float, default=100, help="do_bench measuring time, ms (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--memory", action="store_true",
        help=f"instead of timing: peak memory of our forward at seqlens {', '.join(map(str, MEMORY_SEQLENS['fwd']))} "
        f"(b={MEMORY_BATCH}, h={MEMORY_NHEADS}, d={MEMORY_HDIM}) against the size of q, k, v, o; with --pass "
        f"bwd or fwd_bwd, of forward + backward at seqlens {', '.join(map(str, MEMORY_SEQLENS['fwd_bwd']))} "
        "against the size of q, k, v, o and their gradients",
    )
    args = parser.parse_args(argv)

    args.hdims = parse_list(args.hdims, int)
    args.seqlens = parse_list(args.seqlens, int)
    args.causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    args.dtypes = parse_list(args.dtypes)
    args.backends = parse_list(args.backends)
    for name, chosen, valid in (("dtype", args.dtypes, DTYPES), ("backend", args.backends, BACKENDS)):
        unknown = [item for item in chosen if item not in valid]
        if unknown or not chosen:
            parser.error(f"unknown {name} {unknown or '(none given)'}; choose from {', '.join(valid)}")
    if min(args.hdims + args.seqlens) <= 0 or args.width < max(args.hdims):
        parser.error("head dims and seqlens must be positive, and --width at least the largest head dim")
    return args


def import_flash_attn2():
    """The installed flash_attn2, else the one in this checkout (after `setup.py build_ext --inplace`)."""
    try:
        import flash_attn2
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import flash_attn2
    return flash_attn2


def reference_rows(q, k, v, rows, causal, dtype):
    """Attention output at query `rows` for q/k/v (h, s, d), computed in `dtype` with the softmax in
    at least fp32: float64 for the oracle, PyTorch's own same-precision math for a 16-bit dtype."""
    scale = q.shape[-1] ** -0.5
    q, k, v = q[:, rows].to(dtype), k.to(dtype), v.to(dtype)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (h, rows, s)
    if causal:
        keys = torch.arange(k.shape[1], device=q.device)
        scores = scores.masked_fill(keys[None, None, :] > rows[None, :, None], float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(dtype, torch.float32)), dim=-1).to(dtype)
    return torch.matmul(probs, v)  # (h, rows, d)


def spot_check(out, q, k, v, causal):
    """Compare our output (b, s, h, d) with a float64 oracle on batch 0, CHECK_HEADS heads and the
    rows at both ends (float64, so TF32 settings cannot blur it). Returns (passed, message)."""
    seqlen = q.shape[1]
    heads = slice(0, min(CHECK_HEADS, q.shape[2]))
    ends = min(CHECK_ROWS_EACH_END, seqlen)
    rows = torch.cat([torch.arange(ends), torch.arange(seqlen - ends, seqlen)]).unique().to(q.device)
    q0, k0, v0 = (t[0, :, heads].transpose(0, 1) for t in (q, k, v))  # (h, s, d)
    ours = out[0, :, heads].transpose(0, 1)[:, rows].double()  # (h, rows, d)
    oracle = reference_rows(q0, k0, v0, rows, causal, torch.float64)
    same_precision = reference_rows(q0, k0, v0, rows, causal, q.dtype).double()
    err = (ours - oracle).abs().max().item()
    baseline_err = (same_precision - oracle).abs().max().item()
    passed = math.isfinite(err) and err <= CHECK_ERROR_RATIO * baseline_err + CHECK_ERROR_FLOOR
    verdict = "ok" if passed else f"FAILED (limit {CHECK_ERROR_RATIO:g}x)"
    return passed, f"max |ours - fp64| {err:.2e}, PyTorch {str(q.dtype)[6:]} {baseline_err:.2e}: {verdict}"


def spot_check_grads(q, k, v, causal, flash_attn2, deterministic):
    """Our dq, dk, dv on a crop of the config (batch 0, CHECK_HEADS heads, the first CHECK_GRAD_SEQLEN
    positions) against float64 autograd through the reference, within CHECK_ERROR_RATIO of the error of
    PyTorch's autograd in the input precision. Returns (passed, message)."""
    seqlen, heads = min(CHECK_GRAD_SEQLEN, q.shape[1]), min(CHECK_HEADS, q.shape[2])
    crop = [t.detach()[:1, :seqlen, :heads].contiguous() for t in (q, k, v)]
    grad_out = torch.randn_like(crop[0])
    attention_ref = flash_attn2.reference.attention_ref

    def grads(dtype, attention):
        leaves = [t.detach().to(dtype).requires_grad_() for t in crop]
        return torch.autograd.grad(attention(*leaves), leaves, grad_out.to(dtype))

    ours = grads(q.dtype, lambda *qkv: flash_attn2.flash_attn_func(*qkv, causal=causal, deterministic=deterministic))
    oracle = grads(torch.float64, lambda *qkv: attention_ref(*qkv, causal=causal)[0])
    same_precision = grads(q.dtype, lambda *qkv: attention_ref(*qkv, causal=causal, upcast=False)[0])
    passed, parts = True, []
    for name, grad, want, baseline in zip(("dq", "dk", "dv"), ours, oracle, same_precision):
        err = (grad.double() - want).abs().max().item()
        baseline_err = (baseline.double() - want).abs().max().item()
        passed &= math.isfinite(err) and err <= CHECK_GRAD_ERROR_RATIO * baseline_err + CHECK_GRAD_ERROR_FLOOR
        parts.append(f"{name} {err:.1e}/{baseline_err:.1e}")
    verdict = "ok" if passed else f"FAILED (limit {CHECK_GRAD_ERROR_RATIO:g}x)"
    return passed, f"grads (ours/PyTorch vs fp64, s={seqlen}): {', '.join(parts)}: {verdict}"


def flops(batch, nheads, seqlen, hdim, causal, direction):
    forward = 4 * batch * nheads * seqlen * seqlen * hdim / (2 if causal else 1)
    return forward * PASS_FLOP_FACTOR[direction]


def make_inputs(batch, seqlen, nheads, hdim, dtype, requires_grad):
    shape = (batch, seqlen, nheads, hdim)
    return [torch.randn(shape, device="cuda", dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def forward_fn(backend, q, k, v, causal, flash_attn2, deterministic=False):
    """(callable running one forward of `backend`, the tensors it reads) for (b, s, h, d) inputs.
    `deterministic` selects our backward's mode (it is recorded by the forward)."""
    if backend == "ours":
        return (lambda: flash_attn2.flash_attn_func(q, k, v, causal=causal, deterministic=deterministic)), (q, k, v)
    # SDPA takes (b, h, s, d). Contiguous copies, so it is timed on its preferred layout.
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in (q, k, v))
    return (lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)), (qt, kt, vt)


def backend_context(backend):
    """SDPA's backend is chosen by a context around the call; `ours` needs none."""
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


def is_sticky_cuda_error(err):
    """After an illegal access or a launch failure the CUDA context is unusable: stop, don't record NaNs."""
    return "CUDA error" in str(err) and "out of memory" not in str(err)


def first_line(err):
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:120]


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
                for seqlen in args.seqlens:
                    batch, nheads = max(1, args.tokens // seqlen), args.width // hdim
                    config = dict(dtype=dtype_name, hdim=hdim, causal=causal, seqlen=seqlen, batch=batch, nheads=nheads)
                    print(f"-- {dtype_name} hdim {hdim} {'causal' if causal else 'non-causal'} "
                          f"seqlen {seqlen} batch {batch} nheads {nheads}", flush=True)
                    measured, failed = measure_config(args, config, flash_attn2, do_bench)
                    failures += failed
                    for row in measured:
                        rows.append(row)
                        if writer:
                            writer.writerow(row)
                            csv_file.flush()
    if csv_file:
        csv_file.close()
    return rows, failures


def measure_config(args, config, flash_attn2, do_bench):
    """Time every backend on one config. Returns (csv rows, 1 if our output failed its check else 0)."""
    torch.manual_seed(args.seed)
    dtype, causal, seqlen = DTYPES[config["dtype"]], config["causal"], config["seqlen"]
    q, k, v = make_inputs(config["batch"], seqlen, config["nheads"], config["hdim"], dtype, args.direction != "fwd")
    work = flops(config["batch"], config["nheads"], seqlen, config["hdim"], causal, args.direction)
    rows, failed = [], 0
    for backend in args.backends:
        ms, note = float("nan"), ""
        if backend == "sdpa_math" and seqlen > args.skip_math_above:
            note = f"skipped (seqlen > --skip-math-above {args.skip_math_above})"
        else:
            try:
                with backend_context(backend):
                    forward, inputs = forward_fn(backend, q, k, v, causal, flash_attn2, args.deterministic)
                    if backend == "ours":
                        with torch.no_grad():
                            passed, note = spot_check(forward(), q, k, v, causal)
                        if passed and args.direction != "fwd":
                            passed, grad_note = spot_check_grads(q, k, v, causal, flash_attn2, args.deterministic)
                            note += "; " + grad_note
                        failed = int(not passed)
                    if not failed or backend != "ours":
                        ms = do_bench(timed_fn(forward, inputs, args.direction), warmup=args.warmup, rep=args.rep,
                                      return_mode="median")
            except Exception as err:  # an unsupported backend/config is a NaN, not the end of the run
                if is_sticky_cuda_error(err):
                    raise
                note = f"unavailable: {first_line(err)}"
            torch.cuda.empty_cache()
        tflops = work / (ms * 1e-3) / 1e12 if math.isfinite(ms) else float("nan")
        speed = f"{ms:8.3f} ms {tflops:7.1f} TFLOP/s" if math.isfinite(ms) else f"{'-':>8}"
        print(f"   {backend:15s} {speed}  {note}".rstrip(), flush=True)
        rows.append(dict(backend=backend, **{"pass": args.direction}, **config, ms=ms, tflops=tflops,
                         deterministic=args.deterministic if backend == "ours" and args.direction != "fwd" else ""))
    return rows, failed


def print_summary(rows, backends, direction):
    """Per config: every backend's TFLOP/s, then ours over each baseline."""
    baselines = [b for b in backends if b != "ours"]
    ratio_columns = baselines if "ours" in backends else []
    by_config = {}
    for row in rows:
        key = (row["dtype"], row["hdim"], row["causal"], row["seqlen"])
        by_config.setdefault(key, {})[row["backend"]] = row["tflops"]
    short = {b: b.replace("sdpa_", "") for b in backends}
    header = f"{'dtype':5s} {'hdim':>4s} {'causal':6s} {'seqlen':>6s} | " + " ".join(
        f"{short[b]:>9s}" for b in backends
    )
    if ratio_columns:
        header += " | " + " ".join(f"{'/' + short[b]:>9s}" for b in ratio_columns)
    ratios = "; then ours / each baseline" if ratio_columns else ""
    print(f"\nTFLOP/s per backend, {PASS_NAMES[direction]} pass{ratios}")
    print(header)
    print("-" * len(header))
    for (dtype, hdim, causal, seqlen), speeds in by_config.items():
        line = f"{dtype:5s} {hdim:4d} {str(causal):6s} {seqlen:6d} | " + " ".join(
            f"{speeds.get(b, float('nan')):9.1f}" for b in backends
        )
        if ratio_columns:
            ours = speeds.get("ours", float("nan"))
            line += " | " + " ".join(f"{ours / speeds.get(b, float('nan')):9.2f}" for b in ratio_columns)
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
            for backend in args.backends:
                points = sorted((row["seqlen"], row["tflops"]) for row in rows if row["backend"] == backend
                                and row["dtype"] == dtype and row["hdim"] == hdim and row["causal"] == causal)
                if any(math.isfinite(y) for _, y in points):
                    ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=backend,
                            linewidth=2.5 if backend == "ours" else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_xticks(args.seqlens, [f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n) for n in args.seqlens])
            ax.minorticks_off()
            ax.set_title(f"{args.direction} {dtype} hdim {hdim} {'causal' if causal else 'non-causal'}")
            ax.set_xlabel("seqlen")
            ax.set_ylabel("TFLOP/s")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
    mode = ", ours deterministic" if args.deterministic and args.direction != "fwd" else ""
    fig.suptitle(f"{torch.cuda.get_device_name()}: {PASS_NAMES[args.direction]} pass{mode}, {args.tokens} tokens, "
                 f"width {args.width}")
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
    print_summary(rows, args.backends, args.direction)
    if args.plot:
        plot(rows, args)
    if failures:
        print(f"\n{failures} config(s) where our output FAILED its check (no time recorded for them).")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
