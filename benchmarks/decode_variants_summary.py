"""The table of a decode_variants.sh run: per decode config and row of ours (attention alone: dense, dense on SDPA's
layout, paged), each variant's ratio to the best SDPA backend of the same run, round by round; then per variant and
run the geometric mean over the configs of the dense and of the paged rows.

    python benchmarks/decode_variants_summary.py FOLDER NAME [NAME ...]   (reads FOLDER/NAME_<round or read>.csv)
"""

import csv
import glob
import math
import os
import re
import sys

ROWS = ("ours_dense_attn", "ours_dense_attn_hsd", "ours_paged_attn")


def runs_of(folder, name):
    """NAME_<round>.csv and NAME_read.csv (not those of a variant whose name starts with NAME_)."""
    paths = glob.glob(os.path.join(folder, f"{glob.escape(name)}_*.csv"))
    pattern = re.escape(name) + r"_(\d+|read)"
    return sorted(p for p in paths if re.fullmatch(pattern, os.path.basename(p)[: -len(".csv")]))


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    folder, names = argv[0], argv[1:]
    columns, table = [], {}  # (row, batch, cache) -> {column: ratio}
    for name in names:
        for path in runs_of(folder, name):
            column = os.path.basename(path)[: -len(".csv")]
            columns.append(column)
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    if row["backend"] in ROWS:
                        key = (row["backend"], int(row["batch"]), int(row["seqlen_cache"]))
                        table.setdefault(key, {})[column] = float(row["ratio_vs_sdpa"])
    width = max([10] + [len(c) for c in columns])
    print(f"{'ours / best SDPA':20s} {'batch':>5s} {'cache':>7s} " + " ".join(f"{c:>{width}s}" for c in columns))
    for key in sorted(table):
        cells = " ".join(f"{table[key].get(c, math.nan):{width}.3f}" for c in columns)
        print(f"{key[0]:20s} {key[1]:5d} {key[2]:7d} {cells}")
    for backend in (ROWS[0], ROWS[2]):
        means = []
        for c in columns:
            ratios = [v[c] for k, v in table.items() if k[0] == backend and math.isfinite(v.get(c, math.nan))]
            means.append(math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else math.nan)
        print(f"{'geomean ' + backend:34s} " + " ".join(f"{m:{width}.3f}" for m in means))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
