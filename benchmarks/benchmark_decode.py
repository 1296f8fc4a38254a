#!/usr/bin/env python3
"""Decode throughput of flash_attn_with_kvcache: achieved HBM bandwidth beside a copy and PyTorch SDPA.

A decode step (seqlen_q = 1) reads each sequence's whole K and V cache once and does little arithmetic, so it
is memory bound: the figure of merit is bytes of K and V read (batch * seqlen_cache * nheads_k * hdim * 2
tensors * element size) per second, compared with what a device-to-device copy achieves in the same run
(bytes read + written / time) and with PyTorch's SDPA on the same dense shapes (GQA through enable_gqa when
torch has it, else kv heads repeated outside the timing). Ours runs dense and paged (16-row pages, the block
table a random permutation of the pages, so neighbouring pages are not neighbours in memory).

Inputs are random (never zeros). Before timing a config, our dense output is checked against SDPA (max abs
diff); times are triton.testing.do_bench medians. --graph also times ours through CUDA graph replay, which
takes the launch overhead out (what a serving loop that captures its decode step sees).

Ours' main rows (ours_dense, ours_paged) are a whole decode step: the new token's k and v written into the cache,
then attention over it. SDPA does not append, so two comparisons of the same work sit beside the strict one
(ratio_vs_sdpa: best SDPA attention alone / ours' time, for every row): ours_dense_attn is ours on the same cache
without the append (k=None, v=None), its same-work ratio against SDPA alone; and sdpa_*_append is SDPA preceded by
the append an SDPA user runs (the token copied into the last row of the (b, h_k, s, d) caches), against which the
whole-step rows of ours get their same-work ratio (ratio_same_work).

The layouts: ours' caches are flash-attn's (b, s, h_k, d), where the other heads' rows lie between two keys of
one head (256-byte rows, 2 KB apart at h_k 8, hdim 128); SDPA gets contiguous (b, h_k, s, d) copies, each head's keys one run of
memory. ours_dense_attn_hsd is ours on SDPA's very tensors (strided views of them), and sdpa_*_bshd is SDPA on
views of ours' caches (what a caller holding flash-attn's layout would pass it): the same bytes in the same
layout for both. sdpa_best is the fastest SDPA run without the append, over both layouts.

    python benchmarks/benchmark_decode.py
    python benchmarks/benchmark_decode.py --batches 1,8 --seqlens 4096,32768 --num-splits 1 --graph
    python benchmarks/benchmark_decode.py --csv decode.csv --plot decode.png
"""

import argparse
import contextlib
import csv
import math
import sys

import torch
import torch.nn.functional as F
from checkout import import_flash_attn2

NHEADS, NHEADS_K, HDIM = 32, 8, 128
DTYPE = torch.bfloat16
PAGE_SIZE = 16
COPY_BYTES = 2**30
"""The copy-bandwidth probe moves a 1 GiB tensor: far beyond L2, so it measures HBM."""
CHECK_MAX_ABS_DIFF = 2e-2
"""bf16 outputs of two correct kernels over random data differ by a few ulps of values of size <= ~1."""
MEMORY_HEADROOM = 0.85
"""Skip configs whose tensors would use more than this fraction of the free GPU memory."""
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
CSV_FIELDS = ("backend", "batch", "seqlen_cache", "ms", "tb_per_s", "fraction_of_copy", "ratio_vs_sdpa",
              "ratio_same_work", "note")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,64", help="comma-separated (default: %(default)s)")
    parser.add_argument("--seqlens", default="4096,32768,131072", help="cache lengths (default: %(default)s)")
    parser.add_argument("--num-splits", type=int, default=0, help="ours' num_splits (0: heuristic; default 0)")
    parser.add_argument("--graph", action="store_true", help="also time ours through CUDA graph replay")
    parser.add_argument("--attn-only", action="store_true",
                        help="attention alone: ours without the append (dense on both layouts, and paged) and SDPA's "
                             "cuDNN and flash backends on their layout, nothing else (split and tile sweeps)")
    parser.add_argument("--flush", choices=("zero", "read"), default="zero",
                        help="how L2 is cleared before each timed call: zero (triton's do_bench, which zeroes a "
                             "256 MB buffer and so leaves L2 full of dirty lines that the timed kernel's reads must "
                             "write back) or read (our do_bench_read_flush: the buffer is summed, L2 holds only clean "
                             "lines; the pure streaming rate). Default: %(default)s")
    parser.add_argument("--csv", help="write the rows to this CSV file")
    parser.add_argument("--plot", help="write TB/s vs cache length per batch to this PNG (needs matplotlib)")
    parser.add_argument("--warmup", type=float, default=25, help="do_bench warm-up, ms (default: %(default)s)")
    parser.add_argument("--rep", type=float, default=100, help="do_bench measuring time, ms (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.batches = [int(x) for x in args.batches.split(",") if x.strip()]
    args.seqlens = [int(x) for x in args.seqlens.split(",") if x.strip()]
    return args


def kv_bytes(batch, seqlen):
    """What a decode step must read: K and V of every cached row."""
    return batch * seqlen * NHEADS_K * HDIM * 2 * torch.finfo(DTYPE).bits // 8


def copy_bandwidth(do_bench, args):
    """Device-to-device copy bandwidth, bytes read + written per second: the attainable HBM rate."""
    src = torch.randn(COPY_BYTES // 2, dtype=DTYPE, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=args.warmup, rep=args.rep, return_mode="median")
    del src, dst
    torch.cuda.empty_cache()
    return 2 * COPY_BYTES / (ms * 1e-3)


def fits(batch, seqlen):
    free, _ = torch.cuda.mem_get_info()
    needed = 2 * kv_bytes(batch, seqlen)  # the dense caches and their paged copy, later SDPA's
    return needed < MEMORY_HEADROOM * free


def make_config(batch, seqlen):
    """Dense caches, a paged copy (pages permuted), q, the new token and cache_seqlens for one decode step."""
    k_cache = torch.randn(batch, seqlen, NHEADS_K, HDIM, dtype=DTYPE, device="cuda")
    v_cache = torch.randn_like(k_cache)
    pages = seqlen // PAGE_SIZE
    block_table = torch.randperm(batch * pages, device="cuda", dtype=torch.int64).to(torch.int32).reshape(batch, pages)
    paged = []
    for cache in (k_cache, v_cache):
        pool = torch.empty(batch * pages, PAGE_SIZE, NHEADS_K, HDIM, dtype=DTYPE, device="cuda")
        pool[block_table.flatten().long()] = cache.reshape(batch * pages, PAGE_SIZE, NHEADS_K, HDIM)
        paged.append(pool)
    q = torch.randn(batch, 1, NHEADS, HDIM, dtype=DTYPE, device="cuda")
    k_new, v_new = (torch.randn(batch, 1, NHEADS_K, HDIM, dtype=DTYPE, device="cuda") for _ in range(2))
    seqlens = torch.full((batch,), seqlen - 1, dtype=torch.int32, device="cuda")  # the new token fills the last row
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, paged=paged, block_table=block_table, k=k_new, v=v_new,
                cache_seqlens=seqlens)


def ours_fn(flash_attn2, cfg, paged, num_splits, append=True):
    """One decode step of ours: with `append`, the new token into the last row then attention over every row;
    without, attention over the same rows (the token already written by an earlier call)."""
    k_cache, v_cache = cfg["paged"] if paged else (cfg["k_cache"], cfg["v_cache"])
    block_table = cfg["block_table"] if paged else None
    k, v = (cfg["k"], cfg["v"]) if append else (None, None)
    seqlens = cfg["cache_seqlens"] if append else cfg["cache_seqlens"] + 1
    return lambda: flash_attn2.flash_attn_with_kvcache(cfg["q"], k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                                       block_table=block_table, num_splits=num_splits)


def graphed(fn):
    """``fn`` captured in a CUDA graph; the returned callable replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def head_major_caches(cfg):
    """The dense caches as contiguous (b, h_k, s, d) copies (SDPA's preferred layout; made outside the timing)."""
    return tuple(t.transpose(1, 2).contiguous() for t in (cfg["k_cache"], cfg["v_cache"]))


def sdpa_fn(cfg, append=False, caches=None):
    """SDPA on the dense cache after the append (ours writes the new token into the last row): q (b, h, 1, d),
    k and v the (b, h_k, s, d) `caches` (head_major_caches). With `append`, each call first copies the new token
    into the caches' last row, as a decode step with SDPA does (the same values: the result is unchanged)."""
    q = cfg["q"].transpose(1, 2)
    k, v = caches if caches is not None else head_major_caches(cfg)
    kwargs = {}
    if TORCH_HAS_ENABLE_GQA:
        kwargs = dict(enable_gqa=True)
    else:  # the repeated heads hold every query head's copy; the append writes all of them
        group = NHEADS // NHEADS_K
        k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))  # outside the timing
    heads = k.shape[1]
    k_new, v_new = (t.transpose(1, 2).repeat_interleave(heads // NHEADS_K, dim=1) for t in (cfg["k"], cfg["v"]))
    last = k.shape[2] - 1

    def step():
        if append:
            k[:, :, last:].copy_(k_new)
            v[:, :, last:].copy_(v_new)
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return step


TORCH_HAS_ENABLE_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
"""scaled_dot_product_attention takes enable_gqa from torch 2.5 on (a builtin: inspect cannot read its signature)."""


def sdpa_context(backend):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, backend))


def do_bench_read_flush(fn, warmup=25, rep=100, return_mode="median"):
    """triton.testing.do_bench's loop with the L2 cleared by reading a 256 MB buffer instead of zeroing it: the
    timed call finds L2 holding only clean lines, so what it reads costs no write-back of someone else's data."""
    flush = torch.randn(64 * 2**20, device="cuda")  # 256 MB of fp32, > any L2
    sink = torch.empty((), device="cuda")

    def clear():
        torch.sum(flush, out=sink)

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        clear()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = start.elapsed_time(end) / 5
    n_warmup, n_repeat = max(1, int(warmup / estimate)), max(1, int(rep / estimate))
    for _ in range(n_warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    for i in range(n_repeat):
        clear()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    assert return_mode == "median"
    return times[len(times) // 2]


def measure(do_bench, fn, args):
    return do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")


def max_diff(out, want):
    return (out.float() - want.float()).abs().max().item()


def check_failed(diff, what):
    """Whether `diff` (max |what - SDPA|) is over the bound (NaN is); if so, says that the config gets no times."""
    if diff <= CHECK_MAX_ABS_DIFF:
        return False
    print(f"   CHECK FAILED: max |{what} - SDPA| = {diff:.3e} > {CHECK_MAX_ABS_DIFF}: no times for this config")
    return True


def run_config(flash_attn2, do_bench, args, batch, seqlen, copy_bw):
    torch.manual_seed(args.seed)
    cfg = make_config(batch, seqlen)
    rows, notes = [], {}
    ours_dense = ours_fn(flash_attn2, cfg, False, args.num_splits)
    out = ours_dense()  # writes the new token (the same row every call: the timed calls do the same work)
    # SDPA on (b, h_k, s, d) views of ours' caches: the reference needs no copy of them.
    bshd = tuple(t.transpose(1, 2) for t in (cfg["k_cache"], cfg["v_cache"]))
    with torch.no_grad():
        want = sdpa_fn(cfg, caches=bshd)().transpose(1, 2)
    diff = max_diff(out, want)
    if check_failed(diff, "ours"):
        return rows, 1
    ours_attn = ours_fn(flash_attn2, cfg, False, args.num_splits, append=False)
    diff_attn = max_diff(ours_attn(), want)
    if check_failed(diff_attn, "ours without the append"):
        return rows, 1
    graph = args.graph and not args.attn_only
    if args.attn_only:
        times = {"ours_dense_attn": measure(do_bench, ours_attn, args),
                 "ours_paged_attn": measure(do_bench, ours_fn(flash_attn2, cfg, True, args.num_splits, append=False),
                                            args)}
    else:
        times = {"ours_dense": measure(do_bench, ours_dense, args),
                 "ours_paged": measure(do_bench, ours_fn(flash_attn2, cfg, True, args.num_splits), args),
                 "ours_dense_attn": measure(do_bench, ours_attn, args)}
    if graph:
        times["ours_dense_graph"] = measure(do_bench, graphed(ours_dense), args)
        times["ours_paged_graph"] = measure(do_bench, graphed(ours_fn(flash_attn2, cfg, True, args.num_splits)), args)
        times["ours_dense_attn_graph"] = measure(do_bench, graphed(ours_attn), args)
    # SDPA's (b, h_k, s, d) copies of the dense caches take the paged copy's place: at most two caches' bytes
    # are held at once (what fits() counts; the reference above read views).
    cfg["paged"] = None
    torch.cuda.empty_cache()
    caches = head_major_caches(cfg)
    # Ours on the very tensors SDPA reads (strided (b, s, h_k, d) views of them: each head's keys contiguous),
    # so that the layout of the bytes in memory is the same for both, not only their number.
    head_major = dict(cfg, k_cache=caches[0].transpose(1, 2), v_cache=caches[1].transpose(1, 2))
    ours_hm = ours_fn(flash_attn2, head_major, False, args.num_splits, append=False)
    diff_hm = max_diff(ours_hm(), want)
    if check_failed(diff_hm, "ours on SDPA's layout"):
        return rows, 1
    times["ours_dense_attn_hsd"] = measure(do_bench, ours_hm, args)
    if graph:
        times["ours_dense_attn_hsd_graph"] = measure(do_bench, graphed(ours_hm), args)
    del ours_hm, head_major
    # SDPA on its own layout, with and without the append, and on ours' (the views `bshd`: what a caller
    # holding flash-attn's cache layout would pass it; suffix _bshd). (suffix, step, backends; None: auto)
    if args.attn_only:
        runs = [("", sdpa_fn(cfg, False, caches), ("FLASH_ATTENTION", "CUDNN_ATTENTION"))]
    else:
        every = (None,) + SDPA_BACKENDS
        runs = [("", sdpa_fn(cfg, False, caches), every), ("_append", sdpa_fn(cfg, True, caches), every),
                ("_bshd", sdpa_fn(cfg, False, bshd), every[:-1])]  # MATH (last): never the best
    for suffix, sdpa, backends in runs:
        for backend in backends:
            name = ("sdpa_auto" if backend is None else f"sdpa_{backend.split('_')[0].lower()}") + suffix
            try:
                with sdpa_context(backend):
                    times[name] = measure(do_bench, sdpa, args)
            except Exception as err:  # a backend that refuses these shapes is a blank, not the end of the run
                notes[name] = f"unavailable: {str(err).strip().splitlines()[0][:100] if str(err).strip() else type(err).__name__}"
                times[name] = float("nan")
            torch.cuda.empty_cache()
    del bshd, runs
    best = {}
    for append in (False, True):
        finite = [ms for name, ms in times.items()
                  if name.startswith("sdpa_") and name.endswith("_append") == append and math.isfinite(ms)]
        best[append] = min(finite, default=float("nan"))
    times["sdpa_best"], times["sdpa_best_append"] = best[False], best[True]
    nbytes = kv_bytes(batch, seqlen)
    for name, ms in times.items():
        bw = nbytes / (ms * 1e-3) if math.isfinite(ms) else float("nan")
        # The same work: ours with the append against SDPA with it, ours without against SDPA alone.
        whole_step = name.startswith("ours_") and "_attn" not in name
        same_work = best[whole_step] if name.startswith("ours_") else float("nan")
        note = {"ours_dense": f"max |ours - SDPA| {diff:.2e}",
                "ours_dense_attn": f"max |ours - SDPA| {diff_attn:.2e}",
                "ours_dense_attn_hsd": f"max |ours - SDPA| {diff_hm:.2e}; SDPA's (b, h_k, s, d) tensors"}.get(name, "")
        rows.append(dict(backend=name, batch=batch, seqlen_cache=seqlen, ms=ms, tb_per_s=bw / 1e12,
                         fraction_of_copy=bw / copy_bw, ratio_vs_sdpa=best[False] / ms if math.isfinite(ms) else math.nan,
                         ratio_same_work=same_work / ms if math.isfinite(ms) else math.nan,
                         note=notes.get(name, note)))
    del cfg, caches
    torch.cuda.empty_cache()
    return rows, 0


def print_rows(rows):
    print(f"   {'backend':22s} {'ms':>9s} {'TB/s':>7s} {'of copy':>8s} {'SDPA/ours':>9s} {'same work':>9s}  note")
    for row in rows:
        print(f"   {row['backend']:22s} {row['ms']:9.4f} {row['tb_per_s']:7.3f} {row['fraction_of_copy']:8.1%} "
              f"{row['ratio_vs_sdpa']:9.2f} {row['ratio_same_work']:9.2f}  {row['note']}".replace(" nan", "   -").rstrip(),
              flush=True)


def plot(rows, args, copy_bw):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {args.plot}")
        return
    fig, axes = plt.subplots(1, len(args.batches), squeeze=False, figsize=(4.5 * len(args.batches), 3.6))
    for ax, batch in zip(axes[0], args.batches):
        for backend in ("ours_dense", "ours_dense_attn", "ours_dense_attn_hsd", "ours_paged", "sdpa_best",
                        "sdpa_best_append"):
            points = sorted((r["seqlen_cache"], r["tb_per_s"]) for r in rows
                            if r["batch"] == batch and r["backend"] == backend)
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=backend)
        ax.axhline(copy_bw / 1e12, linestyle="--", color="gray", label="copy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cache length")
        ax.set_ylabel("TB/s (K+V read)")
        ax.set_title(f"batch {batch}")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{torch.cuda.get_device_name()}: decode, bf16 hdim {HDIM}, h {NHEADS} h_k {NHEADS_K}")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot written to {args.plot}")


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmark_decode.py needs a CUDA GPU (torch.cuda.is_available() is False).")
    from triton.testing import do_bench

    if args.flush == "read":
        do_bench = do_bench_read_flush

    flash_attn2 = import_flash_attn2()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, flash_attn2 {flash_attn2.__version__}; "
          f"num_splits {args.num_splits}; L2 flush: {args.flush}")
    copy_bw = copy_bandwidth(do_bench, args)
    print(f"device-to-device copy: {copy_bw / 1e12:.3f} TB/s (bytes read + written)")
    rows, failures = [], 0
    for batch in args.batches:
        for seqlen in args.seqlens:
            print(f"-- batch {batch} cache {seqlen} ({kv_bytes(batch, seqlen) / 2**30:.2f} GiB of K+V)", flush=True)
            if not fits(batch, seqlen):
                print("   skipped: does not fit in GPU memory")
                continue
            measured, failed = run_config(flash_attn2, do_bench, args, batch, seqlen, copy_bw)
            print_rows(measured)
            rows += measured
            failures += failed
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"csv written to {args.csv}")
    if args.plot and rows:
        plot(rows, args, copy_bw)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
