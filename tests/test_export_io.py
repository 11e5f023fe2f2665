"""Atomic writing (fxscore.export.io): a file appears complete and checked, or not at all."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from fxscore.export.io import publish, staged, write_bytes, write_json


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_staged_then_published_replaces_the_destination(tmp_path):
    dest = tmp_path / "model.onnx"
    dest.write_bytes(b"old")
    with staged(dest) as tmp:
        tmp.write_bytes(b"new model")
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.onnx.")
        assert not tmp.name.endswith(".onnx")  # a leftover never looks like a model
        assert dest.read_bytes() == b"old"  # nothing visible before publish
        publish(tmp, dest)
    assert dest.read_bytes() == b"new model"
    assert listing(tmp_path) == ["model.onnx"]
    assert oct(dest.stat().st_mode & 0o777) == oct(0o644)


@pytest.mark.parametrize("error", [RuntimeError("parity failed"), KeyboardInterrupt()])
def test_failure_before_publish_leaves_old_file_and_no_temporary(tmp_path, error):
    dest = tmp_path / "model.onnx"
    dest.write_bytes(b"old")
    with pytest.raises(type(error)):
        with staged(dest) as tmp:
            tmp.write_bytes(b"half a mod")
            raise error
    assert dest.read_bytes() == b"old"
    assert listing(tmp_path) == ["model.onnx"]


def test_failure_without_an_older_file_leaves_the_folder_empty(tmp_path):
    with pytest.raises(ValueError):
        with staged(tmp_path / "model.onnx") as tmp:
            tmp.write_bytes(b"x")
            raise ValueError
    assert listing(tmp_path) == []


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with staged(tmp_path / "nope" / "model.onnx"):
            pass


def test_write_json_is_strict_json_with_nan_as_null(tmp_path):
    dest = write_json(tmp_path / "r.json", {"auc": float("nan"), "d": [1.0, float("inf")],
                                            "ok": True})
    assert json.loads(dest.read_text()) == {"auc": None, "d": [1.0, None], "ok": True}
    assert listing(tmp_path) == ["r.json"]


def test_write_bytes(tmp_path):
    assert write_bytes(tmp_path / "a.bin", b"abc").read_bytes() == b"abc"


def test_sigkill_mid_write_leaves_no_model_file(tmp_path):
    """Even an unhandled kill cannot produce a half-written model.onnx: only a hidden .partial."""
    script = textwrap.dedent(f"""
        import os, sys, time
        from fxscore.export.io import staged
        with staged({str(tmp_path / 'model.onnx')!r}) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"x" * 1000)
                f.flush()
                print("writing", flush=True)
                time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    names = listing(tmp_path)
    assert "model.onnx" not in names
    assert len(names) == 1 and names[0].startswith(".model.onnx.") and names[0].endswith(".partial")
