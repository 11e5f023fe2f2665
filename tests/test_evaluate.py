"""fxscore.evaluate: labelled folders / labels CSV -> scored rows and the metrics document."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from eval_data import (FRACTURED, NOT_FRACTURED, expected_confusion, make_flat, make_folders,
                       write_csv, write_grey, write_truncated)
from fxscore import metrics as M
from fxscore.evaluate import EvalDataError, evaluate
from fxscore.model import load_model
from onnx_models import make_model


@pytest.fixture
def model(tmp_path):
    return load_model(make_model(tmp_path / "tiny.onnx"), threads=1)


@pytest.fixture
def folders(tmp_path):
    return make_folders(tmp_path / "data")


def run(root, model, **kw):
    kw.setdefault("n_bootstrap", 200)
    return evaluate(root, model, workers=1, **kw)


def test_folders_give_true_labels_and_sklearn_metrics(folders, model):
    ev = run(folders, model)
    m = ev.metrics
    assert len(ev.rows) == len(FRACTURED) + len(NOT_FRACTURED)
    # paths relative to DIR, class folder first, sub-folders included
    assert {r["path"].split("/")[0] for r in ev.rows} == {"fractured", "not fractured"}
    assert sum("/deeper/" in r["path"] for r in ev.rows) == len(FRACTURED) - len(FRACTURED) // 2 \
        + len(NOT_FRACTURED) - len(NOT_FRACTURED) // 2
    assert all(r["true_label"] == r["path"].split("/")[0] for r in ev.rows)
    assert m["data"]["per_class"] == {
        "fractured": {"files": len(FRACTURED), "readable": len(FRACTURED), "unreadable": 0},
        "not fractured": {"files": len(NOT_FRACTURED), "readable": len(NOT_FRACTURED),
                          "unreadable": 0}}

    point = m["operating_points"]["model"]
    assert {k: point[k] for k in ("tp", "fp", "tn", "fn")} == expected_confusion()
    y_true = [r["true_label"] for r in ev.rows]
    y_pred = [r["label"] for r in ev.rows]
    prob = np.array([r["probability"] for r in ev.rows])
    positive = np.array([t == "fractured" for t in y_true])
    names = ["fractured", "not fractured"]
    assert m["confusion_matrix"]["matrix"] == skm.confusion_matrix(y_true, y_pred,
                                                                   labels=names).tolist()
    assert m["classification_report"] == skm.classification_report(
        y_true, y_pred, labels=names, digits=3, output_dict=True, zero_division=0)
    assert m["roc_auc"]["value"] == pytest.approx(skm.roc_auc_score(positive, prob))
    assert m["average_precision"]["value"] == pytest.approx(
        skm.average_precision_score(positive, prob))
    assert m["calibration"]["brier"] == pytest.approx(skm.brier_score_loss(positive, prob))
    assert point["sensitivity"] == pytest.approx(skm.recall_score(positive, prob >= 0.5))
    assert point["specificity"] == pytest.approx(skm.recall_score(~positive, prob < 0.5))
    lo, hi = point["ci"]["accuracy"]["low"], point["ci"]["accuracy"]["high"]
    assert lo <= point["accuracy"] <= hi and hi - lo > 0.05
    assert sum(b["count"] for b in m["calibration"]["reliability_curve"]) == len(ev.rows)


def test_labels_csv_gives_the_same_metrics_as_folders(tmp_path, folders, model):
    labels = make_flat(tmp_path / "flat")
    a, b = run(folders, model), run(tmp_path / "flat", model, labels=labels)
    assert b.metrics["data"]["source"] == "labels"
    for key in ("confusion_matrix", "classification_report"):
        assert a.metrics[key] == b.metrics[key], key
    assert a.metrics["roc_auc"]["value"] == b.metrics["roc_auc"]["value"]
    curves = [[(r["count"], r["mean_predicted"], r["fraction_positive"])
               for r in ev.metrics["calibration"]["reliability_curve"]] for ev in (a, b)]
    np.testing.assert_allclose(*curves)  # sums in another order: equal up to rounding
    # the same numbers; the intervals differ only because the files come in another order
    for pa, pb in zip(a.metrics["operating_points"].values(),
                      b.metrics["operating_points"].values()):
        assert {k: v for k, v in pa.items() if k != "ci"} == {k: v for k, v in pb.items()
                                                             if k != "ci"}
    assert b.rows[0]["path"] == "images/fra_00_g250.png"


def test_unreadable_files_stay_in_the_totals(folders, model):
    write_truncated(folders / "not fractured" / "cut.png")
    (folders / "fractured" / "notes.txt").write_text("not an image: ignored, like fxscore run")
    ev = run(folders, model)
    data = ev.metrics["data"]
    assert data["files"] == len(FRACTURED) + len(NOT_FRACTURED) + 1
    assert data["unreadable"] == 1 and data["readable"] == data["files"] - 1
    assert data["per_class"]["not fractured"] == {"files": len(NOT_FRACTURED) + 1,
                                                  "readable": len(NOT_FRACTURED),
                                                  "unreadable": 1}
    assert data["ignored"] == 1
    assert "1 could not be read" in data["note"]
    [failed] = ev.metrics["unreadable_files"]
    assert failed["path"] == "not fractured/cut.png" and "cut.png" in failed["error"]
    # the metrics are those of the readable files alone
    assert ev.metrics["operating_points"]["model"]["tn"] == expected_confusion()["tn"]


def test_listed_but_missing_file_is_unreadable_not_dropped(tmp_path, model):
    labels = make_flat(tmp_path / "flat")
    with open(labels, "a") as f:
        f.write("images/gone.png,fractured\n")
    ev = run(tmp_path / "flat", model, labels=labels)
    assert ev.metrics["data"]["unreadable"] == 1
    assert ev.metrics["unreadable_files"][0]["path"] == "images/gone.png"


def test_target_sensitivity_is_the_highest_threshold_reaching_it(folders, model):
    ev = run(folders, model, target_sensitivity=0.9)
    target = ev.metrics["operating_points"]["target"]
    y, s = ev.arrays()
    assert target["threshold"] == M.threshold_for_sensitivity(y, s, 0.9)
    # 11 fractured: 0.9 needs 10 of them, so the cut is the 10th highest fractured score (grey 100)
    assert target["threshold"] == pytest.approx(sorted(s[y == 1])[-10])
    assert target["sensitivity"] == pytest.approx(10 / 11)
    assert target["target_sensitivity"] == 0.9
    assert target["ci"]["sensitivity"]["low"] <= target["sensitivity"]


def test_bootstrap_is_seeded(folders, model):
    a, b = run(folders, model, seed=3), run(folders, model, seed=3)
    c = run(folders, model, seed=4)
    assert json.dumps(a.metrics) == json.dumps(b.metrics)  # as text: NaN (empty bins) != NaN
    assert a.metrics["roc_auc"]["ci"] != c.metrics["roc_auc"]["ci"]
    assert run(folders, model, n_bootstrap=0).metrics["bootstrap"] is None


def test_groups_resample_whole_groups(tmp_path, model):
    # three copies of every radiograph: resampling copies as if independent is too confident
    greys_f, greys_n = FRACTURED * 3, NOT_FRACTURED * 3
    root = make_folders(tmp_path / "dup", greys_f, greys_n)
    groups = []  # file names are <cls>_<index>_g<grey>.png; copies share index mod the original
    for p in sorted(root.rglob("*.png")):
        cls, index = p.relative_to(root).parts[0], int(p.name.split("_")[1])
        n = len(FRACTURED if cls == "fractured" else NOT_FRACTURED)
        groups.append((p.relative_to(root).as_posix(), f"{cls}-{index % n}"))
    groups_csv = write_csv(tmp_path / "groups.csv", ("path", "group"),
                           groups + [("other/split.png", "x")])  # extra rows are ignored
    plain = run(root, model, n_bootstrap=500)
    grouped = run(root, model, n_bootstrap=500, groups=groups_csv)
    assert grouped.metrics["bootstrap"]["grouped"] and grouped.metrics["bootstrap"]["clusters"] \
        == len(FRACTURED) + len(NOT_FRACTURED)
    assert grouped.metrics["data"]["groups"] == len(FRACTURED) + len(NOT_FRACTURED)

    def width(ev):
        ci = ev.metrics["operating_points"]["model"]["ci"]["accuracy"]
        return ci["high"] - ci["low"]

    assert width(grouped) > 1.4 * width(plain)
    assert grouped.metrics["roc_auc"]["value"] == plain.metrics["roc_auc"]["value"]


def _unknown_folder(root):
    make_folders(root)
    write_grey(root / "Fractured" / "a.png", 200)


def _missing_class(root):
    write_grey(root / "fractured" / "a.png", 200)


def _empty_class(root):
    write_grey(root / "fractured" / "a.png", 200)
    (root / "not fractured" / "sub").mkdir(parents=True)


def _loose_image(root):
    make_folders(root)
    write_grey(root / "stray.png", 10)


def _nothing_readable(root):
    write_truncated(root / "fractured" / "a.png")
    write_truncated(root / "not fractured" / "b.png")


def _one_class_unreadable(root):
    write_grey(root / "fractured" / "a.png", 200)
    write_truncated(root / "not fractured" / "b.png")


@pytest.mark.parametrize("make, match", [
    (_unknown_folder, r"'Fractured' are not classes of this model; expected one folder per "
                      r"class of the model \('fractured', 'not fractured'\)"),
    (_missing_class, r"no folder for class\(es\) 'not fractured'"),
    (_empty_class, r"not fractured: the folder for class 'not fractured' holds no image files"),
    (_loose_image, r"image\(s\) outside the class folders \(e.g. 'stray.png'\)"),
    (_nothing_readable, r"none of the 2 files could be read.*'fractured', 'not fractured'"),
    (_one_class_unreadable, r"no readable image of class 'not fractured'"),
    (lambda root: root.rmdir(), r"not a folder; expected .*'fractured', 'not fractured'"),
])
def test_bad_folders_are_named(tmp_path, model, make, match):
    root = tmp_path / "data"
    root.mkdir()
    make(root)
    with pytest.raises(EvalDataError, match=match):
        run(root, model)


@pytest.mark.parametrize("header, rows, match", [
    (None, [("images/fra_00_g250.png", "fractured")], r"needs a header row with columns "
                                                      r"path,label \(found images/fra_00"),
    (("path", "label"), [], "lists no files"),
    (("path", "label"), [("images/fra_00_g250.png", "broken bone")],
     r"line 2: label 'broken bone' is not a class.*'fractured', 'not fractured'"),
    (("path", "label"), [("images/fra_00_g250.png", "fractured"),
                         ("./images/fra_00_g250.png", "fractured")], "listed twice"),
    (("path", "label"), [("images/fra_00_g250.png", "")], r"line 2: expected path,label"),
    (("path", "label"), [("images/fra_00_g250.png", "fractured")],
     r"no file is labelled 'not fractured'"),
])
def test_bad_labels_csv_is_named(tmp_path, model, header, rows, match):
    make_flat(tmp_path / "flat")
    labels = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(EvalDataError, match=match):
        run(tmp_path / "flat", model, labels=labels)


def test_groups_csv_must_cover_every_file(tmp_path, folders, model):
    groups = write_csv(tmp_path / "g.csv", ("path", "group"),
                       [("fractured/fra_00_g250.png", "p1")])
    with pytest.raises(EvalDataError, match=r"22 evaluated file\(s\) have no group"):
        run(folders, model, groups=groups)
