"""`fxscore wrap` through click's CliRunner: wrap, score, inspect; re-stamp; a torchvision model."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import SAMPLE_DATA
from fxscore.cli import cli
from fxscore.model import load_model
from onnx_models import make_model
from test_wrap import H, W, third_party

WRAP_ARGS = ["--classes", "fractured,not fractured", "--positive", "fractured",
             "--input-size", f"{H},{W}", "--mean", "0.5,0.4,0.3", "--std", "0.2,0.25,0.3",
             "--output", "softmax:0"]


def words(text: str) -> str:
    return " ".join(text.split())  # info aligns its columns; compare words


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def test_wrap_then_run_then_info(tmp_path):
    src = third_party(tmp_path / "their.onnx", layout="nhwc")
    out = tmp_path / "models" / "fx.onnx"  # a missing folder is created
    r = invoke("wrap", src, "--out", out, *WRAP_ARGS, "--layout", "nhwc", "--check",
               SAMPLE_DATA / "val", "--model-version", "2024.1")
    assert r.exit_code == 0, r.output
    assert "adapted: NHWC input: a Transpose from fxscore's NCHW is added in front" in r.stdout
    assert "adapted: output is class logits: Softmax added, column 0 taken" in r.stdout
    assert "checked on 20 images (16 from " in r.stdout
    assert f"wrote {out} (model " in r.stdout
    model = load_model(out, threads=1)
    assert model.meta.model_version == "2024.1" and model.verified

    preds = tmp_path / "preds.csv"
    run = invoke("run", SAMPLE_DATA / "test", "--model", out, "--out", preds, "--quiet")
    assert run.exit_code in (0, 3), run.output
    with open(preds, newline="") as f:
        rows = [row for row in csv.DictReader(f) if not row["error"]]
    assert len(rows) >= 30 and all(0 <= float(row["probability"]) <= 1 for row in rows)
    assert {row["model_id"] for row in rows} == {model.model_id}

    info = invoke("info", out)
    assert info.exit_code == 0
    text = words(info.stdout)
    assert "version 2024.1" in text and "wrapped from their.onnx (sha256 " in text
    assert "output softmax:0" in text and "precision fp32" in text


def test_wrap_restamps_an_fxscore_model(tmp_path):
    src = make_model(tmp_path / "m.onnx")
    out = tmp_path / "m-t0.37.onnx"
    r = invoke("wrap", src, "--out", out, "--threshold", "0.37", "--model-version", "1.1")
    assert r.exit_code == 0, r.output
    assert "threshold 0.5 -> 0.37; model version 1 -> 1.1" in r.stdout
    assert "weights and graph copied unchanged, digest updated" in r.stdout
    meta = load_model(out, threads=1).meta
    assert (meta.threshold, meta.model_version) == (0.37, "1.1")
    doc = json.loads(invoke("info", out, "--json").stdout)
    assert doc["threshold"] == 0.37 and doc["integrity"]["verified"] is True
    assert "copied from" in invoke("info", out).stdout


@pytest.mark.parametrize("make, args, code, message", [
    (lambda t: make_model(t / "m.onnx"), ["--classes", "a,b"], 2,
     "already an fxscore model: only --threshold, --model-version and --model-name can change "
     "(not --classes)"),
    (lambda t: third_party(t / "m.onnx"), ["--classes", "a,b"], 2,
     "is not an fxscore model; to wrap it, say what it is: --positive, --input-size, --mean, "
     "--std, --output missing"),
    (lambda t: third_party(t / "m.onnx"), [*WRAP_ARGS[:-2], "--output", "logit"], 1,
     "has 2 values per image"),
    (lambda t: third_party(t / "m.onnx"), ["--classes", "a", *WRAP_ARGS[2:]], 2,
     "expected two different class names"),
    (lambda t: third_party(t / "m.onnx"), [*WRAP_ARGS[:4], "--input-size", "4", *WRAP_ARGS[6:]],
     2, "each side in 8..4096"),
    (lambda t: third_party(t / "m.onnx"), [*WRAP_ARGS[:6], "--mean", "0.5,x", *WRAP_ARGS[8:]],
     2, "expected numbers separated by commas"),
    (lambda t: make_model(t / "m.onnx"), [], 1, "say what to change"),
])
def test_wrap_refusals(tmp_path, make, args, code, message):
    src = make(tmp_path)
    r = invoke("wrap", src, "--out", tmp_path / "fx.onnx", *args)
    assert r.exit_code == code, r.output
    assert message in " ".join(r.output.split())
    assert not (tmp_path / "fx.onnx").exists() and "Traceback" not in r.output


def test_wrap_help_shows_the_options_with_examples():
    r = invoke("wrap", "--help")
    assert r.exit_code == 0
    for text in ("--classes", "--positive", "--input-size", "--mean", "--std", "--output",
                 "--layout", "--input-range", "--threshold", "--model-version", "Examples:",
                 "fxscore wrap model.onnx --out model-t0.37.onnx --threshold 0.37"):
        assert text in r.output, text


@pytest.mark.torch
def test_wrap_a_torchvision_export(tmp_path):
    """A torchvision classifier with two class logits, exported by torch, wrapped without it:
    the scorer's probabilities equal torch's softmax on the same tensors."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("onnxscript")
    from fxscore.images import read_image
    from fxscore.preprocess import preprocess

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=2).eval()
    size = 32
    batch = torch.export.Dim("batch", min=1, max=1024)
    src = tmp_path / "resnet.onnx"
    with torch.no_grad():
        program = torch.onnx.export(net, (torch.zeros(2, 3, size, size),), None, dynamo=True,
                                    input_names=["x"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), verbose=False)
    src.write_bytes(program.model_proto.SerializeToString())
    out = tmp_path / "fx.onnx"
    r = invoke("wrap", src, "--out", out, "--classes", "fractured,not fractured",
               "--positive", "fractured", "--input-size", str(size), "--mean",
               "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--output", "softmax:0")
    assert r.exit_code == 0, r.output
    model = load_model(out, threads=1)
    files = sorted(p for p in (SAMPLE_DATA / "test").rglob("*.png"))[:6]
    x = np.stack([preprocess(read_image(f), model.meta.preprocess) for f in files])
    with torch.no_grad():
        want = torch.softmax(net(torch.from_numpy(x)), dim=1)[:, 0].numpy()
    np.testing.assert_allclose(model.predict(x), want, atol=1e-4)
    assert "precision fp32" in words(invoke("info", out).stdout)
