"""fxscore.studies and `fxscore studies`: one row per study from one or more row files."""
from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner

from fxscore import csvsafe
from fxscore.cli import cli
from fxscore.studies import (COLUMNS, StudiesError, read_rows, studies_csv, summarise,
                             summarise_files, write_studies)

HEADER = ("path", "probability", "label", "threshold", "model_id", "sha256", "error",
          "StudyInstanceUID")
POS, NEG = "fractured", "not fractured"


def row(path, p, study="", *, thr=0.5, model="m1", error=""):
    label = "" if p is None else (POS if p >= thr else NEG)
    return (path, p, label, thr, model, "" if error else "ab" * 32, error, study)


def write_csv(path, rows, header=HEADER, *, tail=""):
    buf = io.StringIO(newline="")
    csvsafe.write_rows(buf, header, [r[:len(header)] for r in rows])
    path.write_text(buf.getvalue() + tail, encoding="utf-8", newline="")
    return path


def write_jsonl(path, rows):
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(dict(zip(HEADER, r))) + "\n")
    return path


def read_back(text):
    return list(csvsafe.read_dicts(io.StringIO(text, newline="")))


def test_rows_from_shards_group_by_study_with_max_mean_and_label(tmp_path):
    a = write_csv(tmp_path / "s1.csv", [row("p1/a.dcm", 0.2, "1.2.3"),
                                       row("p1/b.dcm", 0.7, "1.2.3"),
                                       row("p2/c.dcm", 0.1, "1.2.4")])
    b = write_jsonl(tmp_path / "s2.jsonl", [row("p1/d.dcm", 0.4, "1.2.3"),
                                            row("p2/e.dcm", 0.3, "1.2.4")])
    studies = summarise_files([a, b])
    by = {s.study: s for s in studies}
    assert set(by) == {"1.2.3", "1.2.4"}
    s = by["1.2.3"]
    assert (s.key, s.images, s.failed, s.label) == ("StudyInstanceUID", 3, 0, POS)
    assert s.max_probability == pytest.approx(0.7)
    assert s.mean_probability == pytest.approx((0.2 + 0.7 + 0.4) / 3)
    t = by["1.2.4"]
    assert (t.images, t.label) == (2, NEG) and t.max_probability == pytest.approx(0.3)
    assert (s.threshold, s.model_id) == (0.5, "m1")


def test_rows_without_a_study_uid_group_by_folder(tmp_path):
    header = HEADER[:-1]  # a run without --dicom-columns
    f = write_csv(tmp_path / "r.csv", [row("x/1.png", 0.9), row("x/2.png", 0.1),
                                      row("y/z/3.png", 0.2), row("top.png", 0.6)], header)
    studies = {s.study: s for s in summarise_files([f])}
    assert set(studies) == {"x", "y/z", "."}
    assert all(s.key == "folder" for s in studies.values())
    assert studies["x"].label == POS and studies["y/z"].label == NEG
    assert studies["."].images == 1


def test_a_study_is_positive_when_any_image_is_even_with_its_mean_below(tmp_path):
    rows = [row("s/a", 0.05, "9"), row("s/b", 0.06, "9"), row("s/c", 0.55, "9")]
    (s,) = summarise(_typed(rows))
    assert s.label == POS and s.mean_probability < 0.5


def test_failed_images_are_counted_and_not_scored(tmp_path):
    rows = [row("s/a", 0.3, "9"), row("s/b", None, "9", error="s/b: file is truncated")]
    (s,) = summarise(_typed(rows))
    assert (s.images, s.failed, s.label) == (1, 1, NEG)


def test_a_study_whose_images_all_failed_has_no_probability(tmp_path):
    (s,) = summarise(_typed([row("s/b", None, "9", error="bad")]))
    assert (s.images, s.failed, s.max_probability, s.mean_probability, s.label) == \
        (0, 1, None, None, "")


def test_mixed_models_or_thresholds_are_refused(tmp_path):
    with pytest.raises(StudiesError, match="one model and threshold"):
        summarise(_typed([row("a", 0.1, "1"), row("b", 0.2, "1", thr=0.3)]))
    with pytest.raises(StudiesError, match="one model and threshold"):
        summarise(_typed([row("a", 0.1, "1"), row("b", 0.2, "1", model="m2")]))


def test_one_path_with_two_results_is_refused_but_a_file_given_twice_counts_once(tmp_path):
    f = write_csv(tmp_path / "r.csv", [row("s/a", 0.3, "9"), row("s/b", 0.8, "9")])
    (s,) = summarise_files([f, f])
    assert s.images == 2
    g = write_csv(tmp_path / "g.csv", [row("s/a", 0.4, "9")])
    with pytest.raises(StudiesError, match="already read with another result"):
        summarise_files([f, g])


def test_a_half_written_last_line_is_skipped(tmp_path):
    f = write_csv(tmp_path / "r.csv", [row("s/a", 0.3, "9")], tail="s/b,0.9,fract")
    assert [r["path"] for r in read_rows(f)] == ["s/a"]


@pytest.mark.parametrize("content, message", [
    ("", "empty file"),
    ("a,b,c\n1,2,3\n", "not an fxscore run output"),
    ('{"path": "a"}\n', "not an fxscore run row"),
    ("path,probability,label,threshold,model_id,sha256,error\na,zz,x,0.5,m,,\n",
     "probability is not a number"),
    ("path,probability,label,threshold,model_id,sha256,error\na,0.2,x\n", "has 3 cells"),
])
def test_bad_row_files_are_refused_naming_the_file(tmp_path, content, message):
    f = tmp_path / "bad.csv"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(StudiesError, match=message) as e:
        summarise_files([f])
    assert str(e.value).startswith(str(f))


def test_missing_or_binary_files_are_refused(tmp_path):
    with pytest.raises(StudiesError, match="no such file"):
        summarise_files([tmp_path / "nope.csv"])
    b = tmp_path / "b.csv"
    b.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(StudiesError, match="not UTF-8"):
        summarise_files([b])


def test_folder_names_round_trip_through_csv_safety(tmp_path):
    header = HEADER[:-1]
    f = write_csv(tmp_path / "r.csv", [row("=cmd|x/a.png", 0.9), row("-600,ok\n/b.png", 0.1)],
                  header)
    studies = summarise_files([f])
    text = studies_csv(studies)
    assert "\n=cmd" not in text  # neutralised on the way out
    assert {r["study"] for r in read_back(text)} == {"=cmd|x", "-600,ok\n"}


def test_write_studies_is_atomic_and_refuses_devices(tmp_path):
    f = write_csv(tmp_path / "r.csv", [row("s/a", 0.3, "9")])
    out = tmp_path / "studies.csv"
    write_studies(summarise_files([f]), out)
    rows = read_back(out.read_text(encoding="utf-8"))
    assert list(rows[0]) == list(COLUMNS)
    assert rows[0]["study"] == "9" and rows[0]["images"] == "1"
    with pytest.raises(StudiesError, match="not a regular file"):
        write_studies([], "/dev/null")


def test_cli_studies_writes_the_file_and_exits_3_when_a_study_is_incomplete(tmp_path):
    f1 = write_csv(tmp_path / "a.csv", [row("p/a.dcm", 0.8, "1.1"), row("p/b.dcm", 0.2, "1.2")])
    f2 = write_csv(tmp_path / "b.csv", [row("p/c.dcm", None, "1.2", error="p/c.dcm: bad")])
    out = tmp_path / "studies.csv"
    r = CliRunner().invoke(cli, ["studies", str(f1), str(f2), "--out", str(out)])
    assert r.exit_code == 3, r.output
    assert "2 studies (2 by StudyInstanceUID, 0 by folder) from 2 scored images in 2 files" \
        in r.output
    rows = {d["study"]: d for d in read_back(out.read_text(encoding="utf-8"))}
    assert rows["1.1"]["label"] == POS and rows["1.2"]["failed"] == "1"
    assert float(rows["1.1"]["max_probability"]) == pytest.approx(0.8)

    r = CliRunner().invoke(cli, ["studies", str(f1), "-q"])
    assert r.exit_code == 0
    assert read_back(r.output)[0]["study"] == "1.1"  # stdout by default


def test_cli_studies_reports_bad_input_as_one_line(tmp_path):
    r = CliRunner().invoke(cli, ["studies", str(tmp_path / "none.csv")])
    assert r.exit_code == 1 and "no such file" in r.output
    assert CliRunner().invoke(cli, ["studies"]).exit_code == 2


def _typed(rows):
    out = []
    for i, r in enumerate(rows):
        d = dict(zip(HEADER, r))
        d["_where"] = f"mem:{i}"
        d["error"] = d["error"] or ""
        out.append(d)
    return out
