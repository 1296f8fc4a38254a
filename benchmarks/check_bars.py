#!/usr/bin/env python3
"""Reads CSVs written by benchmark_attention.py (or benchmark_decode.py) and says, config by config, where ours
misses a speed bar.

The bars of the forward and backward issues: ours / sdpa_flash >= 1.0 at head dims 64 and 128 (both dtypes,
causal and not, seqlen 1k-16k), >= 0.9 at the other head dims. The decode bars (--pass decode, a
benchmark_decode.py CSV): every ours row (dense and paged, eager and graph) reads at >= 80% of the copy
bandwidth of its run, and the dense rows take <= the time of PyTorch's best SDPA backend (ratio >= 1.0): the
strict ratio, SDPA attention alone even where ours appends the token too (a miss of such a row also shows its
ratio against SDPA preceded by the same append).
Ratios are taken within one CSV (one run), never across files. Exit status 0 when every config in the files
meets its bar, 1 otherwise.

    python benchmarks/check_bars.py bench_out/fwd.csv [more.csv ...] [--pass fwd|bwd|fwd_bwd|decode]
"""

import argparse
import csv
import math
import sys
from collections import defaultdict

MAIN_HEAD_DIMS = (64, 128)
MAIN_BAR, OTHER_BAR = 1.0, 0.9
SEQLENS = range(1024, 16384 + 1)
DECODE_COPY_BAR, DECODE_SDPA_BAR = 0.8, 1.0


def ratios(path, pass_name):
    """{(dtype, hdim, causal, seqlen): ours / sdpa_flash} of one CSV's rows of `pass_name`."""
    tflops = defaultdict(dict)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["pass"] != pass_name or not row["tflops"] or row.get("modifier"):
                continue
            key = (row["dtype"], int(row["hdim"]), row["causal"] == "True", int(row["seqlen"]))
            tflops[key][row["backend"]] = float(row["tflops"])
    return {key: b["ours"] / b["sdpa_flash"] for key, b in tflops.items() if "ours" in b and "sdpa_flash" in b}


def decode_misses(path):
    """(configs checked, lines for the misses) of one benchmark_decode.py CSV."""
    checked, lines = 0, []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not row["backend"].startswith("ours") or not row["fraction_of_copy"]:
                continue
            where = f"{path}: decode {row['backend']} batch {row['batch']} cache {row['seqlen_cache']}"
            checked += 1
            fraction = float(row["fraction_of_copy"])
            ratio = float(row["ratio_vs_sdpa"]) if row["ratio_vs_sdpa"] else float("nan")
            if not fraction >= DECODE_COPY_BAR:
                lines.append(f"MISS {where}: {fraction:.1%} of copy < {DECODE_COPY_BAR:.0%}")
            if row["backend"].startswith("ours_dense") and not ratio >= DECODE_SDPA_BAR:
                lines.append(f"MISS {where}: {ratio:.3f} x SDPA < {DECODE_SDPA_BAR}")
                same_work = float(row["ratio_same_work"]) if row.get("ratio_same_work") else float("nan")
                if "_attn" not in row["backend"] and math.isfinite(same_work):
                    lines[-1] += f" (against SDPA with the append too: {same_work:.3f})"
    return checked, lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+")
    parser.add_argument("--pass", dest="pass_name", default="fwd", choices=("fwd", "bwd", "fwd_bwd", "decode"))
    args = parser.parse_args(argv)
    misses = checked = 0
    if args.pass_name == "decode":
        for path in args.csv:
            n, lines = decode_misses(path)
            checked += n
            misses += len(lines)
            for line in lines:
                print(line)
        print(f"{checked} configs checked, {misses} bars missed")
        return 1 if misses or not checked else 0
    for path in args.csv:
        for (dtype, hdim, causal, seqlen), ratio in sorted(ratios(path, args.pass_name).items()):
            if seqlen not in SEQLENS:
                continue
            bar = MAIN_BAR if hdim in MAIN_HEAD_DIMS else OTHER_BAR
            checked += 1
            if ratio < bar:
                misses += 1
                print(f"MISS {path}: {args.pass_name} {dtype} hdim {hdim} {'causal' if causal else 'non-causal'} "
                      f"seqlen {seqlen}: {ratio:.3f} < {bar}")
    print(f"{checked} configs checked, {misses} below their bar")
    return 1 if misses or not checked else 0


if __name__ == "__main__":
    sys.exit(main())
