#!/usr/bin/env python3
"""What deterministic=True costs: our backward time with it over our default backward time, per config,
from one benchmark_attention.py CSV that has both `ours` and `ours_det` rows (each config's two timed back to
back: run_bars.sh's bwd.csv), or from two CSVs of one run (a default one and a --deterministic one).
--backend names the deterministic rows' backend (default ours_det; ours_det_staggered: the staggered mode's).

    python benchmarks/det_cost.py bwd.csv
    python benchmarks/det_cost.py --backend ours_det_staggered bwd.csv
    python benchmarks/det_cost.py bwd.csv det.csv
"""

import csv
import sys


def ours_ms(path, deterministic, det_backend="ours_det"):
    """(dtype, hdim, causal, seqlen) -> ms of our backward rows (ours, det_backend) with that deterministic flag."""
    times = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if (row["backend"] in ("ours", det_backend) and row["pass"] == "bwd" and row["ms"]
                    and (row.get("deterministic") == "True") == deterministic):
                times[(row["dtype"], int(row["hdim"]), row["causal"] == "True", int(row["seqlen"]))] = float(row["ms"])
    return times


def main(argv):
    det_backend = "ours_det"
    if len(argv) >= 2 and argv[0] == "--backend":
        det_backend, argv = argv[1], argv[2:]
    if len(argv) not in (1, 2):
        print(__doc__)
        return 2
    default, det = ours_ms(argv[0], False), ours_ms(argv[-1], True, det_backend)
    ratios = []
    print(f"## deterministic time / default time (same run; {det_backend})")
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
