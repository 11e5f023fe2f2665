"""fxscore.sessioncache: a model's optimised graph is cached per digest, onnxruntime and CPU,
used only for a file that passes the same checks, and scores bit-identically."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fxscore import sessioncache
from fxscore.contract import META_KEY
from fxscore.model import ModelError, load_model
from fxscore.modelfile import read_props

from onnx_models import convnet_proto, make_convnet, make_meta, make_model, write_with_props


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(sessioncache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "ort"


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.ort-graph")) if cache.exists() else []


def contents(entry: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(entry.iterdir())}


def scores(model, seed: int = 0) -> np.ndarray:
    h, w = model.meta.preprocess.input_size
    x = np.random.default_rng(seed).standard_normal((4, 3, h, w)).astype(np.float32)
    return model.predict(x)


@pytest.mark.parametrize("which", ["convnet", "packaged default"])
def test_second_load_uses_the_cached_graph_and_scores_identically(cache, tmp_path,
                                                                  monkeypatch, which):
    path = make_convnet(tmp_path / "m.onnx") if which == "convnet" else None
    cold = load_model(path, threads=1)
    [entry] = entries(cache)
    assert sessioncache.cpu_key() in entry.name
    before, mtime = contents(entry), entry.stat().st_mtime_ns
    # the weights are raw data beside the graph (mapped at load, not parsed out of it)
    assert set(before) == {sessioncache.GRAPH, sessioncache.WEIGHTS, sessioncache.VERIFIED}
    assert len(before[sessioncache.WEIGHTS]) > 5 * len(before[sessioncache.GRAPH])
    assert not list(cache.glob(".*.tmp"))
    warm = load_model(path, threads=1)
    assert entries(cache) == [entry] and contents(entry) == before
    assert entry.stat().st_mtime_ns >= mtime  # marked used
    level = ort.GraphOptimizationLevel
    assert cold.session.get_session_options().graph_optimization_level == level.ORT_ENABLE_ALL
    # built from the entry, already optimised, not from the file
    assert warm.session.get_session_options().graph_optimization_level == level.ORT_DISABLE_ALL
    monkeypatch.setenv(sessioncache.CACHE_ENV, "off")
    fresh = load_model(path, threads=1)
    for seed in range(3):
        assert np.array_equal(scores(cold, seed), scores(warm, seed))
        assert np.array_equal(scores(cold, seed), scores(fresh, seed))
    assert warm.model_id == cold.model_id and warm.integrity == cold.integrity


def test_cache_off_writes_nothing(cache, tmp_path, monkeypatch):
    monkeypatch.setenv(sessioncache.CACHE_ENV, "off")
    load_model(make_convnet(tmp_path / "m.onnx"))
    assert sessioncache.cache_dir() is None and entries(cache) == []


def test_a_damaged_entry_is_replaced_not_used(cache, tmp_path):
    path = make_convnet(tmp_path / "m.onnx")
    expected = scores(load_model(path, threads=1))
    [entry] = entries(cache)
    graph = entry / sessioncache.GRAPH
    graph.write_bytes(b"not an onnx graph")
    model = load_model(path, threads=1)
    assert np.array_equal(scores(model), expected)
    assert graph.read_bytes() != b"not an onnx graph"  # rebuilt from the file and cached again


def test_a_tampered_file_claiming_a_cached_digest_is_refused(cache, tmp_path):
    """The cache is looked up by the digest a file claims; the claim is still checked, so a
    file with other weights and a copied digest fails instead of scoring the cached graph."""
    meta = make_meta()
    good = make_convnet(tmp_path / "good.onnx", meta)
    load_model(good)
    [entry] = entries(cache)
    claimed = {META_KEY: read_props(good.read_bytes())[META_KEY]}  # its digest included
    bad = write_with_props(convnet_proto(meta, seed=1), tmp_path / "bad.onnx", None, claimed)
    with pytest.raises(ModelError, match="do not match the digest"):
        load_model(bad)
    assert entries(cache) == [entry]


def test_a_file_identical_to_the_entrys_is_not_hashed_twice(cache, tmp_path, monkeypatch):
    """The entry records the sha256 of the file that passed the digest check: the same bytes
    again need no digest computed (a second pass over 45 MB); other bytes claiming that digest
    (here: a site's own metadata key added, which the digest does not cover) are checked."""
    import hashlib

    from fxscore import modelfile

    path = make_convnet(tmp_path / "m.onnx")
    cold = load_model(path)
    [entry] = entries(cache)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sessioncache.verified_sha256(entry) == sha
    checked = []
    check = modelfile.check_digest
    monkeypatch.setattr(modelfile, "check_digest", lambda *a: checked.append(1) or check(*a))
    warm = load_model(path)
    assert checked == [] and warm.integrity == cold.integrity and warm.model_id == sha[:12]
    proto = onnx.load(str(path))
    proto.metadata_props.add(key="site.note", value="approved 2025-01")
    onnx.save(proto, str(tmp_path / "noted.onnx"))
    noted = load_model(tmp_path / "noted.onnx")
    assert checked == [1] and noted.verified and noted.integrity == cold.integrity
    assert entries(cache) == [entry] and sessioncache.verified_sha256(entry) == sha


def test_files_without_a_digest_are_not_cached(cache, tmp_path):
    load_model(make_model(tmp_path / "v1.onnx", make_meta(format_version=1), digest=False))
    assert entries(cache) == []


def test_an_unusable_cache_directory_only_costs_the_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory would be")
    monkeypatch.setenv(sessioncache.CACHE_ENV, str(blocker))
    model = load_model(make_convnet(tmp_path / "m.onnx"))
    assert model.verified


def test_least_recently_used_entries_beyond_keep_are_removed(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(sessioncache, "KEEP", 2)
    for seed in range(3):
        load_model(make_convnet(tmp_path / f"m{seed}.onnx", seed=seed))
    assert len(entries(cache)) == 2


def test_an_entry_another_process_committed_first_is_kept(cache, tmp_path):
    path = make_convnet(tmp_path / "m.onnx")
    load_model(path)
    [entry] = entries(cache)
    before = contents(entry)
    tmp = sessioncache.writable_tmp(entry)  # a second process's graph, finished later
    (tmp / sessioncache.GRAPH).write_bytes(b"theirs")
    sessioncache.commit(tmp, entry, "0" * 64)
    assert contents(entry) == before and not tmp.exists()


def test_an_entry_a_cut_short_removal_left_incomplete_is_rebuilt(cache, tmp_path):
    path = make_convnet(tmp_path / "m.onnx")
    load_model(path)
    [entry] = entries(cache)
    (entry / sessioncache.GRAPH).unlink()  # rmtree stopped after the first file
    assert sessioncache.graph_of(entry) is None
    load_model(path)
    assert sessioncache.graph_of(entry) is not None
    level = ort.GraphOptimizationLevel
    warm = load_model(path)
    assert warm.session.get_session_options().graph_optimization_level == level.ORT_DISABLE_ALL


def test_earlier_releases_entries_and_crashed_writers_leftovers_are_removed(cache, tmp_path):
    import os
    import time

    cache.mkdir(parents=True)
    legacy = cache / ("ab" * 16 + "-ort1.0-cpu.ort-graph.onnx")  # a one-file entry
    legacy.write_bytes(b"x" * 1000)
    stale, fresh = cache / ".old.ort-graph.1.aa.tmp", cache / ".new.ort-graph.2.bb.tmp"
    for d in (stale, fresh):
        d.mkdir()
        (d / sessioncache.GRAPH).write_bytes(b"half written")
    hours_ago = time.time() - 2 * sessioncache.STALE_TMP
    os.utime(stale, (hours_ago, hours_ago))
    load_model(make_convnet(tmp_path / "m.onnx"))  # its commit tidies the directory
    assert len(entries(cache)) == 1
    assert not legacy.exists() and not stale.exists()
    assert fresh.exists()  # another process may be writing it now


def test_the_cpu_key_follows_what_the_cpu_reports_to_programs_not_proc_cpuinfo(tmp_path):
    """qemu-user passes the host's /proc/cpuinfo through while its CPUID reports a Haswell; a key
    read from /proc/cpuinfo handed the emulated AVX2 CPU a graph laid out for AVX-512 and scores
    off by 0.3 (caught by tests/test_export_quantize.py). The key must differ there."""
    import shutil
    import subprocess
    import sys

    from conftest import cpu_flags

    if "avx512f" not in cpu_flags():
        pytest.skip("this CPU has no AVX-512: a Haswell's key would match it legitimately")
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-x86_64 not installed (Debian: apt-get install qemu-user)")
    done = subprocess.run([qemu, "-cpu", "Haswell", sys.executable, "-c",
                           "from fxscore.sessioncache import cpu_key; print(cpu_key())"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    emulated = done.stdout.strip()
    assert len(emulated) == 12 and emulated != sessioncache.cpu_key()


def test_an_entry_is_named_for_the_onnxruntime_build_as_well_as_its_version(cache, monkeypatch):
    before = sessioncache.entry_path("sha256:" + "ab" * 32)
    monkeypatch.setattr(ort, "get_build_info", lambda: "ORT Build Info: git-commit-id=0000000")
    after = sessioncache.entry_path("sha256:" + "ab" * 32)
    assert before != after and before.parent == after.parent
    assert f"-ort{ort.__version__}-" in after.name and sessioncache.cpu_key() in after.name
