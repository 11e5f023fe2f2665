"""`fxscore eval` through click's CliRunner, once as a real process, and on the real test set."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import SAMPLE_DATA
from eval_data import (FRACTURED, NOT_FRACTURED, expected_confusion, make_flat, make_folders,
                       write_csv, write_grey, write_truncated)
from fxscore.cli import EXIT_SOME_FAILED, cli


@pytest.fixture
def folders(tmp_path):
    return make_folders(tmp_path / "data")


def invoke(*args):
    return CliRunner().invoke(cli, ["eval", *map(str, args), "--threads", "1"])


def test_eval_prints_the_report(folders, tiny_model):
    r = invoke(folders, "--model", tiny_model, "--bootstrap", "300")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "precision    recall  f1-score   support" in out  # scikit-learn's report
    assert "macro avg" in out and "weighted avg" in out and "accuracy" in out
    c = expected_confusion()
    assert f"TP {c['tp']}  FP {c['fp']}  TN {c['tn']}  FN {c['fn']}" in out
    for text in ("Confusion matrix (rows: true class, columns: predicted class)", "ROC-AUC",
                 "Average precision", "Sensitivity (recall)", "Specificity", "95% CI",
                 "300 resamples, seed 0", "Brier score", "Reliability"):
        assert text in out, text
    # stderr is not a terminal here: one plain progress line at the end, nothing else
    assert r.stderr.startswith("eval: 23/23 files (100%), ") and r.stderr.count("\n") == 1
    assert "version 1 (id " in out and " v1 " not in out  # the version as the model has it


def test_eval_is_deterministic_with_a_seed(folders, tiny_model):
    a, b = (invoke(folders, "-m", tiny_model, "--seed", "5").stdout for _ in range(2))
    assert a == b
    assert invoke(folders, "-m", tiny_model, "--seed", "6").stdout != a


def test_eval_report_and_target_sensitivity(tmp_path, folders, tiny_model):
    out = tmp_path / "report"
    r = invoke(folders, "-m", tiny_model, "--report", out, "--target-sensitivity", "0.9")
    assert r.exit_code == 0, r.output
    assert "At target sensitivity 0.90 (threshold" in r.stdout
    assert f"report: {out / 'report.html'}" in r.stderr
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["operating_points"]["target"]["sensitivity"] >= 0.9
    with open(out / "predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(FRACTURED) + len(NOT_FRACTURED)
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_eval_unreadable_files_exit_3_and_are_listed(tmp_path, folders, tiny_model):
    write_truncated(folders / "fractured" / "cut.png")
    write_truncated(folders / "not fractured" / os.fsdecode(b"latin1-\xe9.png"))  # not UTF-8
    r = invoke(folders, "-m", tiny_model, "--report", tmp_path / "out")
    assert r.exit_code == EXIT_SOME_FAILED, r.output
    assert "2 files could not be read and are not in the metrics:" in r.stdout
    assert "fractured/cut.png: " in r.stdout and "latin1-\\udce9.png: " in r.stdout
    assert "warning: 2 files could not be read; the metrics use the 23 readable" in r.stderr
    assert "; 2 unreadable files" in r.stderr  # the progress line's note
    assert "latin1-\\udce9.png" in (tmp_path / "out" / "report.html").read_text()


def test_eval_labels_and_groups(tmp_path, tiny_model):
    labels = make_flat(tmp_path / "flat")
    with open(labels, newline="") as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    groups = write_csv(tmp_path / "groups.csv", ("path", "group"),
                       [(p, f"patient{i // 4}") for i, p in enumerate(paths)])
    r = invoke(tmp_path / "flat", "-m", tiny_model, "--labels", labels, "--groups", groups)
    assert r.exit_code == 0, r.output
    assert f"labels from {labels}" in r.stdout and "resampling 6 groups" in r.stdout
    c = expected_confusion()
    assert f"TP {c['tp']}  FP {c['fp']}  TN {c['tn']}  FN {c['fn']}" in r.stdout


def _unknown_folder(root):
    make_folders(root)
    write_grey(root / "broken" / "a.png", 10)


def _empty_folder(root):
    root.mkdir(parents=True)


def _split_layout(root):
    make_folders(root / "train")
    make_folders(root / "test")


def _nothing_readable(root):
    write_truncated(root / "fractured" / "a.png")
    write_truncated(root / "not fractured" / "b.png")


def test_eval_study_level_writes_studies_csv_and_says_what_a_study_is(tmp_path, tiny_model):
    root = tmp_path / "st"
    rows = []
    for i, greys in enumerate([(200, 20), (30, 20), (150, 160), (40, 50)]):
        for j, grey in enumerate(greys):
            rel = f"patient{i}/study/{j}.png"
            write_grey(root / rel, grey)
            rows.append((rel, "fractured" if (i, j) in {(0, 0), (1, 1), (2, 0)} else
                         "not fractured"))
    write_truncated(root / "patient3/study/2.png")
    rows.append(("patient3/study/2.png", "not fractured"))
    labels = write_csv(tmp_path / "labels.csv", ("path", "label"), rows)
    r = invoke(root, "-m", tiny_model, "--labels", labels, "--study-level", "--report",
               tmp_path / "rep", "--bootstrap", "50")
    assert r.exit_code == EXIT_SOME_FAILED, r.output
    assert "data  4 studies in " in r.stdout and "(9 images)" in r.stdout
    assert ("Metrics per study (4 by folder): a study is 'fractured' when any of its images is "
            "labelled so; its score is its highest image probability; 1 study incomplete") \
        in r.stdout
    assert "1 file could not be read; the metrics use the 4 studies with a readable image" \
        in r.stderr
    with open(tmp_path / "rep" / "studies.csv", newline="") as f:
        studies = list(csv.DictReader(f))
    assert [s["study"] for s in studies] == [f"patient{i}/study" for i in range(4)]
    assert [s["true_label"] for s in studies] == ["fractured"] * 3 + ["not fractured"]
    assert [s["images"] for s in studies] == ["2", "2", "2", "2"]
    assert studies[3]["failed"] == "1"
    with open(tmp_path / "rep" / "predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 9  # the images
    doc = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert doc["data"]["level"] == "study" and doc["data"]["files"] == 4
    assert "Metrics per study" in (tmp_path / "rep" / "report.html").read_text()


@pytest.mark.parametrize("make, extra, message", [
    (_unknown_folder, [], "folder(s) 'broken' are not classes of this model; expected one folder "
                          "per class of the model ('fractured', 'not fractured')"),
    (_empty_folder, [], "no folder for class(es) 'fractured', 'not fractured'"),
    (_split_layout, [], "these sub-folders hold class folders: {root}/test, {root}/train "
                        "(e.g. `fxscore eval {root}/test`)"),
    (_nothing_readable, [], "none of the 2 files could be read as an image"),
    (make_folders, ["--labels", "{tmp}/missing.csv"], "missing.csv: cannot read the labels CSV"),
    (make_folders, ["--labels", "{tmp}/bad.csv"], "bad.csv, line 2: label 'maybe' is not a "
                                                  "class of this model; expected one of "
                                                  "'fractured', 'not fractured'"),
    (make_folders, ["--model", "{tmp}/none.onnx"], "none.onnx does not exist"),
])
def test_eval_errors_exit_1_naming_what_was_expected(tmp_path, tiny_model, make, extra, message):
    root = tmp_path / "data"
    make(root)
    write_csv(tmp_path / "bad.csv", ("path", "label"), [("fractured/x.png", "maybe")])
    r = invoke(root, "-m", tiny_model, *[a.format(tmp=tmp_path) for a in extra])
    assert r.exit_code == 1, r.output
    assert message.format(root=root) in " ".join(r.stderr.split())
    assert "Traceback" not in r.output


@pytest.mark.parametrize("args", [["--target-sensitivity", "1.5"], ["--target-sensitivity", "0"],
                                  ["--target-specificity", "0"], ["--threshold", "1.1"],
                                  ["--threshold", "-0.1"], ["--bootstrap", "-1"],
                                  ["--batch-size", "0"]])
def test_eval_usage_errors_exit_2(folders, tiny_model, args):
    assert invoke(folders, "-m", tiny_model, *args).exit_code == 2


def test_eval_help_documents_the_command():
    r = CliRunner().invoke(cli, ["eval", "--help"])
    assert r.exit_code == 0
    for text in ("--target-sensitivity", "--target-specificity", "--threshold", "--labels",
                 "--groups", "--bootstrap", "--report",
                 "fxscore eval ./test -m model.onnx --target-sensitivity 0.95 --report out/",
                 "fxscore eval ./val -m model.onnx --target-specificity 0.9",
                 "fxscore eval ./test -m model.onnx --threshold 0.37"):
        assert text in r.output


# ---- the operating point ------------------------------------------------------------------

def test_threshold_is_what_every_output_uses(tmp_path, folders, tiny_model):
    out = tmp_path / "report"
    r = invoke(folders, "-m", tiny_model, "--threshold", "0.9", "--report", out)
    assert r.exit_code == 0, r.output
    assert "threshold 0.900 (--threshold; the model's own is 0.500)" in r.stdout
    assert "Classification report (threshold 0.900)" in r.stdout
    assert "At threshold 0.900 (--threshold):" in r.stdout
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {row["threshold"] for row in rows} == {"0.9"}
    assert all(row["label"] == ("fractured" if float(row["probability"]) >= 0.9
                                else "not fractured") for row in rows)
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["threshold"] == {"value": 0.9, "model": 0.5, "source": "--threshold"}
    page = (out / "report.html").read_text()
    assert "threshold 0.900 (--threshold; the model&#x27;s own is 0.500)" in page


@pytest.mark.parametrize("flag, what", [("--target-sensitivity", "sensitivity"),
                                        ("--target-specificity", "specificity")])
def test_a_target_prints_the_command_that_applies_it(folders, tiny_model, flag, what):
    r = invoke(folders, "-m", tiny_model, flag, "0.8", "--bootstrap", "0")
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("Operating point for"))
    assert line.startswith(f"Operating point for {what} >= 0.8 on {folders}: threshold ")
    t = line.split("threshold ")[1].split(" ")[0]
    assert f"  fxscore run INPUT --model {tiny_model} --threshold {t} --out preds.csv" \
        in r.stdout
    assert f"  fxscore wrap {tiny_model} --out tiny-t{t}.onnx --threshold {t}" in r.stdout
    assert (f"warning: the threshold {t} was picked on the evaluation data itself, so its "
            f"{what}") in " ".join(r.stderr.split())
    assert len(t) <= 6  # the shortest number that makes the same calls, not 17 digits
    # Applying the printed threshold gives exactly the operating point that was found.
    found = re.search(rf"\b{what} ([0-9.]+)", line.split(": threshold")[1]).group(1)
    again = invoke(folders, "-m", tiny_model, "--threshold", t, "--bootstrap", "0")
    label = "Sensitivity (recall)" if what == "sensitivity" else "Specificity"
    row = next(ln for ln in again.stdout.splitlines() if ln.strip().startswith(label))
    assert row.split()[-1] == found
    assert float(found) >= 0.8


def test_both_targets_at_once(tmp_path, folders, tiny_model):
    out = tmp_path / "r"
    r = invoke(folders, "-m", tiny_model, "--target-sensitivity", "0.9",
               "--target-specificity", "0.9", "--report", out, "--bootstrap", "50")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("Operating point for") == 2
    assert "At target specificity 0.90 (threshold" in r.stdout
    points = json.loads((out / "metrics.json").read_text())["operating_points"]
    assert set(points) == {"model", "target", "target_specificity"}
    assert points["target_specificity"]["specificity"] >= 0.9


# ---- nothing silent -----------------------------------------------------------------------

def test_labels_csv_says_how_many_files_have_no_row(tmp_path, tiny_model):
    labels = make_flat(tmp_path / "flat")
    lines = labels.read_text().splitlines()
    (tmp_path / "part.csv").write_text("\n".join(lines[:-2]) + "\n")  # two rows dropped
    r = invoke(tmp_path / "flat", "-m", tiny_model, "--labels", tmp_path / "part.csv")
    assert r.exit_code == 0, r.output
    assert (f"warning: 2 image files under {tmp_path / 'flat'} have no row in "
            f"{tmp_path / 'part.csv'} and were not evaluated") in " ".join(r.stderr.split())
    assert "2 image files without a label row not evaluated" in r.stdout
    full = invoke(tmp_path / "flat", "-m", tiny_model, "--labels", labels)
    assert "no row in" not in full.stderr


def test_one_class_folder_reports_what_it_can(tmp_path, tiny_model):
    root = tmp_path / "fractures-only"
    make_folders(root, not_fractured=[])  # no 'not fractured' folder at all
    r = invoke(root, "-m", tiny_model, "--target-sensitivity", "0.9", "--report",
               tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "report.html").read_text().count('<div class="fig"><img') == 4
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["roc_auc"]["value"] is None
    sens = next(ln for ln in r.stdout.splitlines() if "Sensitivity (recall)" in ln)
    assert sens.split()[2] != "n/a"
    spec = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("Specificity"))
    assert spec.split()[1] == "n/a"
    assert "only 'fractured' images are readable here" in r.stdout
    assert "warning: only 'fractured' images could be evaluated" in r.stderr
    bad = invoke(root, "-m", tiny_model, "--target-specificity", "0.9")
    assert bad.exit_code == 1
    assert "--target-specificity needs readable 'not fractured' images" in bad.stderr


def test_one_unreadable_file_is_one_file(tmp_path, folders, tiny_model):
    write_truncated(folders / "fractured" / "cut.png")
    r = invoke(folders, "-m", tiny_model)
    assert r.exit_code == EXIT_SOME_FAILED
    assert "1 file could not be read and is not in the metrics:" in r.stdout
    assert "warning: 1 file could not be read; the metrics use the 23 readable" in r.stderr


def test_progress_lines_in_a_log_and_none_with_quiet(folders, tiny_model, monkeypatch):
    monkeypatch.setenv("FXSCORE_PROGRESS_INTERVAL", "0")
    r = invoke(folders, "-m", tiny_model, "--batch-size", "4", "--bootstrap", "0")
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("eval: ")]
    assert len(lines) >= 6 and "\r" not in r.stderr
    assert lines[0].startswith("eval: 1/23 files (4%)") and "ETA" in lines[0]
    assert lines[-1].startswith("eval: 23/23 files (100%)")
    quiet = invoke(folders, "-m", tiny_model, "--bootstrap", "0", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_eval_as_a_real_process_on_sample_data(tmp_path, tiny_model):
    """The installed console script on the synthetic phantoms (JPEG, PNG, 16-bit, DICOM)."""
    test_dir = SAMPLE_DATA / "test"
    if not test_dir.is_dir():
        pytest.fail(f"{test_dir} is missing: run scripts/make_sample_data.py")
    n_files = {c: sum(1 for p in (test_dir / c).rglob("*") if p.is_file())
               for c in ("fractured", "not fractured")}
    fxscore = Path(sys.executable).with_name("fxscore")
    proc = subprocess.run([str(fxscore), "eval", str(test_dir), "--model", str(tiny_model),
                           "--report", str(tmp_path / "out"), "--bootstrap", "200",
                           "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "precision    recall  f1-score   support" in proc.stdout
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {c: v["files"] for c, v in doc["data"]["per_class"].items()} == n_files
    assert doc["data"]["unreadable"] == 0


@pytest.mark.realdata
def test_eval_on_the_real_test_set(tmp_path, real_data_root, tiny_model):
    """340 real X-rays, 4 truncated: counted, listed, and the report is written."""
    test_dir = real_data_root / "test"
    on_disk = {c: sum(1 for p in (test_dir / c).iterdir() if p.is_file())
               for c in ("fractured", "not fractured")}
    out = tmp_path / "report"
    r = invoke(test_dir, "-m", tiny_model, "--report", out, "--target-sensitivity", "0.95")
    doc = json.loads((out / "metrics.json").read_text())
    data = doc["data"]
    assert data["files"] == sum(on_disk.values()) == 340
    assert {c: v["files"] for c, v in data["per_class"].items()} == on_disk
    failed = doc["unreadable_files"]
    assert len(failed) == data["unreadable"] == data["files"] - data["readable"]
    assert all(f["error"] and (test_dir / f["path"]).is_file() for f in failed)
    assert r.exit_code == (EXIT_SOME_FAILED if failed else 0), r.output
    for f in failed:
        assert f["path"] in r.stdout
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 340 and sum(bool(row["error"]) for row in rows) == len(failed)
    page = (out / "report.html").read_text()
    assert page.count('<div class="fig"><img') == 4  # the figures; the gallery adds thumbnails
    assert all(f["path"] in page for f in failed)
    assert doc["classification_report"]["macro avg"]["support"] == data["readable"]
    assert sum(map(sum, doc["confusion_matrix"]["matrix"])) == data["readable"]


def test_readme_quick_start_says_what_the_default_model_does_on_the_phantoms(monkeypatch):
    """README: the packaged model calls N of the M readable phantoms "not fractured" (fp32: the
    same on every CPU) and ranks sample_data/test at chance; the README says why."""
    from fxscore.files import find_images
    from fxscore.model import load_model
    from fxscore.scoring import score_items

    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    said = re.search(r'"not fractured" for (\d+) of the (\d+) readable ones', readme)
    assert said, "the quick start no longer states what the default model does on sample_data"
    monkeypatch.delenv("FXSCORE_MODEL", raising=False)
    model = load_model(threads=1)
    assert model.meta.model_version == "2"  # fp32; an int8 model's count would depend on the CPU
    rows = [r for r in score_items(model, find_images(SAMPLE_DATA), workers=1) if not r["error"]]
    negatives = sum(r["label"] == "not fractured" for r in rows)
    assert (negatives, len(rows)) == (int(said.group(1)), int(said.group(2)))
    r = CliRunner().invoke(cli, ["eval", str(SAMPLE_DATA / "test"), "--bootstrap", "0", "-q",
                                 "--threads", "1"])
    auc = float(next(ln for ln in r.stdout.splitlines() if ln.startswith("ROC-AUC")).split()[1])
    assert 0.3 < auc < 0.7 and "ROC-AUC of about 0.5" in readme
    assert "not X-rays the model was trained" in " ".join(readme.split())
