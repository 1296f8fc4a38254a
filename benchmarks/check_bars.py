#!/usr/bin/env python3
"""Reads CSVs written by benchmark_attention.py and says, config by config, where ours misses a speed bar.

The bars of the forward and backward issues: ours / sdpa_flash >= 1.0 at head dims 64 and 128 (both dtypes,
causal and not, seqlen 1k-16k), >= 0.9 at the other head dims. Ratios are taken within one CSV (one run),
never across files. Exit status 0 when every config in the files meets its bar, 1 otherwise.

    python benchmarks/check_bars.py bench_out/fwd.csv [more.csv ...] [--pass fwd|bwd|fwd_bwd]
"""

import argparse
import csv
import sys
from collections import defaultdict

MAIN_HEAD_DIMS = (64, 128)
MAIN_BAR, OTHER_BAR = 1.0, 0.9
SEQLENS = range(1024, 16384 + 1)


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+")
    parser.add_argument("--pass", dest="pass_name", default="fwd", choices=("fwd", "bwd", "fwd_bwd"))
    args = parser.parse_args(argv)
    misses = checked = 0
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
