#!/usr/bin/env python3
"""What deterministic=True costs: our backward time with it over our default backward time, per config,
from one benchmark_attention.py CSV that has both `ours` and `ours_det` rows (each config's two timed back to
back: run_bars.sh's bwd.csv), or from two CSVs of one run (a default one and a --deterministic one).

    python benchmarks/det_cost.py bwd.csv
    python benchmarks/det_cost.py bwd.csv det.csv
"""

import csv
import sys


def ours_ms(path, deterministic):
    """(dtype, hdim, causal, seqlen) -> ms of our backward rows with that deterministic flag."""
    times = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if (row["backend"] in ("ours", "ours_det") and row["pass"] == "bwd" and row["ms"]
                    and (row.get("deterministic") == "True") == deterministic):
                times[(row["dtype"], int(row["hdim"]), row["causal"] == "True", int(row["seqlen"]))] = float(row["ms"])
    return times


def main(argv):
    if len(argv) not in (1, 2):
        print(__doc__)
        return 2
    default, det = ours_ms(argv[0], False), ours_ms(argv[-1], True)
    ratios = []
    print("## deterministic time / default time (same run)")
    print("dtype hdim causal seqlen default_ms det")
    for key in sorted(set(default) & set(det)):
        ratio = det[key] / default[key]
        ratios.append(ratio)
        dtype, hdim, causal, seqlen = key
        print(f"{dtype} {hdim} {causal} {seqlen} {default[key]:.4f} {ratio:.3f}")
    if not ratios:
        print("det: no config in both files")
        return 1
    over = sum(r > 1.15 for r in ratios)
    print(f"det: min {min(ratios):.3f} max {max(ratios):.3f} over {len(ratios)}; {over} above 1.15")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
