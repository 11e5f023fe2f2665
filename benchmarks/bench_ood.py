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

Printed: ROC-AUC of the OOD score for radiograph vs not (goal >= 0.95) overall and per kind,
the share of each kind flagged at the embedded threshold, and the false-flag rate on the test
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
import io
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
from fxscore.graph_outputs import OOD_SCORE, PROBABILITY
from fxscore.images import ImageReadError, image_info, read_image
from fxscore.model import load_model, packaged_model
from fxscore.preprocess import preprocess, resize
from fxscore.scoring import model_input

REPO = Path(__file__).resolve().parent.parent
BATCH = 32


class Scorer:
    """Collects (kind, name, ood score, probability) for inputs: files or intensity arrays."""

    def __init__(self, model) -> None:
        self.model = model
        self.rows: list[dict] = []
        self.unreadable: dict[str, int] = defaultdict(int)
        self._pending: list[tuple[str, str, np.ndarray]] = []

    def add_file(self, kind: str, path: Path, name: str | None = None) -> None:
        try:
            x = model_input(path, self.model.meta.preprocess)
        except (ImageReadError, OSError):
            self.unreadable[kind] += 1
            return
        self._push(kind, name or str(path), x)

    def add_array(self, kind: str, name: str, image: np.ndarray) -> None:
        self._push(kind, name, preprocess(image.astype(np.float32), self.model.meta.preprocess))

    def _push(self, kind: str, name: str, x: np.ndarray) -> None:
        self._pending.append((kind, name, x))
        if len(self._pending) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        out = self.model.predict_with(np.stack([x for *_, x in self._pending]),
                                      (PROBABILITY, OOD_SCORE))
        for (kind, name, _), s, p in zip(self._pending, out[OOD_SCORE], out[PROBABILITY]):
            self.rows.append({"kind": kind, "name": name, "ood_score": float(s),
                              "probability": float(p)})
        self._pending.clear()


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
    s = Scorer(model)

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

    rows = s.rows
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_kind[r["kind"]].append(r)
    inside = np.array([r["ood_score"] for r in by_kind["test radiographs"]])
    radiograph_kinds = {"test radiographs", "DICOM radiograph (CR/DX)"}
    outside = [r for r in rows if r["kind"] not in radiograph_kinds]
    out_scores = np.array([r["ood_score"] for r in outside])
    y = np.r_[np.zeros(len(inside)), np.ones(len(out_scores))]
    auc = metrics.roc_auc(y, np.r_[inside, out_scores])
    flags = inside > threshold
    g = np.array([groups.get(r["name"], r["name"]) for r in by_kind["test radiographs"]])
    res = {"model_id": model.model_id, "ood": ood, "threshold": threshold,
           "test_radiographs": int(len(inside)), "false_flags": int(flags.sum()),
           "false_flag_rate": float(flags.mean()),
           "false_flag_rate_ci": group_interval(flags, g) if len(g) else None,
           "not_radiographs": int(len(out_scores)), "roc_auc": auc,
           "flagged_not_radiographs": float(np.mean(out_scores > threshold)),
           "unreadable": dict(s.unreadable), "kinds": {}}
    for kind, rs in sorted(by_kind.items()):
        sc = np.array([r["ood_score"] for r in rs])
        entry = {"n": len(rs), "flagged": float(np.mean(sc > threshold)),
                 "median_score": float(np.median(sc)),
                 "median_probability": float(np.median([r["probability"] for r in rs]))}
        if kind != "test radiographs":
            entry["roc_auc_vs_test"] = metrics.roc_auc(
                np.r_[np.zeros(len(inside)), np.ones(len(sc))], np.r_[inside, sc])
        res["kinds"][kind] = entry
    res["seconds"] = round(time.perf_counter() - started, 1)

    ffr_ci = res["false_flag_rate_ci"] or [float("nan")] * 2
    how = ("out of fold" if ood.get("threshold_from") != "held-out images"
           else f"on {ood['holdout_images']} held-out validation images")
    print(f"OOD flag of model {model.model_id}: fit on {ood['fit_images']} images (left out: "
          f"{ood.get('excluded') or 'none'}), threshold {threshold:.3f} at a "
          f"{ood['false_flag_rate']:.0%} false-flag rate, chosen {how}")
    print(f"  radiograph vs not: ROC-AUC {auc:.4f} ({len(inside)} test radiographs, "
          f"{len(out_scores)} other inputs; goal >= 0.95)")
    print(f"  false flags on test radiographs: {flags.sum()}/{len(inside)} = "
          f"{flags.mean():.2%} [{ffr_ci[0]:.2%}, {ffr_ci[1]:.2%}] (goal <= 2%)")
    print(f"  {'kind':<34} {'n':>5} {'flagged':>8} {'AUC':>7} {'median p':>9}")
    for kind, e in res["kinds"].items():
        auc_k = f"{e['roc_auc_vs_test']:.3f}" if "roc_auc_vs_test" in e else "-"
        print(f"  {kind:<34} {e['n']:>5} {e['flagged']:>8.1%} {auc_k:>7} "
              f"{e['median_probability']:>9.3f}")
    if s.unreadable:
        print(f"  unreadable (not scored, error rows in a run): {dict(s.unreadable)}")
    print(f"  ({res['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps({**res, "rows": rows}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
