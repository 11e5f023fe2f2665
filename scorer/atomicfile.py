"""Writing a set of files so that each is either its old self or complete, never cut short.

Each file is written to a temporary name in its own folder, fsynced, and only when every one of
them has been written whole are they renamed into place (a rename within a folder is atomic)
and the folders fsynced. A full disk or an I/O error part-way leaves the old files as they were
and no temporary files behind; it never leaves a 0-byte or half-written report.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

TMP_SUFFIX = ".fxscore-tmp"


def write_files(contents: Mapping[str | os.PathLike, str | bytes]) -> list[Path]:
    """Write every path's contents (str as UTF-8) atomically -> the paths, in the given order.

    Raises OSError (with the file name) when any of them cannot be written; then none is
    replaced.
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data in contents.items():
            path = Path(path)
            tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
            temps.append((tmp, path))
            raw = data.encode("utf-8") if isinstance(data, str) else data
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                view = memoryview(raw)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as e:
                e.filename = e.filename or str(path)
                raise
            finally:
                os.close(fd)
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
    for folder in {path.parent for _, path in temps}:
        fsync_dir(folder)
    return [path for _, path in temps]


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make renames in `folder` durable (where the platform and file system allow it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows cannot open a folder; the rename stands as it is
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder
    finally:
        os.close(fd)
