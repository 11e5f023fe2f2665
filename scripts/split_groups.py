#!/usr/bin/env python3
"""Print `fxscore eval --groups` CSV (path,group) for one split of an `fxscore split` output.

    python scripts/split_groups.py CLEAN test > test-groups.csv

Paths are relative to CLEAN/<split>/, as `fxscore eval CLEAN/<split>` names them, so the
bootstrap resamples whole groups of near-duplicate images.
"""
import csv
import sys


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    clean, split = sys.argv[1], sys.argv[2]
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["path", "group"])
    with open(f"{clean}/manifest.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["split"] == split:
                out.writerow([row["path"].split("/", 1)[1], row["group"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
