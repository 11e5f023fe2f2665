"""`fxscore eval` through click's CliRunner, once as a real process, and on the real test set."""
from __future__ import annotations

import csv
import json
import os
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
    assert r.stderr == ""  # no progress on a non-terminal stderr, nothing went wrong


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
    assert "2 file(s) could not be read and are not in the metrics:" in r.stdout
    assert "fractured/cut.png: " in r.stdout and "latin1-\\udce9.png: " in r.stdout
    assert "warning: 2 file(s) could not be read; the metrics use the 23 readable" in r.stderr
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


def _empty_class_folder(root):
    make_folders(root)
    for p in (root / "not fractured").rglob("*.png"):
        p.unlink()


def _nothing_readable(root):
    write_truncated(root / "fractured" / "a.png")
    write_truncated(root / "not fractured" / "b.png")


@pytest.mark.parametrize("make, extra, message", [
    (_unknown_folder, [], "folder(s) 'broken' are not classes of this model; expected one folder "
                          "per class of the model ('fractured', 'not fractured')"),
    (_empty_folder, [], "no folder for class(es) 'fractured', 'not fractured'"),
    (_empty_class_folder, [], "the folder for class 'not fractured' holds no image files"),
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
    assert message in r.stderr
    assert "Traceback" not in r.output


@pytest.mark.parametrize("args", [["--target-sensitivity", "1.5"], ["--target-sensitivity", "0"],
                                  ["--bootstrap", "-1"], ["--batch-size", "0"]])
def test_eval_usage_errors_exit_2(folders, tiny_model, args):
    assert invoke(folders, "-m", tiny_model, *args).exit_code == 2


def test_eval_help_documents_the_command():
    r = CliRunner().invoke(cli, ["eval", "--help"])
    assert r.exit_code == 0
    for text in ("--target-sensitivity", "--labels", "--groups", "--bootstrap", "--report",
                 "fxscore eval ./test -m model.onnx --target-sensitivity 0.95 --report out/"):
        assert text in r.output


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
    assert page.count('src="data:image/png;base64,') == 4
    assert all(f["path"] in page for f in failed)
    assert doc["classification_report"]["macro avg"]["support"] == data["readable"]
    assert sum(map(sum, doc["confusion_matrix"]["matrix"])) == data["readable"]
