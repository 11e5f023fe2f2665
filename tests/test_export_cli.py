"""`fxscore export` through click's CliRunner, once as a real process, and end to end:
`fxscore train` -> `fxscore export` -> `fxscore run`, on sample_data and on real X-rays, with the
scorer's probability equal to torch's within 1e-4 for every file.
"""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

import numpy as np  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from conftest import SAMPLE_DATA  # noqa: E402
from export_checkpoints import exported_files, link_slice  # noqa: E402,F401

from fxscore.cli import cli  # noqa: E402
from fxscore.contract import Preprocess  # noqa: E402
from fxscore.export import pipeline, quantize  # noqa: E402
from fxscore.export.onnx_export import load_checkpoint  # noqa: E402
from fxscore.export.parity import torch_outputs  # noqa: E402
from fxscore.images import ImageReadError  # noqa: E402
from fxscore.model import load_model  # noqa: E402
from fxscore.scoring import model_input  # noqa: E402


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


@pytest.fixture(scope="module")
def checkpoint(exported_files):
    return exported_files[0]


def test_export_with_verify_and_forced_int8(checkpoint, tmp_path, monkeypatch):
    real_problem = quantize.problem
    # Any drop at all is "too much": the refusal path runs on a real comparison.
    monkeypatch.setattr(quantize, "problem", lambda result, limit: real_problem(result, -1.0))
    verify = link_slice(SAMPLE_DATA, tmp_path / "val", per_class=5)
    out = tmp_path / "model.onnx"
    r = invoke("export", checkpoint, "--out", out, "--verify", verify, "--int8",
               "--calibration", SAMPLE_DATA / "train", "--calibration-images", "8", "--force",
               "--threshold", "0.45", "--model-name", "wrist", "--model-version", "2.1")
    assert r.exit_code == 0, r.output
    assert "parity, random batch 1: max |d logit|" in r.stdout
    assert "parity, 10 files (0 unreadable)" in r.stdout
    assert "int8 vs fp32 on 10 labelled images: ROC-AUC" in r.stdout
    q = json.loads((tmp_path / "model.export.json").read_text())["int8"]
    change = q["auc_int8"] - q["auc_fp32"]
    assert f"(AUC change {change:+.3f}; refused below -0.01)" in r.stdout  # signed, not "drop"
    assert "drop" not in r.stdout
    assert "WARNING: --force: wrote" in r.stderr and "ROC-AUC drops" in r.stderr
    assert "export: parity on 10 files" in r.stderr  # progress goes to stderr
    for name in ("model.onnx", "model.int8.onnx", "model.export.json"):
        assert f"wrote {tmp_path / name}" in r.stdout
    report = json.loads((tmp_path / "model.export.json").read_text())
    assert report["ok"] is True and report["int8"]["forced"] is True
    meta = load_model(out).meta
    assert (meta.threshold, meta.model_name, meta.model_version) == (0.45, "wrist", "2.1")
    assert load_model(tmp_path / "model.int8.onnx").meta.model_version == "2.1-int8"


def test_a_failed_check_exits_1_and_prints_the_report(checkpoint, tmp_path, monkeypatch):
    report = {"parity": {"random": [{"batch": 1, "max_abs_logit": 0.5, "max_abs_prob": 0.1,
                                     "label_agreement": 1.0}]}, "written": []}

    def failing(ckpt, opts, progress, stages=None):
        raise pipeline.ExportFailed("the ONNX model does not compute what the checkpoint "
                                    "computes", report)

    monkeypatch.setattr(pipeline, "export", failing)
    r = invoke("export", checkpoint, "--out", tmp_path / "model.onnx")
    assert r.exit_code == 1
    assert "Error: the ONNX model does not compute" in r.stderr
    assert "max |d logit| 0.5" in r.stdout


@pytest.mark.parametrize("args, code, message", [
    (["--out", "m.onnx", "--opset", "17"], 2, "17 is not in the range 18<=x<=20"),
    (["--out", "m.onnx", "--threshold", "2"], 2, "not in the range 0<=x<=1"),
    ([], 2, "Missing option '--out'"),
    (["--out", "m.pt"], 1, "name the model file *.onnx"),
    (["--out", "m.onnx", "--int8"], 1, "--int8 needs --calibration DIR"),
    (["--out", "m.onnx", "--verify", "nope"], 1, "--verify nope: not a folder"),
])
def test_usage_errors(checkpoint, tmp_path, monkeypatch, args, code, message):
    monkeypatch.chdir(tmp_path)
    r = invoke("export", checkpoint, *args)
    assert r.exit_code == code, r.output
    assert message in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint(tmp_path):
    r = invoke("export", tmp_path / "best.pt", "--out", tmp_path / "m.onnx")
    assert r.exit_code == 1 and "does not exist" in r.stderr


def test_a_run_folder_exports_its_best_pt(checkpoint, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").symlink_to(checkpoint)
    monkeypatch.setenv("FXSCORE_PROGRESS_INTERVAL", "0")
    verify = link_slice(SAMPLE_DATA, tmp_path / "val", per_class=3)
    r = invoke("export", run, "--out", tmp_path / "m.onnx", "--verify", verify,
               "--model-version", "2.1")
    assert r.exit_code == 0, r.output
    assert f"export: reading checkpoint {run / 'best.pt'}" in r.stderr
    assert "export parity: 6/6 files (100%)" in r.stderr  # progress, plain lines in a log
    assert load_model(tmp_path / "m.onnx").meta.model_version == "2.1"
    # The version reads as it was set, wherever it is shown.
    ev = invoke("eval", SAMPLE_DATA / "test", "-m", tmp_path / "m.onnx", "--bootstrap", "0",
                "-q")
    assert "version 2.1 (id" in ev.stdout and "v2.1" not in ev.stdout
    empty = tmp_path / "empty-run"
    empty.mkdir()
    r = invoke("export", empty, "--out", tmp_path / "n.onnx")
    assert r.exit_code == 1 and "is a folder without best.pt" in r.stderr


def test_default_version_is_not_prefixed(exported_files, tmp_path):
    _, onnx_path = exported_files
    ev = invoke("eval", SAMPLE_DATA / "test", "-m", onnx_path, "--bootstrap", "0", "-q")
    assert ev.exit_code == 0, ev.output
    assert "version ckpt-" in ev.stdout and "vckpt-" not in ev.stdout


@pytest.mark.parametrize("content, why", [
    (b"", "the file is empty"),
    (b"hello, I am a text file\n", "it is neither a torch zip archive nor a pickle"),
    (b"PK\x03\x04" + b"\0" * 60, "it is a zip archive, but not one written by torch.save"),
    ("pickle", "it holds Python objects other than tensors and plain values"),
])
def test_a_file_that_is_not_a_checkpoint_gets_our_error(tmp_path, content, why):
    import collections
    import pickle

    bad = tmp_path / "best.pt"
    if content == "pickle":
        bad.write_bytes(pickle.dumps(collections.OrderedDict(a=object.__new__(Preprocess))))
    else:
        bad.write_bytes(content)
    r = invoke("export", bad, "--out", tmp_path / "m.onnx")
    assert r.exit_code == 1
    assert f"{bad}: not a `fxscore train` checkpoint: {why}" in " ".join(r.stderr.split())
    assert "file an issue" not in r.output.lower() and "Traceback" not in r.output


def test_sigterm_mid_export_leaves_no_model(checkpoint, tmp_path):
    """A real process killed (SIGTERM, as a batch system does) while its model is on disk
    but not yet checked: it removes the temporary, exits 143 and says so in ONE line (the
    group's handler, not one of its own)."""
    out = tmp_path / "model.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "fxscore.cli", "export", str(checkpoint),
                             "--out", str(out), "--verify", str(SAMPLE_DATA / "val")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial, rest = [], ""
    try:
        for line in proc.stderr:
            if line.startswith("export: parity on random tensors"):
                partial = [p.name for p in tmp_path.iterdir()]
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert len(partial) == 1 and partial[0].endswith(".partial")  # the model, being checked
    assert proc.returncode == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    hint = f"terminated (SIGTERM); no model written to {out} (an older one there is untouched)"
    assert rest.strip().splitlines()[-1] == hint, rest
    assert [x for x in rest.splitlines() if "SIGTERM" in x] == [hint], rest
    assert "Traceback" not in rest


# ---- end to end ------------------------------------------------------------------------------

def train(src_root, tmp_path, per_class):
    """`fxscore train`, tiny: a few images per class of src_root's train/ and val/."""
    data = tmp_path / "data"
    for split in ("train", "val"):
        link_slice(src_root, data / split, per_class=per_class, split=split)
    r = invoke("train", data, "--out", tmp_path / "run", "--pretrained", "none", "--freeze",
               "none", "--epochs", "1", "--image-size", "64", "--batch-size", "4", "--quiet")
    assert r.exit_code in (0, 3), r.output  # 3: some real files are unreadable, skipped
    return tmp_path / "run" / "best.pt"


def scored_rows(model, folder, csv_path):
    r = invoke("run", folder, "--model", model, "--out", csv_path, "--quiet")
    assert r.exit_code in (0, 3), r.output
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def assert_scorer_equals_torch(best_pt, folder, rows) -> int:
    """Every file: the scorer's probability (from `fxscore run`'s CSV) vs torch on the tensor
    the scorer's reading rule (`model_input`) makes of it. Returns how many were compared."""
    model, ckpt = load_checkpoint(best_pt)
    params = Preprocess.from_dict(ckpt["preprocess"])
    xs, scored = [], []
    for row in rows:
        try:
            xs.append(model_input(folder / row["path"], params))
        except ImageReadError:
            assert row["error"] and row["probability"] == ""
            continue
        scored.append(float(row["probability"]))
    _, prob = torch_outputs(model, np.stack(xs))
    worst = np.abs(np.array(scored) - prob).max()
    assert worst <= 1e-4, worst
    return len(scored)


def test_train_export_run_on_sample_data(tmp_path):
    best = train(SAMPLE_DATA, tmp_path, per_class=4)
    out = tmp_path / "model.onnx"
    # The export as a real process, as a user runs it.
    proc = subprocess.run([sys.executable, "-m", "fxscore.cli", "export", str(best), "--out",
                           str(out), "--verify", str(SAMPLE_DATA / "val")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "parity, 40 files (0 unreadable)" in proc.stdout
    ckpt = torch.load(best, weights_only=True)
    meta = load_model(out).meta
    assert meta.training["best_epoch"] == ckpt["best_epoch"] == 1
    assert meta.training["data_fingerprint"] == ckpt["data_fingerprint"]
    assert meta.training["best_metrics"] == pytest.approx(ckpt["best_metrics"], nan_ok=True)
    assert meta.preprocess.input_size == (64, 64)
    rows = scored_rows(out, SAMPLE_DATA / "test", tmp_path / "test.csv")  # unseen; DICOM too
    assert len(rows) == 40
    assert assert_scorer_equals_torch(best, SAMPLE_DATA / "test", rows) == 40


@pytest.mark.realdata
def test_train_export_run_on_real_xrays(real_data_root, tmp_path):
    best = train(real_data_root, tmp_path, per_class=4)
    verify = link_slice(real_data_root, tmp_path / "verify", per_class=8, split="test")
    out = tmp_path / "model.onnx"
    r = invoke("export", best, "--out", out, "--verify", verify, "--int8", "--calibration",
               tmp_path / "data" / "train", "--force")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "model.export.json").read_text())
    assert report["parity"]["files"]["max_abs_prob"] <= 1e-4
    assert report["int8"]["images"] >= 14 and (tmp_path / "model.int8.onnx").exists()
    rows = scored_rows(out, verify, tmp_path / "preds.csv")
    assert len(rows) == 16
    assert assert_scorer_equals_torch(best, verify, rows) >= 14
