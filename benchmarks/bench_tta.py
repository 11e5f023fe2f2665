"""Would horizontal-flip test-time augmentation help the model? Measured, not shipped on faith.

Each labelled image is read exactly as `fxscore run` reads it (`scoring.model_input`), scored
as it is and mirrored left-right, and the two probabilities are averaged (what a flip inside the
graph would compute). Printed per folder: ROC-AUC plain and with the flip, and the grouped
bootstrap interval of the difference when the folder is a split with a manifest. Decide on the
validation split; the test split only confirms.

    python benchmarks/bench_tta.py --model model.onnx CLEAN/val CLEAN/test
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fxscore import metrics
from fxscore.evaluate import items_from_folders
from fxscore.images import ImageReadError
from fxscore.model import load_model
from fxscore.scoring import model_input
from fxscore.split import read_manifest

BATCH = 32


def scores(model, files: list[Path]) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    plain, flipped, kept, batch = [], [], [], []

    def flush() -> None:
        x = np.stack(batch)
        plain.append(model.predict(x))
        flipped.append(model.predict(np.ascontiguousarray(x[:, :, :, ::-1])))
        batch.clear()

    for f in files:
        try:
            batch.append(model_input(f, model.meta.preprocess))
            kept.append(f)
        except ImageReadError:
            continue
        if len(batch) == BATCH:
            flush()
    if batch:
        flush()
    return np.concatenate(plain), np.concatenate(flipped), kept


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", type=Path, nargs="+", help="labelled folders: DIR/<class>/...")
    ap.add_argument("--model", help="fxscore ONNX model [the packaged default]")
    args = ap.parse_args()
    model = load_model(args.model)
    positive = model.meta.positive_class
    for folder in args.folders:
        items = items_from_folders(folder, model.meta.class_names)  # as `fxscore eval` reads
        label = {i.file: i.true_label for i in items}
        p, q, kept = scores(model, [i.file for i in items])
        y = np.array([label[f] == positive for f in kept], dtype=int)
        tta = (p + q) / 2
        line = (f"{folder}: {len(kept)} images, ROC-AUC plain {metrics.roc_auc(y, p):.4f}, "
                f"with flip {metrics.roc_auc(y, tta):.4f}")
        manifest = folder.parent / "manifest.csv"
        if manifest.is_file():
            group = {r["path"]: r["group"] for r in read_manifest(manifest)}
            g = np.array([group.get(f.relative_to(folder.parent).as_posix(), str(f))
                          for f in kept])
            d = metrics.paired_auc_difference(y, p, tta, groups=g, seed=0)
            line += f"; difference {d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
