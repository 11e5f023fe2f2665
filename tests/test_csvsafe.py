"""fxscore.csvsafe: text <-> CSV cell, reversibly; formulas neutralised, files valid UTF-8."""
from __future__ import annotations

import csv
import io
import os

import pytest

from fxscore import csvsafe

NAMES = [
    "plain.png", "", " ", "with,comma", 'with"quote"', "a\nb", "a\rb", "a\r\nb", "ends\r",
    "\r", "\n", "\t", "x\ty", " lead and trail ", "Röntgen", "日本語.dcm",
    os.fsdecode(b"\xff"), os.fsdecode(b"caf\xe9.png"), os.fsdecode(b"\x80\xfe\xff"),
    "\ud800", "lone \udfff high", "\\", "\\\\", "a\\b", "C:\\data\\x.png", "\\x", "\\xff",
    "\\x41", "\\u", "\\udcff", "\\ud800", os.fsdecode(b"\\\xff"), os.fsdecode(b"\xff\\"),
    "=1+1", "=HYPERLINK(\"http://evil\",\"click\")", "=cmd|' /C calc'!A0", "+1", "-1", "-600",
    "@SUM(A1)", "\t=1", "\r=1", "'", "''", "'=1", "''=1", "'plain", "a=b", "1e5", "-",
    "=", "@", "+", ",=1",
]


@pytest.mark.parametrize("name", NAMES, ids=[ascii(n) for n in NAMES])
def test_text_round_trips_and_is_valid_utf8(name):
    cell = csvsafe.text(name)
    cell.encode("utf-8")  # strict: never a lone surrogate in a file
    assert csvsafe.untext(cell) == name
    assert not cell.startswith(csvsafe.FORMULA_START)  # never a live formula
    # through a real CSV file, as written and read by the project
    buf = io.StringIO(newline="")
    csvsafe.write_rows(buf, ["path", "n"], [[name, 1], ["after", 2]])
    data = buf.getvalue()
    data.encode("utf-8")
    rows = list(csvsafe.read_rows(io.StringIO(data, newline="")))
    assert rows == [["path", "n"], [name, "1"], ["after", "2"]]
    # and by a plain csv reader (pandas, a spreadsheet): three rows, whatever the name holds
    assert len(list(csv.reader(io.StringIO(data, newline="")))) == 3


@pytest.mark.parametrize("name", ["=1", "+A1", "-2+3", "@SUM(1)", "\tx", "\rx"])
def test_formula_starts_get_a_quote(name):
    assert csvsafe.text(name) == "'" + name


@pytest.mark.parametrize("value, cell", [
    (-600, "-600"), (-0.5, "-0.5"), (0.25, "0.25"), (3, "3"), (True, "1"), (False, "0"),
    (None, ""), (float("nan"), ""), ("-600", "'-600"), ("=1", "'=1")])
def test_numbers_stay_numbers_text_is_neutralised(value, cell):
    assert csvsafe.cell(value) == cell


def test_undecodable_bytes_are_visible_escapes():
    assert csvsafe.text(os.fsdecode(b"caf\xe9.png")) == "caf\\xe9.png"
    assert csvsafe.text("C:\\data\\a.png") == "C:\\data\\a.png"  # backslashes kept where clear
    assert csvsafe.text("a\\x.png") == "a\\\\x.png"
    # a hand-written lone leading quote and a plain \x41 are left as they are
    assert csvsafe.untext("'abc") == "'abc" and csvsafe.untext("\\x41") == "\\x41"


def test_lone_carriage_return_is_quoted():
    """The csv module's minimal quoting leaves a lone CR bare when rows end in "\\n"."""
    assert csvsafe.format_row(["a\rb", "c"]) == '"a\rb",c\n'
    assert csvsafe.format_row(["x", ""]) == "x,\n"


def test_read_dicts(tmp_path):
    p = tmp_path / "m.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        csvsafe.write_rows(f, ["path", "group"], [["=a,b", 3], [os.fsdecode(b"\xff"), 4]])
    with open(p, newline="", encoding="utf-8") as f:
        assert list(csvsafe.read_dicts(f)) == [{"path": "=a,b", "group": "3"},
                                               {"path": os.fsdecode(b"\xff"), "group": "4"}]
