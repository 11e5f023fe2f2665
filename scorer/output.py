"""Writing scores as CSV or JSON lines, batch by batch; the output file is the run's checkpoint.

Rows are appended and flushed (and fsynced) after every batch. A run killed at any moment leaves
complete records followed by at most one half-written record, because every record ends with a
newline outside quotes and the bytes on disk are always a prefix of what was written.
`open_output` reads the complete records back, cuts the half-written tail and returns the paths
already scored, so the rerun appends exactly the missing rows.

The done paths are kept as a set of strings: exact whatever changed in the tree between runs
(a cursor into the sorted order would silently skip files added before it), and about 100 bytes
a path, so 100k files cost ~10 MB, less than the model.

Paths are the strings `os.scandir` gives: an undecodable byte in a file name travels as a lone
surrogate, written back as the same byte (CSV) or as a \\udcXX escape (JSON), so it round-trips.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable

from .scoring import Row

COLUMNS = ("path", "probability", "label", "threshold", "model_id", "error")
FORMATS = ("csv", "jsonl")


class OutputError(Exception):
    """The output file cannot be resumed or written; the message names the file and the fix."""


@dataclass
class Existing:
    """What earlier runs left in the output file."""

    done: set[str] = field(default_factory=set)
    failed: int = 0  # rows with an error
    cut: int = 0  # bytes of a half-written last record that were removed


def csv_cells(row: Row) -> list[str]:
    """One row's CSV cells in COLUMNS order, formatted as `fxscore run` writes them."""
    p = row["probability"]
    return [row["path"], "" if p is None else f"{p:.6f}", row["label"],
            str(float(row["threshold"])), row["model_id"], row["error"]]


def format_for(out: str, fmt: str | None) -> str:
    """The explicit format, else jsonl for a .jsonl/.ndjson --out, else csv."""
    if fmt:
        return fmt
    return "jsonl" if out.lower().endswith((".jsonl", ".ndjson")) else "csv"


class RowWriter:
    """Appends rows to a text stream and makes each batch durable before the next one."""

    def __init__(self, stream: IO[str], fmt: str, *, header: bool, sync: bool,
                 detach: bool = False) -> None:
        self.stream, self.fmt, self.sync, self.detach = stream, fmt, sync, detach
        self._csv = csv.writer(stream, lineterminator="\n") if fmt == "csv" else None
        if header and self._csv:
            self._csv.writerow(COLUMNS)

    def write_batch(self, rows: Iterable[Row]) -> None:
        for row in rows:
            if self._csv:
                self._csv.writerow(csv_cells(row))
            else:
                rec = {k: row[k] for k in COLUMNS}
                if rec["probability"] is not None:
                    rec["probability"] = round(rec["probability"], 6)
                self.stream.write(json.dumps(rec) + "\n")  # ASCII escapes: always valid JSON
        self.stream.flush()
        if self.sync:
            os.fsync(self.stream.fileno())

    def close(self) -> None:
        if self.detach:
            self.stream.flush()
            self.stream.detach()  # leave the underlying stdout open for whoever owns it
        else:
            self.stream.close()


def open_output(out: str, fmt: str, model_id: str, *,
                overwrite: bool = False) -> tuple[RowWriter, Existing]:
    """Open `out` ("-" = stdout) for appending rows; resume what an earlier run left there.

    Raises OutputError when the file holds another model's scores, another format, or lines
    fxscore did not write, or when another process is writing it.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if out == "-":
        sys.stdout.flush()
        stream = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", errors="surrogateescape",
                                  newline="")
        return RowWriter(stream, fmt, header=True, sync=False, detach=True), Existing()

    path = Path(out)
    try:
        f = open(path, "a+b")  # never truncates before the checks below pass
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        _lock(f, path)
        if overwrite:
            f.truncate(0)
            existing, end = Existing(), 0
        else:
            existing, end = _read_existing(f, path, fmt, model_id)
            f.truncate(end)
    except BaseException:
        f.close()
        raise
    stream = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
    return RowWriter(stream, fmt, header=end == 0, sync=True), existing


def _lock(f: IO[bytes], path: Path) -> None:
    """Refuse a second writer (e.g. two array tasks given the same --out)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the user must not share --out
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        raise OutputError(f"{path} is being written by another process; give every run "
                          "(every --shard) its own --out") from e


def _read_existing(f: IO[bytes], path: Path, fmt: str,
                   model_id: str) -> tuple[Existing, int]:
    """Check every complete record, collect its path; return them and where the records end."""
    existing, end, number = Existing(), 0, 0
    fix = "pass --overwrite to start afresh, or choose another --out"
    f.seek(0)
    for record in _records(f, fmt):
        number += 1
        text = record.decode("utf-8", errors="surrogateescape")
        row = _parse(text, fmt, header=fmt == "csv" and number == 1)
        if row is None:
            what = f"record {number}" if number > 1 else "its first line"
            raise OutputError(f"{path} was not written by `fxscore run --format {fmt}` "
                              f"({what} is {text[:60]!r}); {fix}")
        if row:  # not the header
            if row["model_id"] != model_id:
                raise OutputError(f"{path} holds scores from model {row['model_id']}, not "
                                  f"{model_id}; {fix}")
            existing.done.add(row["path"])
            existing.failed += bool(row["error"])
        end += len(record)
    f.seek(0, os.SEEK_END)
    existing.cut = f.tell() - end
    return existing, end


def _records(f: IO[bytes], fmt: str) -> Iterable[bytes]:
    """The complete records of a file: each ends with a newline outside CSV quotes.

    A quote count per physical line tracks whether a newline is inside a quoted field (a path
    with a newline in it); the csv module doubles embedded quotes, so the parity is exact.
    """
    parts: list[bytes] = []
    quoted = False
    for line in f:
        parts.append(line)
        if fmt == "csv":
            quoted ^= bool(line.count(b'"') & 1)
        if line.endswith(b"\n") and not quoted:
            yield b"".join(parts)
            parts = []


def _parse(text: str, fmt: str, *, header: bool) -> dict | None:
    """One record -> row dict ({} for the CSV header), or None when it is not ours."""
    if fmt == "csv":
        try:
            fields = next(csv.reader(io.StringIO(text, newline="")), None)
        except csv.Error:
            return None
        if fields is None or len(fields) != len(COLUMNS):
            return None
        if header:
            return {} if tuple(fields) == COLUMNS else None
        return dict(zip(COLUMNS, fields))
    try:
        rec = json.loads(text)
    except ValueError:
        return None
    if not isinstance(rec, dict) or set(rec) != set(COLUMNS) or not isinstance(rec["path"], str):
        return None
    return rec
