"""sha256 of files and bytes: the one definition every fxscore module hashes with.

Kept apart from `fxscore.fingerprint` (near-duplicate search, which needs scipy) so that the
scoring path imports nothing heavier than hashlib to name a file's contents.
"""
from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (streamed, so DICOM volumes do not fill memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """Hex sha256 of bytes already in memory."""
    return hashlib.sha256(data).hexdigest()
