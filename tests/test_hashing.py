"""fxscore.hashing: the sha256 every module names contents with."""
from __future__ import annotations

import hashlib

from fxscore.hashing import sha256_bytes, sha256_file


def test_sha256_file_streams_in_chunks(tmp_path):
    data = bytes(range(256)) * 5000  # 1.28 MB: several chunks, the last one partial
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert sha256_file(p) == sha256_file(p, chunk=4096) == sha256_file(str(p), chunk=7) == want


def test_sha256_bytes(tmp_path):
    assert sha256_bytes(b"") == hashlib.sha256(b"").hexdigest()
    assert sha256_bytes(memoryview(b"abc")) == hashlib.sha256(b"abc").hexdigest()


def test_fingerprint_reexports_the_same_function():
    from fxscore import fingerprint

    assert fingerprint.sha256_file is sha256_file
