"""Precision and recall of the audit's near-copy grouping, on copies and on look-alikes.

Pairwise, over every pair of images in a set: a pair is "same" when both images come from
one original, "predicted" when the audit's grouping (`fxscore.grouping`) puts them in one
group. Precision = predicted pairs that are same / predicted pairs; recall = same pairs
predicted / same pairs. Sets:

- phantoms: sample_data's 200 phantoms (every one drawn separately, by one generator: images
  that look alike) plus --phantoms more drawn with its functions, and planted copies of
  --copies-of of the new ones, one of each kind (turned, flipped, rotated, resized, cropped,
  re-encoded, brighter/flatter): 11 per original;
- real (when the real X-rays are present): 16 real radiographs, chosen as each other's
  closest look-alikes and checked by eye to be other films, with one planted copy of every
  kind of each of the first 11; and the real pairs judged by eye in
  tests/data/audit_pairs.csv, each verified on its own (`fingerprint.match`) and, with
  --report DIR (`fxscore audit REAL --out DIR`), as the audit grouped them;
- textures (only when asked for): random textures (tests/test_fingerprint.texture) that are
  all alike at low frequencies, a stress test of the candidate search, not of the verdicts.

    python benchmarks/bench_audit.py                    # phantoms and real; ~5 CPU-minutes
    python benchmarks/bench_audit.py --report audit/    # + the real audit's groups
    python benchmarks/bench_audit.py --sets phantoms --phantoms 40 --copies-of 4
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the copy kinds, texture() and phantom() of the tests

from conftest import REAL_DATA  # noqa: E402
from test_audit import DISTINCT  # noqa: E402
from test_fingerprint import COPIES, from_pil, phantom, texture, to_pil  # noqa: E402

from fxscore import fingerprint as fp  # noqa: E402
from fxscore import grouping  # noqa: E402
from fxscore.files import find_images  # noqa: E402
from fxscore.images import read_image  # noqa: E402

PAIRS_CSV = REPO / "tests" / "data" / "audit_pairs.csv"


def with_copies(originals: list[np.ndarray], copied: int, *, distinct_only=()):
    """Thumbnails, aspects and source ids: every original, then one copy of every kind of
    each of the first `copied` originals; `distinct_only` are added as originals without
    copies (look-alikes)."""
    images, truth = [], []
    for k, img in enumerate(originals):
        images.append(img)
        truth.append(k)
    for k, img in enumerate(originals[:copied]):
        for make in COPIES.values():
            images.append(from_pil(make(to_pil(np.clip(img, 0, 1)))))
            truth.append(k)
    for img in distinct_only:
        images.append(img)
        truth.append(len(truth) + 10**6)
    thumbs = np.stack([fp.thumbnail(i) for i in images])
    aspects = np.array([i.shape[0] / i.shape[1] for i in images])
    return thumbs, aspects, np.array(truth)


def pairwise(labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    same = truth[:, None] == truth[None, :]
    predicted = labels[:, None] == labels[None, :]
    upper = np.triu(np.ones_like(same), 1)
    tp = int((same & predicted & upper).sum())
    n_pred, n_same = int((predicted & upper).sum()), int((same & upper).sum())
    return {"images": len(labels), "same_pairs": n_same, "predicted_pairs": n_pred, "tp": tp,
            "precision": tp / n_pred if n_pred else 1.0, "recall": tp / n_same if n_same else 1.0}


def run_set(name, thumbs, aspects, truth, pool) -> dict:
    t0 = time.perf_counter()
    near = grouping.near_duplicate_groups(thumbs, aspects, executor=pool)
    result = pairwise(near.labels, truth)
    result.update(name=name, seconds=round(time.perf_counter() - t0, 1),
                  verified=near.checked, refused=len(near.refused))
    # which copies were missed, which look-alikes merged: what to look at
    result["missed"] = sorted({int(t) for t in truth
                               if len(set(near.labels[truth == t])) > 1})
    merged = [set(truth[near.labels == g].tolist()) for g in np.unique(near.labels)]
    result["merged"] = [sorted(m) for m in merged if len(m) > 1]
    return result


def sample_data_phantoms() -> list[np.ndarray]:
    root = REPO / "sample_data"
    return [read_image(p) for rel, p in find_images(root)
            if rel.split("/")[0] in ("train", "val", "test")]


def real_images() -> list[np.ndarray]:
    return [read_image(REAL_DATA / "blobs" / sha) for sha in DISTINCT]


def checked_pairs(report: Path | None = None) -> list[dict]:
    """The pairs of tests/data/audit_pairs.csv against their verdicts -> confusion counts:
    verified one by one (`match`), and as grouped by the audit that wrote `report`."""
    with open(PAIRS_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    said = []
    for r in rows:
        a, b = (read_image(REAL_DATA / "blobs" / r[k]) for k in ("sha256_a", "sha256_b"))
        m = fp.match(fp.thumbnail(a), fp.thumbnail(b), None, a.shape[0] / a.shape[1],
                     b.shape[0] / b.shape[1])
        said.append((m.same, f"{m.score:.3f}/{m.residual:.3f}"))
    out = [_confusion("real pairs, one by one", rows, said)]
    if report is not None:
        from fxscore import csvsafe

        with open(report / "files.csv", newline="", encoding="utf-8") as f:
            group = {r["sha256"]: r["group"] for r in csvsafe.read_dicts(f)}
        out.append(_confusion("real pairs, grouped", rows, [
            (group[r["sha256_a"]] == group[r["sha256_b"]], "group") for r in rows]))
    return out


def _confusion(name: str, rows: list[dict], said: list[tuple[bool, str]]) -> dict:
    tp = sum(1 for r, (s, _) in zip(rows, said) if s and r["verdict"] == "same")
    fp_ = sum(1 for r, (s, _) in zip(rows, said) if s and r["verdict"] == "distinct")
    same = sum(1 for r in rows if r["verdict"] == "same")
    wrong = [(r["sha256_a"][:12], r["sha256_b"][:12], r["verdict"], why)
             for r, (s, why) in zip(rows, said) if s != (r["verdict"] == "same")]
    return {"name": name, "pairs": len(rows), "same": same, "tp": tp, "fp": fp_,
            "precision": tp / (tp + fp_) if tp + fp_ else 1.0,
            "recall": tp / same if same else 1.0, "wrong": wrong}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["phantoms", "real"],
                    choices=["phantoms", "textures", "real"])
    ap.add_argument("--report", type=Path, default=None,
                    help="an `fxscore audit` report (--out DIR) of the real data set: judge "
                         "its groups against tests/data/audit_pairs.csv too")
    ap.add_argument("--phantoms", type=int, default=60, help="phantoms drawn beside sample_data")
    ap.add_argument("--copies-of", type=int, default=12, help="originals that get 11 copies")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    results = []
    with ProcessPoolExecutor(args.workers) if args.workers > 1 else _none() as pool:
        if "phantoms" in args.sets:
            drawn = [phantom(1000 + s) for s in range(args.phantoms)]
            results.append(run_set("phantoms", *with_copies(
                drawn, args.copies_of, distinct_only=sample_data_phantoms()), pool))
        if "textures" in args.sets:
            results.append(run_set("textures", *with_copies(
                [texture(s, size=int(160 + 20 * (s % 5))) for s in range(40)], 12), pool))
        if "real" in args.sets:
            if not (REAL_DATA / "manifest.csv").exists():
                print(f"real: skipped ({REAL_DATA} not found)")
            else:
                results.append(run_set("real", *with_copies(real_images(), 11), pool))
                if PAIRS_CSV.exists():
                    results += checked_pairs(args.report)
    print(f"{'set':<20} {'images':>6} {'same':>6} {'pred':>6} {'tp':>6} {'precision':>9} "
          f"{'recall':>7} {'time':>7}")
    for r in results:
        if "images" in r:
            print(f"{r['name']:<20} {r['images']:>6} {r['same_pairs']:>6} "
                  f"{r['predicted_pairs']:>6} {r['tp']:>6} {r['precision']:>9.4f} "
                  f"{r['recall']:>7.4f} {r['seconds']:>6}s")
            if r["missed"]:
                print(f"  originals with a missed copy: {r['missed']}")
            if r["merged"]:
                print(f"  groups of different originals: {r['merged'][:10]}")
        else:
            print(f"{r['name']:<20} {r['pairs']:>6} {r['same']:>6} {r['tp'] + r['fp']:>6} "
                  f"{r['tp']:>6} {r['precision']:>9.4f} {r['recall']:>7.4f}")
            for w in r["wrong"]:
                print(f"  disagrees with the eye: {w}")
    # the headline: the planted sets and the grouped real pairs (pairs one by one are the
    # verifier's margin, shown above; the audit's groups are what leaks or not)
    sets = [r for r in results if "images" in r or r["name"] == "real pairs, grouped"]
    tp = sum(r["tp"] for r in sets)
    pred = sum(r.get("predicted_pairs", r.get("tp", 0) + r.get("fp", 0)) for r in sets)
    same = sum(r.get("same_pairs", r.get("same", 0)) for r in sets)
    print(f"{'all':<20} {'':>6} {same:>6} {pred:>6} {tp:>6} "
          f"{tp / pred if pred else 1:>9.4f} {tp / same if same else 1:>7.4f}")


class _none:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
