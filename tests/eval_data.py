"""Labelled image folders with known scores, for the eval tests.

Every image is one flat grey level, so the tiny model of `onnx_models.make_model` gives it an
exactly predictable probability: brighter means more "fractured". At threshold 0.5 the cut
lies between grey 114 and 115 (see `CUT`).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

CUT = 115  # grey >= CUT -> probability >= 0.5 with make_model's defaults and ImageNet mean/std

# Two errors each way at threshold 0.5; grey 100 appears in both classes (a tied score).
FRACTURED = [250, 220, 200, 180, 160, 150, 140, 130, 120, 100, 90]
NOT_FRACTURED = [10, 20, 30, 40, 50, 60, 70, 80, 100, 110, 125, 150]


def write_grey(path: Path, grey: int, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), grey, dtype=np.uint8)).save(path)
    return path


def make_folders(root: Path, fractured=FRACTURED, not_fractured=NOT_FRACTURED) -> Path:
    """root/{fractured,not fractured}/..., the second half of each class in a sub-folder."""
    for cls, greys in (("fractured", fractured), ("not fractured", not_fractured)):
        for i, g in enumerate(greys):
            sub = "deeper/" if i >= len(greys) // 2 else ""
            write_grey(root / cls / f"{sub}{cls[:3]}_{i:02d}_g{g}.png", g)
    return root


def make_flat(root: Path, fractured=FRACTURED, not_fractured=NOT_FRACTURED) -> Path:
    """root/images/*.png plus root/labels.csv (path,label); returns the CSV."""
    rows = []
    for cls, greys in (("fractured", fractured), ("not fractured", not_fractured)):
        for i, g in enumerate(greys):
            rel = f"images/{cls[:3]}_{i:02d}_g{g}.png"
            write_grey(root / rel, g)
            rows.append((rel, cls))
    return write_csv(root / "labels.csv", ("path", "label"), rows)


def write_csv(path: Path, header, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def write_truncated(path: Path) -> Path:
    """A PNG cut in half: must be reported as unreadable, never scored."""
    write_grey(path, 128, size=64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def expected_confusion(fractured=FRACTURED, not_fractured=NOT_FRACTURED) -> dict[str, int]:
    return {"tp": sum(g >= CUT for g in fractured), "fn": sum(g < CUT for g in fractured),
            "fp": sum(g >= CUT for g in not_fractured), "tn": sum(g < CUT for g in not_fractured)}
