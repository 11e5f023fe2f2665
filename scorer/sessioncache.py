"""onnxruntime's optimised graph of a model, kept on disk so that the next start skips optimising.

Building a CPU session for the 45 MB ResNet18 spends about a third of its time optimising the
graph (fusions, and the NCHWc layout that makes the convolutions fast). onnxruntime can save the
graph it optimised and load it later with optimisation off, its documented "offline mode"; such
a graph holds the layout chosen for this CPU (NCHWc blocks are 16 wide with AVX-512, 8 with
AVX2) by this onnxruntime version, so an entry is named by the model's digest, the onnxruntime
version and build, and the instruction sets the CPU reports (CPUID). The scores are
bit-identical either way: it is the graph onnxruntime would build again
(tests/test_sessioncache.py).

Trust: an entry is written only after the file it was built from passed its digest check (or
the packaged model's pin), and read only for a file whose digest (or pin) is the same and that
passes the same check, as the loader does before it returns. Like the installation itself, the
cache directory must be writable only by whoever runs fxscore. An entry that onnxruntime cannot
load is removed and the model is built from its file, as when there is no entry.

FXSCORE_CACHE_DIR chooses the directory (default $XDG_CACHE_HOME/fxscore, else
~/.cache/fxscore); FXSCORE_CACHE_DIR=off turns the cache off. At most KEEP entries are kept
(about 45 MB each for ResNet18 in fp32), the least recently used removed first.
"""
from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

CACHE_ENV = "FXSCORE_CACHE_DIR"
KEEP = 8
_SUFFIX = ".ort-graph.onnx"


def cache_dir() -> Path | None:
    """The directory for optimised graphs, or None when the cache is off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("off", "0", "") else Path(value) / "ort"
    try:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:  # no home directory
        return None
    return Path(base) / "fxscore" / "ort"


def entry_path(digest: str) -> Path | None:
    """Where the optimised graph of the model with this digest (or pinned sha256) lives on this
    CPU with this onnxruntime; None when the cache is off."""
    import onnxruntime

    where, cpu = cache_dir(), cpu_key()
    if where is None or cpu is None:
        return None
    # The version names the release; the build (its commit and options) names the binary:
    # a package built from another commit under the same version may optimise differently.
    build = hashlib.sha256(onnxruntime.get_build_info().encode()).hexdigest()[:8]
    name = digest.split(":", 1)[-1][:32]
    return where / f"{name}-ort{onnxruntime.__version__}-{build}-{cpu}{_SUFFIX}"


def cpu_key() -> str | None:
    """12 hex digits naming this CPU's architecture and the instruction sets it reports, or None
    (no cache) where they cannot be read.

    The features come from CPUID, as onnxruntime's own kernel choice does (numpy's dispatcher
    reads them the same way), not from /proc/cpuinfo: an emulator or a CPU-masking hypervisor
    can report the host's flags there while CPUID, and so onnxruntime, sees a smaller CPU. Under
    `qemu-x86_64 -cpu Haswell` on an AVX-512 host, a graph laid out for 16-wide blocks and run
    with 8-wide kernels gave probabilities off by 0.3.
    """
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return None
    have = " ".join(sorted(name for name, on in features.items() if on))
    return hashlib.sha256(f"{platform.machine()}|{have}".encode()).hexdigest()[:12]


def writable_tmp(entry: Path) -> Path | None:
    """A temporary file beside `entry` for onnxruntime to write the graph to, or None when the
    directory cannot be made or written (the model then loads as without a cache)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(entry.parent, os.W_OK | os.X_OK):
        return None
    return entry.with_name(f".{entry.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def commit(tmp: Path, entry: Path) -> None:
    """Make the graph written to `tmp` the entry (atomically), and drop the least recently used
    entries beyond KEEP. A failure leaves the cache as it was: it is only a cache."""
    try:
        os.replace(tmp, entry)
        entries = sorted(entry.parent.glob(f"*{_SUFFIX}"), key=_last_used, reverse=True)
        for old in entries[KEEP:]:
            old.unlink(missing_ok=True)
    except OSError:
        discard(tmp)


def used(entry: Path) -> None:
    """Mark an entry as just used (its mtime), for the KEEP rule."""
    try:
        os.utime(entry)
    except OSError:
        pass


def discard(path: Path | None) -> None:
    if path is not None:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _last_used(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
