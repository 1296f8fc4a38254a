"""The table of an ab_builds.sh run: per configuration, each version's TFLOP/s of every round and its
ratio to the first other backend of the same run (sdpa_flash by default).

    python benchmarks/ab_summary.py FOLDER NAME [NAME ...]     (reads FOLDER/NAME_<round>.csv)
"""

import csv
import glob
import os
import sys


def load(path):
    rows = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            key = (row["dtype"], int(row["hdim"]), row["causal"], int(row["seqlen"]))
            # The deterministic flag is ours alone (empty for the other backends): part of our backend's name.
            backend = row["backend"] + (" det" if row.get("deterministic") == "True" else "")
            rows.setdefault(key, {})[backend] = float(row["tflops"])
    return rows


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    folder, names = argv[0], argv[1:]
    table = {}  # key -> [(name, round, ours, reference ratio or None)]
    for name in names:
        for path in sorted(glob.glob(os.path.join(folder, f"{name}_*.csv"))):
            run = os.path.basename(path)[len(name) + 1:-len(".csv")]
            for key, by_backend in load(path).items():
                others = [v for b, v in by_backend.items() if not b.startswith("ours")]
                for backend in (b for b in by_backend if b.startswith("ours")):
                    ours = by_backend[backend]
                    ratio = ours / others[0] if others else None
                    table.setdefault(key + (backend,), []).append((name, run, ours, ratio))
    print("dtype hdim causal seqlen backend | version/round: ours TFLOP/s (ours / reference)")
    for key in sorted(table):
        cells = "  ".join(f"{n}/{r}: {t:.1f}" + (f" ({x:.3f})" if x is not None else "") for n, r, t, x in table[key])
        print(f"{key[0]} {key[1]:4d} {key[2]:5s} {key[3]:6d} {key[4]:8s} | {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
