"""How well does the embedded near-copy test (`fxscore.membership`) find copies, and how large is
the training-data table?

On the real X-rays (../shared/data/fracture-multi-region, or FXSCORE_REAL_DATA), for a random
sample of distinct images: each one's nearest other images by descriptor similarity (the int8
descriptors a model stores, against the query's own), and for the 6 nearest the audit's
pixel-level verdict (`fxscore.fingerprint.match`: aligned and confirmed). An image "has a copy"
when any of its 6 nearest is confirmed; the near-copy test flags it when its nearest reaches the
similarity. Prints precision and recall per similarity, and the table's size for the public
train + val split.

    python benchmarks/bench_membership.py               # 400 images: ~5 min on 2 cores
    python benchmarks/bench_membership.py --sample 100

Measured (400 images, seed 1): at 0.98 (fxscore.membership.NEAR_SIMILARITY) precision 99.7%,
recall 93.5%; 0.95: 98.0% / 99.1%; 0.99: 100% / 84%. Table: 2,497 distinct contents, 344 kB.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
REAL = Path(os.environ.get("FXSCORE_REAL_DATA", REPO.parent / "shared" / "data"
                           / "fracture-multi-region"))


def _thumb(path: str):
    from fxscore import fingerprint as fp
    from fxscore.images import ImageReadError, read_image

    try:
        img = read_image(path)
    except ImageReadError:
        return None, 1.0
    return fp.thumbnail(img), img.shape[0] / img.shape[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    from fxscore import fingerprint as fp
    from fxscore import membership as mb

    rows = list(csv.DictReader(open(REAL / "manifest.csv", newline="")))
    shas = sorted({r["sha256"] for r in rows})
    t0 = time.time()
    with ProcessPoolExecutor(args.workers) as pool:
        done = list(pool.map(_thumb, [str(REAL / "blobs" / s) for s in shas], chunksize=16))
    ok = [i for i, (t, _) in enumerate(done) if t is not None]
    thumbs = np.stack([done[i][0] for i in ok])
    aspects = np.array([done[i][1] for i in ok])
    desc = np.stack([fp.descriptors(t) for t in thumbs])
    stored = mb._dequantise(np.stack([mb._quantise(d) for d in desc]))  # what a model holds
    print(f"{len(shas)} distinct contents, {len(ok)} readable, thumbnails in "
          f"{time.time() - t0:.0f}s", flush=True)

    rng = np.random.default_rng(args.seed)
    query = rng.choice(len(ok), min(args.sample, len(ok)), replace=False)
    sims = (desc[query].reshape(-1, desc.shape[2]) @ stored.T).reshape(len(query), 8, -1).max(1)
    sims[np.arange(len(query)), query] = -1  # not itself
    best, has_copy = [], []
    for k, q in enumerate(query):
        top = np.argsort(-sims[k])[:6]
        verdicts = [fp.match(thumbs[q], thumbs[j], None, aspects[q], aspects[j]).same
                    for j in top]
        best.append(sims[k, top[0]])
        has_copy.append(any(verdicts))
    best, has_copy = np.array(best), np.array(has_copy)
    print(f"{has_copy.sum()} of {len(query)} sampled images have a confirmed copy among their "
          "6 nearest")
    print(f"{'similarity':>10} {'flagged':>8} {'precision':>10} {'recall':>7}")
    for t in (0.95, 0.97, 0.98, 0.99, 0.995):
        flagged = best >= t
        tp = (flagged & has_copy).sum()
        print(f"{t:>10.3f} {flagged.sum():>8} {tp / max(flagged.sum(), 1):>10.3f} "
              f"{tp / max(has_copy.sum(), 1):>7.3f}")

    train_val = [r["sha256"] for r in rows if r["split"] in ("train", "val")]
    readable = {shas[i] for i in ok}
    summary, _ = mb.encode([r["sha256"] for r in rows if r["split"] == "train"],
                           [r["sha256"] for r in rows if r["split"] == "val"],
                           {s: desc[ok.index(shas.index(s))] if s in readable else None
                            for s in set(train_val)})
    print(f"table for the public train + val ({len(train_val)} files): {summary['contents']} "
          f"distinct contents, {summary['bytes'] / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
