"""Run a decoder where a crash or a hang costs one file, not the night's job.

Compressed DICOM pixel data is decoded by C libraries (GDCM, OpenJPEG, CharLS, libjpeg) that
can crash the process (a segfault, an abort) or spin for ever on malformed data; no `except`
catches either. `Isolated` runs a function in a few worker processes, one call at a time per
worker, with a time limit per call:

- the call returns what the function returned, or raises what it raised (ImageReadError, ...);
- a worker that dies (any signal, any exit) or overruns the time limit is killed and replaced
  by a fresh one, and that call raises `IsolationError` (a subclass of ImageReadError, so the
  scoring loop turns it into that file's error row like any unreadable file);
- the other calls, in other workers, are not disturbed.

Workers are started lazily (a run without compressed DICOM starts none) with the
"forkserver" method where it exists, else "spawn": never plain fork, which would copy
onnxruntime's threads and locks into the child. Callers may be many threads: each call takes
a free worker, so at most `workers` decodes run at once and the rest wait their turn.

`decode_preprocessed` is the function the scoring loop runs this way: read_image on the file's
bytes, then the model's preprocessing, so only the small model input crosses the pipe back.
"""
from __future__ import annotations

import os
import queue
import signal
import threading
from typing import TYPE_CHECKING, Any, Callable

from .images import ImageReadError

if TYPE_CHECKING:
    import multiprocessing.process

DEFAULT_TIMEOUT = 60.0  # seconds per file; a 9000 x 9000 JPEG 2000 decodes in a few seconds
START_TIMEOUT = 120.0  # seconds for a new worker to import its modules (not counted per file)


class IsolationError(ImageReadError):
    """The decoder process crashed or overran its time limit on this file."""


class _Worker:
    def __init__(self, ctx, fn: Callable, quiet: bool) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_serve, args=(child, fn, quiet), daemon=True,
                                   name="fxscore-decoder")
        self.process.start()
        child.close()  # the parent keeps one end only, so a dead child reads as EOF
        # Start-up (imports) is not part of any file's time limit: wait for "ready" first.
        ready = False
        try:
            ready = self.conn.poll(START_TIMEOUT) and self.conn.recv() == "ready"
        except (EOFError, OSError):
            pass
        if not ready:
            code = self.kill(wait=1.0)
            raise RuntimeError(f"a decoder worker process did not start ({_describe_exit(code)})")

    def kill(self, wait: float = 0.0) -> int | None:
        """Stop the process now and reap it. Returns its exit code if it ended by itself
        (negative: the signal), waiting up to `wait` seconds for that; None if killed here."""
        if wait:
            self.process.join(wait)
        code = self.process.exitcode
        if code is None:
            self.process.kill()
            self.process.join(5)
        try:
            self.conn.close()
        except OSError:
            pass
        return code

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(2)
        self.kill()


class Isolated:
    """`fn(*args)` in worker processes, with a time limit per call. See the module docstring.

    fn must be picklable (a module-level function, or functools.partial of one), and so must
    its arguments, results and exceptions. quiet: send the workers' native stderr (GDCM and
    OpenJPEG print diagnostics there) to /dev/null.
    """

    def __init__(self, fn: Callable, *, workers: int = 1, timeout: float = DEFAULT_TIMEOUT,
                 start_method: str | None = None, quiet: bool = True) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self._method, self._ctx = start_method, None  # the context: at the first start
        self._fn, self.timeout, self._quiet = fn, float(timeout), quiet
        self._free: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(workers):
            self._free.put(None)  # a slot; its process starts on first use
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.replaced = 0  # workers killed and replaced (crashes and time-outs)

    def call(self, *args: Any, name: str = "") -> Any:
        """fn(*args) in a worker. `name` (the file) starts IsolationError's message."""
        if self._closed:
            raise RuntimeError("Isolated.call after close()")
        worker = self._free.get()
        try:
            worker = self._send(worker, args)
            if not worker.conn.poll(self.timeout):
                self._discard(worker)
                worker = None
                raise IsolationError(f"{name}: decoding took longer than {self.timeout:g} s and "
                                     "was stopped (the decoder may hang on this file; a larger "
                                     "limit helps only if the file is huge)")
            try:
                status, value = worker.conn.recv()
            except (EOFError, OSError):
                code = self._discard(worker, wait=1.0)
                worker = None
                raise IsolationError(f"{name}: the decoder crashed on this file "
                                     f"({_describe_exit(code)}); the file is probably corrupt "
                                     "or uses an encoder feature the decoder mishandles") from None
        finally:
            self._free.put(worker)
        if status == "ok":
            return value
        raise value

    def _send(self, worker: _Worker | None, args: tuple) -> _Worker:
        """Hand args to a live worker, starting (or restarting) one as needed."""
        for attempt in (1, 2):
            if worker is None or worker.process.exitcode is not None:
                if worker is not None:
                    self._discard(worker)
                worker = self._start()
            try:
                worker.conn.send(args)
                return worker
            except (OSError, ValueError):  # it died between two calls: one fresh try
                if attempt == 2:
                    raise
                self._discard(worker)
                worker = None
        raise AssertionError("unreachable")

    def _start(self) -> _Worker:
        with self._lock:
            if self._ctx is None:  # most runs never start one: multiprocessing costs ~4 ms
                import multiprocessing

                method = self._method or ("forkserver" if "forkserver" in
                                          multiprocessing.get_all_start_methods() else "spawn")
                self._ctx = multiprocessing.get_context(method)
            worker = _Worker(self._ctx, self._fn, self._quiet)
            self._all.add(worker)
            return worker

    def _discard(self, worker: _Worker, wait: float = 0.0) -> int | None:
        code = worker.kill(wait)
        with self._lock:
            self._all.discard(worker)
            self.replaced += 1
        return code

    @property
    def processes(self) -> list[multiprocessing.process.BaseProcess]:
        """The worker processes alive now (for tests and diagnostics)."""
        with self._lock:
            return [w.process for w in self._all if w.process.is_alive()]

    def close(self) -> None:
        """Stop every worker (politely, then by force). Calls in flight end with an error."""
        self._closed = True
        with self._lock:
            workers = list(self._all)
            self._all.clear()
        for worker in workers:
            worker.stop()

    def __enter__(self) -> Isolated:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "it stopped answering"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _serve(conn, fn: Callable, quiet: bool) -> None:
    """A worker's loop: receive args, send back ("ok", result) or ("error", exception)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if quiet:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    conn.send("ready")  # fn and its module are imported (unpickling the args did that)
    while True:
        try:
            args = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if args is None:
            return
        try:
            reply = ("ok", fn(*args))
        except Exception as e:  # noqa: BLE001 - every failure goes back to the caller
            reply = ("error", e)
        try:
            conn.send(reply)
        except (OSError, EOFError):
            return
        except Exception as e:  # noqa: BLE001 - the result or exception would not pickle
            conn.send(("error", RuntimeError(f"{type(e).__name__} while returning the "
                                             f"result: {e}")))


def decode_preprocessed(data: bytes, name: str, params: Any) -> Any:
    """read_image on a file's bytes, then the model's preprocessing: what a worker runs.

    The scorer's one reading rule (`fxscore.scoring.model_input`, which imports onnxruntime,
    so it is not imported here). Returns the model input (float32, small) so that only it
    crosses back to the parent.
    """
    import io

    from .images import check_min_side, read_image
    from .preprocess import preprocess

    source = io.BytesIO(data)
    image = read_image(source, name=name, min_size=params.input_size)
    return preprocess(check_min_side(image, source, name), params)


def needs_isolation(header: Any) -> bool:
    """True for DICOM whose pixel data is compressed (encapsulated): decoded by C libraries.

    header: a `fxscore.dicom.Header` (as `fxscore.scorable.read_header` returns) or a pydicom
    Dataset with file meta. Native and deflated pixel data are decoded in-process (numpy, zlib).
    """
    ds = getattr(header, "ds", header)
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    return bool(ts is not None and getattr(ts, "is_compressed", False))


__all__ = ["DEFAULT_TIMEOUT", "Isolated", "IsolationError", "decode_preprocessed",
           "needs_isolation"]
