"""fxscore.output: one schema, rows that round-trip, resuming a file cut at any byte, refusing
what cannot be resumed, dropping stale rows atomically, and write errors without a traceback."""
from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import small_tmpfs
from fxscore import csvsafe
from fxscore.output import (FIXED_COLUMNS, LEGACY_COLUMNS, MAX_RECORD, Done, OutputError,
                            RunIdentity, format_for, open_output, sidecar_path)

MODEL_ID = "0123456789ab"
ROOT = "/data/xrays"
SHA = "5" * 64
AWKWARD = {  # every kind of name a file system allows and a CSV has to carry
    "plain": "plain.png", "comma": "with,comma.png", "quotes": 'with"quote".png',
    "LF": "with\nnewline.png", "CR": "with\rcarriage return.png", "CRLF": "with\r\ncrlf.png",
    "trailing CR": "ends in CR\r", "tab": "with\ttab.png", "leading tab": "\tleading tab.png",
    "leading CR": "\rleading CR.png", "spaces": " spaces .png", "unicode": "Röntgen/ünïcode.dcm",
    "undecodable": os.fsdecode(b"undecodable\xff\xfe.png"),
    "undecodable dir": os.fsdecode(b"d\xe9j\xe0/IM0001"), "backslash": "back\\slash.png",
    "backslash x": "back\\xff.png", "backslash undecodable": os.fsdecode(b"b\\\xff.png"),
    "formula =": "=HYPERLINK(\"http://x\",\"y\").png", "formula cmd": "=cmd|' /C calc'!A0",
    "formula @": "@SUM(1+1)*cmd|' /C calc'!A0", "formula +": "+1.png", "formula -": "-600.png",
    "leading quote": "'quoted'.png", "two quotes": "''=x.png", "mixed": '",\n".jpg',
    "no extension": "d/IM0001",
}
PATHS = list(AWKWARD.values())


def ident(model_id=MODEL_ID, threshold=0.5, root=ROOT, extra=()) -> RunIdentity:
    return RunIdentity(model_id, threshold, root, extra_columns=extra)


def make_rows(paths=PATHS, model_id=MODEL_ID) -> list[dict]:
    rows = []
    for i, p in enumerate(paths):
        failed = i % 4 == 2
        prob = None if failed else (i * 0.123456789) % 1
        rows.append({"path": p, "probability": prob,
                     "label": "" if failed else ("fractured" if prob >= 0.5 else "not fractured"),
                     "threshold": 0.5, "model_id": model_id, "sha256": "" if failed else SHA,
                     "error": f"{p}: cannot decode, \"truncated\"\nfile" if failed else ""})
    return rows


def write(path: Path, fmt: str, rows, *, batch: int = 3, identity=None, **kw):
    writer, existing = open_output(str(path), fmt, identity or ident(), **kw)
    try:
        for i in range(0, len(rows), batch):
            writer.write_batch(rows[i:i + batch])
    finally:
        writer.close()
    return existing


def read_back(path: Path, fmt: str, columns=FIXED_COLUMNS) -> list[dict]:
    """As a user's program would read it, plus csvsafe to undo the documented escaping."""
    with open(path, encoding="utf-8", newline="") as f:  # strict UTF-8: the file must be valid
        if fmt == "csv":
            rows = list(csvsafe.read_rows(f))
            assert tuple(rows[0]) == columns
            return [dict(zip(columns, r)) for r in rows[1:]]
        recs = [json.loads(line) for line in f]
        return [{k: csvsafe.unescape_bytes(v) if isinstance(v, str) else v
                 for k, v in r.items()} for r in recs]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_rows_round_trip(tmp_path, fmt):
    out = tmp_path / f"preds.{fmt}"
    rows = make_rows()
    assert write(out, fmt, rows).rows == {}
    back = read_back(out, fmt)
    assert [r["path"] for r in back] == PATHS
    for got, want in zip(back, rows):
        assert got["model_id"] == MODEL_ID and got["label"] == want["label"]
        assert got["error"] == want["error"] and got["sha256"] == want["sha256"]
        if want["probability"] is None:
            assert got["probability"] in ("", None)
        else:
            assert float(got["probability"]) == pytest.approx(want["probability"], abs=5e-7)
        assert float(got["threshold"]) == 0.5
    if fmt == "csv":  # six decimals, as documented
        assert back[1]["probability"] == f"{rows[1]['probability']:.6f}"
    else:  # JSON lines stay ASCII, without lone surrogates, for any name
        text = out.read_bytes().decode("ascii")
        assert "\\udc" not in text
    # reopening collects what is there and appends nothing by itself
    writer, existing = open_output(str(out), fmt, ident())
    writer.close()
    n_failed = len(range(2, len(PATHS), 4))
    assert set(existing.done) == set(PATHS) and existing.failed == n_failed and existing.cut == 0
    assert existing.rows[PATHS[0]] == Done(SHA, False) and existing.rows[PATHS[2]] == Done("", True)
    assert existing.errors() == [p for i, p in enumerate(PATHS) if i % 4 == 2]
    assert len(read_back(out, fmt)) == len(PATHS)


@pytest.mark.parametrize("name", AWKWARD)
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_every_name_is_written_read_back_and_resumed_exactly(tmp_path, fmt, name):
    """A name alone in its file, between two others, then resumed after a cut mid-row."""
    path = AWKWARD[name]
    rows = make_rows(["before.png", path, "after.png"])
    out = tmp_path / "p"
    write(out, fmt, rows, batch=1)
    data = out.read_bytes()
    data.decode("utf-8")  # valid UTF-8 whatever the name
    assert [r["path"] for r in read_back(out, fmt)] == ["before.png", path, "after.png"]
    if fmt == "csv":
        # pandas and the csv module see three rows of seven cells (no cell runs on)
        with open(out, encoding="utf-8", newline="") as f:
            raw = list(csv.reader(f))
        assert [len(r) for r in raw] == [7] * 4 and raw[2][0] == csvsafe.text(path)
    # killed one byte before the end of each row: resuming rewrites exactly the missing rows
    lines = [len(r) for r in _records(data, fmt)]
    for cut in sorted({sum(lines[:k]) - 1 for k in range(1, len(lines) + 1)}):
        out.write_bytes(data[:cut])
        writer, existing = open_output(str(out), fmt, ident())
        writer.write_batch([r for r in rows if r["path"] not in existing.done])
        writer.close()
        assert out.read_bytes() == data, (name, cut)


def _records(data: bytes, fmt: str) -> list[bytes]:
    """Split a file written by fxscore into its records (newlines outside quotes)."""
    out, start, quoted = [], 0, False
    for i, b in enumerate(data):
        if fmt == "csv" and b == ord('"'):
            quoted = not quoted
        if b == ord("\n") and not quoted:
            out.append(data[start:i + 1])
            start = i + 1
    return out


def test_formula_cells_are_neutralised_and_numbers_stay_numbers(tmp_path):
    rows = make_rows(["=HYPERLINK(\"http://evil\",\"x\")", "@SUM(A1)", "+1", "-2", "\tt"])
    rows[0]["error"] = "=cmd|' /C calc'!A0"
    out = tmp_path / "p.csv"
    write(out, "csv", rows)
    with open(out, encoding="utf-8", newline="") as f:
        raw = list(csv.reader(f))[1:]
    assert [r[0] for r in raw] == ["'=HYPERLINK(\"http://evil\",\"x\")", "'@SUM(A1)", "'+1", "'-2",
                                   "'\tt"]
    assert raw[0][6] == "'=cmd|' /C calc'!A0"
    assert all(r[1] == "" or float(r[1]) >= 0 and not r[1].startswith("'") for r in raw)
    assert [r["path"] for r in read_back(out, "csv")] == [r["path"] for r in rows]


def test_header_is_the_fixed_columns_then_the_optional_ones_in_order(tmp_path):
    extra = ("window_center", "modality", "ood")
    rows = make_rows(PATHS[:3])
    rows[0].update(window_center=-600, modality="=CR", ood=True)
    rows[1].update(window_center=40.5, modality="DX", ood=False)
    rows[2].update(window_center=None, modality="", ood=None)
    write(tmp_path / "p.csv", "csv", rows, identity=ident(extra=extra))
    write(tmp_path / "p.jsonl", "jsonl", rows, identity=ident(extra=extra))
    lines = (tmp_path / "p.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == ",".join(FIXED_COLUMNS + extra)
    assert lines[1].endswith(",-600,'=CR,1")  # the number stays a number, the text is neutralised
    back = read_back(tmp_path / "p.csv", "csv", FIXED_COLUMNS + extra)
    assert [r["window_center"] for r in back] == ["-600", "40.5", ""]
    assert back[0]["modality"] == "=CR"
    recs = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert all(tuple(r) == FIXED_COLUMNS + extra for r in recs)
    assert recs[0]["window_center"] == -600 and recs[0]["ood"] is True
    # resuming with the same options works; with other options it is refused
    open_output(str(tmp_path / "p.csv"), "csv", ident(extra=extra))[0].close()
    for fmt in ("csv", "jsonl"):
        with pytest.raises(OutputError, match="--overwrite") as e:
            open_output(str(tmp_path / f"p.{fmt}"), fmt, ident())
        assert str(tmp_path / f"p.{fmt}") in str(e.value)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_resume_after_a_cut_at_every_byte(tmp_path, monkeypatch, fmt):
    """Whatever prefix a killed run left, resuming gives exactly the uninterrupted file."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not the question here
    rows = make_rows(PATHS[:12]) if fmt == "csv" else make_rows(PATHS[3:8])
    full_path = tmp_path / "full"
    write(full_path, fmt, rows)
    full = full_path.read_bytes()
    out = tmp_path / "cut"
    write(out, fmt, [])  # the sidecar
    for cut in range(len(full)):
        out.write_bytes(full[:cut])
        writer, existing = open_output(str(out), fmt, ident())
        kept = out.stat().st_size  # a cut header is removed, then written whole
        assert full.startswith(out.read_bytes())
        assert existing.cut == (cut - kept if cut >= kept else cut)
        writer.write_batch([r for r in rows if r["path"] not in existing.done])
        writer.close()
        assert out.read_bytes() == full, f"cut at byte {cut}"
        # the paths found done are exactly the rows complete before the cut
        n_done = len(existing.done)
        assert set(existing.done) == {r["path"] for r in rows[:n_done]}


def test_paths_with_newlines_are_not_split_into_records(tmp_path):
    rows = make_rows(["a\nb.png", "c.png"])
    write(tmp_path / "p.csv", "csv", rows)
    data = (tmp_path / "p.csv").read_bytes()
    cut = data.index(b"a\n") + 2  # killed just after the newline inside the quoted path
    (tmp_path / "p.csv").write_bytes(data[:cut])
    writer, existing = open_output(str(tmp_path / "p.csv"), "csv", ident())
    writer.close()
    assert existing.rows == {}
    assert (tmp_path / "p.csv").read_bytes() == data[:data.index(b"\n") + 1]


def _csv_file(p: Path):
    write(p, "csv", make_rows()[:3])


def _jsonl_file(p: Path):
    write(p, "jsonl", make_rows()[:3])


def _foreign_line(p: Path):
    _csv_file(p)
    with p.open("a") as f:
        f.write("hello\nx.png,0.5,fractured,0.5,0123456789ab,,\n")


def _legacy_csv(p: Path):  # what fxscore 0.1.0 wrote: no sha256 column, no sidecar
    p.write_text(",".join(LEGACY_COLUMNS) + "\na.png,0.100000,not fractured,0.5,"
                 f"{MODEL_ID},\n")


def _legacy_jsonl(p: Path):
    p.write_text(json.dumps({"path": "a.png", "probability": 0.1, "label": "not fractured",
                             "threshold": 0.5, "model_id": MODEL_ID, "error": ""}) + "\n")


def _no_sidecar(p: Path):
    _csv_file(p)
    sidecar_path(p).unlink()


def _broken_sidecar(p: Path):
    _csv_file(p)
    sidecar_path(p).write_text("{not json")


def _no_newline(p: Path):
    p.write_bytes(b"\x89PNG\r\x1a\x00" + bytes(b for b in range(256) if b != 10) * 4)  # an image


def _bad_sha(p: Path):
    _csv_file(p)
    with p.open("a") as f:
        f.write(f"x.png,0.5,fractured,0.5,{MODEL_ID},not-a-hash,\n")


REFUSED = {  # how the file was made, the format and identity asked for, the message
    "other model": (_csv_file, "csv", ident("ffffffffffff"),
                    "holds scores from model 0123456789ab, not ffffffffffff"),
    "other threshold": (_csv_file, "csv", ident(threshold=0.3),
                        "holds labels at threshold 0.5, not 0.3"),
    "other root": (_csv_file, "csv", ident(root="/other/export"),
                   "holds scores of the files under /data/xrays, not /other/export"),
    "other root, jsonl": (_jsonl_file, "jsonl", ident(root="/other/export"),
                          "under /data/xrays, not /other/export"),
    "jsonl file, csv wanted": (_jsonl_file, "csv", ident(),
                               "not written by `fxscore run --format csv`"),
    "csv file, jsonl wanted": (_csv_file, "jsonl", ident(),
                               "not written by `fxscore run --format jsonl`"),
    "other columns": (lambda p: p.write_text("path,score\na.png,0.1\n"), "csv", ident(),
                      "its first line is 'path,score"),
    "foreign line": (_foreign_line, "csv", ident(), "record 5 is 'hello"),
    "0.1.0 csv": (_legacy_csv, "csv", ident(), "written by fxscore 0.1.0 .*no sha256"),
    "0.1.0 jsonl": (_legacy_jsonl, "jsonl", ident(), "written by fxscore 0.1.0 .*no sha256"),
    "sidecar missing": (_no_sidecar, "csv", ident(), r"preds.fxscore.json, .* is missing"),
    "sidecar broken": (_broken_sidecar, "csv", ident(), r"preds.fxscore.json, .* not readable"),
    "binary, no newline": (_no_newline, "csv", ident(), "without a newline"),
    "bad sha256 cell": (_bad_sha, "csv", ident(), "record 5 is 'x.png"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refuses_to_resume_a_file_it_did_not_write(tmp_path, case):
    make, fmt, identity, message = REFUSED[case]
    out = tmp_path / "preds"
    make(out)
    before = out.read_bytes()
    side = sidecar_path(out)
    side_before = side.read_bytes() if side.exists() else None
    with pytest.raises(OutputError, match=message) as e:
        open_output(str(out), fmt, identity)
    assert "--overwrite" in str(e.value) and str(out) in str(e.value)
    assert out.read_bytes() == before  # nothing cut, nothing appended
    assert (side.read_bytes() if side.exists() else None) == side_before  # nor recorded
    # --overwrite is the way out
    write(out, fmt, make_rows(model_id="ffffffffffff")[:2], identity=ident("ffffffffffff"),
          overwrite=True)
    assert [r["path"] for r in read_back(out, fmt)] == PATHS[:2]
    assert json.loads(side.read_text())["model_id"] == "ffffffffffff"


def test_sidecar_records_the_run_and_csv_stays_plain(tmp_path):
    root = tmp_path / os.fsdecode(b"export \xff")
    out = tmp_path / "p.csv"
    write(out, "csv", make_rows()[:2], identity=ident(root=root))
    doc = json.loads(sidecar_path(out).read_text(encoding="ascii"))
    assert doc["root"] == str(root) and doc["model_id"] == MODEL_ID and doc["threshold"] == 0.5
    assert doc["columns"] == list(FIXED_COLUMNS) and doc["format"] == "csv"
    # the same root resumes (also given relatively); pandas-style readers see only the CSV
    os.chdir(tmp_path)
    open_output(str(out), "csv", ident(root=os.path.relpath(root)))[0].close()
    with open(out, newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 2


@pytest.mark.parametrize("content", [b"", b"path,proba", b"path,probability,label,threshold,",
                                     b"path,probability,label,threshold,model_id,error"])
def test_empty_or_half_header_starts_afresh(tmp_path, content):
    out = tmp_path / "p.csv"
    out.write_bytes(content)
    write(out, "csv", make_rows()[:2])
    assert out.read_text(encoding="utf-8").count("path,probability") == 1
    assert len(read_back(out, "csv")) == 2


def test_header_only_file_without_sidecar_is_resumed(tmp_path):
    out = tmp_path / "p.csv"
    write(out, "csv", [])
    sidecar_path(out).unlink()
    write(out, "csv", make_rows()[:2], identity=ident(root="/elsewhere"))
    assert json.loads(sidecar_path(out).read_text())["root"] == "/elsewhere"


# ---- drop --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_drop_rewrites_atomically_and_each_path_appears_once(tmp_path, fmt):
    out = tmp_path / f"p.{fmt}"
    rows = make_rows()
    write(out, fmt, rows)
    out.chmod(0o640)
    inode = out.stat().st_ino
    stale = {PATHS[1], PATHS[3], PATHS[2]}  # a changed file, an error row, an awkward name
    writer, existing = open_output(str(out), fmt, ident())
    try:
        assert writer.drop(stale | {"not/in/the/file.png"}) == 3
        assert set(existing.done) == set(PATHS) - stale
        assert out.stat().st_ino != inode  # a new file renamed into place ...
        assert stat.S_IMODE(out.stat().st_mode) == 0o640  # ... with the old one's mode
        with pytest.raises(OutputError, match="another process"):  # and still locked
            open_output(str(out), fmt, ident())
        fresh = [dict(r, sha256="6" * 64, error="", probability=0.9, label="fractured")
                 for r in rows if r["path"] in stale]
        writer.write_batch(fresh)
        with pytest.raises(RuntimeError, match="before the first"):
            writer.drop({PATHS[0]})
    finally:
        writer.close()
    back = read_back(out, fmt)
    assert sorted(r["path"] for r in back) == sorted(PATHS)  # every path exactly once
    by_path = {r["path"]: r for r in back}
    assert all(by_path[p]["sha256"] == "6" * 64 for p in stale)
    assert [r["path"] for r in back[:len(PATHS) - 3]] == [p for p in PATHS if p not in stale]
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_drop_that_fails_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "p.csv"
    write(out, "csv", make_rows())
    before = out.read_bytes()

    def fail(*a):
        raise OSError(5, "Input/output error")

    writer, _ = open_output(str(out), "csv", ident())
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OutputError, match="cannot write .*Input/output error"):
        writer.drop({PATHS[0]})
    writer.close()
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.csv.fxscore.json"]


# ---- locks, odd --out targets ------------------------------------------------------------

def test_second_writer_is_refused(tmp_path):
    writer, _ = open_output(str(tmp_path / "p.csv"), "csv", ident())
    try:
        with pytest.raises(OutputError, match="another process"):
            open_output(str(tmp_path / "p.csv"), "csv", ident())
    finally:
        writer.close()
    open_output(str(tmp_path / "p.csv"), "csv", ident())[0].close()  # free again


def test_unwritable_output(tmp_path):
    with pytest.raises(OutputError, match="cannot write"):
        open_output(str(tmp_path / "no" / "such" / "dir.csv"), "csv", ident())


def _fifo(tmp_path: Path) -> str:
    os.mkfifo(tmp_path / "fifo")
    return str(tmp_path / "fifo")


@pytest.mark.parametrize("target, kind", [
    (lambda t: "/dev/null", "character device"), (lambda t: "/dev/full", "character device"),
    (lambda t: "/dev/zero", "character device"), (_fifo, "FIFO"),
    (lambda t: str(t), "folder")])
def test_out_that_is_not_a_regular_file_is_refused(tmp_path, target, kind):
    out = target(tmp_path)
    if not os.path.exists(out):
        pytest.skip(f"{out} is missing here")
    with pytest.raises(OutputError, match=f"is a {kind}, not a regular file; --out must be a "
                                          "regular file"):
        open_output(out, "csv", ident())
    assert not os.path.exists(str(sidecar_path(out)))  # nothing created beside it


LIMITS = ["timeout", "60", "prlimit", f"--as={1 << 30}"]  # 1 GiB address space, 60 s


def _limited(code: str, **kw) -> subprocess.CompletedProcess:
    if not all(os.path.exists(f"/usr/bin/{t}") or _which(t) for t in ("timeout", "prlimit")):
        pytest.skip("needs timeout and prlimit")
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([*LIMITS, sys.executable, "-c", textwrap.dedent(code)],
                          stderr=subprocess.PIPE, text=True, **kw)


def _which(tool: str) -> bool:
    import shutil
    return shutil.which(tool) is not None


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/full", "/dev/null"])
def test_devices_are_refused_fast_under_a_memory_limit(device):
    """Today /dev/zero is read as one endless line until the kernel kills the machine."""
    r = _limited(f"""
        from fxscore.output import OutputError, RunIdentity, open_output
        try:
            open_output({device!r}, "csv", RunIdentity("m", 0.5, "/data"))
        except OutputError as e:
            print("refused:", e)
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"refused: {device}: is a character device")


def test_a_huge_file_without_newlines_is_refused_without_reading_it_all(tmp_path):
    out = tmp_path / "huge.csv"
    with open(out, "wb") as f:  # 4 GiB of zeros (sparse): more than the address space allowed
        f.truncate(4 << 30)
    r = _limited(f"""
        from fxscore.output import OutputError, RunIdentity, open_output
        try:
            open_output({str(out)!r}, "csv", RunIdentity("m", 0.5, "/data"))
        except OutputError as e:
            print("refused:", e)
        """)
    assert r.returncode == 0, r.stderr
    assert f"longer than {MAX_RECORD} bytes" in r.stdout and "--overwrite" in r.stdout
    assert out.stat().st_size == 4 << 30


# ---- write errors ------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: a real ENOSPC."""
    with small_tmpfs(tmp_path / "mnt", "64k") as mnt:
        yield mnt


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_full_disk_is_one_clear_error_and_what_was_written_resumes(small_disk, tmp_path, fmt):
    rows = make_rows([f"scan {i:05d} " + "x" * 150 + ".dcm" for i in range(1500)])
    out = small_disk / f"p.{fmt}"
    writer, _ = open_output(str(out), fmt, ident())
    with pytest.raises(OutputError) as e:
        for i in range(0, len(rows), 32):
            writer.write_batch(rows[i:i + 32])
    assert str(e.value).startswith(f"cannot write {out}: No space left on device")
    assert "rerun the same command to resume" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(OutputError):  # stays failed, without touching the file again
        writer.write_batch(rows[:1])
    writer.close()  # no second error from flushing the same bytes again
    writer.close()
    # space freed: the rerun resumes where the disk filled up and finishes the same file
    subprocess.run(["mount", "-o", "remount,size=2m", str(small_disk)], check=True)
    writer, existing = open_output(str(out), fmt, ident())
    assert 0 < len(existing.done) < len(rows)
    writer.write_batch([r for r in rows if r["path"] not in existing.done])
    writer.close()
    full = tmp_path / f"full.{fmt}"
    write(full, fmt, rows, batch=32)
    assert out.read_bytes() == full.read_bytes()


def test_stdout_on_a_full_device_is_one_error_and_no_exit_noise():
    """`fxscore run --out - > /dev/full`: one OutputError, nothing printed at exit after it."""
    code = """
        import sys
        from fxscore.output import OutputError, RunIdentity, open_output
        row = {"path": "a.png", "probability": 0.5, "label": "fractured", "threshold": 0.5,
               "model_id": "m", "sha256": "", "error": ""}
        writer, _ = open_output("-", "csv", RunIdentity("m", 0.5, "/data"))
        try:
            writer.write_batch([row] * 10000)
        except OutputError as e:
            print("error:", e, file=sys.stderr)
        finally:
            writer.close()
        """
    with open("/dev/full", "wb") as full:
        r = _limited(code, stdout=full)
    assert r.returncode == 0
    assert r.stderr.strip() == ("error: cannot write stdout: No space left on device (the disk "
                                "or quota is full)")


@pytest.mark.parametrize("out, fmt, expected", [
    ("p.csv", None, "csv"), ("p.jsonl", None, "jsonl"), ("P.NDJSON", None, "jsonl"),
    ("-", None, "csv"), ("p.txt", None, "csv"), ("p.csv", "jsonl", "jsonl")])
def test_format_for(out, fmt, expected):
    assert format_for(out, fmt) == expected


def test_identity_root_is_absolute_and_columns_distinct(tmp_path):
    os.chdir(tmp_path)
    assert ident(root="x").root == str(tmp_path / "x")
    assert ident(extra=("a", "b")).columns == FIXED_COLUMNS + ("a", "b")
    with pytest.raises(ValueError):
        ident(extra=("sha256",))


def test_fxscore_run_on_a_full_disk_says_one_line_and_resumes(small_disk, tmp_path):
    """End to end: ENOSPC mid-run is one 'Error: cannot write' line (no traceback, no second
    error from close), exit 1; after freeing space the same command finishes the same file."""
    from onnx_models import make_model

    repo = Path(__file__).resolve().parent.parent
    model = make_model(tmp_path / "tiny.onnx")
    out = small_disk / "p.csv"
    filler = small_disk / "filler"
    free = os.statvfs(small_disk)
    # two pages left: one for the sidecar, one (4 KiB, ~30 rows of 40) for the CSV
    filler.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 2 * 4096))
    cmd = ["timeout", "300", str(Path(sys.executable).parent / "fxscore"), "run",
           str(repo / "sample_data" / "test"), "-m", str(model), "--out", str(out),
           "--batch-size", "4", "--workers", "1", "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], r.stderr
    filler.unlink()
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = read_back(out, "csv")
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)) == sum(
        1 for p in (repo / "sample_data" / "test").rglob("*") if p.is_file())
