"""fxscore.report: stdout text, predictions.csv, metrics.json and the self-contained HTML page."""
from __future__ import annotations

import base64
import csv
import io
import json
import re

import pytest
from PIL import Image
from sklearn.metrics import classification_report

from conftest import small_tmpfs
from eval_data import FRACTURED, NOT_FRACTURED, make_folders, write_truncated
from fxscore.evaluate import evaluate
from fxscore.model import load_model
from fxscore.output import COLUMNS
from fxscore.report import format_text, metrics_json, render_html, write_report
from onnx_models import make_meta, make_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_folders(tmp_path_factory.mktemp("report") / "data")
    write_truncated(root / "fractured" / "cut.png")
    write_truncated(root / "not fractured" / "odd <b>name</b> & co.png")  # listed, escaped
    return root


def _evaluate(root, threshold=0.5, **kw):
    model = make_model(root.parent / f"m{threshold}.onnx", make_meta(threshold=threshold))
    kw.setdefault("n_bootstrap", 200)
    return evaluate(root, load_model(model, threads=1), workers=1, **kw)


@pytest.fixture(scope="module")
def written(data):
    """One evaluation with a target operating point, written out once for the tests below."""
    ev = _evaluate(data, target_sensitivity=0.9)
    return ev, write_report(ev, data.parent / "out" / "nested")


def test_report_files(written):
    ev, paths = written
    assert sorted(p.name for p in paths["report"].parent.iterdir()) == [
        "metrics.json", "predictions.csv", "report.html"]

    with open(paths["predictions"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [*COLUMNS, "true_label"]
    assert len(rows) == len(FRACTURED) + len(NOT_FRACTURED) + 2
    bad = [r for r in rows if r["error"]]
    assert [r["path"] for r in bad] == ["fractured/cut.png",
                                        "not fractured/odd <b>name</b> & co.png"]
    assert all(r["probability"] == "" and r["label"] == "" for r in bad)
    assert all(r["true_label"] == r["path"].split("/")[0] for r in rows)
    good = [r for r in rows if not r["error"]]
    assert all((float(r["probability"]) >= 0.5) == (r["label"] == "fractured") for r in good)
    by_path = {r["path"]: r for r in ev.rows}
    assert all(float(r["probability"]) == pytest.approx(by_path[r["path"]]["probability"],
                                                        abs=1e-6) for r in good)

    doc = json.loads(paths["metrics"].read_text())
    assert doc["data"]["files"] == len(rows) and doc["data"]["unreadable"] == 2
    assert doc["unreadable_files"][0]["path"] == "fractured/cut.png"
    assert doc["model"]["model_id"] == ev.metrics["model"]["model_id"] == rows[0]["model_id"]
    assert set(doc["operating_points"]) == {"model", "target"}
    assert doc["roc_auc"]["ci"]["low"] <= doc["roc_auc"]["value"] <= doc["roc_auc"]["ci"]["high"]


def test_html_is_self_contained_and_its_images_decode(written):
    ev, paths = written
    page = paths["report"].read_text(encoding="utf-8")
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(srcs) == 4  # ROC, PR, reliability, histograms
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))) as im:
            im.load()
            assert im.format == "PNG" and im.width >= 500 and im.height >= 400
    without_images = re.sub(r'src="data:[^"]*"', "", page)
    for external in ("http://", "https://", "<script", "<link", "@import", "url(", "src=",
                     "href=", "<iframe", "<object"):
        assert external not in without_images.lower(), external
    # contents: model, data summary, tables, every unreadable file, escaped names
    for text in (ev.metrics["model"]["model_id"], "test-gap", "Operating points",
                 "Confusion matrix", "Classification report", "Calibration", "fractured/cut.png",
                 "target sensitivity 0.90", "95% CI",
                 "odd &lt;b&gt;name&lt;/b&gt; &amp; co.png"):
        assert text in page, text
    assert "<b>name</b>" not in page


def test_text_report_holds_sklearn_report_matrix_and_intervals(written):
    ev, _ = written
    text = format_text(ev)
    ok = ev.readable
    expected = classification_report([r["true_label"] for r in ok], [r["label"] for r in ok],
                                      labels=["fractured", "not fractured"], digits=3,
                                      zero_division=0)
    assert expected.rstrip() in text
    cm = ev.metrics["confusion_matrix"]["matrix"]
    assert re.search(rf"^\s+fractured\s+{cm[0][0]}\s+{cm[0][1]}$", text, re.M)
    assert re.search(rf"^\s+not fractured\s+{cm[1][0]}\s+{cm[1][1]}$", text, re.M)
    ci = ev.metrics["roc_auc"]["ci"]
    assert "ROC-AUC" in text and f"[{ci['low']:.3f}, {ci['high']:.3f}]" in text
    for label in ("Sensitivity (recall)", "Specificity", "Average precision", "Brier score"):
        assert label in text
    assert "2 unreadable, metrics use the" in text
    assert "fractured/cut.png: " in text


def test_undefined_metrics_are_null_in_json_and_na_in_pages(data):
    # threshold 1.0: nothing is called fractured, so precision (PPV) is undefined
    ev = _evaluate(data, threshold=1.0, n_bootstrap=0)
    assert ev.metrics["operating_points"]["model"]["precision"] != \
        ev.metrics["operating_points"]["model"]["precision"]  # NaN
    doc = json.loads(metrics_json(ev))
    assert doc["operating_points"]["model"]["precision"] is None
    assert doc["bootstrap"] is None
    assert re.search(r"Precision \(PPV\)\s+n/a", format_text(ev))
    page = render_html(ev)
    assert "n/a" in page and "No confidence intervals" in page and "95% CI" not in page


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, for a real ENOSPC."""
    with small_tmpfs(tmp_path / "mnt", "1m") as mnt:
        yield mnt


def test_full_disk_leaves_the_old_report_whole_and_no_empty_files(written, small_disk):
    """Today a full disk leaves a 0-byte report.html; now each file is old or new, never cut."""
    ev, _ = written
    out = small_disk / "report"
    paths = write_report(ev, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"predictions.csv", "metrics.json", "report.html"}
    free = __import__("os").statvfs(small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 8192))  # leave 8 KiB
    with pytest.raises(OSError) as e:
        write_report(ev, out)
    assert e.value.errno == 28  # ENOSPC
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp file left
    filler.unlink()
    fresh = small_disk / "fresh"
    fresh.mkdir()
    filler.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 8192))
    with pytest.raises(OSError):
        write_report(ev, fresh)
    assert list(fresh.iterdir()) == []  # not a 0-byte report.html
    assert paths["report"].read_bytes() == before["report.html"]


def test_predictions_csv_neutralises_formulas_and_round_trips(data, tmp_path):
    from fxscore import csvsafe
    from fxscore.report import predictions_csv

    rows = [{"path": p, "probability": 0.25, "label": "not fractured", "threshold": 0.5,
             "model_id": "m", "sha256": "", "error": "", "true_label": "fractured"}
            for p in ("=1+1.png", "a\rb.png", "-600.png")]
    text = predictions_csv(rows)
    assert [r[0] for r in csv.reader(io.StringIO(text, newline=""))][1:] == [
        "'=1+1.png", "a\rb.png", "'-600.png"]
    back = list(csvsafe.read_dicts(io.StringIO(text, newline="")))
    assert [r["path"] for r in back] == [r["path"] for r in rows]
    assert list(back[0]) == [*COLUMNS, "true_label"] and back[0]["probability"] == "0.250000"
