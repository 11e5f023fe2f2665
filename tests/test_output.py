"""fxscore.output: CSV/JSONL rows that round-trip, and resuming a file cut at any byte."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from fxscore.output import COLUMNS, OutputError, format_for, open_output

MODEL_ID = "0123456789ab"
PATHS = ["plain.png", "with,comma.png", 'with"quote".png', "with\nnewline.png",
         "with\r\ncrlf.png", "Röntgen/ünïcode.dcm", os.fsdecode(b"undecodable\xff.png"),
         " spaces .png", '",\n".jpg', "d/IM0001"]


def make_rows(paths=PATHS, model_id=MODEL_ID) -> list[dict]:
    rows = []
    for i, p in enumerate(paths):
        failed = i % 4 == 2
        prob = None if failed else (i * 0.123456789) % 1
        rows.append({"path": p, "probability": prob,
                     "label": "" if failed else ("fractured" if prob >= 0.5 else "not fractured"),
                     "threshold": 0.5, "model_id": model_id,
                     "error": f"{p}: cannot decode, \"truncated\"\nfile" if failed else ""})
    return rows


def write(path: Path, fmt: str, rows, *, batch: int = 3, model_id=MODEL_ID, **kw):
    writer, existing = open_output(str(path), fmt, model_id, **kw)
    try:
        for i in range(0, len(rows), batch):
            writer.write_batch(rows[i:i + batch])
    finally:
        writer.close()
    return existing


def read_back(path: Path, fmt: str) -> list[dict]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        if fmt == "csv":
            reader = csv.reader(f)
            assert tuple(next(reader)) == COLUMNS
            return [dict(zip(COLUMNS, r)) for r in reader]
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_rows_round_trip(tmp_path, fmt):
    out = tmp_path / f"preds.{fmt}"
    rows = make_rows()
    assert write(out, fmt, rows).done == set()
    back = read_back(out, fmt)
    assert [r["path"] for r in back] == PATHS
    for got, want in zip(back, rows):
        assert got["model_id"] == MODEL_ID and got["label"] == want["label"]
        assert got["error"] == want["error"]
        if want["probability"] is None:
            assert got["probability"] in ("", None)
        else:
            assert float(got["probability"]) == pytest.approx(want["probability"], abs=5e-7)
        assert float(got["threshold"]) == 0.5
    if fmt == "csv":  # six decimals, as documented
        assert back[1]["probability"] == f"{rows[1]['probability']:.6f}"
    else:  # JSON lines stay valid JSON even for undecodable names
        out.read_bytes().decode("ascii")
    # reopening collects what is there and appends nothing by itself
    writer, existing = open_output(str(out), fmt, MODEL_ID)
    writer.close()
    assert existing.done == set(PATHS) and existing.failed == 2 and existing.cut == 0
    assert len(read_back(out, fmt)) == len(PATHS)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_resume_after_a_cut_at_every_byte(tmp_path, monkeypatch, fmt):
    """Whatever prefix a killed run left, resuming gives exactly the uninterrupted file."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not the question here
    # JSON lines are simple; keep its file short, the paths that matter included
    rows = make_rows() if fmt == "csv" else make_rows(PATHS[3:8])
    full_path = tmp_path / "full"
    write(full_path, fmt, rows)
    full = full_path.read_bytes()
    out = tmp_path / "cut"
    for cut in range(len(full)):
        out.write_bytes(full[:cut])
        writer, existing = open_output(str(out), fmt, MODEL_ID)
        kept = out.stat().st_size
        assert full.startswith(out.read_bytes()) and existing.cut == cut - kept
        writer.write_batch([r for r in rows if r["path"] not in existing.done])
        writer.close()
        assert out.read_bytes() == full, f"cut at byte {cut}"
        # the paths found done are exactly the rows complete before the cut
        n_done = len(existing.done)
        assert existing.done == {r["path"] for r in rows[:n_done]}


def test_paths_with_newlines_are_not_split_into_records(tmp_path):
    rows = make_rows(["a\nb.png", "c.png"])
    write(tmp_path / "p.csv", "csv", rows)
    data = (tmp_path / "p.csv").read_bytes()
    cut = data.index(b"a\n") + 2  # killed just after the newline inside the quoted path
    (tmp_path / "p.csv").write_bytes(data[:cut])
    writer, existing = open_output(str(tmp_path / "p.csv"), "csv", MODEL_ID)
    writer.close()
    assert existing.done == set() and (tmp_path / "p.csv").read_bytes() == data[:data.index(b"\n") + 1]


def _csv_file(p: Path):
    write(p, "csv", make_rows()[:3])


def _jsonl_file(p: Path):
    write(p, "jsonl", make_rows()[:3])


def _foreign_line(p: Path):
    _csv_file(p)
    with p.open("a") as f:
        f.write("hello\nx.png,0.5,fractured,0.5,0123456789ab,\n")


REFUSED = {  # how the file was made, the format and model asked for, the message
    "other model": (_csv_file, "csv", "ffffffffffff",
                    "holds scores from model 0123456789ab, not ffffffffffff"),
    "jsonl file, csv wanted": (_jsonl_file, "csv", MODEL_ID,
                               "not written by `fxscore run --format csv`"),
    "csv file, jsonl wanted": (_csv_file, "jsonl", MODEL_ID,
                               "not written by `fxscore run --format jsonl`"),
    "other columns": (lambda p: p.write_text("path,score\na.png,0.1\n"), "csv", MODEL_ID,
                      "its first line is 'path,score"),
    "foreign line": (_foreign_line, "csv", MODEL_ID, "record 5 is 'hello"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refuses_to_resume_a_file_it_did_not_write(tmp_path, case):
    make, fmt, model_id, message = REFUSED[case]
    out = tmp_path / "preds"
    make(out)
    before = out.read_bytes()
    with pytest.raises(OutputError, match=message) as e:
        open_output(str(out), fmt, model_id)
    assert "--overwrite" in str(e.value) and str(out) in str(e.value)
    assert out.read_bytes() == before  # nothing cut, nothing appended
    # --overwrite is the way out
    write(out, fmt, make_rows()[:2], model_id="ffffffffffff", overwrite=True)
    assert [r["path"] for r in read_back(out, fmt)] == PATHS[:2]


@pytest.mark.parametrize("content", [b"", b"path,proba", b"path,probability,label,threshold,"])
def test_empty_or_half_header_starts_afresh(tmp_path, content):
    out = tmp_path / "p.csv"
    out.write_bytes(content)
    write(out, "csv", make_rows()[:2])
    assert out.read_text(encoding="utf-8").count("path,probability") == 1
    assert len(read_back(out, "csv")) == 2


def test_second_writer_is_refused(tmp_path):
    writer, _ = open_output(str(tmp_path / "p.csv"), "csv", MODEL_ID)
    try:
        with pytest.raises(OutputError, match="another process"):
            open_output(str(tmp_path / "p.csv"), "csv", MODEL_ID)
    finally:
        writer.close()
    open_output(str(tmp_path / "p.csv"), "csv", MODEL_ID)[0].close()  # free again


def test_unwritable_output(tmp_path):
    with pytest.raises(OutputError, match="cannot write"):
        open_output(str(tmp_path / "no" / "such" / "dir.csv"), "csv", MODEL_ID)


@pytest.mark.parametrize("out, fmt, expected", [
    ("p.csv", None, "csv"), ("p.jsonl", None, "jsonl"), ("P.NDJSON", None, "jsonl"),
    ("-", None, "csv"), ("p.txt", None, "csv"), ("p.csv", "jsonl", "jsonl")])
def test_format_for(out, fmt, expected):
    assert format_for(out, fmt) == expected
