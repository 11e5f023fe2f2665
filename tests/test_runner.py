"""fxscore.runner: the run job as a library (listing, resume plan, scoring, writing, summary)."""
from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fxscore import exitcodes, runner
from fxscore.model import load_model
from fxscore.output import OutputError
from fxscore.runner import (RunError, Summary, output_format, parse_size, plan_resume,
                            run_job)

from onnx_models import make_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(make_model(tmp_path_factory.mktemp("m") / "m.onnx"), threads=1)


def grey(path: Path, value: int, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


def rows_of(out: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"), newline="")))


def job(model, root, out, **kw) -> Summary:
    kw.setdefault("workers", 1)
    return run_job(model, root, str(out), fmt="csv", **kw)


@pytest.mark.parametrize("text, expected", [
    ("4096", 4096), ("512M", 512 << 20), ("2G", 2 << 30), ("2g", 2 << 30), ("1.5G", 3 << 29),
    ("800MiB", 800 << 20), ("64k", 64 << 10), (" 1 T ", 1 << 40), ("100b", 100),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "2X", "-1G", "0", "1.2.3M", "2 GB extra"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_default_budget_is_half_of_what_the_process_may_use(monkeypatch):
    monkeypatch.setattr(runner, "available_memory", lambda: 8 << 30)
    assert runner.default_max_memory() == 4 << 30
    monkeypatch.setattr(runner, "available_memory", lambda: None)
    assert runner.default_max_memory() == runner.FALLBACK_MEMORY


@pytest.mark.parametrize("out, fmt, expected", [
    ("p.csv", None, "csv"), ("p.CSV", None, "csv"), ("p.jsonl", None, "jsonl"),
    ("p.ndjson", None, "jsonl"), ("p", None, "csv"), ("p", "jsonl", "jsonl"), ("-", None, "csv"),
    ("-", "jsonl", "jsonl"), ("d.v2/p.csv", "csv", "csv"),
])
def test_output_format(out, fmt, expected):
    assert output_format(out, fmt) == expected


@pytest.mark.parametrize("out, fmt", [("p.parquet", None), ("p.tsv", None), ("p.txt", "csv"),
                                      ("p.csv", "jsonl"), ("p.jsonl", "csv")])
def test_output_format_refuses_unknown_or_contradicting_extensions(out, fmt):
    with pytest.raises(RunError, match="--out"):
        output_format(out, fmt)


def test_a_fresh_run_fills_the_summary(model, tmp_path):
    src = tmp_path / "in"
    for i in range(5):
        grey(src / f"{i}.png", 40 * i)
    (src / "notes.txt").write_text("x")
    (src / "bad.png").write_bytes(b"broken")
    out = tmp_path / "deep" / "er" / "p.csv"  # missing folders are created
    s = job(model, src, out, batch_size=2)
    assert (s.candidates, s.scored, s.failed, s.already_done) == (6, 5, 1, 0)
    assert s.ignored == Counter({".txt": 1}) and s.exit_code() == exitcodes.SOME_FAILED
    rows = rows_of(out)
    assert [r["path"] for r in rows] == ["0.png", "1.png", "2.png", "3.png", "4.png", "bad.png"]
    assert rows[0]["sha256"] == hashlib.sha256((src / "0.png").read_bytes()).hexdigest()
    d = s.to_dict()
    assert d["exit_code"] == 3 and "1 file(s) could not be read" in d["reason"]
    assert d["model_id"] == model.model_id and d["ignored"] == {".txt": 1}
    assert d["timings"]["total_s"] >= d["timings"]["scoring_s"] > 0
    assert d["max_memory"] > 0 and d["peak_budget_bytes"] > 0
    json.dumps(d)  # what --summary-json writes


def test_nothing_to_score_is_exit_5_but_a_finished_resume_is_0(model, tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "a.py").write_text("x")
    s = job(model, empty, tmp_path / "e.csv")
    assert s.candidates == 0 and s.exit_code() == exitcodes.NOTHING_TO_SCORE
    src = tmp_path / "in"
    grey(src / "a.png", 10)
    out = tmp_path / "p.csv"
    assert job(model, src, out).exit_code() == 0
    again = job(model, src, out)
    assert (again.scored, again.already_done, again.exit_code()) == (0, 1, 0)


def test_resume_rescores_changed_content_and_keeps_each_path_once(model, tmp_path):
    src = tmp_path / "in"
    for i in range(6):
        grey(src / f"{i}.png", 30 * i)
    out = tmp_path / "p.csv"
    job(model, src, out, batch_size=4)
    before = {r["path"]: r for r in rows_of(out)}
    grey(src / "2.png", 250)  # same name, other content
    grey(src / "9.png", 5)  # new
    s = job(model, src, out)
    assert (s.changed, s.scored, s.already_done) == (1, 2, 5)
    rows = rows_of(out)
    assert sorted(r["path"] for r in rows) == sorted(before) + ["9.png"]  # each once
    now = {r["path"]: r for r in rows}
    assert now["2.png"]["sha256"] == hashlib.sha256((src / "2.png").read_bytes()).hexdigest()
    assert now["2.png"]["probability"] != before["2.png"]["probability"]
    for p in ("0.png", "1.png", "3.png"):
        assert now[p] == before[p]


def test_recycled_names_in_a_daily_export_are_rescored(model, tmp_path):
    """Monday's files replaced by Tuesday's under the same names: nothing is skipped."""
    src = tmp_path / "export"
    for i in range(4):
        grey(src / f"IMG{i:04d}.png", 20 + i)
    out = tmp_path / "daily.csv"
    job(model, src, out)
    for i in range(4):
        grey(src / f"IMG{i:04d}.png", 200 - i)
    s = job(model, src, out)
    assert s.changed == 4 and s.scored == 4 and s.already_done == 0
    rows = rows_of(out)
    assert len(rows) == 4
    for r in rows:
        assert r["sha256"] == hashlib.sha256((src / r["path"]).read_bytes()).hexdigest()


def test_the_same_names_in_another_folder_are_refused(model, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        grey(root / "x.png", 10)
        grey(root / "y.png", 20)
    out = tmp_path / "p.csv"
    job(model, a, out)
    kept = out.read_bytes()
    with pytest.raises(OutputError, match="not .*b"):
        job(model, b, out)
    assert out.read_bytes() == kept


def test_another_threshold_is_refused_and_recorded(model, tmp_path):
    src = tmp_path / "in"
    grey(src / "a.png", 10)
    out = tmp_path / "p.csv"
    job(model, src, out, threshold=0.25)
    assert rows_of(out)[0]["threshold"] == "0.25"
    with pytest.raises(OutputError, match="threshold"):
        job(model, src, out)  # the model's own threshold is 0.5


def test_a_fixed_broken_file_is_rescored_by_its_hash(model, tmp_path):
    """A truncated file's error row carries the hash of what was read; fixing the file
    changes that, so a plain resume rescores it."""
    src = tmp_path / "in"
    grey(src / "a.png", 10)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "p.csv"
    assert job(model, src, out).failed == 1
    [broken] = [r for r in rows_of(out) if r["error"]]
    assert broken["path"] == "broken.png" and broken["sha256"]
    grey(src / "broken.png", 99)
    s = job(model, src, out)
    assert (s.changed, s.scored, s.failed, s.exit_code()) == (1, 1, 0, 0)
    rows = rows_of(out)
    assert sorted(r["path"] for r in rows) == ["a.png", "broken.png"]
    assert all(not r["error"] for r in rows)


def test_retry_errors_for_rows_without_a_hash(model, tmp_path, monkeypatch):
    from fxscore import scoring

    src = tmp_path / "in"
    grey(src / "a.png", 10)
    grey(src / "b.png", 20)
    out = tmp_path / "p.csv"
    real_open = scoring.open_regular

    def refuse_b(path):
        if Path(path).name == "b.png":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path)

    monkeypatch.setattr(scoring, "open_regular", refuse_b)
    assert job(model, src, out).failed == 1
    [b] = [r for r in rows_of(out) if r["path"] == "b.png"]
    assert b["sha256"] == "" and "Permission denied" in b["error"]
    monkeypatch.setattr(scoring, "open_regular", real_open)  # permissions fixed
    s = job(model, src, out)
    assert (s.scored, s.earlier_failed, s.exit_code()) == (0, 1, exitcodes.SOME_FAILED)
    s = job(model, src, out, retry_errors=True)
    assert (s.retried, s.scored, s.failed, s.exit_code()) == (1, 1, 0, 0)
    rows = rows_of(out)
    assert sorted(r["path"] for r in rows) == ["a.png", "b.png"]
    assert all(r["sha256"] and not r["error"] for r in rows)


def test_plan_reads_only_the_files_that_have_rows(model, tmp_path, monkeypatch):
    src = tmp_path / "in"
    for i in range(10):
        grey(src / f"{i}.png", i)
    out = tmp_path / "p.csv"
    hashed = []
    real = runner.sha256_regular
    monkeypatch.setattr(runner, "sha256_regular", lambda p: hashed.append(p.name) or real(p))
    job(model, src, out)
    assert hashed == []  # a fresh run only lists
    grey(src / "10.png", 1)
    job(model, src, out)
    assert sorted(hashed) == sorted(f"{i}.png" for i in range(10))


def test_plan_resume_counts_and_classifies():
    from fxscore.output import Done, Existing

    existing = Existing(rows={"same": Done("a" * 64, False), "changed": Done("b" * 64, False),
                              "err": Done("c" * 64, True), "unread": Done("", True),
                              "gone": Done("d" * 64, False)})
    hashes = {"same": "a" * 64, "changed": "e" * 64, "err": "c" * 64, "unread": None}
    orig = runner.sha256_regular
    runner.sha256_regular = lambda p: hashes[p.name]
    try:
        found = [(n, Path(n)) for n in ("new", "same", "changed", "err", "unread")]
        plan = plan_resume(found, existing)
        assert (plan.candidates, plan.kept, plan.changed, plan.retried) == (5, 3, {"changed"}, set())
        assert plan.todo == 2
        plan = plan_resume(found, existing, retry_errors=True)
        assert (plan.kept, plan.stale, plan.todo) == (1, {"changed", "err", "unread"}, 4)
    finally:
        runner.sha256_regular = orig


def test_links_outside_are_summarised(model, tmp_path):
    src = tmp_path / "in"
    grey(src / "a.png", 10)
    grey(tmp_path / "elsewhere" / "b.png", 10)
    (src / "ext").symlink_to(tmp_path / "elsewhere")
    (src / "up").symlink_to("..")
    (src / "c.png").symlink_to(tmp_path / "elsewhere" / "b.png")
    s = job(model, src, tmp_path / "p.csv")
    assert s.scored == 1 and s.links_not_followed == Counter({"folder": 2, "file": 1})
    s = job(model, src, tmp_path / "q.csv", follow_links=True)
    assert s.scored == 3 and not s.links_not_followed


def test_another_scoring_loop_can_be_plugged_in(model, tmp_path):
    """What a cluster driver does: the runner lists, plans and writes; `score` scores."""
    src = tmp_path / "in"
    for i in range(3):
        grey(src / f"{i}.png", i)
    seen = []

    def remote(items):
        for rel, path in items:
            seen.append(rel)
            yield [{"path": rel, "probability": 0.25, "label": "not fractured", "threshold": 0.5,
                    "model_id": model.model_id, "sha256": "0" * 64, "error": ""}]

    out = tmp_path / "p.csv"
    s = job(model, src, out, score=remote)
    assert seen == ["0.png", "1.png", "2.png"] and s.scored == 3
    assert [r["probability"] for r in rows_of(out)] == ["0.250000"] * 3


def test_a_missing_input_is_a_run_error(model, tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        job(model, tmp_path / "nope", tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


# ---- DICOM: selection, columns, SRs, decoding in worker processes ----------------------------

@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    import pacs_export

    return pacs_export.make_export(tmp_path_factory.mktemp("pacs") / "export")


def test_excluded_dicom_files_get_no_row_and_are_counted_by_reason(model, export, tmp_path):
    import pacs_export
    from fxscore.scoring import DicomOptions

    listed = []
    out = tmp_path / "p.csv"
    s = job(model, export, out, on_ignored=lambda rel, why: listed.append((rel, why)))
    assert sorted(r["path"] for r in rows_of(out)) == sorted(pacs_export.SCORED)
    assert s.excluded == Counter(pacs_export.EXCLUDED_COUNTS)
    assert (s.candidates, s.scored, s.failed, s.exit_code()) == (13, 6, 0, 0)
    assert sorted(listed) == sorted((rel, f"excluded: {why}")
                                    for rel, why in pacs_export.EXCLUDED.items())
    d = s.to_dict()
    assert d["excluded"] == dict(sorted(pacs_export.EXCLUDED_COUNTS.items()))
    assert d["excluded_total"] == 7 and d["exit_code"] == 0
    # --modality all and --for-processing score the CT slices and the raw DX image
    s = job(model, export, tmp_path / "all.csv",
            dicom=DicomOptions(modalities=None, for_processing=True))
    assert (s.scored, s.failed) == (10, 0)
    assert s.excluded == Counter({"DICOMDIR": 1, "structured report": 1,
                                  "key object selection": 1})
    # no selection at all (what eval does): every file is read, the non-images are errors
    s = job(model, export, tmp_path / "none.csv", dicom=None)
    assert not s.excluded and (s.scored, s.failed) == (10, 3)


def test_an_input_where_everything_is_excluded_exits_5(model, export, tmp_path):
    import shutil

    src = tmp_path / "in"
    shutil.copytree(export / "PAT2" / "STUDY_C", src / "C")
    shutil.copy(export / "PAT1" / "STUDY_A" / "SR" / "SR1", src / "SR1")
    out = tmp_path / "p.csv"
    for _ in range(2):  # a rerun finds them excluded again
        s = job(model, src, out)
        assert (s.candidates, s.scored, s.failed, s.excluded_total) == (4, 0, 0, 4)
        assert s.exit_code() == exitcodes.NOTHING_TO_SCORE
        assert s.exit_reason() == ("nothing to score: every file was excluded (3 CT, "
                                   "1 structured report)")
        assert rows_of(out) == []
    grey(src / "photo.png", 50)  # one scored file: a success, and so is its finished resume
    assert job(model, src, out).exit_code() == 0
    again = job(model, src, out)
    assert (again.already_done, again.excluded_total, again.exit_code()) == (1, 4, 0)


def test_dicom_columns_follow_the_fixed_ones_and_resume_needs_the_same(model, export, tmp_path):
    import pacs_export
    from fxscore.identifiers import DEFAULT_COLUMNS
    from fxscore.output import FIXED_COLUMNS
    from fxscore.scoring import DicomOptions

    out = tmp_path / "p.csv"
    job(model, export, out, dicom=DicomOptions(columns=DEFAULT_COLUMNS))
    assert out.read_text(encoding="utf-8").splitlines()[0].split(",") == [
        *FIXED_COLUMNS, *DEFAULT_COLUMNS]
    rows = {r["path"]: r for r in rows_of(out)}
    cr = rows["PAT2/STUDY_B/CR/IM1"]
    assert (cr["StudyInstanceUID"], cr["Modality"], cr["BodyPartExamined"]) == (
        pacs_export.STUDY_B, "CR", "WRIST")
    assert all(r["StudyInstanceUID"] == study for r, study in
               ((rows[p], s) for p, s in pacs_export.SCORED.items()))
    assert all(rows["photos/hand.png"][c] == "" for c in DEFAULT_COLUMNS)  # not DICOM
    again = job(model, export, out, dicom=DicomOptions(columns=DEFAULT_COLUMNS))
    assert (again.already_done, again.scored) == (6, 0)
    kept = out.read_bytes()
    for other in ((), DEFAULT_COLUMNS + ("PatientID",), DEFAULT_COLUMNS[::-1]):
        with pytest.raises(OutputError, match="other columns"):
            job(model, export, out, dicom=DicomOptions(columns=other))
    assert out.read_bytes() == kept


def _sr_content(path: Path):
    """An SR's data set without the attributes that record when it was made (all that a
    rerun changes)."""
    import pydicom

    ds = pydicom.dcmread(path)
    for keyword in ("ContentDate", "ContentTime", "InstanceCreationDate",
                    "InstanceCreationTime"):
        if keyword in ds:
            delattr(ds, keyword)
    for item in ds.get("ContributingEquipmentSequence", []):
        del item.ContributionDateTime
    return ds


def test_each_sr_is_on_disk_before_its_row_and_a_rerun_rewrites_the_same(model, export,
                                                                          tmp_path, monkeypatch):
    import pydicom

    import pacs_export
    from fxscore import output, sr
    from fxscore.scoring import DicomOptions

    sr_dir = tmp_path / "sr"
    expected = {rel: sr.sr_path(sr_dir, pydicom.dcmread(export / rel, stop_before_pixels=True),
                                model.model_id)
                for rel, study in pacs_export.SCORED.items() if study}
    written = []
    real = output.RowWriter.write_batch

    def checking(self, rows):
        rows = list(rows)
        for r in rows:
            if r["path"] in expected:
                assert expected[r["path"]].is_file(), f"row of {r['path']} before its SR"
            written.append(r["path"])
        return real(self, rows)

    monkeypatch.setattr(output.RowWriter, "write_batch", checking)
    options = DicomOptions(sr_out=sr_dir)
    s = job(model, export, tmp_path / "p.csv", batch_size=2, dicom=options)
    assert sorted(written) == sorted(pacs_export.SCORED)
    assert (s.sr_written, s.sr_failed, s.exit_code()) == (5, 0, 0)
    assert sorted(sr_dir.iterdir()) == sorted(expected.values())
    first = {p.name: _sr_content(p) for p in sr_dir.iterdir()}

    resumed = job(model, export, tmp_path / "p.csv", dicom=options)  # nothing new to write
    assert (resumed.scored, resumed.sr_written) == (0, 0)
    rerun = job(model, export, tmp_path / "q.csv", dicom=options)  # the same SRs again
    assert rerun.sr_written == 5 and sorted(p.name for p in sr_dir.iterdir()) == sorted(first)
    assert all(_sr_content(sr_dir / name) == ds for name, ds in first.items())

    shards = tmp_path / "sharded"
    for k in (1, 2):
        job(model, export, tmp_path / f"s{k}.csv", shard=runner.Shard(k, 2),
            dicom=DicomOptions(sr_out=shards))
    assert sorted(p.name for p in shards.iterdir()) == sorted(first)  # shards cover every SR


def test_an_sr_that_cannot_be_written_makes_an_error_row(model, export, tmp_path):
    import pacs_export
    from fxscore.scoring import DicomOptions

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    warnings = []
    out = tmp_path / "p.csv"
    s = job(model, export, out, dicom=DicomOptions(sr_out=blocker), warn=warnings.append)
    rows = {r["path"]: r for r in rows_of(out)}
    assert (s.sr_written, s.sr_failed, s.scored, s.failed) == (0, 5, 1, 5)
    assert s.exit_code() == exitcodes.SOME_FAILED
    for rel, study in pacs_export.SCORED.items():
        if study:
            assert "its DICOM SR could not be written" in rows[rel]["error"]
            assert rows[rel]["probability"] == ""
    assert not rows["photos/hand.png"]["error"]
    assert len(warnings) == 5 and all("could not be written" in w for w in warnings)


def test_a_crashing_or_hanging_decoder_costs_one_row(model, export, tmp_path, monkeypatch):
    import shutil

    import standin_decoder
    from fxscore import isolate
    from fxscore.scoring import model_input

    src = tmp_path / "in"
    src.mkdir()
    for name in ("crash.dcm", "hang.dcm", "ok.dcm"):  # RLE: decoded in a worker process
        shutil.copy(export / "PAT1" / "STUDY_A" / "DX" / "IM2", src / name)
    grey(src / "plain.png", 50)
    pools = []

    def standin_pool(workers, timeout=None):
        pools.append(isolate.Isolated(standin_decoder.decode, workers=workers, timeout=6.0))
        return pools[-1]

    monkeypatch.setattr(runner, "make_isolated", standin_pool)
    out = tmp_path / "p.csv"
    s = job(model, src, out, workers=2)
    rows = {r["path"]: r for r in rows_of(out)}
    assert "the decoder crashed on this file (killed by SIGSEGV)" in rows["crash.dcm"]["error"]
    assert "decoding took longer than 6 s" in rows["hang.dcm"]["error"]
    assert not rows["ok.dcm"]["error"] and not rows["plain.png"]["error"]
    assert (s.scored, s.failed, s.exit_code()) == (2, 2, exitcodes.SOME_FAILED)
    [pool] = pools  # one pool for the job, closed at its end
    assert pool.replaced == 2 and pool.processes == []
    x = model_input(src / "ok.dcm", model.meta.preprocess)  # in-process: the same score
    assert float(rows["ok.dcm"]["probability"]) == pytest.approx(
        float(model.predict(x[None])[0]), abs=1e-6)


def test_other_formats_are_not_parsed_as_dicom(model, export, tmp_path, monkeypatch):
    import shutil

    from fxscore import dicom

    src = tmp_path / "in"
    for i in range(4):
        grey(src / f"{i}.png", 10 * i)
    Image.new("L", (40, 40), 90).save(src / "j.jpg")
    parsed = []
    real = dicom.read_header
    monkeypatch.setattr(dicom, "read_header",
                        lambda f, name, **kw: parsed.append(name) or real(f, name, **kw))
    assert job(model, src, tmp_path / "p.csv").scored == 5
    assert parsed == []
    shutil.copy(export / "PAT1" / "STUDY_A" / "DX" / "IM1", src / "x.dcm")
    assert job(model, src, tmp_path / "p.csv").scored == 1
    assert 1 <= len(parsed) <= 2  # selection, then the decode; nothing more
