"""The training run's data as the export needs it: found where the checkpoint says (or where
the user says it now lies) and proven to be the very data trained on by its fingerprint.

The export reads it for the training-data table (`fxscore.membership`: hashes and near-copy
descriptors of the train and val images) and for calibration on the validation split
(`fxscore.export.calibrate`). The checkpoint records the data root and options of its run
(`config`) and the fingerprint of every file it listed (`data_fingerprint`,
`fxscore.train.data.fingerprint`); the same discovery run again on the same files gives the
same fingerprint, so nothing else is trusted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fxscore.train.data import DataError, discover, fingerprint

from .onnx_export import ExportError


@dataclass(frozen=True)
class RunData:
    root: Path
    rows: list[dict[str, Any]]  # fingerprint rows: file (relative), split, target, bytes, sha256

    def sha256s(self, split: str) -> list[str]:
        return [r["sha256"] for r in self.rows if r["split"] == split]

    def files(self, split: str) -> list[tuple[str, Path, int]]:
        """(relative path, path, target: 1 = positive class) of a split's files."""
        return [(r["file"], self.root / r["file"], int(r["target"])) for r in self.rows
                if r["split"] == split]


def recorded_root(ckpt: dict[str, Any]) -> str | None:
    """The data root the checkpoint's run was given, or None (a checkpoint not made by
    `fxscore train` may name none)."""
    data = (ckpt.get("config") or {}).get("data")
    return data if isinstance(data, str) and data else None


def locate(ckpt: dict[str, Any], root: str | Path | None = None) -> RunData | None:
    """The run's data under `root` (default: the root the checkpoint records), verified.

    None when no root is given and the checkpoint records none. ExportError, naming the
    fixes, when the folder is gone or holds other data than was trained on.
    """
    flag = "--training-data"
    given = root is not None
    root = root if given else recorded_root(ckpt)
    if root is None:
        return None
    config = ckpt.get("config") or {}
    fixes = (f"pass {flag} DIR where the run's data (train/ and val/) lies now, or "
             "--no-training-hashes to export without the training-data table (and without "
             "--calibrate / --threshold-for, which need its val/)")
    where = f"{flag} {root}" if given else f"the checkpoint's training data {root}"
    try:
        layout = discover(root, config.get("positive_class") or ckpt["positive_class"],
                          config.get("limit_per_class"), int(config.get("seed", 0)))
        digest, rows = fingerprint(layout)
    except (DataError, OSError) as e:
        raise ExportError(f"{where}: cannot be read as the run's data ({e}); {fixes}") from e
    if digest != ckpt.get("data_fingerprint"):
        raise ExportError(f"{where}: holds other files than the run was trained on (fingerprint "
                          f"{digest[:12]}, the checkpoint's {str(ckpt.get('data_fingerprint'))[:12]}"
                          f"); {fixes}")
    return RunData(Path(root), rows)


def training_table(run: RunData, *, descriptors: bool = True, threads: int | None = None,
                   ) -> tuple[dict[str, Any], str]:
    """The training-data table of the run's train and val files (`fxscore.membership.encode`):
    every content once; descriptors of those that decode (each content read once)."""
    from fxscore import membership

    table = None
    if descriptors:
        first: dict[str, Path] = {}
        for split in ("train", "val"):
            for r in run.rows:
                if r["split"] == split:
                    first.setdefault(r["sha256"], run.root / r["file"])
        shas = list(first)
        table = dict(zip(shas, membership.describe_files([first[s] for s in shas], threads)))
    return membership.encode(run.sha256s("train"), run.sha256s("val"), table)
