"""fxscore.evaluate: labelled folders / labels CSV -> scored rows and the metrics document."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil

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


def _split_layout(root):
    write_grey(root / "train" / "fractured" / "a.png", 200)
    write_grey(root / "test" / "not fractured" / "b.png", 20)


def _no_images(root):
    (root / "fractured").mkdir()
    (root / "not fractured").mkdir()


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
    (_split_layout, r"folder\(s\) 'test', 'train' are not classes of this model; .*these "
                    r"sub-folders hold class folders: .*data/test, .*data/train \(e.g. "
                    r"`fxscore eval .*data/test`\)"),
    (_no_images, r"the folder for class 'fractured' holds no image files; at least one class"),
    (_loose_image, r"image\(s\) outside the class folders \(e.g. 'stray.png'\)"),
    (_nothing_readable, r"none of the 2 files could be read.*'fractured', 'not fractured'"),
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
])
def test_bad_labels_csv_is_named(tmp_path, model, header, rows, match):
    make_flat(tmp_path / "flat")
    labels = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(EvalDataError, match=match):
        run(tmp_path / "flat", model, labels=labels)


@pytest.mark.parametrize("make", [_missing_class, _empty_class, _one_class_unreadable])
def test_one_class_is_evaluated_as_far_as_one_class_allows(tmp_path, model, make):
    """A fractures-only set gives sensitivity; what needs both classes is NaN, and said."""
    root = tmp_path / "data"
    root.mkdir()
    make(root)
    m = run(root, model).metrics
    assert m["data"]["one_class"] == "fractured"
    point = m["operating_points"]["model"]
    assert point["sensitivity"] == 1.0 and point["tp"] == 1
    assert np.isnan(point["specificity"]) and np.isnan(m["roc_auc"]["value"])
    with pytest.raises(EvalDataError, match=r"--target-specificity needs readable 'not "
                                            r"fractured' images"):
        run(root, model, target_specificity=0.9)
    assert run(root, model, target_sensitivity=1.0).metrics["operating_points"]["target"][
        "sensitivity"] == 1.0


def test_labels_csv_with_one_class_and_unlabelled_files(tmp_path, model):
    labels = make_flat(tmp_path / "flat")
    with open(labels) as f:
        lines = f.read().splitlines()
    fractured_only = [ln for ln in lines[1:] if ln.endswith(",fractured")]
    (tmp_path / "one.csv").write_text("\n".join([lines[0], *fractured_only]) + "\n")
    m = run(tmp_path / "flat", model, labels=tmp_path / "one.csv").metrics
    assert m["data"]["one_class"] == "fractured"
    assert m["data"]["unlabelled"] == len(NOT_FRACTURED)  # on disk, no row in the CSV
    assert len(m["data"]["unlabelled_examples"]) == 5
    assert run(tmp_path / "flat", model, labels=labels).metrics["data"]["unlabelled"] == 0


def test_threshold_replaces_the_models_everywhere(folders, model):
    ev = run(folders, model, threshold=0.9)
    assert {r["threshold"] for r in ev.rows} == {0.9}
    assert all(r["label"] == ("fractured" if r["probability"] >= 0.9 else "not fractured")
               for r in ev.rows)
    m = ev.metrics
    assert m["threshold"] == {"value": 0.9, "model": 0.5, "source": "--threshold"}
    assert m["operating_points"]["model"]["threshold"] == 0.9
    assert m["model"]["threshold"] == 0.5  # what the file carries
    assert model.meta.threshold == 0.5  # the caller's model is not changed


def test_target_specificity_is_the_lowest_threshold_reaching_it(folders, model):
    m = run(folders, model, target_specificity=0.75).metrics
    p = m["operating_points"]["target_specificity"]
    assert p["specificity"] >= 0.75 and p["target_specificity"] == 0.75
    y, s = run(folders, model).arrays()
    lower = s[s < p["threshold"]].max()  # the next lower threshold misses the target
    assert M.threshold_metrics(y, s, lower)["specificity"] < 0.75
    assert M.threshold_metrics(y, s, p["apply_threshold"]) == M.threshold_metrics(
        y, s, p["threshold"]) | {"threshold": p["apply_threshold"]}


def test_groups_csv_must_cover_every_file(tmp_path, folders, model):
    groups = write_csv(tmp_path / "g.csv", ("path", "group"),
                       [("fractured/fra_00_g250.png", "p1")])
    with pytest.raises(EvalDataError, match=r"22 evaluated file\(s\) have no group"):
        run(folders, model, groups=groups)


AWKWARD = ["=HYPERLINK(\"evil\",\"x\").png", "-600.png", "@SUM(1).png", "+1.png", "a,b.png",
           "new\nline.png", "cr\r.png", "tab\t.png", " spaced .png", "'quoted.png",
           "back\\xslash.png", os.fsdecode(b"caf\xe9.png")]


@pytest.fixture
def awkward(tmp_path):
    """Class folders whose file names hold formulas, CR/LF, commas, spaces, undecodable bytes."""
    root = tmp_path / "awkward"
    for cls, greys in (("fractured", (200, 180)), ("not fractured", (20, 40))):
        for g in greys:
            for name in AWKWARD:
                write_grey(root / cls / f"g{g}" / name, g)
    return root


def test_awkward_names_round_trip_through_predictions_labels_and_groups(tmp_path, awkward, model):
    from fxscore import csvsafe
    from fxscore.report import write_report

    ev = run(awkward, model, n_bootstrap=0)
    assert ev.metrics["data"]["unreadable"] == 0
    paths = sorted(r["path"] for r in ev.rows)
    assert len(paths) == 4 * len(AWKWARD)
    written = write_report(ev, tmp_path / "report")
    raw = written["predictions"].read_bytes().decode("utf-8")  # valid UTF-8
    cells = [r[0] for r in csv.reader(io.StringIO(raw, newline=""))][1:]
    assert len(cells) == len(paths)  # one row per file, whatever its name holds
    with open(written["predictions"], newline="", encoding="utf-8") as f:
        back = list(csvsafe.read_dicts(f))
    assert sorted(r["path"] for r in back) == paths
    # a CSV fxscore wrote (escaped, neutralised) names exactly the files: --labels, --groups
    flat = tmp_path / "flat"
    shutil.copytree(awkward, flat / "images")
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="", encoding="utf-8") as f:
        csvsafe.write_rows(f, ["path", "label"],
                           [[f"images/{r['path']}", r["true_label"]] for r in back])
    by_labels = run(flat, model, labels=labels, n_bootstrap=0)
    assert by_labels.metrics["data"]["unreadable"] == 0
    assert sorted(r["path"] for r in by_labels.rows) == sorted(f"images/{p}" for p in paths)
    groups = tmp_path / "groups.csv"
    with open(groups, "w", newline="", encoding="utf-8") as f:
        csvsafe.write_rows(f, ["path", "group"], [[p, p.split("/")[-1]] for p in paths])
    grouped = run(awkward, model, groups=groups, n_bootstrap=20)
    assert grouped.metrics["data"]["groups"] == len(AWKWARD)


def test_hand_padded_label_paths_still_match(tmp_path, model):
    labels = make_flat(tmp_path / "flat")
    text = labels.read_text().replace(".png,", ".png ,")  # "images/x.png ,fractured"
    labels.write_text(text)
    ev = run(tmp_path / "flat", model, labels=labels, n_bootstrap=0)
    assert ev.metrics["data"]["unreadable"] == 0


# ---------------------------------------------------------------------------- study level

def _studies(root, n=12, truncated=()):
    """n studies of two images each (root/images/sNN/{a,b}.png) and their labels CSV: study i
    < n/2 has one fractured image (a, the brighter) and one not; the others none."""
    rows = []
    for i in range(n):
        bright = 60 + 15 * i if i < n // 2 else 40 + 15 * i  # overlapping, not separable
        for name, grey, cls in (("a", bright, "fractured" if i < n // 2 else "not fractured"),
                                ("b", max(5, bright - 40), "not fractured")):
            rel = f"images/s{i:02d}/{name}.png"
            if (i, name) in truncated:
                write_truncated(root / rel)
            else:
                write_grey(root / rel, grey)
            rows.append((rel, cls))
    return write_csv(root / "labels.csv", ("path", "label"), rows)


def test_study_level_metrics_are_the_metrics_of_study_maxima(tmp_path, model):
    root = tmp_path / "st"
    labels = _studies(root)
    images = run(root, model, labels=labels, n_bootstrap=0)
    ev = run(root, model, labels=labels, study_level=True, n_bootstrap=300)
    by = {}
    for r in images.rows:
        by.setdefault(r["path"].rsplit("/", 1)[0], []).append(r)
    assert [r["path"] for r in ev.rows] == sorted(by)
    y = np.array([any(r["true_label"] == "fractured" for r in by[s]) for s in sorted(by)], int)
    score = np.array([max(r["probability"] for r in by[s]) for s in sorted(by)])
    assert [r["probability"] for r in ev.rows] == pytest.approx(score.tolist(), abs=0)
    assert [r["true_label"] == "fractured" for r in ev.rows] == y.astype(bool).tolist()
    assert ev.metrics["roc_auc"]["value"] == pytest.approx(skm.roc_auc_score(y, score))
    point = ev.metrics["operating_points"]["model"]
    called = score >= ev.threshold
    assert (point["tp"], point["fp"]) == (int((called & (y == 1)).sum()),
                                          int((called & (y == 0)).sum()))
    data = ev.metrics["data"]
    assert (data["level"], data["files"], data["images"]) == ("study", 12, 24)
    assert data["study_keys"] == {"folder": 12}
    assert ev.metrics["bootstrap"]["n_resamples"] == 300 and not ev.metrics["bootstrap"]["grouped"]
    assert ev.image_rows == ev.images and len(ev.images) == 24
    # the image-level evaluation of the same data differs: studies are the unit here
    assert images.metrics["data"]["files"] == 24


def test_study_level_unreadable_images_make_studies_incomplete_or_unreadable(tmp_path, model):
    root = tmp_path / "st"
    labels = _studies(root, truncated={(0, "b"), (3, "a"), (3, "b")})
    ev = run(root, model, labels=labels, study_level=True, n_bootstrap=0)
    rows = {r["path"]: r for r in ev.rows}
    assert rows["images/s00"]["images"] == 1 and rows["images/s00"]["failed"] == 1
    assert rows["images/s03"]["error"].startswith("images/s03: none of its 2 image(s)")
    # the truth of an unreadable image still counts: s03 is a fractured study
    assert rows["images/s03"]["true_label"] == "fractured"
    data = ev.metrics["data"]
    assert (data["unreadable"], data["unreadable_images"], data["incomplete_studies"]) == (1, 3, 1)
    assert [f["path"] for f in ev.metrics["unreadable_files"]] == ["images/s03"]


def test_study_level_groups_resample_studies_and_must_agree_within_a_study(tmp_path, model):
    root = tmp_path / "st"
    labels = _studies(root)
    rels = [f"images/s{i:02d}/{n}.png" for i in range(12) for n in "ab"]
    patients = write_csv(tmp_path / "g.csv", ("path", "group"),
                         [(r, f"p{int(r[8:10]) // 2}") for r in rels])  # 2 studies a patient
    ev = run(root, model, labels=labels, study_level=True, groups=patients, n_bootstrap=200)
    assert ev.metrics["bootstrap"]["grouped"] and ev.metrics["bootstrap"]["clusters"] == 6
    split = write_csv(tmp_path / "bad.csv", ("path", "group"),
                      [(r, "x" if r == "images/s04/b.png" else "p") for r in rels])
    with pytest.raises(EvalDataError, match=r"study images/s04 has images in two groups .*"
                                            r"images/s04/b.png"):
        run(root, model, labels=labels, study_level=True, groups=split)


def test_study_level_reads_the_study_uid_from_dicom_headers(tmp_path, model):
    """A PACS-like export: DICOM images group by StudyInstanceUID across series folders, the
    PNG by its folder."""
    from pacs_export import SCORED, STUDY_A, STUDY_B, make_export

    root = make_export(tmp_path / "pacs")
    labels = write_csv(tmp_path / "labels.csv", ("path", "label"),
                       [(p, "fractured" if p == "PAT1/STUDY_A/DX/IM2" else "not fractured")
                        for p in SCORED])
    images = run(root, model, labels=labels, n_bootstrap=0)
    ev = run(root, model, labels=labels, study_level=True, n_bootstrap=0)
    prob = {r["path"]: r["probability"] for r in images.rows}
    studies = {r["path"]: r for r in ev.rows}
    assert set(studies) == {STUDY_A, STUDY_B, "photos"}
    assert studies[STUDY_A]["study_key"] == "StudyInstanceUID"
    assert studies[STUDY_A]["images"] == 3 and studies[STUDY_A]["true_label"] == "fractured"
    assert studies[STUDY_A]["probability"] == max(prob[p] for p, s in SCORED.items()
                                                  if s == STUDY_A)
    assert studies[STUDY_B]["true_label"] == "not fractured" and studies[STUDY_B]["images"] == 2
    assert studies["photos"]["study_key"] == "folder"
    assert ev.metrics["data"]["study_keys"] == {"StudyInstanceUID": 2, "folder": 1}
