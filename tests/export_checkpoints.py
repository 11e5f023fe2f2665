"""Training checkpoints in the `fxscore train` format, and real-image slices, for the export tests.

`write_checkpoint` saves what the train helper's checkpoints hold (see the shared checkpoint
format) around a randomly initialised fxscore ResNet18, so the export tests need no training
run; the end-to-end test in test_export_cli.py uses the real `fxscore train`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from fxscore.contract import Preprocess
from fxscore.train.model import build_model

CLASSES = ["fractured", "not fractured"]


def write_checkpoint(path: Path, *, input_size: int = 64, seed: int = 0,
                     data: Path | None = None) -> Path:
    """data: the DATA folder (train/, val/) the checkpoint says it was trained on, recorded as
    `fxscore train` records it (config data, fingerprint); without it the checkpoint names none."""
    torch.manual_seed(seed)
    net = build_model("none")
    metrics = {"train_loss": 0.69, "val_loss": 0.68, "val_accuracy": 0.55, "val_auc": 0.6}
    config = {"image_size": input_size, "lr": 1e-3, "seed": seed}
    fingerprint = "0" * 64
    if data is not None:
        from fxscore.train.data import discover, fingerprint as data_fingerprint

        config.update(data=str(data), positive_class="fractured")
        fingerprint = data_fingerprint(discover(data, "fractured"))[0]
    ckpt = {"model": net.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 4,
            "best_epoch": 3, "config": config,
            "class_names": list(CLASSES), "positive_class": "fractured",
            "preprocess": Preprocess(input_size=(input_size, input_size)).to_dict(),
            "metrics": {**metrics, "val_auc": float("nan")}, "best_metrics": metrics,
            "data_fingerprint": fingerprint,
            "versions": {"torch": str(torch.__version__), "fxscore": "0.1.0"}}
    torch.save(ckpt, path)
    return path


def link_slice(src_root: Path, dest: Path, per_class: int, split: str = "val") -> Path:
    """dest/<class>/: hard links to the first `per_class` files of src_root/<split>/<class>/.

    Hard links, not symlinks: fxscore does not follow links that leave the input folder
    (unless --follow-links), and nothing here writes to the linked files.
    """
    for cls in CLASSES:
        out = dest / cls
        out.mkdir(parents=True, exist_ok=True)
        files = sorted(p for p in (src_root / split / cls).iterdir() if p.is_file())
        for f in files[:per_class]:
            try:
                os.link(f.resolve(), out / f.name)
            except OSError:  # another file system: a copy
                shutil.copy2(f.resolve(), out / f.name)
    return dest


_SHARED: dict[str, tuple[Path, Path]] = {}


def export_once(tmp_path_factory) -> tuple[Path, Path]:
    """(best.pt, model.onnx): one random-init checkpoint (64 px) exported once per session.

    Memoised here, so torch's exporter (several seconds) runs once for all test modules.
    """
    if "files" not in _SHARED:
        from fxscore.export.onnx_export import build_meta, load_checkpoint, to_onnx

        folder = tmp_path_factory.mktemp("exported")
        ckpt_path = write_checkpoint(folder / "best.pt", input_size=64)
        model, ckpt = load_checkpoint(ckpt_path)
        onnx_path = folder / "model.onnx"
        onnx_path.write_bytes(to_onnx(model, build_meta(ckpt)).SerializeToString())
        _SHARED["files"] = (ckpt_path, onnx_path)
    return _SHARED["files"]


@pytest.fixture(scope="session")
def exported_files(tmp_path_factory) -> tuple[Path, Path]:
    """`export_once` as a fixture (test modules import it; pytest runs it once per module)."""
    return export_once(tmp_path_factory)
