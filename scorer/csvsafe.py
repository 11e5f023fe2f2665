"""The one place where text becomes a CSV cell, and a CSV cell becomes text again.

Every CSV fxscore writes (run output, eval's predictions.csv, audit's files.csv and groups.csv,
split's manifest.csv and excluded.csv) goes through `write_row`/`cell`, and every CSV it reads
back (resume, `eval --labels`, `eval --groups`, split manifests) through `read_rows`/`untext`,
so a path read back is exactly the path written. Two things happen to text, in this order:

1. **Undecodable bytes** (file names that are not UTF-8 arrive from `os.scandir` as lone
   surrogates U+DC80..U+DCFF) are written as a visible `\\xHH` (the byte in lower-case hex), and
   any other lone surrogate as `\\uXXXX`, so the file is always valid UTF-8. A backslash is
   doubled only where it would otherwise read as the start of such an escape, i.e. when the next
   character is a backslash, `x`, `u` or an escaped one; every other backslash is written as is
   (`C:\\data\\a.png` stays as it is, `a\\x.png` is written `a\\\\x.png`).
2. **Formula neutralising** (OWASP "CSV injection"): a text cell that starts with `=`, `+`, `-`,
   `@`, a tab or a carriage return gets a leading `'`, so a spreadsheet shows it as text instead
   of running it. A text cell that already starts with `'` gets one more, so that this can be
   undone: reading strips one leading `'` when it is followed by one of those characters or by
   another `'` (a lone leading `'` in a hand-written CSV is left alone).

Numbers are cells too but never text: a probability, or a -600 window centre, is written as the
number and stays a number in a spreadsheet. Cells are quoted when they hold a comma, a quote,
a carriage return or a line feed (the csv module's minimal quoting misses a lone carriage return
when the line ends in "\\n"), and every row ends with "\\n".

JSON lines use step 1 only (the same `\\xHH` escapes, so they hold no lone surrogates either).
"""
from __future__ import annotations

import csv
import math
import numbers
import re
from typing import IO, Any, Iterable, Iterator

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_QUOTE_IF = re.compile(r'[,"\r\n]')
_ESCAPE = re.compile(r"\\(?=[\\xu\ud800-\udfff])|[\ud800-\udfff]")
_UNESCAPE = re.compile(r"\\\\|\\x([89a-fA-F][0-9a-fA-F])|\\u([dD][89a-fA-F][0-9a-fA-F]{2})")


def _escape_one(m: re.Match) -> str:
    c = m.group()
    if c == "\\":
        return "\\\\"
    code = ord(c)
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def _unescape_one(m: re.Match) -> str:
    if m.group(1):
        return chr(0xDC00 + int(m.group(1), 16))
    if m.group(2):
        return chr(int(m.group(2), 16))
    return "\\"


def escape_bytes(s: str) -> str:
    """Step 1: lone surrogates -> `\\xHH` / `\\uXXXX` (valid UTF-8); `unescape_bytes` undoes it."""
    return _ESCAPE.sub(_escape_one, s) if ("\\" in s or _has_surrogate(s)) else s


def unescape_bytes(s: str) -> str:
    """Undo `escape_bytes`: `\\xHH` -> the undecodable byte's surrogate, `\\\\` -> `\\`."""
    return _UNESCAPE.sub(_unescape_one, s) if "\\" in s else s


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def text(s: str) -> str:
    """A text value as its CSV cell: undecodable bytes escaped, formulas neutralised."""
    s = escape_bytes(s)
    if s.startswith(FORMULA_START) or s.startswith("'"):
        return "'" + s
    return s


def untext(cell_text: str) -> str:
    """A CSV cell as the text it was written from (the inverse of `text`)."""
    if len(cell_text) > 1 and cell_text[0] == "'" and cell_text[1] in "'=+-@\t\r":
        cell_text = cell_text[1:]
    return unescape_bytes(cell_text)


def cell(value: Any) -> str:
    """Any value as a CSV cell: None -> "", bool -> 1/0, numbers as numbers, the rest as text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        return "" if math.isnan(v) else repr(v)
    return text(str(value))


def format_row(cells: Iterable[str]) -> str:
    """Cells that are CSV cells already (from `cell`/`text`) -> one CSV line ending in "\\n"."""
    return ",".join('"' + c.replace('"', '""') + '"' if _QUOTE_IF.search(c) else c
                    for c in cells) + "\n"


def write_row(stream: IO[str], values: Iterable[Any]) -> None:
    """Write one row of values (each through `cell`) to a text stream opened with newline=""."""
    stream.write(format_row(cell(v) for v in values))


def write_rows(stream: IO[str], header: Iterable[str], rows: Iterable[Iterable[Any]]) -> None:
    write_row(stream, header)
    for row in rows:
        write_row(stream, row)


def read_rows(stream: IO[str]) -> Iterator[list[str]]:
    """The rows of a CSV text stream (opened with newline=""), every cell through `untext`."""
    for row in csv.reader(stream):
        yield [untext(c) for c in row]


def read_dicts(stream: IO[str]) -> Iterator[dict[str, str]]:
    """Like csv.DictReader over `read_rows`: one dict per row, keyed by the header."""
    rows = read_rows(stream)
    header = next(rows, None)
    if header is None:
        return
    for row in rows:
        yield dict(zip(header, row))
