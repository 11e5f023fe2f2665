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
passes the same check, as the loader does before it returns. The entry records that file's
sha256 (VERIFIED): a file with the same sha256 is byte for byte the file that passed, so the
loader skips computing its digest again (half the hashing of a cached start); any other file
claiming the digest is checked in full. Like the installation itself, the
cache directory must be writable only by whoever runs fxscore. An entry that onnxruntime cannot
load is removed and the model is built from its file, as when there is no entry.

An entry is a directory holding the graph (GRAPH) and, beside it, its weights (WEIGHTS) as raw
external data, which onnxruntime maps into memory instead of parsing them out of the graph's
protobuf: a cached ResNet18 session builds in about 6 ms instead of 70 (AMD EPYC Zen 4), and
processes scoring on one machine share those pages. The directory is made under a temporary
name and renamed into place whole, so an entry is complete or absent; entries are never
changed in place (a file mapped into memory must not shrink under the process reading it), only
replaced or removed, so keep the cache on a local disk, as the default is.

FXSCORE_CACHE_DIR chooses the directory (default $XDG_CACHE_HOME/fxscore, else
~/.cache/fxscore); FXSCORE_CACHE_DIR=off turns the cache off. At most KEEP entries are kept
(about 45 MB each for ResNet18 in fp32), the least recently used removed first.
"""
from __future__ import annotations

import hashlib
import os
import platform
import time
from pathlib import Path
from typing import Any

CACHE_ENV = "FXSCORE_CACHE_DIR"
KEEP = 8
GRAPH, WEIGHTS = "graph.onnx", "weights.bin"  # an entry's graph and its weights
VERIFIED = "verified.sha256"  # the sha256 of the model file it was made from, once verified
_SUFFIX = ".ort-graph"  # an entry directory's name ends so
_LEGACY = ".ort-graph.onnx"  # the one-file entries of earlier releases: removed when seen
STALE_TMP = 3600.0  # seconds after which a temporary entry is a crashed writer's leftover


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


def graph_of(entry: Path) -> Path | None:
    """The graph file of a complete entry, or None when there is none."""
    graph = entry / GRAPH
    return graph if graph.is_file() else None


def writable_tmp(entry: Path) -> Path | None:
    """A new temporary directory beside `entry` for onnxruntime to write the graph into, or None
    when it cannot be made (the model then loads as without a cache)."""
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError:
        return None
    return tmp


def save_into(options: Any, tmp: Path) -> None:
    """Have the session these onnxruntime SessionOptions build save its optimised graph in
    `tmp`, with the weights in a file of their own (the entry layout above)."""
    options.optimized_model_filepath = str(tmp / GRAPH)
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", WEIGHTS)
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024")


def verified_sha256(entry: Path) -> str | None:
    """The sha256 (hex) of the model file this entry was made from, recorded once that file
    passed the loader's checks; None for an entry without one."""
    try:
        value = (entry / VERIFIED).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else None


def commit(tmp: Path, entry: Path, sha256: str) -> None:
    """Make the graph written into `tmp` the entry (one rename), recording `sha256`, that of
    the model file it was made from, which the caller has verified; then drop the least
    recently used entries beyond KEEP, earlier releases' entries and stale temporary ones. A
    failure (another process committed the same entry first, say) leaves the cache as it was."""
    try:
        (tmp / VERIFIED).write_text(sha256 + "\n", encoding="ascii")
        if entry.exists() and graph_of(entry) is None:
            discard(entry)  # what a removal cut short left: it would block every commit
        os.replace(tmp, entry)  # fails if `entry` is there already: theirs is as good
    except OSError:
        discard(tmp)
        return
    try:
        where = entry.parent
        entries = sorted(where.glob(f"*{_SUFFIX}"), key=_last_used, reverse=True)
        now = time.time()
        for old in [*entries[KEEP:], *where.glob(f"*{_LEGACY}"),
                    *(p for p in where.glob(".*.tmp") if now - _last_used(p) > STALE_TMP)]:
            discard(old)
    except OSError:
        pass


def used(entry: Path) -> None:
    """Mark an entry as just used (its mtime), for the KEEP rule."""
    try:
        os.utime(entry)
    except OSError:
        pass


def discard(path: Path | None) -> None:
    """Remove an entry, a temporary one or a legacy file, if it is there; never raises."""
    if path is None:
        return
    try:
        if path.is_dir():
            import shutil

            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _last_used(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
