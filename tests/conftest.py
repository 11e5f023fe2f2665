"""Shared fixtures: the real X-rays in ../shared/data, laid out once per session, and tiny models."""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
# Optimised graphs (fxscore.sessioncache) go to a directory of this test session, never the
# user's cache; the subprocesses tests start inherit it.
_CACHE = tempfile.mkdtemp(prefix="fxscore-test-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["FXSCORE_CACHE_DIR"] = _CACHE
SAMPLE_DATA = REPO / "sample_data"
REAL_DATA = Path(os.environ.get("FXSCORE_REAL_DATA",
                                REPO.parent / "shared" / "data" / "fracture-multi-region"))


def require_real_data() -> Path:
    """Skip (or, in CI, fail) when the real X-rays are absent."""
    if not (REAL_DATA / "manifest.csv").exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the real-data tests but {REAL_DATA} is missing")
        pytest.skip(f"real X-rays not found at {REAL_DATA} (set FXSCORE_REAL_DATA)")
    return REAL_DATA


@pytest.fixture(scope="session")
def real_data_root(tmp_path_factory) -> Path:
    """The real data set laid out as train/val/test/<class>/ (hard links, so cheap)."""
    src = require_real_data()
    dest = tmp_path_factory.mktemp("real") / "fracture"
    subprocess.run([sys.executable, str(src / "materialize"), str(dest)], check=True,
                   capture_output=True)
    return dest


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    from onnx_models import make_model
    return make_model(tmp_path / "tiny.onnx")


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "64k") mounted at `folder`: a real ENOSPC for disk-full tests.
    Needs root (or CAP_SYS_ADMIN); skips with the reason where mounting is refused."""
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def has_vnni() -> bool:
    """onnxruntime takes its exact int8 kernels on such CPUs, saturating AVX2 ones elsewhere."""
    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())


def cpu_kind() -> str:
    flags = cpu_flags()
    if "avx512_vnni" in flags:
        return "AVX512-VNNI"
    if "avx_vnni" in flags:
        return "AVX-VNNI"
    if "avx2" in flags:
        return "AVX2, no VNNI"
    return "no AVX2"
