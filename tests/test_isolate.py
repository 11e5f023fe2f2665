"""fxscore.isolate: a decoder that crashes or hangs costs that call only; the pool carries on.

The stand-in decoders live in this module, so the worker processes import them from here.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time

import numpy as np
import pytest

from fxscore.images import ImageReadError
from fxscore.isolate import Isolated, IsolationError, needs_isolation


def square(x):
    return np.full((2, 2), x, dtype=np.float32)


def behave(kind: str, x: int = 0):
    """A stand-in decoder: returns, raises, aborts, segfaults, hangs or prints, on request."""
    if kind == "ok":
        return np.full((3, 4), x, dtype=np.float32)
    if kind == "raise":
        raise ImageReadError(f"file{x}: cannot decode image (bad marker)")
    if kind == "abort":
        os.abort()
    if kind == "segfault":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if kind == "hang":
        time.sleep(10_000)
    if kind == "exit":
        os._exit(7)
    if kind == "unpicklable":
        raise _Unpicklable()
    if kind == "pid":
        return os.getpid()
    if kind == "stderr":
        os.write(2, b"native decoder noise\n")
        return "printed"
    raise AssertionError(kind)


class _Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("cannot pickle this")


@pytest.fixture
def pool():
    p = Isolated(behave, workers=2, timeout=2.0)
    yield p
    p.close()


def test_results_and_exceptions_cross_the_process_boundary(pool):
    out = pool.call("ok", 5, name="a.dcm")
    assert out.shape == (3, 4) and out.dtype == np.float32 and float(out[0, 0]) == 5.0
    with pytest.raises(ImageReadError, match="file3: cannot decode image") as e:
        pool.call("raise", 3, name="b.dcm")
    assert not isinstance(e.value, IsolationError)  # the decoder's own error, not a crash
    assert pool.call("pid") != os.getpid()  # it really ran in another process


@pytest.mark.parametrize("kind, signal_name", [("abort", "SIGABRT"), ("segfault", "SIGSEGV"),
                                               ("exit", "exit status 7")])
def test_a_crash_costs_one_call_and_the_worker_is_replaced(kind, signal_name):
    with Isolated(behave, workers=1, timeout=5.0) as pool:
        before = pool.call("pid")
        with pytest.raises(IsolationError, match=f"^bad.dcm: the decoder crashed.*{signal_name}"):
            pool.call(kind, name="bad.dcm")
        assert pool.replaced == 1
        after = pool.call("pid")  # the pool still works, on a fresh process
        assert after != before
        assert float(pool.call("ok", 4)[0, 0]) == 4.0
        assert [p.pid for p in pool.processes] == [after]


def test_a_hang_is_stopped_at_the_time_limit(pool):
    start = time.monotonic()
    with pytest.raises(IsolationError, match=r"^slow.dcm: decoding took longer than 2 s"):
        pool.call("hang", name="slow.dcm")
    assert time.monotonic() - start > 1.9  # not before its limit; `pool.call` returning at all
    # shows it was stopped (a hang without the limit would never return)
    assert float(pool.call("ok", 1)[0, 0]) == 1.0
    assert len(pool.processes) <= 2  # the hung process is gone, not left running


def test_other_calls_in_flight_are_undisturbed_by_a_crash():
    with Isolated(behave, workers=3, timeout=1.0) as pool:
        kinds = ["ok", "segfault", "ok", "hang", "ok", "abort", "ok", "ok", "raise", "ok"]
        results: dict[int, object] = {}

        def run(i: int, kind: str) -> None:
            try:
                results[i] = pool.call(kind, i, name=f"f{i}")
            except Exception as e:  # noqa: BLE001
                results[i] = e

        threads = [threading.Thread(target=run, args=(i, k)) for i, k in enumerate(kinds)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for i, kind in enumerate(kinds):
            got = results[i]
            if kind == "ok":
                assert isinstance(got, np.ndarray) and float(got[0, 0]) == i, (i, got)
            elif kind == "raise":
                assert type(got) is ImageReadError
            else:
                assert isinstance(got, IsolationError) and str(got).startswith(f"f{i}:"), got
        assert pool.replaced == 3


def test_workers_start_lazily_and_close_stops_them():
    pool = Isolated(square, workers=2)
    assert pool.processes == []  # nothing started before the first call
    assert float(pool.call(2.0)[1, 1]) == 2.0
    procs = pool.processes
    assert len(procs) == 1
    pool.close()
    assert not any(p.is_alive() for p in procs)
    with pytest.raises(RuntimeError, match="after close"):
        pool.call(1.0)


def test_an_unpicklable_exception_still_comes_back_as_an_error(pool):
    with pytest.raises(RuntimeError, match="while returning the result"):
        pool.call("unpicklable")
    assert pool.call("ok", 1) is not None


def test_native_stderr_of_workers_is_silenced(capfd):
    with Isolated(behave, workers=1, quiet=True) as pool:
        assert pool.call("stderr") == "printed"
    assert "native decoder noise" not in capfd.readouterr().err


@pytest.mark.parametrize("bad", [{"workers": 0}, {"timeout": 0}, {"timeout": -1}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        Isolated(square, **bad)


def test_needs_isolation_only_for_encapsulated_pixel_data():
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom import uid

    def with_ts(ts):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
        return ds

    assert needs_isolation(with_ts(uid.JPEGLossless))
    assert needs_isolation(with_ts(uid.JPEG2000))
    assert needs_isolation(with_ts(uid.RLELossless))
    assert not needs_isolation(with_ts(uid.ExplicitVRLittleEndian))
    assert not needs_isolation(with_ts(uid.DeflatedExplicitVRLittleEndian))
    assert not needs_isolation(Dataset())


def test_decode_preprocessed_in_a_worker_equals_decoding_in_process():
    """The function the scoring loop runs isolated: real compressed DICOM, same model input."""
    from pydicom.data import get_testdata_file

    from fxscore.contract import Preprocess
    from fxscore.isolate import decode_preprocessed
    from fxscore.scorable import read_header

    params = Preprocess(input_size=(32, 32))
    with Isolated(decode_preprocessed, workers=1, timeout=30) as pool:
        for name in ("MR_small_jpeg_ls_lossless.dcm", "JPGExtended.dcm", "MR_small_RLE.dcm"):
            data = open(get_testdata_file(name), "rb").read()
            assert needs_isolation(read_header(data, name=name))
            isolated = pool.call(data, name, params, name=name)
            assert np.array_equal(isolated, decode_preprocessed(data, name, params))
            assert isolated.shape == (3, 32, 32)
        with pytest.raises(ImageReadError, match="^broken.dcm: "):
            pool.call(data[:len(data) // 2], "broken.dcm", params, name="broken.dcm")
