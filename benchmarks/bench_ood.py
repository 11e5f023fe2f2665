"""Does the OOD flag tell radiographs from inputs the model was not made for?

The model's OOD statistics are fit as `fxscore export` fits them: mean and covariance of
the pooled features of the training images of a leak-free split, the threshold at a 1%
false-flag rate on its validation images, colour images left out of both (`--fit val`: on
the validation images alone, threshold out of fold). Then the flag is measured on

- in distribution: the grey radiographs of the same split's test images (never fit on);
- not radiographs:
  * the colour figures of the real data (annotated figures, photos; every split; none is
    among the fit images, which leave colour out),
  * pydicom's test files, by modality: CT, MR, ultrasound, nuclear medicine, RGB/YBR test
    patterns (all DICOM files whatever their modality, as `--modality all` would read them),
  * synthetic: blank, constant, white, uniform and Gaussian noise, checkerboards, gradients,
    and extreme-aspect images (a real radiograph squashed to 8:1 and 1:8, noise strips),
  * sample_data's phantoms (drawn bones, not X-rays).

Every input is scored as `fxscore run` scores it (`scoring.score_items`; the synthetic images
are written as 16-bit PNG files first), so the flag is the rows' `ood` column, the colour rule
included: a colour image is flagged whatever its distance.

Printed: ROC-AUC for radiograph vs not (goal >= 0.95) overall and per kind, with the colour
rule (colour inputs ranked above every distance, as the flag treats them) and without it (the
distance alone), the share of each kind flagged, and the false-flag rate on the test
radiographs (goal <= 2%) with a 95% interval resampling near-duplicate groups. The DICOM
radiographs (CR/DX test files) are listed apart: they are radiographs of other sites.

    python benchmarks/bench_ood.py --data /tmp/fxscore-default/clean        # ~5 min, 2 cores
    python benchmarks/bench_ood.py --data CLEAN --model model.onnx --json ood.json

The model defaults to the packaged default model, augmented (`fxscore augment --ood-fit
CLEAN/train --ood-threshold-on CLEAN/val`) in a temporary file; it must have been trained on
CLEAN/train only (the packaged model was: scripts/make_default_model.sh).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from fxscore import metrics
from fxscore.files import find_images
from fxscore.images import ImageReadError, image_info, read_image
from fxscore.model import load_model, packaged_model
from fxscore.preprocess import resize
from fxscore.scoring import score_items

REPO = Path(__file__).resolve().parent.parent
BATCH = 32


class Scorer:
    """Collects (kind, name, ood score, ood flag, colour, probability) for inputs (files, or
    intensity arrays written as 16-bit PNG under `tmp`), scored as `fxscore run` scores them."""

    def __init__(self, model, tmp: Path) -> None:
        self.model = model
        self.tmp = tmp
        self.rows: list[dict] = []
        self.unreadable: dict[str, int] = defaultdict(int)
        self._items: list[tuple[str, str, Path]] = []

    def add_file(self, kind: str, path: Path, name: str | None = None) -> None:
        self._items.append((kind, name or str(path), Path(path)))

    def add_array(self, kind: str, name: str, image: np.ndarray) -> None:
        path = self.tmp / f"{len(self._items):05d}-{name}.png"
        grey = np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16)
        Image.fromarray(grey).save(path)
        self.add_file(kind, path, name)

    def flush(self) -> None:
        rows = score_items(self.model, [(name, p) for _, name, p in self._items],
                           batch_size=BATCH)
        for (kind, _, _), row in zip(self._items, rows):  # rows come in input order
            if row["error"]:
                self.unreadable[kind] += 1
                continue
            self.rows.append({"kind": kind, "name": row["path"],
                              "ood_score": float(row["ood_score"]), "ood": bool(row["ood"]),
                              "colour": bool(row.get("_colour")),
                              "probability": float(row["probability"])})
        self._items.clear()


COLOUR_RANK = 1e30  # above any distance (roc_auc refuses infinite scores)


def ranked(rows: list[dict], rule: bool) -> np.ndarray:
    """The score the flag ranks by: with the colour rule a colour input above any distance."""
    return np.array([COLOUR_RANK if rule and r["colour"] else r["ood_score"] for r in rows])


def is_colour(path: Path) -> bool:
    try:
        return bool(image_info(path, decode=True).get("has_colour"))
    except ImageReadError:
        return False


def synthetic(rng: np.random.Generator, radiograph: np.ndarray | None):
    """(kind, name, image) of made-up inputs that are no radiograph."""
    for i in range(8):
        h, w = rng.integers(128, 1024, 2)
        yield "blank", f"blank-{i}", np.zeros((h, w))
        yield "constant", f"constant-{i}", np.full((h, w), rng.uniform(0.1, 0.9))
        yield "white", f"white-{i}", np.ones((h, w))
        yield "uniform noise", f"uniform-{i}", rng.random((h, w))
        yield "gaussian noise", f"gauss-{i}", np.clip(rng.normal(0.5, 0.2, (h, w)), 0, 1)
        cell = int(rng.integers(4, 64))
        yy, xx = np.mgrid[0:h, 0:w]
        yield "checkerboard", f"checker-{i}", (((yy // cell) + (xx // cell)) % 2).astype(float)
        angle = rng.uniform(0, np.pi)
        g = np.cos(angle) * xx / w + np.sin(angle) * yy / h
        yield "gradient", f"gradient-{i}", (g - g.min()) / (np.ptp(g) or 1)
        long_side, short_side = int(rng.integers(800, 2000)), int(rng.integers(40, 120))
        yield "extreme aspect", f"strip-h-{i}", rng.random((short_side, long_side))
        yield "extreme aspect", f"strip-v-{i}", rng.random((long_side, short_side))
    if radiograph is not None:
        for i, (h, w) in enumerate([(64, 512), (512, 64), (100, 1000), (1000, 100)]):
            yield "extreme aspect", f"squashed-radiograph-{i}", resize(radiograph, (h, w))


DICOM_KINDS = {"CT": "DICOM CT", "MR": "DICOM MR", "US": "DICOM ultrasound",
               "NM": "DICOM nuclear medicine", "CR": "DICOM radiograph (CR/DX)",
               "DX": "DICOM radiograph (CR/DX)"}


def dicom_kind(path: str) -> str | None:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - not a DICOM file
        return None
    photometric = str(ds.get("PhotometricInterpretation", ""))
    modality = str(ds.get("Modality", ""))
    if photometric.startswith(("RGB", "YBR", "PALETTE")) and modality not in ("US",):
        return "DICOM RGB / colour test pattern"
    return DICOM_KINDS.get(modality, f"DICOM other ({modality or 'no modality'})")


def pydicom_files() -> list[str]:
    from pydicom.data import get_testdata_files

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = set(get_testdata_files("*"))
    return sorted(f for f in files if Path(f).is_file())


def group_interval(flags: np.ndarray, groups: np.ndarray, n: int = 2000, seed: int = 0):
    rng = np.random.default_rng(seed)
    uniq, inv = np.unique(groups, return_inverse=True)
    sums = np.bincount(inv, weights=flags.astype(float), minlength=len(uniq))
    counts = np.bincount(inv, minlength=len(uniq))
    rates = []
    for _ in range(n):
        w = np.bincount(rng.integers(0, len(uniq), len(uniq)), minlength=len(uniq))
        rates.append((w @ sums) / max(1, w @ counts))
    return [float(v) for v in np.percentile(rates, [2.5, 97.5])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="an `fxscore split` output")
    ap.add_argument("--model", default=None,
                    help="a model with OOD statistics [default: the packaged model, "
                         "augmented with statistics fit on DATA/val]")
    ap.add_argument("--raw", type=Path, default=None,
                    help="the laid-out real data (every split) to take colour figures from "
                         "[default: DATA's own train/val/test]")
    ap.add_argument("--fit", choices=["train", "val"], default="train",
                    help="train: covariance of DATA/train, threshold on DATA/val (as export); "
                         "val: both from DATA/val, threshold out of fold")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", module="pydicom")  # odd test files say so at length
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from fxscore.explain_graph import augment_file

            packaged, _ = packaged_model()
            path = str(Path(tmp) / "default.ood.onnx")
            val = [p for _, p in find_images(args.data / "val")]
            train = [p for _, p in find_images(args.data / "train")]
            print(f"fitting OOD statistics ({args.fit}) ...", file=sys.stderr)
            if args.fit == "train":
                augment_file(str(packaged), path, ood_files=train, ood_holdout=val)
            else:
                augment_file(str(packaged), path, ood_files=val)
        else:
            path = args.model
        model = load_model(path)
    if not model.meta.ood:
        sys.exit(f"{path} has no OOD statistics; `fxscore augment {path} --out NEW.onnx "
                 "--ood-fit VAL`")
    ood = model.meta.ood
    threshold = float(ood["threshold"])
    synthetic_dir = tempfile.TemporaryDirectory()
    s = Scorer(model, Path(synthetic_dir.name))

    from fxscore.split import read_manifest

    manifest = args.data / "manifest.csv"
    groups = ({r["path"]: r["group"] for r in read_manifest(manifest)} if manifest.is_file()
              else {})
    colour_seen: set[bytes] = set()
    radiograph = None
    for rel, p in find_images(args.data / "test"):
        name = f"test/{rel}"
        if is_colour(p):
            continue  # counted with the colour figures below
        s.add_file("test radiographs", p, name)
        if radiograph is None:
            try:
                radiograph = read_image(p)
            except ImageReadError:
                pass
    import hashlib

    colour_root = args.raw or args.data
    for split in ("train", "val", "test"):
        for _, p in find_images(colour_root / split):
            if not is_colour(p):
                continue
            digest = hashlib.sha256(p.read_bytes()).digest()
            if digest in colour_seen:
                continue  # distinct contents only
            colour_seen.add(digest)
            s.add_file("colour figures (real data)", p)
    for f in pydicom_files():
        kind = dicom_kind(f)
        if kind is not None:
            s.add_file(kind, Path(f))
    for kind, name, img in synthetic(rng, radiograph):
        s.add_array(kind, name, np.asarray(img, dtype=np.float32))
    for _, p in find_images(REPO / "sample_data"):
        s.add_file("sample_data phantoms", p)
    s.flush()
    synthetic_dir.cleanup()

    rows = s.rows
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_kind[r["kind"]].append(r)
    test_rows = by_kind["test radiographs"]
    radiograph_kinds = {"test radiographs", "DICOM radiograph (CR/DX)"}
    outside = [r for r in rows if r["kind"] not in radiograph_kinds]

    def auc_of(others: list[dict], rule: bool) -> float:
        y = np.r_[np.zeros(len(test_rows)), np.ones(len(others))]
        return metrics.roc_auc(y, np.r_[ranked(test_rows, rule), ranked(others, rule)])

    auc, auc_distance = auc_of(outside, True), auc_of(outside, False)
    flags = np.array([r["ood"] for r in test_rows], dtype=bool)
    g = np.array([groups.get(r["name"], r["name"]) for r in test_rows])
    res = {"model_id": model.model_id, "ood": ood, "threshold": threshold,
           "test_radiographs": len(test_rows), "false_flags": int(flags.sum()),
           "false_flag_rate": float(flags.mean()),
           "false_flag_rate_ci": group_interval(flags, g) if len(g) else None,
           "not_radiographs": len(outside), "roc_auc": auc,
           "roc_auc_distance_only": auc_distance,
           "flagged_not_radiographs": float(np.mean([r["ood"] for r in outside])),
           "unreadable": dict(s.unreadable), "kinds": {}}
    for kind, rs in sorted(by_kind.items()):
        entry = {"n": len(rs), "flagged": float(np.mean([r["ood"] for r in rs])),
                 "colour": int(sum(r["colour"] for r in rs)),
                 "median_score": float(np.median([r["ood_score"] for r in rs])),
                 "median_probability": float(np.median([r["probability"] for r in rs]))}
        if kind != "test radiographs":
            entry["roc_auc_vs_test"] = auc_of(rs, True)
            entry["roc_auc_vs_test_distance_only"] = auc_of(rs, False)
        res["kinds"][kind] = entry
    res["seconds"] = round(time.perf_counter() - started, 1)

    ffr_ci = res["false_flag_rate_ci"] or [float("nan")] * 2
    how = ("out of fold" if ood.get("threshold_from") != "held-out images"
           else f"on {ood['holdout_images']} held-out validation images")
    print(f"OOD flag of model {model.model_id}: fit on {ood['fit_images']} images (left out: "
          f"{ood.get('excluded') or 'none'}), threshold {threshold:.3f} at a "
          f"{ood['false_flag_rate']:.0%} false-flag rate, chosen {how}")
    print(f"  features: {ood.get('feature', 'pooled')} ({ood.get('dim')} dimensions)")
    print(f"  radiograph vs not: ROC-AUC {auc:.4f} with the colour rule, {auc_distance:.4f} "
          f"by distance alone ({len(test_rows)} test radiographs, {len(outside)} other "
          "inputs; goal >= 0.95)")
    print(f"  false flags on test radiographs: {flags.sum()}/{len(test_rows)} = "
          f"{flags.mean():.2%} [{ffr_ci[0]:.2%}, {ffr_ci[1]:.2%}] (goal <= 2%)")
    print(f"  {'kind':<34} {'n':>5} {'colour':>6} {'flagged':>8} {'AUC':>7} {'AUC dist':>8} "
          f"{'median p':>9}")
    for kind, e in res["kinds"].items():
        auc_k = f"{e['roc_auc_vs_test']:.3f}" if "roc_auc_vs_test" in e else "-"
        auc_d = (f"{e['roc_auc_vs_test_distance_only']:.3f}" if "roc_auc_vs_test" in e
                 else "-")
        print(f"  {kind:<34} {e['n']:>5} {e['colour']:>6} {e['flagged']:>8.1%} {auc_k:>7} "
              f"{auc_d:>8} {e['median_probability']:>9.3f}")
    if s.unreadable:
        print(f"  unreadable (not scored, error rows in a run): {dict(s.unreadable)}")
    print(f"  ({res['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps({**res, "rows": rows}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
