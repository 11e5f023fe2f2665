"""Are fxscore's heatmaps faithful? A deletion test on real fractured X-rays.

For each fractured radiograph of the leak-free test split, the model's input is perturbed in
two ways and scored again:

- CAM: the 10% of input pixels where the class activation map is hottest are replaced by a
  heavily blurred copy of the image (Gaussian, sigma = 1/8 of the input side): the local
  detail (a fracture line) goes, the brightness stays, so the model sees no black hole;
- random: the same area, as random blobs of the same kind (a random map of the CAM's cells,
  upsampled the same way, its top 10%), blurred the same way; several draws per image.

A heatmap that tracks the model's evidence lowers the probability more under CAM masking than
under random masking. Reported: the mean drop in probability of each, the paired difference,
with 95% bootstrap intervals that resample whole near-duplicate groups of the split manifest
(the data set holds rotated and cropped copies), and the same for the images the model
labels fractured. Colour images (annotated figures, not radiographs) are left out.

    python benchmarks/bench_cam.py --data /tmp/fxscore-default/clean      # ~2 min on 2 cores
    python benchmarks/bench_cam.py --data CLEAN --model model.onnx --json cam.json
    python benchmarks/bench_cam.py --cost      # time the model with / without heatmap outputs

--data is an `fxscore split` output (CLEAN/test/fractured, CLEAN/manifest.csv), e.g. the one
scripts/make_default_model.sh makes. The model defaults to the packaged default model with
heatmap outputs added (`fxscore augment`, in a temporary file); it must not have been trained
on CLEAN/test.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fxscore.cam import cam_cells, map_to_image, upsample
from fxscore.files import find_images
from fxscore.graph_outputs import FEATURE_MAP, PROBABILITY
from fxscore.images import ImageReadError, image_info, read_image
from fxscore.model import load_model, packaged_model
from fxscore.preprocess import content_box, preprocess, resize


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding (numpy only)."""
    radius = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    out = np.pad(img, radius, mode="edge")
    out = np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), 1, out)
    return np.apply_along_axis(lambda c: np.convolve(c, k, mode="valid"), 0, out)


def top_mask(heat: np.ndarray, fraction: float) -> np.ndarray:
    """The `fraction` of pixels with the highest values (ties broken by position)."""
    k = int(round(fraction * heat.size))
    order = np.argsort(-heat.ravel(), kind="stable")
    mask = np.zeros(heat.size, bool)
    mask[order[:k]] = True
    return mask.reshape(heat.shape)


def group_bootstrap(values: np.ndarray, groups: np.ndarray, n: int = 2000,
                    seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of `values`, resampling whole groups."""
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(uniq))
    counts = np.bincount(inverse, minlength=len(uniq))
    means = []
    for _ in range(n):
        w = np.bincount(rng.integers(0, len(uniq), len(uniq)), minlength=len(uniq))
        means.append((w @ sums) / max(1, w @ counts))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def groups_of(clean: Path) -> dict[str, str]:
    from fxscore.split import read_manifest

    manifest = clean / "manifest.csv"
    if not manifest.is_file():
        return {}
    return {row["path"]: row["group"] for row in read_manifest(manifest)}


def explain_model(path: str | None, tmp: Path):
    if path is None:
        from fxscore.explain_graph import augment_file

        packaged, _ = packaged_model()
        path = str(tmp / "default.explain.onnx")
        augment_file(str(packaged), path)
    model = load_model(path)
    if FEATURE_MAP not in model.meta.outputs:
        sys.exit(f"{path} has no heatmap outputs; run `fxscore augment {path} --out NEW.onnx`")
    return model


def cost(repeats: int = 7, batch: int = 32) -> dict:
    """Seconds per batch of the packaged model as shipped, with heatmap outputs (fetching only
    the probability, as a run without --heatmaps does), and fetching the feature map too;
    interleaved so that load from other processes hits all three alike; the median."""
    from fxscore.explain_graph import augment_file

    packaged, _ = packaged_model()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "explain.onnx"
        augment_file(str(packaged), path)
        plain, aug = load_model(str(packaged), threads=1), load_model(path, threads=1)
    h, w = plain.meta.preprocess.input_size
    x = np.random.default_rng(0).standard_normal((batch, 3, h, w)).astype(np.float32)
    runs = {"shipped": lambda: plain.predict(x), "augmented, probability only":
            lambda: aug.predict(x), "augmented, + feature map":
            lambda: aug.predict_with(x, (PROBABILITY, FEATURE_MAP))}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for f in runs.values():
        f()  # warm up
    for _ in range(repeats):
        for k, f in runs.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="an `fxscore split` output")
    ap.add_argument("--model", default=None, help="[default: the packaged model, augmented]")
    ap.add_argument("--fraction", type=float, default=0.10)
    ap.add_argument("--random-draws", type=int, default=5)
    ap.add_argument("--limit", type=int, default=None, help="at most this many images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here too")
    ap.add_argument("--cost", action="store_true",
                    help="only time the packaged model with and without heatmap outputs")
    args = ap.parse_args()
    if args.cost:
        for k, v in cost().items():
            print(f"  {k:<30} {v * 1000:8.1f} ms per batch of 32 (1 thread, median of 7)")
        return 0

    if args.data is None:
        ap.error("--data is required (an `fxscore split` output)")
    started = time.perf_counter()
    folder = args.data / "test" / "fractured"
    files = [p for _, p in find_images(folder)]
    if not files:
        sys.exit(f"no images under {folder}")
    groups = groups_of(args.data)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = explain_model(args.model, Path(tmp))
        params = model.meta.preprocess
        h, w = params.input_size
        sigma = max(h, w) / 8
        weights = np.asarray(model.meta.cam["weights"])
        cells_shape = tuple(model.meta.cam.get("cells") or (h // 32, w // 32))
        records, colour, unreadable = [], 0, 0
        for f in files[:args.limit]:
            data = f.read_bytes()
            try:
                if image_info(io.BytesIO(data), decode=True, name=str(f)).get("has_colour"):
                    colour += 1
                    continue
                image = read_image(io.BytesIO(data), name=str(f), min_size=params.input_size)
            except ImageReadError:
                unreadable += 1
                continue
            # Masks cover the image as the network sees it: for a padding model, the box the
            # image fills in the input (masking a black border would flatter the random masks).
            top, left, bh, bw = content_box(image.shape, params)
            small = resize(image, (bh, bw), params.resize)  # what preprocess feeds the network
            blurred = gaussian_blur(small, sigma).astype(np.float32)
            canvas = np.zeros((h, w), dtype=np.float32)

            def network_input(view: np.ndarray) -> np.ndarray:
                canvas[top:top + bh, left:left + bw] = view
                return preprocess(canvas, params)

            out = model.predict_with(network_input(small)[None], (PROBABILITY, FEATURE_MAP))
            # Ranked by the raw map (negative cells too), upsampled like the overlay.
            cells = cam_cells(out[FEATURE_MAP][0], weights).astype(np.float32)
            heat = map_to_image(cells, (bh, bw), params)
            masks = [top_mask(heat + 1e-9 * rng.random(heat.shape), args.fraction)]
            for _ in range(args.random_draws):
                random_cells = rng.random(cells_shape)
                masks.append(top_mask(upsample(random_cells, (bh, bw), params), args.fraction))
            batch = np.stack([network_input(np.where(m, blurred, small)) for m in masks])
            p = model.predict(batch)
            p0 = float(out[PROBABILITY][0])
            rel = f.relative_to(args.data).as_posix()
            records.append({"path": rel, "group": groups.get(rel, rel), "p": p0,
                            "cam_drop": p0 - float(p[0]),
                            "random_drop": float(np.mean(p0 - p[1:]))})
    if not records:
        sys.exit("no readable grey images")
    res: dict = {"model": str(args.model or "packaged default model (augmented)"),
                 "model_id": model.model_id, "images": len(records),
                 "left_out_colour": colour, "unreadable": unreadable,
                 "fraction": args.fraction, "blur_sigma_px": sigma,
                 "random_draws": args.random_draws, "input_size": [h, w],
                 "cells": list(cells_shape)}
    for subset, keep in (("all", lambda r: True),
                         ("labelled_fractured", lambda r: r["p"] >= model.meta.threshold)):
        rows = [r for r in records if keep(r)]
        if not rows:
            continue
        g = np.array([r["group"] for r in rows])
        cam = np.array([r["cam_drop"] for r in rows])
        rnd = np.array([r["random_drop"] for r in rows])
        res[subset] = {
            "images": len(rows), "groups": int(len(set(g.tolist()))),
            "cam_drop": float(cam.mean()), "cam_drop_ci": group_bootstrap(cam, g),
            "random_drop": float(rnd.mean()), "random_drop_ci": group_bootstrap(rnd, g),
            "difference": float((cam - rnd).mean()),
            "difference_ci": group_bootstrap(cam - rnd, g),
            "cam_beats_random": float(np.mean(cam > rnd))}
    res["seconds"] = round(time.perf_counter() - started, 1)

    print(f"deletion test: {res['images']} fractured radiographs of {folder} "
          f"({colour} colour images left out), model {res['model_id']}, input {h} x {w}, "
          f"CAM {cells_shape[0]} x {cells_shape[1]} cells; top {args.fraction:.0%} of pixels "
          f"replaced by a blur (sigma {sigma:g} px); random: {args.random_draws} draws")
    for subset in ("all", "labelled_fractured"):
        if subset not in res:
            continue
        s = res[subset]
        print(f"  {subset:<19} n={s['images']:<4} groups={s['groups']:<4} "
              f"drop CAM {s['cam_drop']:.3f} [{s['cam_drop_ci'][0]:.3f}, {s['cam_drop_ci'][1]:.3f}]"
              f"  random {s['random_drop']:.3f} [{s['random_drop_ci'][0]:.3f}, "
              f"{s['random_drop_ci'][1]:.3f}]  difference {s['difference']:.3f} "
              f"[{s['difference_ci'][0]:.3f}, {s['difference_ci'][1]:.3f}]  CAM > random for "
              f"{s['cam_beats_random']:.0%}")
    print(f"  ({res['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps({**res, "per_image": records}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
