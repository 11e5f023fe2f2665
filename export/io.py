"""Atomic file writing: a result appears at its final path complete and checked, or not at all.

Every file is first written to a hidden temporary beside its destination (same directory, so
`os.replace` is an atomic rename on the same file system) and only renamed into place once the
caller has checked it. An exception, Ctrl-C or a failed check deletes the temporary. Even a
SIGKILL cannot leave a half-written `model.onnx`: the temporary is named `.model.onnx.<random>.partial`.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

PARTIAL = ".partial"


@contextmanager
def staged(dest: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary path beside `dest`, deleted on exit unless `publish` moved it into place."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"{dest}: the folder {dest.parent} does not exist; create it "
                                "first or choose another --out")
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=PARTIAL, dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def publish(tmp: Path, dest: str | os.PathLike) -> Path:
    """Flush `tmp` to disk and rename it onto `dest` in one step (replacing any older file)."""
    dest = Path(dest)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    # mkstemp creates 0600; a model is meant to be read by the scoring service's account too.
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)
    return dest


def write_bytes(dest: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `dest` atomically."""
    with staged(dest) as tmp:
        tmp.write_bytes(data)
        return publish(tmp, dest)


def write_json(dest: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON to `dest` atomically (NaN and infinities are written as null)."""
    text = json.dumps(finite_or_none(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
    return write_bytes(dest, text.encode("utf-8"))


def finite_or_none(obj: Any) -> Any:
    # JSON has no NaN; an AUC on a one-class set is NaN and must still make a valid document.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def _fsync_dir(folder: Path) -> None:
    # The rename itself lives in the directory; without this a power cut can undo it.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
