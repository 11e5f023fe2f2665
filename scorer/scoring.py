"""Scoring a stream of files: decode in a small thread pool while onnxruntime runs the model.

Each file is opened ONCE (`images.open_regular`: a FIFO, socket or device found at open becomes
an error row instead of a wait), its bytes are read, hashed (the row's sha256 is of exactly the
bytes scored) and decoded from memory, at reduced scale where the format allows it but never
below the model's input size (`read_image(..., min_size=input size)`, the reader's one rule).

Memory: the decoded pixels in flight are held under one byte budget (`MemoryBudget`). A worker
estimates what a file will take from its header (`images.decoded_nbytes`, plus the file's own
bytes) and waits until that fits; a file larger than the whole budget is decoded alone, once
nothing else is in flight, never refused for its size. Admission is first come, first served,
so a large file is not overtaken for ever by small ones. Without the budget, peak memory would
grow with workers x image size (six 13000 x 13000 PNGs took 4 GB with 1 worker, 11 GB with 3).

Decoding and resizing (Pillow, numpy, hashlib) release the GIL for their heavy parts, so threads
overlap them with inference without the pickling cost of processes. At most `prefetch` batches
are decoded ahead of the one the model is running, so memory stays flat however many files
stream in, and rows come out in input order.

DICOM (`DicomOptions`, what `fxscore run`'s DICOM options set): the header is parsed from the
file already open (only files whose first bytes say DICOM, or a DICOM suffix on content of no
other format; a JPEG or PNG costs one 132-byte sniff), before its pixels are read. With
options, a file `fxscore.scorable` excludes (a structured report, a DICOMDIR, a CT slice...)
is not read further and comes back as a row with `EXCLUDED` set to the reason, which writers
skip; `columns` are added to every row from that header; `sr_out` gets one DICOM SR per scored
DICOM image (`fxscore.sr`), written before its row is yielded, so a row written means its SR
is on disk (an SR that cannot be written turns its row into an error row, `SR_ERROR`).
Compressed pixel data is decoded in worker processes (`fxscore.isolate`), with or without
options: a decoder that crashes or hangs costs that file's row only.
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Iterator, NamedTuple

import numpy as np

from . import identifiers, scorable
from .contract import Preprocess
from .cpus import available_cpus
from .dicom import check_size as check_dicom_size, peak_bytes as dicom_peak_bytes
from .images import (MIN_SIDE, ImageReadError, check_min_side,  # noqa: F401 (MIN_SIDE)
                     colour_read_cost, decoded_nbytes, open_regular, read_image,
                     read_with_colour)
from .model import Model
from .preprocess import preprocess

if TYPE_CHECKING:
    from .isolate import Isolated

# path, probability (float | None), label, threshold, model_id, sha256, error
Row = dict[str, Any]

# decoded_nbytes(f, min_size) is read_image's own peak (decoder output at the reduced scale plus
# the arrays made from it); measured peaks of 6000 x 6000 PNG/JPEG/TIFF, 8/16-bit, grey/RGB
# stayed within it plus the file's bytes. PER_FILE covers what preprocess adds (a resized copy
# of the reduced image, a few MB at most) and the decoder's own buffers.
DECODE_OVERHEAD = 1.0
PER_FILE = 2 << 20
# When a header cannot be read (a file that is not an image) the estimate is its size times this.
UNKNOWN_FACTOR = 4

# Keys a result row may carry beside its columns (never written as columns):
EXCLUDED = "excluded"  # the reason a file was excluded (scorable); such a row is not written
SR_PATH = "sr_path"  # the DICOM SR written for this row (--sr-out)
SR_ERROR = "sr_error"  # why its SR could not be written (the row is then an error row)


@dataclass(frozen=True)
class DicomOptions:
    """What the scoring loop does with DICOM headers (`fxscore run`'s DICOM options).

    modalities: the modality codes scored, None for every modality (`scorable.parse_modalities`
    reads --modality); for_processing: score For Processing images too; columns: DICOM
    keywords added to every row ("" for non-DICOM files; `identifiers.parse_names`); sr_out:
    the folder for one SR per scored DICOM image; decode_timeout: seconds one compressed
    DICOM may take to decode in its worker process (None: `isolate.DEFAULT_TIMEOUT`).
    """

    modalities: frozenset[str] | None = scorable.DEFAULT_MODALITIES
    for_processing: bool = False
    columns: tuple[str, ...] = ()
    sr_out: Path | None = None
    decode_timeout: float | None = None


class _Loaded(NamedTuple):
    """One file after its worker is done with it."""

    sha: str  # "" when the file could not be read at all (or was excluded unread)
    x: np.ndarray | str | None  # the model input, or why it could not be read
    extra: dict[str, str]  # the DICOM columns
    ds: Any = None  # the DICOM header, kept only when an SR will be written from it
    excluded: str | None = None  # why it is not scored (no row is written)
    where: str = ""  # the file, for messages
    colour: bool = False  # shows real colour (checked only for a model with OOD statistics)


class BudgetClosed(Exception):
    """The run ended (interrupt, failure) while a worker waited for memory."""


class MemoryBudget:
    """Bytes in flight under one limit; first come, first served; an oversized request alone.

    `limit=None` admits everything at once (and still records `peak`).
    """

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"memory budget must be positive, got {limit}")
        self.limit = limit
        self.in_use = 0
        self.in_flight = 0
        self.peak = 0  # the most bytes held at once: what the budget let through
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self._closed = False

    def acquire(self, n: int) -> None:
        """Wait until `n` bytes fit (or nothing else is in flight), then hold them."""
        n = max(0, int(n))
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while not self._closed and not (ticket == self._serving and self._fits(n)):
                self._cond.wait()
            if self._closed:
                raise BudgetClosed()
            self._serving += 1
            self.in_use += n
            self.in_flight += 1
            self.peak = max(self.peak, self.in_use)
            self._cond.notify_all()  # the next ticket may fit too

    def _fits(self, n: int) -> bool:
        return self.limit is None or self.in_flight == 0 or self.in_use + n <= self.limit

    def release(self, n: int) -> None:
        with self._cond:
            self.in_use -= max(0, int(n))
            self.in_flight -= 1
            self._cond.notify_all()

    @contextmanager
    def hold(self, n: int) -> Iterator[None]:
        self.acquire(n)
        try:
            yield
        finally:
            self.release(n)

    def close(self) -> None:
        """Wake every waiter with BudgetClosed: the run is over."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def score_items(model: Model, items: Iterable[tuple[str, Path]], *, batch_size: int = 32,
                workers: int | None = None, prefetch: int = 2,
                memory: MemoryBudget | int | None = None,
                threshold: float | None = None,
                roles: tuple[str, ...] | None = None, dicom: DicomOptions | None = None,
                isolated: Isolated | None = None) -> Iterator[Row]:
    """(name, path) pairs -> one row per pair, in order. Unreadable files become error rows;
    with `dicom`, excluded files come back as rows with EXCLUDED set (see score_batches)."""
    return chain.from_iterable(score_batches(model, items, batch_size=batch_size,
                                             workers=workers, prefetch=prefetch, memory=memory,
                                             threshold=threshold, roles=roles, dicom=dicom,
                                             isolated=isolated))


def score_batches(model: Model, items: Iterable[tuple[str, Path]], *, batch_size: int = 32,
                  workers: int | None = None, prefetch: int = 2,
                  memory: MemoryBudget | int | None = None,
                  threshold: float | None = None,
                  roles: tuple[str, ...] | None = None, dicom: DicomOptions | None = None,
                  isolated: Isolated | None = None) -> Iterator[list[Row]]:
    """Like `score_items`, one list of rows per model batch, so a writer can flush per batch.

    `memory`: the byte budget for decoding (a MemoryBudget, or its limit; None: unlimited).
    `threshold`: the label's operating point [default: the model's].
    `roles`: the graph outputs to fetch (`fxscore.graph_outputs`) [default: the probability,
    and the OOD score when the model has OOD statistics]. With "ood_score" every row gets
    `ood_score` and `ood` (None in error rows); with "feature_map" the scored rows get
    "_feature_map" and "_file" for `cam.HeatmapWriter` (not written to --out).
    `dicom`: select DICOM files, add their columns, write SRs (`DicomOptions`); None: every
    file is scored, with the fixed columns only. An excluded file's row has `row[EXCLUDED]`
    = the reason, no probability and no error: a writer skips it.
    `isolated`: the worker processes compressed DICOM is decoded in (`make_isolated`), for a
    caller that scores several streams; by default this call makes its own (no process starts
    before a compressed file comes) and closes them when it ends.
    """
    from .graph_outputs import OOD_SCORE, roles_for

    roles = roles_for(model) if roles is None else tuple(roles)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    budget = memory if isinstance(memory, MemoryBudget) else MemoryBudget(memory)
    threshold = model.meta.threshold if threshold is None else float(threshold)
    items = iter(items)
    capacity = batch_size * (prefetch + 1)
    pending: deque[tuple[str, Path, Future]] = deque()
    params = model.meta.preprocess
    # The OOD flag's colour rule (fxscore.ood): only a run that fetches the OOD score pays for
    # the check, and only colour-stored files need more than a header read for it.
    colour = OOD_SCORE in roles and bool(model.meta.ood)
    workers = workers or available_cpus()
    _tune_malloc(budget, workers)
    gate = _decode_gate(model, workers)
    own = isolated is None
    if own:
        isolated = make_isolated(workers, dicom.decode_timeout if dicom else None)
    stacked = _BatchBuffer()
    with ThreadPoolExecutor(workers, thread_name_prefix="fxscore-decode") as pool:
        def fill() -> None:
            while len(pending) < capacity:
                item = next(items, None)
                if item is None:
                    return
                name, path = item
                pending.append((name, path, pool.submit(_load, path, params, budget, dicom,
                                                        isolated, colour, workers, gate)))

        try:
            fill()
            while pending:
                batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
                fill()  # keep the decoders busy while this batch waits and runs
                loaded = [fut.result() for *_, fut in batch]
                gate.clear()
                try:
                    rows = _score(model, threshold,
                                  [(name, r.sha, "" if r.excluded else r.x)
                                   for (name, *_), r in zip(batch, loaded)],
                                  stacked, roles, [path for _, path, _ in batch])
                finally:
                    gate.set()
                _colour_rule(rows, loaded)
                yield _with_dicom(model, threshold, rows, loaded, dicom)
        finally:
            for *_, fut in pending:  # an abandoned or failed run should not decode on
                fut.cancel()
            gate.set()  # workers waiting for the model to finish a batch go on, and end
            budget.close()  # and workers waiting for memory give up
            if own:
                isolated.close()  # a decode in flight in a worker process ends now


class _Open:
    """A gate that never closes: decoding overlaps the model."""

    def set(self) -> None:
        pass

    clear = set
    wait = set


def _decode_gate(model: Model, workers: int) -> threading.Event | _Open:
    """Where the decode threads and the model's threads together outnumber the CPUs (the
    default: both use every CPU), decoding waits while the model runs a batch. Overlapped
    there, each slowed the other more than the overlap gained: the model's threads work in
    lockstep, and one preempted by a decoder stalls the rest (2 CPUs, 2000 x 2500 DICOM: 61
    -> 55 CPU ms per file, 31.9 -> 34.4 files/s; 224 px JPEG: no change beyond the noise).
    On a GPU, or with CPUs to spare, they overlap."""
    options = model.session.get_session_options()
    on_cpu = model.session.get_providers()[0] == "CPUExecutionProvider"
    if on_cpu and workers + max(1, options.intra_op_num_threads) > available_cpus():
        gate = threading.Event()
        gate.set()
        return gate
    return _Open()


def make_isolated(workers: int, timeout: float | None = None) -> Isolated:
    """The worker processes compressed DICOM is decoded in (`isolate.decode_preprocessed`):
    at most `workers` at once, `timeout` seconds per file (None: isolate.DEFAULT_TIMEOUT).
    None starts before a compressed file comes; close() them when the job ends."""
    from . import isolate

    return isolate.Isolated(isolate.decode_preprocessed, workers=max(1, workers),
                            timeout=timeout or isolate.DEFAULT_TIMEOUT)


def model_input(source: str | os.PathLike | BinaryIO, params: Preprocess, *,
                name: str | None = None) -> np.ndarray:
    """The one reading rule: a file (path or binary file object) -> the network's input
    (3, h, w), decoded at reduced scale no smaller than the model's input allows. An image
    under MIN_SIDE pixels on a side raises ImageReadError (`images.check_min_side`).

    Everything that must give the scorer's numbers (export parity, int8 calibration,
    training's validation) should read through this, not `read_image` alone.
    """
    return _model_input(source, params, name, colour=False)[0]


def model_input_with_colour(source: str | os.PathLike | BinaryIO, params: Preprocess, *,
                            name: str | None = None) -> tuple[np.ndarray, bool]:
    """(model_input(...), whether the image shows colour: the OOD flag's colour rule), from
    one decode where the reading rule decodes in full anyway (`images.read_with_colour`)."""
    return _model_input(source, params, name, colour=True)


def _model_input(source, params: Preprocess, name: str | None,
                 colour: bool) -> tuple[np.ndarray, bool]:
    if colour:
        image, shows = read_with_colour(source, name=name, min_size=params.input_size)
    else:
        image, shows = read_image(source, name=name, min_size=params.input_size), False
    return preprocess(check_min_side(image, source, name), params), shows


def estimate_nbytes(f: BinaryIO, size: int, min_size: tuple[int, int] | None = None) -> int:
    """Memory a decode of this open file will hold: its bytes + the decoded pixels and working
    copies (from the header), or a multiple of its size when the header says nothing."""
    try:
        decoded = decoded_nbytes(f, min_size)
    except Exception:  # noqa: BLE001 - not an image (or too large): read_image says why, fast
        decoded = UNKNOWN_FACTOR * size
    finally:
        f.seek(0)
    return _with_file(size, decoded)


def _with_file(size: int, decoded: int) -> int:
    return size + int(DECODE_OVERHEAD * decoded) + PER_FILE


def _load(path: Path, params: Preprocess, budget: MemoryBudget,
          dicom: DicomOptions | None = None, isolated: Isolated | None = None,
          colour: bool = False, workers: int = 1,
          gate: threading.Event | _Open | None = None) -> _Loaded:
    """Read, hash, decode and preprocess one file in a worker.

    A DICOM header is read first, from the open file: with `dicom`, a file it excludes is read
    no further. Compressed DICOM pixel data is decoded by `isolated`. sha256 is "" when the
    file could not be read at all; a failure comes back as its message (in place of the input).
    With `colour`, whether the image shows real colour is found too: for DICOM from its
    header (`_dicom_colour`), for a file stored in colour from its pixels, by the same decode
    that scores it where the reading rule decodes in full (`model_input_with_colour`).
    """
    if gate is not None:
        gate.wait()  # the model is running a batch on the CPUs this would compete for
    sha, extra, ds, where, is_colour = "", {}, None, str(path), False
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            header, unreadable = _header(f, where)
            if dicom is not None:
                if header is not None:
                    why = scorable.reason(header.ds, header.has_pixels, dicom.modalities,
                                          for_processing=dicom.for_processing)
                    if why:
                        return _Loaded("", None, {}, excluded=why, where=where)
                    if dicom.sr_out is not None:
                        ds = header.ds
                extra = identifiers.dicom_columns(header.ds if header else None, dicom.columns)
            need, decode_colour = _estimate(f, size, params, header, where, colour)
            with budget.hold(need):
                try:
                    data = f.read()
                    sha = hashlib.sha256(data).hexdigest()
                    if unreadable is not None:
                        raise unreadable  # the hash is of what was read: a fix shows
                    if colour and header is not None:
                        is_colour = _dicom_colour(header)
                    if header is not None and isolated is not None and _compressed(header):
                        x = isolated.call(data, where, params, name=where)
                    elif decode_colour:
                        x, is_colour = model_input_with_colour(io.BytesIO(data), params,
                                                               name=where)
                    else:
                        x = model_input(io.BytesIO(data), params, name=where)
                    del data
                    return _Loaded(sha, x, extra, ds, where=where, colour=is_colour)
                finally:
                    if need > keep_per_arena(budget, workers):
                        data = None
                        _give_back_freed_memory()  # before the budget admits the next file
    except BudgetClosed:
        return _Loaded(sha, f"{path}: not scored, the run ended", extra, where=where)
    except ImageReadError as e:
        message = str(e)
    except OSError as e:  # gone or unreadable since it was listed
        message = f"{path}: cannot read ({e.strerror or type(e).__name__})"
    except Exception as e:  # noqa: BLE001 - one bad file must not end a night's batch job
        message = f"{path}: {type(e).__name__}: {e}"
    # one line: it goes into a CSV cell and log lines
    return _Loaded(sha, " ".join(message.split()), extra, where=where)


def _dicom_colour(header: Any) -> bool:
    """The OOD fit's colour rule for DICOM (`images.image_info(decode=True)["has_colour"]`):
    an image is colour when its Photometric Interpretation is not MONOCHROME."""
    photometric = str(header.ds.get("PhotometricInterpretation", "MONOCHROME2"))
    return not photometric.strip().upper().startswith("MONOCHROME")


def _colour_rule(rows: list[Row], loaded: list[_Loaded]) -> None:
    """A scored colour image is out of distribution whatever its distance (fxscore.ood): set
    its `ood`, keep `ood_score`; "_colour" (not written) says why, for benchmarks."""
    for row, r in zip(rows, loaded):
        if r.colour and row.get("ood") is not None:
            row["ood"] = True
            row["_colour"] = True


def _header(f: BinaryIO, name: str) -> tuple[Any, ImageReadError | None]:
    """(the DICOM header or None for other content, the error if it is unreadable); f is left
    at 0. Other formats cost a sniff of their first bytes, no parse."""
    try:
        return scorable.read_header(f, name=name), None
    except ImageReadError as e:
        return None, e
    finally:
        f.seek(0)


def _compressed(header: Any) -> bool:
    from .isolate import needs_isolation

    return needs_isolation(header)


def _estimate(f: BinaryIO, size: int, params: Preprocess, header: Any, name: str,
              colour: bool = False) -> tuple[int, bool]:
    """(estimate_nbytes, whether the colour rule decodes pixels: with `colour`, for a file
    stored in colour that is not DICOM), from the DICOM header already read where there is
    one, else from one read of the image's header."""
    if header is None:
        if not colour:
            return estimate_nbytes(f, size, params.input_size), False
        try:
            decoded, stored = colour_read_cost(f, params.input_size)
        except Exception:  # noqa: BLE001 - as estimate_nbytes: read_image says why, fast
            decoded, stored = UNKNOWN_FACTOR * size, False
        finally:
            f.seek(0)
        return _with_file(size, decoded), stored
    try:
        check_dicom_size(header, name)
        decoded = dicom_peak_bytes(header, name)
    except Exception:  # noqa: BLE001 - refused or odd: read_image says why, fast
        decoded = UNKNOWN_FACTOR * size
    return _with_file(size, decoded), False


def _with_dicom(model: Model, threshold: float, rows: list[Row], loaded: list[_Loaded],
                dicom: DicomOptions | None) -> list[Row]:
    """Mark the excluded rows, add the DICOM columns, write the SRs of the scored DICOM images
    (before the rows leave: a row written means its SR is on disk)."""
    if dicom is None:
        return rows
    for row, r in zip(rows, loaded):
        if r.excluded:
            row["error"] = ""
            row[EXCLUDED] = r.excluded
            continue
        for column in dicom.columns:
            row[column] = r.extra.get(column, "")
        if dicom.sr_out is not None and r.ds is not None and not row["error"]:
            _write_sr(model, threshold, row, r, dicom.sr_out)
    return rows


def _write_sr(model: Model, threshold: float, row: Row, r: _Loaded, out_dir: Path) -> None:
    from . import sr

    meta = model.meta
    info = {"model_id": model.model_id, "name": meta.model_name,
            "version": meta.model_version, "positive_class": meta.positive_class}
    try:
        row[SR_PATH] = str(sr.write_sr(r.ds, row["probability"], row["label"], threshold, info,
                                       out_dir))
    except Exception as e:  # noqa: BLE001 - one SR must not end the job; the row says why
        if isinstance(e, OSError):
            why = e.strerror or type(e).__name__
        elif isinstance(e, sr.SRError):
            why = str(e)
        else:  # highdicom's messages can quote header values (PHI): name the kind only
            why = f"{type(e).__name__} while building it from the image's header"
        row.update(probability=None, label="", error=" ".join(
            f"{r.where}: scored, but its DICOM SR could not be written to {out_dir} ({why}); "
            "rerun with --retry-errors to write it".split()))
        row[SR_ERROR] = why


# glibc keeps memory freed by a thread in that thread's malloc arena, so with N decoding threads
# the process could keep N images' worth of memory although the budget lets only one be decoded
# at a time (measured: 4 large PNGs decoded one at a time by 4 workers peaked at 489 MiB RSS,
# 210 MiB with 1 worker). Returning every large block to the OS is no cure either: the next
# file faults the pages back in, and for a 2000 x 2500 DICOM that doubled the CPU per file
# (33 vs 17 ms; ~9,600 page faults). So blocks below MMAP_ABOVE come from the arenas, and
# free() trims an arena only when its free top exceeds `keep_per_arena`: the workers together
# keep up to a quarter of the decode budget (at most RETAIN_MAX) for the next decode. A file
# whose decode needed more than that is followed by malloc_trim, which also returns free
# memory inside the arenas. glibc only (mallopt parameters from its malloc.h); a no-op elsewhere.
MMAP_ABOVE = 32 << 20  # glibc's largest mmap threshold on 64-bit
RETAIN_MAX = 512 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_libc: Any = None


def _glibc() -> Any:
    global _libc
    if _libc is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None)
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            _libc = libc
        except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
            _libc = False
    return _libc


def keep_per_arena(budget: MemoryBudget, workers: int) -> int:
    """Free bytes each decoding thread's arena keeps for its next decode (glibc's trim
    threshold): a quarter of the budget, at most RETAIN_MAX, shared by the workers."""
    share = min(RETAIN_MAX, budget.limit // 4) if budget.limit else RETAIN_MAX
    return max(128 << 10, share // max(1, workers))


def _tune_malloc(budget: MemoryBudget, workers: int) -> None:
    libc = _glibc()
    if libc:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_ABOVE)
        libc.mallopt(_M_TRIM_THRESHOLD, min(keep_per_arena(budget, workers), 2**31 - 1))


def _give_back_freed_memory() -> None:
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


class _BatchBuffer:
    """One model batch's input array, reused batch after batch: a fresh 19 MB array per batch
    of 32 at 224 px cost its page faults while the model waited."""

    def __init__(self) -> None:
        self._array: np.ndarray | None = None

    def stack(self, inputs: list[np.ndarray]) -> np.ndarray:
        shape = (len(inputs), *inputs[0].shape)
        a = self._array
        if a is None or a.shape[1:] != shape[1:] or len(a) < len(inputs):
            a = self._array = np.empty(shape, dtype=np.float32)
        return np.stack(inputs, out=a[:len(inputs)])


def _score(model: Model, threshold: float, loaded: list[tuple[str, str, np.ndarray | str]],
           stacked: _BatchBuffer, roles: tuple[str, ...] = ("probability",),
           files: list[Path] | None = None) -> list[Row]:
    scored = [i for i, (_, _, x) in enumerate(loaded) if not isinstance(x, str)]
    good = [loaded[i][2] for i in scored]
    stack = stacked.stack
    if roles == ("probability",) or not good:
        outputs = {"probability": model.predict(stack(good))} if good else {}
    else:
        outputs = model.predict_with(stack(good), roles)
    probs = iter(outputs.get("probability", ()))
    meta = model.meta
    rows = []
    for name, sha, x in loaded:
        row: Row = {"path": name, "probability": None, "label": "", "threshold": threshold,
                    "model_id": model.model_id, "sha256": sha, "error": ""}
        if isinstance(x, str):
            row["error"] = x
        else:
            p = float(next(probs))
            row["probability"] = p
            row["label"] = meta.positive_class if p >= threshold else meta.negative_class
        rows.append(row)
    if roles != ("probability",):
        from .graph_outputs import annotate_rows

        annotate_rows(model, rows, outputs, scored, files)
    return rows
