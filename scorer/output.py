"""Writing scores as CSV or JSON lines, batch by batch; the output file is the run's checkpoint.

API (what `fxscore run` calls):

    identity = RunIdentity(model_id, threshold, root, extra_columns=())
    writer, existing = open_output(out, fmt, identity, overwrite=False)
    existing.rows[path] -> Done(sha256, error)   # per path already in --out
    writer.drop(paths)        # before the first write: rewrite --out without these rows
    writer.write_batch(rows)  # append + fsync; raises OutputError (one line) on ENOSPC, EIO...
    writer.close()            # never raises after a failed write; safe to call twice

**Schema.** `FIXED_COLUMNS` in that order, then the identity's optional columns in the order
their options add them; a CSV starts with that header, a JSON line has exactly those keys. A row
is a dict holding at least those keys. Text goes through `fxscore.csvsafe` (undecodable bytes
as `\\xHH`, formula cells neutralised with a leading `'`), and is read back through it.

**Resume.** Rows are appended and fsynced per batch. A run killed at any moment leaves complete
records followed by at most one half-written record (every record ends with a newline outside
quotes, and the bytes on disk are a prefix of what was written); `open_output` reads the
complete records back in bounded chunks (a record over `MAX_RECORD` bytes is not ours), cuts
the half-written tail and returns what each done path scored. It resumes only a file whose
header (CSV) or keys (JSONL) are exactly what this run writes, whose rows carry this model id
and threshold, and whose sidecar names the same input root; anything else is refused with a
message naming --overwrite. Files from fxscore 0.1.0 (no sha256 column) are refused too: their
rows say nothing about which content was scored, so they are rescored with --overwrite.

**Sidecar and lock.** `OUT.fxscore.json` records the run identity (model id, threshold, the
input root as an absolute path, format and columns) beside the output, so pandas reads the CSV
unchanged. It is also the file that is locked (flock) against a second writer, because `drop`
replaces OUT itself by a rename. It is only ever rewritten while OUT holds no rows, so a crash
while writing it cannot leave rows without their identity.

**Drop.** `drop(paths)` writes the kept records (their bytes unchanged) to a temporary file in
the same folder, fsyncs it, renames it over OUT and fsyncs the folder: at every moment OUT holds
either the old rows or the kept ones, and each path appears once in the finished file.

`--out` must be a regular file (or "-", stdout, no resume): a device, FIFO, socket or folder is
refused before anything is read or written.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, KeysView, NamedTuple

from . import csvsafe
from .atomicfile import fsync_dir

FIXED_COLUMNS = ("path", "probability", "label", "threshold", "model_id", "sha256", "error")
COLUMNS = FIXED_COLUMNS  # the columns every output has (name kept for older imports)
LEGACY_COLUMNS = ("path", "probability", "label", "threshold", "model_id", "error")  # 0.1.0
FORMATS = ("csv", "jsonl")
SIDECAR_SUFFIX = ".fxscore.json"
MAX_RECORD = 1 << 20  # bytes; fxscore never writes a longer record (paths <= PATH_MAX)
MAX_ERROR_CHARS = 16384  # a longer error message is shortened, keeping records bounded
_CHUNK = 1 << 16
_SHA256 = re.compile(r"(?:[0-9a-f]{64})?")

Row = dict[str, Any]


class OutputError(Exception):
    """The output file cannot be resumed or written; the message names the file and the fix."""


@dataclass(frozen=True)
class RunIdentity:
    """What makes two runs' rows interchangeable: the same model, threshold, input and columns.

    `root` is made absolute here (not resolved: a mount reached through a link keeps its name).
    """

    model_id: str
    threshold: float
    root: str
    extra_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", os.path.abspath(os.fspath(self.root)))
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "extra_columns", tuple(self.extra_columns))
        clash = [c for c in self.extra_columns if c in FIXED_COLUMNS]
        if clash or len(set(self.extra_columns)) != len(self.extra_columns):
            raise ValueError(f"optional columns must be new and distinct: {self.extra_columns}")

    @property
    def columns(self) -> tuple[str, ...]:
        return FIXED_COLUMNS + self.extra_columns


class Done(NamedTuple):
    """What an earlier run wrote for one path."""

    sha256: str  # hex sha256 of the bytes scored; "" when the file could not be read
    error: bool  # the row is an error row


@dataclass
class Existing:
    """What earlier runs left in the output file."""

    rows: dict[str, Done] = field(default_factory=dict)
    cut: int = 0  # bytes of a half-written last record that were removed

    @property
    def done(self) -> KeysView[str]:
        """The paths already in the file (a live view: `path in existing.done` is O(1))."""
        return self.rows.keys()

    @property
    def failed(self) -> int:
        """Rows with an error."""
        return sum(d.error for d in self.rows.values())

    def errors(self) -> list[str]:
        """The paths of error rows (what --retry-errors rescores)."""
        return [p for p, d in self.rows.items() if d.error]


def format_for(out: str, fmt: str | None) -> str:
    """The explicit format, else jsonl for a .jsonl/.ndjson --out, else csv."""
    if fmt:
        return fmt
    return "jsonl" if out.lower().endswith((".jsonl", ".ndjson")) else "csv"


def sidecar_path(out: str | os.PathLike) -> Path:
    """Where the run identity of `out` is recorded (and locked)."""
    return Path(os.fspath(out) + SIDECAR_SUFFIX)


# ---- formatting ------------------------------------------------------------------------------

def _error_text(row: Row) -> str:
    error = row["error"] or ""
    return error if len(error) <= MAX_ERROR_CHARS else error[:MAX_ERROR_CHARS] + " [...]"


def csv_cells(row: Row, extra_columns: Iterable[str] = ()) -> list[str]:
    """One row's CSV cells, fixed columns then `extra_columns`, as `fxscore run` writes them."""
    p = row["probability"]
    return ([csvsafe.text(row["path"]), "" if p is None else f"{p:.6f}",
             csvsafe.text(row["label"] or ""), repr(float(row["threshold"])),
             csvsafe.text(row["model_id"]), csvsafe.text(row["sha256"] or ""),
             csvsafe.text(_error_text(row))]
            + [csvsafe.cell(row.get(c)) for c in extra_columns])


def csv_line(row: Row, extra_columns: Iterable[str] = ()) -> str:
    return csvsafe.format_row(csv_cells(row, extra_columns))


def header_line(columns: Iterable[str]) -> str:
    return csvsafe.format_row(csvsafe.text(c) for c in columns)


def _json_value(v: Any) -> Any:
    if isinstance(v, str):
        return csvsafe.escape_bytes(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def json_line(row: Row, extra_columns: Iterable[str] = ()) -> str:
    """One row as a JSON line: the same keys in the same order, strings byte-escaped."""
    p = row["probability"]
    rec = {"path": csvsafe.escape_bytes(row["path"]),
           "probability": None if p is None else round(float(p), 6),
           "label": csvsafe.escape_bytes(row["label"] or ""),
           "threshold": float(row["threshold"]),
           "model_id": csvsafe.escape_bytes(row["model_id"]),
           "sha256": row["sha256"] or "",
           "error": csvsafe.escape_bytes(_error_text(row))}
    rec.update((c, _json_value(row.get(c))) for c in extra_columns)
    return json.dumps(rec, allow_nan=False) + "\n"  # ASCII: valid in any encoding


# ---- the writer ------------------------------------------------------------------------------

class RowWriter:
    """Appends rows to the output and makes each batch durable before the next one.

    Writes go straight to the file descriptor (no hidden buffer), so a failed write raises once,
    leaves a prefix of what was meant on disk (resumable), and `close` has nothing left to flush.
    """

    def __init__(self, fd: int, fmt: str, identity: RunIdentity | None, *, name: str,
                 sync: bool, stdout: bool = False, lock_fd: int | None = None,
                 target: str | None = None, existing: Existing | None = None) -> None:
        self.fmt, self.identity, self.name = fmt, identity, name
        self.existing = existing if existing is not None else Existing()
        self._fd, self._lock_fd, self._sync, self._stdout = fd, lock_fd, sync, stdout
        self._target = target  # the real file behind --out, for `drop`'s rename
        self._extra = identity.extra_columns if identity else ()
        self._wrote = False
        self._pending = b""  # the header, written with the first batch
        self._failed: OutputError | None = None
        self._closed = False

    # one line per record, built before anything is written
    def _record(self, row: Row) -> str:
        line = (csv_line(row, self._extra) if self.fmt == "csv" else json_line(row, self._extra))
        if len(line) * 4 > MAX_RECORD and len(line.encode("utf-8")) > MAX_RECORD:
            raise ValueError(f"a record for {row['path']!r} is over {MAX_RECORD} bytes")
        return line

    def write_header(self) -> None:
        """Put the CSV header in front of the next write (or of `close`, for a run of 0 files)."""
        if self.fmt == "csv":
            self._pending = header_line(self.identity.columns if self.identity
                                        else FIXED_COLUMNS).encode("utf-8")

    def write_batch(self, rows: Iterable[Row]) -> None:
        """Append rows and fsync. Raises OutputError (message: file, cause, how to resume)."""
        data = "".join(self._record(r) for r in rows).encode("utf-8")
        self._wrote = True
        data, self._pending = self._pending + data, b""
        self._write(data)

    def _write(self, data: bytes) -> None:
        if self._failed:
            raise self._failed
        if self._closed:
            raise ValueError(f"{self.name}: write after close")
        try:
            view = memoryview(data)
            while view:
                if self._stdout and self._fd < 0:
                    buf = sys.stdout.buffer
                    buf.write(view)
                    buf.flush()
                    break
                n = os.write(self._fd, view)
                view = view[n:]
            if self._sync:
                os.fsync(self._fd)
        except OSError as e:
            self._failed = _write_error(self.name, e, resumable=not self._stdout)
            raise self._failed from e

    def drop(self, paths: Iterable[str]) -> int:
        """Remove the rows of `paths` from the file (atomically) -> how many were removed.

        Call it before the first `write_batch`: the rows that replace them are appended after.
        """
        if self._wrote:
            raise RuntimeError("drop() must come before the first write_batch()")
        gone = {p for p in paths if p in self.existing.rows}
        if not gone:
            return 0
        if self._target is None:
            raise RuntimeError("cannot drop rows from stdout")
        self.existing.rows = {p: d for p, d in self.existing.rows.items() if p not in gone}
        target = self._target
        tmp = os.path.join(os.path.dirname(target), "." + os.path.basename(target) + ".fxscore-tmp")
        try:
            os.lseek(self._fd, 0, os.SEEK_SET)
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                os.fchmod(out, stat.S_IMODE(os.fstat(self._fd).st_mode))
                first = True
                for record in _records(self._fd, self.fmt, self.name):
                    if not (self.fmt == "csv" and first):
                        row = _parse(record.decode("utf-8", "surrogateescape"), self.fmt,
                                     self.identity.columns)
                        if row is not None and row["path"] in gone:
                            continue
                    first = False
                    _write_all(out, record)
                os.fsync(out)
            finally:
                os.close(out)
            os.replace(tmp, target)
            _fsync_dir(target)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise _write_error(self.name, e, resumable=True) from e
        old, self._fd = self._fd, os.open(target, os.O_RDWR | os.O_APPEND)
        os.close(old)
        return len(gone)

    def close(self) -> None:
        """Release the file and its lock. Raises only if closing loses rows not yet reported."""
        if self._closed:
            return
        if self._pending and not self._failed:
            try:
                self.write_batch([])
            except OutputError:
                self._close_fds()
                raise
        self._close_fds()

    def _close_fds(self) -> None:
        self._closed = True
        error = None
        for fd in (self._fd, self._lock_fd):
            if fd is None or fd < 0 or (self._stdout and fd == self._fd):
                continue
            try:
                os.close(fd)
            except OSError as e:  # NFS reports a failed write-back at close
                error = error or e
        if self._stdout and self._fd < 0 and not self._failed:
            try:
                sys.stdout.buffer.flush()
            except (OSError, ValueError) as e:
                error = error or e
        if error is not None and not self._failed:
            raise _write_error(self.name, error, resumable=not self._stdout) from error

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_error(name: str, e: OSError, *, resumable: bool) -> OutputError:
    if e.errno == errno.EPIPE:
        return OutputError("output closed by its reader (broken pipe)")
    what = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what += " (the disk or quota is full)"
    fix = "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix this"
    hint = (f"; the rows written so far are kept: {fix} and rerun the same command to resume"
            if resumable else "")
    return OutputError(f"cannot write {name}: {what}{hint}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(path: str | os.PathLike) -> None:
    fsync_dir(os.path.dirname(os.path.abspath(path)) or ".")


# ---- opening and resuming --------------------------------------------------------------------

def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _not_regular(path: str, mode: int) -> OutputError:
    return OutputError(f"{path}: is {_kind(mode)}, not a regular file; --out must be a regular "
                       "file (it is resumed, locked and rewritten), or '-' for stdout")


def _open_regular(path: str, flags: int) -> int:
    """Open a regular file (created if missing) without ever blocking on a FIFO or device."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
    else:
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
    try:
        fd = os.open(path, flags | os.O_CREAT | getattr(os, "O_NONBLOCK", 0), 0o666)
    except IsADirectoryError as e:
        raise _not_regular(path, stat.S_IFDIR) from e
    except FileExistsError:
        raise
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
    st = os.fstat(fd)  # what was opened, not what was listed a moment before
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _not_regular(path, st.st_mode)
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return fd


def open_output(out: str, fmt: str, identity: RunIdentity, *, overwrite: bool = False
                ) -> tuple[RowWriter, Existing]:
    """Open `out` ("-" = stdout) for appending rows; resume what an earlier run left there.

    Raises OutputError when `out` is not a regular file, holds another model's (threshold's,
    input root's, columns') scores, another format, or records fxscore did not write, or when
    another process is writing it. Nothing is cut or written before every check has passed.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if out == "-":
        sys.stdout.flush()
        try:
            fd = sys.stdout.fileno()
            sys.stdout.buffer.flush()
        except (AttributeError, OSError, ValueError):
            fd = -1  # not a real descriptor (e.g. captured in tests): write through the buffer
        writer = RowWriter(fd, fmt, identity, name="stdout", sync=False, stdout=True)
        writer.write_header()
        return writer, writer.existing

    side = str(sidecar_path(out))
    fd = _open_regular(out, os.O_RDWR | os.O_APPEND)  # a device or FIFO is refused here
    lock_fd = created = None
    try:
        lock_fd, created = _open_lock(side, out)
        if overwrite:
            os.ftruncate(fd, 0)
            existing, end = Existing(), 0
        else:
            existing, end = _read_existing(fd, out, fmt, identity)
            if existing.rows:
                _check_sidecar(lock_fd, side, out, fmt, identity)
        if existing.cut:
            os.ftruncate(fd, end)
        if not existing.rows:  # nothing there to contradict it: record this run's identity
            os.fsync(fd)
            _write_sidecar(lock_fd, fmt, identity)
        if created or end == 0:
            _fsync_dir(out)
    except BaseException as e:
        if created:  # a sidecar this call made, for a file it then refused
            try:
                os.unlink(side)
            except OSError:
                pass
        for f in (fd, lock_fd):
            if f is not None:
                os.close(f)
        if isinstance(e, OSError):
            raise _write_error(out, e, resumable=False) from e
        raise
    writer = RowWriter(fd, fmt, identity, name=out, sync=True, lock_fd=lock_fd,
                       target=os.path.realpath(out), existing=existing)
    if end == 0:
        writer.write_header()
    return writer, existing


def _open_lock(side: str, out: str) -> tuple[int, bool]:
    """Open and lock the sidecar -> (descriptor, whether this call created it)."""
    try:
        fd, created = _open_regular(side, os.O_RDWR | os.O_EXCL), True
    except FileExistsError:
        fd, created = _open_regular(side, os.O_RDWR), False
    try:
        _lock(fd, out)
        # a process that refused the file may have removed a sidecar it had just made: the
        # lock counts only on the file that is still there
        a, b = os.fstat(fd), os.stat(side)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            raise OutputError(f"{out} is being opened by another process at the same time; "
                              "give every run (every --shard) its own --out")
    except BaseException:
        os.close(fd)
        raise
    return fd, created


def _lock(fd: int, out: str) -> None:
    """Refuse a second writer (e.g. two array tasks given the same --out)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the user must not share --out
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        raise OutputError(f"{out} is being written by another process; give every run "
                          "(every --shard) its own --out") from e


def _sidecar_doc(fmt: str, identity: RunIdentity) -> dict[str, Any]:
    from . import __version__

    return {"fxscore_output": 1, "fxscore": __version__, "format": fmt,
            "model_id": identity.model_id, "threshold": identity.threshold,
            "root": identity.root, "columns": list(identity.columns)}


def _write_sidecar(fd: int, fmt: str, identity: RunIdentity) -> None:
    # ensure_ascii: a root with undecodable bytes travels as \udcXX and comes back the same
    data = (json.dumps(_sidecar_doc(fmt, identity), indent=2) + "\n").encode("ascii")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    _write_all(fd, data)
    os.fsync(fd)


def _check_sidecar(fd: int, side: str, out: str, fmt: str, identity: RunIdentity) -> None:
    fix = "pass --overwrite to start afresh, or choose another --out"
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, MAX_RECORD)
    try:
        doc = json.loads(data.decode("ascii"))
        root, threshold = doc["root"], float(doc["threshold"])
        model_id, columns, written_fmt = doc["model_id"], tuple(doc["columns"]), doc["format"]
    except (ValueError, KeyError, TypeError):
        what = "is missing" if not data else "is not readable"
        raise OutputError(f"{out} has scores, but {side}, which records the input folder they "
                          f"came from, {what}; {fix}") from None
    if root != identity.root:
        raise OutputError(f"{out} holds scores of the files under {root}, not {identity.root} "
                          f"(files with the same names there would be skipped); {fix}")
    if model_id != identity.model_id:
        raise OutputError(f"{out} holds scores from model {model_id}, not "
                          f"{identity.model_id}; {fix}")
    if threshold != identity.threshold:
        raise OutputError(f"{out} holds labels at threshold {threshold!r}, not "
                          f"{identity.threshold!r}; {fix}")
    if columns != identity.columns or written_fmt != fmt:
        raise OutputError(f"{out} was written with other columns or format ({written_fmt}: "
                          f"{','.join(columns)}); rerun with the same options, or {fix}")


def _read_existing(fd: int, out: str, fmt: str,
                   identity: RunIdentity) -> tuple[Existing, int]:
    """Check every complete record, collect what it scored; return that and where records end."""
    existing, end, number = Existing(), 0, 0
    columns = identity.columns
    fix = "pass --overwrite to start afresh, or choose another --out"
    header = header_line(columns)
    os.lseek(fd, 0, os.SEEK_SET)
    records = _records(fd, fmt, out)
    for record in records:
        number += 1
        text = record.decode("utf-8", errors="surrogateescape")
        if fmt == "csv" and number == 1:
            if text != header:
                raise _bad_header(out, text, columns, fix)
            end += len(record)
            continue
        row = _parse(text, fmt, columns)
        if row is None:
            if fmt == "jsonl" and number == 1 and _legacy_json(text):
                raise OutputError(f"{out} was written by fxscore 0.1.0 (no sha256 column, so "
                                  f"it cannot tell which content each row scored); {fix}")
            raise OutputError(f"{out} was not written by `fxscore run --format {fmt}` with "
                              f"these options (record {number} is {text[:60]!r}); {fix}")
        if row["model_id"] != identity.model_id:
            raise OutputError(f"{out} holds scores from model {row['model_id']}, not "
                              f"{identity.model_id}; {fix}")
        if row["threshold"] != identity.threshold:
            raise OutputError(f"{out} holds labels at threshold {row['threshold']!r}, not "
                              f"{identity.threshold!r}; {fix}")
        existing.rows[row["path"]] = Done(row["sha256"], bool(row["error"]))
        end += len(record)
    tail = records.tail  # a half-written last record: ours only if it could begin one
    if fmt == "jsonl":
        starts = [b'{"path": "']
    elif end == 0:  # a cut header, this version's or 0.1.0's: as empty as no file
        starts = [header.encode(), header_line(LEGACY_COLUMNS).encode()]
    else:
        starts = [b""]
    if tail and not any(s.startswith(tail) or tail.startswith(s) for s in starts):
        raise OutputError(f"{out} was not written by `fxscore run --format {fmt}` (it ends "
                          f"in {tail[:60]!r} without a newline); {fix}")
    existing.cut = len(tail)
    return existing, end


def _bad_header(out: str, text: str, columns: tuple[str, ...], fix: str) -> OutputError:
    if text == header_line(LEGACY_COLUMNS):
        return OutputError(f"{out} was written by fxscore 0.1.0 (no sha256 column, so it cannot "
                           f"tell which content each row scored); {fix}")
    got = text.rstrip("\n")
    if got.split(",")[:len(FIXED_COLUMNS)] == list(FIXED_COLUMNS):
        return OutputError(f"{out} has the columns {got!r}, but this run writes "
                           f"{','.join(columns)!r} (other options add other columns); rerun with "
                           f"the options that wrote it, or {fix}")
    return OutputError(f"{out} was not written by `fxscore run --format csv` (its first line is "
                       f"{text[:60]!r}); {fix}")


def _legacy_json(text: str) -> bool:
    try:
        rec = json.loads(text)
    except ValueError:
        return False
    return isinstance(rec, dict) and tuple(rec) == LEGACY_COLUMNS


class _Records:
    """The complete records of a file descriptor, read in bounded chunks from where it stands.

    A record ends with a newline outside CSV quotes: a quote count per physical line tracks
    whether a newline is inside a quoted field (the writer doubles embedded quotes, so the
    parity is exact). A record longer than MAX_RECORD cannot be ours and is refused instead of
    being buffered: `--out` pointed at a huge foreign file never fills memory. `tail` holds the
    incomplete last record once iteration ends.
    """

    def __init__(self, fd: int, fmt: str, name: str) -> None:
        self.fd, self.csv, self.name, self.tail = fd, fmt == "csv", name, b""

    def __iter__(self) -> Iterator[bytes]:
        buf, pos, quoted = bytearray(), 0, False
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if self.csv:
                    quoted ^= bool(buf.count(b'"', pos) & 1)
                pos = len(buf)
                if pos > MAX_RECORD:
                    raise self._too_long()
                chunk = os.read(self.fd, _CHUNK)
                if not chunk:
                    self.tail = bytes(buf)
                    return
                buf += chunk
                continue
            if self.csv:
                quoted ^= bool(buf.count(b'"', pos, nl) & 1)
            pos = nl + 1
            if pos > MAX_RECORD:
                raise self._too_long()
            if not quoted:
                yield bytes(buf[:pos])
                del buf[:pos]
                pos = 0

    def _too_long(self) -> OutputError:
        return OutputError(f"{self.name} was not written by fxscore (it holds a record longer "
                           f"than {MAX_RECORD} bytes); pass --overwrite to start afresh, or "
                           "choose another --out")


def _records(fd: int, fmt: str, name: str) -> _Records:
    return _Records(fd, fmt, name)


def _parse(text: str, fmt: str, columns: tuple[str, ...]) -> dict | None:
    """One data record -> row dict (path, sha256 unescaped, threshold a float), or None."""
    if fmt == "csv":
        try:
            rows = list(csvsafe.read_rows(io.StringIO(text, newline="")))
        except csv.Error:
            return None
        if len(rows) != 1 or len(rows[0]) != len(columns):
            return None
        fields = rows[0]
        rec: dict[str, Any] = dict(zip(columns, fields))
    else:
        try:
            rec = json.loads(text)
        except ValueError:
            return None
        if not isinstance(rec, dict) or tuple(rec) != columns:
            return None
        for k in ("path", "model_id", "sha256", "error"):
            if not isinstance(rec[k], str):
                return None
        rec = {k: csvsafe.unescape_bytes(v) if isinstance(v, str) else v for k, v in rec.items()}
    if not isinstance(rec["sha256"], str) or not _SHA256.fullmatch(rec["sha256"]):
        return None
    try:
        rec["threshold"] = float(rec["threshold"])
    except (TypeError, ValueError):
        return None
    return rec
