"""`fxscore explain` and `fxscore augment` through click's CliRunner."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fxscore.cli import cli
from fxscore.contract import Preprocess
from onnx_models import make_convnet, make_meta, make_model

META = make_meta(preprocess=Preprocess(input_size=(32, 32)), model_name="test-cnn")


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def _images(folder, n, seed=0, size=(48, 40)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        small = rng.random((5, 5))
        img = Image.fromarray((small * 255).astype(np.uint8)).resize(size[::-1],
                                                                     Image.Resampling.BICUBIC)
        files.append(folder / f"x{i:03d}.png")
        img.save(files[-1])
    return files


@pytest.fixture
def cnn(tmp_path):
    return make_convnet(tmp_path / "cnn.onnx", META)


def test_augment_then_explain_writes_the_overlay_and_the_run_score(tmp_path, cnn):
    r = invoke("augment", cnn, "--out", tmp_path / "cnn.explain.onnx")
    assert r.exit_code == 0, r.output
    assert "heatmap outputs added (16 x 16 cells)" in r.stderr
    (image,) = _images(tmp_path / "in", 1)
    r = invoke("explain", image, "--model", tmp_path / "cnn.explain.onnx", "--out",
               tmp_path / "h.png")
    assert r.exit_code == 0, r.output
    assert "fractured probability" in r.stdout and "heatmap (16 x 16 cells" in r.stdout
    with Image.open(tmp_path / "h.png") as im:
        assert im.size == (40, 48) and im.mode == "RGB"
    r = invoke("explain", image, "-m", tmp_path / "cnn.explain.onnx", "-o", tmp_path / "h2.png",
               "--json")
    doc = json.loads(r.stdout)
    run = invoke("run", image, "-m", tmp_path / "cnn.explain.onnx", "-q")
    row = run.stdout.splitlines()[1].split(",")
    assert f"{doc['probability']:.6f}" == row[1] and doc["label"] == row[2]
    assert doc["ood"] is None and len(doc["cells"]) == 16


def test_explain_with_a_model_without_heatmap_outputs_says_how_to_add_them(tmp_path, cnn):
    (image,) = _images(tmp_path / "in", 1)
    r = invoke("explain", image, "-m", cnn, "-o", tmp_path / "h.png")
    assert r.exit_code == 1
    assert "has no heatmap outputs" in r.output and f"fxscore augment {cnn}" in r.output
    assert not (tmp_path / "h.png").exists()


def test_augment_with_ood_statistics_flags_what_is_unlike_them(tmp_path, cnn):
    _images(tmp_path / "val", 40)
    r = invoke("augment", cnn, "--out", tmp_path / "ood.onnx", "--ood-fit", tmp_path / "val")
    assert r.exit_code == 0, r.output
    assert "OOD statistics: fit on 40 images" in r.stderr
    (same,) = _images(tmp_path / "new", 1, seed=7)
    flat = tmp_path / "flat.png"  # a constant image: nothing like a texture
    Image.fromarray(np.full((48, 40), 255, np.uint8)).save(flat)
    docs = {}
    for f in (same, flat):
        r = invoke("explain", f, "-m", tmp_path / "ood.onnx", "-o", tmp_path / "h.png", "--json")
        assert r.exit_code == 0, r.output
        docs[f] = json.loads(r.stdout)
    assert docs[flat]["ood"] is True and docs[flat]["ood_score"] > docs[same]["ood_score"]
    r = invoke("explain", flat, "-m", tmp_path / "ood.onnx", "-o", tmp_path / "h.png")
    assert "OOD: unlike the images the model was made for" in r.stdout
    # the colour rule, as in `fxscore run`: the same texture with a red stroke is flagged
    rgb = np.stack([np.asarray(Image.open(same))] * 3, axis=-1)
    rgb[10:14, 5:35] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "figure.png")
    r = invoke("explain", tmp_path / "figure.png", "-m", tmp_path / "ood.onnx", "-o",
               tmp_path / "h.png", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ood"] is True, r.output


def test_augment_with_a_threshold_set_apart(tmp_path, cnn):
    _images(tmp_path / "train", 30, seed=1)
    _images(tmp_path / "val", 25, seed=2)
    r = invoke("augment", cnn, "--out", tmp_path / "ood.onnx", "--ood-fit", tmp_path / "train",
               "--ood-threshold-on", tmp_path / "val")
    assert r.exit_code == 0, r.output
    assert "fit on 30 images" in r.stderr and "of 25 held-out images" in r.stderr


@pytest.mark.parametrize("args, code, message", [
    (["--out", "x.txt"], 2, "name the model file *.onnx"),
    (["--out", "x.onnx", "--ood-fit", "EMPTY"], 1, "no image files found"),
    (["--out", "x.onnx", "--ood-threshold-on", "EMPTY"], 2, "needs --ood-fit"),
])
def test_augment_usage_errors(tmp_path, cnn, args, code, message):
    (tmp_path / "EMPTY").mkdir()
    args = [str(tmp_path / a) if a in ("x.txt", "x.onnx", "EMPTY") else a for a in args]
    r = invoke("augment", cnn, *args)
    assert r.exit_code == code and message in r.output


def test_augment_refuses_a_graph_without_an_fxscore_head(tmp_path):
    path = make_model(tmp_path / "logits.onnx", head="Identity")
    r = invoke("augment", path, "--out", tmp_path / "x.onnx")
    assert r.exit_code == 1 and "does not come from a Sigmoid" in r.output
    assert not (tmp_path / "x.onnx").exists()


def test_explain_an_unreadable_image_is_a_clear_error(tmp_path, cnn):
    invoke("augment", cnn, "--out", tmp_path / "e.onnx")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    r = invoke("explain", bad, "-m", tmp_path / "e.onnx", "-o", tmp_path / "h.png")
    assert r.exit_code == 1 and "bad.png" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------------------- fxscore run


def _read_rows(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_writes_one_heatmap_per_row_and_resumes_without_gaps(tmp_path, cnn):
    from fxscore.cam import PNG_TEXT_KEY, heatmap_name, row_path_of

    invoke("augment", cnn, "--out", tmp_path / "e.onnx")
    src = tmp_path / "in"
    _images(src / "a", 3, seed=1)
    _images(src / "b, c", 2, seed=2)  # a comma in the folder: the name escapes it
    args = ["run", src, "-m", tmp_path / "e.onnx", "--out", tmp_path / "p.csv", "--heatmaps",
            tmp_path / "hm", "--heatmaps-for", "all", "-q"]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    rows = _read_rows(tmp_path / "p.csv")
    names = sorted(p.name for p in (tmp_path / "hm").iterdir())
    assert names == sorted(heatmap_name(row["path"]) for row in rows) and len(names) == 5
    assert sorted(row_path_of(n) for n in names) == sorted(row["path"] for row in rows)
    with Image.open(tmp_path / "hm" / heatmap_name(rows[0]["path"])) as im:
        assert im.text[PNG_TEXT_KEY] == rows[0]["path"]
    # more files, a rerun: only the new rows get (new) heatmaps; none is missing
    _images(src / "d", 2, seed=3)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "hm").iterdir()}
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "hm").iterdir()}
    assert len(after) == 7 and all(after[n] == t for n, t in before.items())


def test_run_heatmaps_for_positive_rows_only_by_default(tmp_path, cnn):
    from fxscore.cam import heatmap_name

    invoke("augment", cnn, "--out", tmp_path / "e.onnx")
    _images(tmp_path / "in", 8, seed=4)
    r = invoke("run", tmp_path / "in", "-m", tmp_path / "e.onnx", "--out", tmp_path / "p.csv",
               "--heatmaps", tmp_path / "hm")
    assert r.exit_code == 0, r.output
    rows = _read_rows(tmp_path / "p.csv")
    positive = [row for row in rows if row["label"] == "fractured"]
    assert sorted(p.name for p in (tmp_path / "hm").iterdir()) == sorted(
        heatmap_name(row["path"]) for row in positive)
    assert f"{len(positive)} heatmap" in r.stderr


def test_run_heatmaps_with_a_model_without_outputs_fails_before_scoring(tmp_path, cnn):
    _images(tmp_path / "in", 2)
    r = invoke("run", tmp_path / "in", "-m", cnn, "--out", tmp_path / "p.csv", "--heatmaps",
               tmp_path / "hm")
    assert r.exit_code == 1 and "has no heatmap outputs" in r.output
    assert "fxscore augment" in r.output and not (tmp_path / "p.csv").exists()


def test_run_with_ood_statistics_adds_the_columns_and_counts_the_flags(tmp_path, cnn):
    _images(tmp_path / "val", 40)
    invoke("augment", cnn, "--out", tmp_path / "o.onnx", "--ood-fit", tmp_path / "val")
    src = tmp_path / "in"
    _images(src, 3, seed=9)
    Image.fromarray(np.full((48, 40), 255, np.uint8)).save(src / "white.png")
    (src / "broken.png").write_bytes(b"no image")
    r = invoke("run", src, "-m", tmp_path / "o.onnx", "--out", tmp_path / "p.csv")
    assert r.exit_code == 3, r.output  # broken.png
    with open(tmp_path / "p.csv") as f:
        assert f.readline().rstrip("\r\n").endswith(",error,ood_score,ood")
    rows = {row["path"]: row for row in _read_rows(tmp_path / "p.csv")}
    assert rows["white.png"]["ood"] == "1" and float(rows["white.png"]["ood_score"]) > 0
    assert rows["broken.png"]["ood"] == "" and rows["broken.png"]["ood_score"] == ""
    assert rows["white.png"]["probability"]  # flagged rows keep their score
    assert "flagged out of distribution" in r.stderr
    plain = invoke("run", src, "-m", cnn, "--out", tmp_path / "q.csv")  # no statistics
    with open(tmp_path / "q.csv") as f:
        assert f.readline().rstrip("\r\n").endswith(",sha256,error")
    assert plain.exit_code == 3
