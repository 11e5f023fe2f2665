#!/usr/bin/env python3
"""Print `fxscore eval --groups` CSV (path,group) for one split of an `fxscore split` output.

    python scripts/split_groups.py CLEAN test > test-groups.csv

Paths are relative to CLEAN/<split>/, as `fxscore eval CLEAN/<split>` names them, so the
bootstrap resamples whole groups of near-duplicate images.
"""
import io
import sys

from fxscore import csvsafe
from fxscore.split import read_manifest


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    clean, split = sys.argv[1], sys.argv[2]
    # csvsafe both ways: paths with commas, newlines, formulas or undecodable bytes survive
    out = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="")
    csvsafe.write_row(out, ["path", "group"])
    for row in read_manifest(f"{clean}/manifest.csv"):
        if row["split"] == split:
            csvsafe.write_row(out, [row["path"].split("/", 1)[1], row["group"]])
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
