"""The whole export (fxscore.export.pipeline): what gets written, and that failures write no model.

torch's exporter runs once per module; each test gets a copy of that graph (or a deliberately
broken one), so the tests here exercise the orchestration: checks, refusals, atomic writes.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

import onnx  # noqa: E402
from conftest import SAMPLE_DATA  # noqa: E402
from export_checkpoints import exported_files, link_slice, write_checkpoint  # noqa: E402,F401
from onnx import numpy_helper  # noqa: E402

from fxscore import membership  # noqa: E402
from fxscore.export import pipeline, quantize  # noqa: E402
from fxscore.hashing import sha256_file  # noqa: E402
from fxscore.modelfile import read_props  # noqa: E402
from fxscore.export.onnx_export import ExportError, set_metadata  # noqa: E402
from fxscore.model import load_model  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(exported_files):
    """(best.pt, the graph torch's exporter made of it)."""
    return exported_files[0], onnx.load(str(exported_files[1]))


@pytest.fixture
def graph(checkpoint, monkeypatch):
    """Serve the module's export for every to_onnx call; `graph.nudge()` breaks one weight."""
    state = {"nudge": 0.0}

    def fake_to_onnx(model, meta, *, opset=18):
        proto = onnx.ModelProto()
        proto.CopyFrom(checkpoint[1])
        if state["nudge"]:  # an exporter bug: the file is self-consistent (digest) but wrong
            init = next(i for i in proto.graph.initializer if i.name.endswith("fc.bias"))
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + state["nudge"],
                                                  init.name))
        set_metadata(proto, meta)  # this call's metadata (threshold, ...), as to_onnx writes it
        return proto

    monkeypatch.setattr(pipeline, "to_onnx", fake_to_onnx)

    class Graph:
        def nudge(self, value: float) -> None:
            state["nudge"] = value

    return Graph()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """6 images per class of sample_data/val: enough for ROC-AUC, quick to score."""
    return link_slice(SAMPLE_DATA, tmp_path_factory.mktemp("labelled"), per_class=6)


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_writes_model_and_report(checkpoint, graph, labelled, tmp_path):
    out = tmp_path / "model.onnx"
    report = pipeline.export(checkpoint[0], pipeline.ExportOptions(
        out=out, verify=labelled, threshold=0.4))
    assert names(tmp_path) == ["model.export.json", "model.onnx"]
    saved = json.loads((tmp_path / "model.export.json").read_text())
    assert saved["ok"] is True and report["ok"] is True
    assert saved["parity"]["files"]["n"] == 12
    assert saved["parity"]["files"]["max_abs_prob"] < 1e-4
    assert [r["batch"] for r in saved["parity"]["random"]] == [1, 5]
    assert saved["written"] == [str(out), str(tmp_path / "model.export.json")]
    assert load_model(out).meta.threshold == 0.4


def test_parity_failure_writes_no_model_and_keeps_the_old_one(checkpoint, graph, labelled,
                                                              tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the model in service")
    graph.nudge(0.01)
    with pytest.raises(pipeline.ExportFailed, match="does not compute what the checkpoint") as e:
        pipeline.export(checkpoint[0], pipeline.ExportOptions(out=out, verify=labelled))
    assert out.read_bytes() == b"the model in service"
    assert names(tmp_path) == ["model.export.json", "model.onnx"]  # no temporaries left
    saved = json.loads((tmp_path / "model.export.json").read_text())
    assert saved["ok"] is False and saved["written"] == []
    assert saved["parity"]["files"]["max_abs_logit"] == pytest.approx(0.01, rel=1e-3)
    assert any("image files" in err for err in saved["errors"])
    assert e.value.report["errors"] == saved["errors"]


@pytest.mark.parametrize("where", ["parity", "quantize"])
def test_interrupt_midway_leaves_no_model(checkpoint, graph, tmp_path, monkeypatch, where):
    def interrupted(*args, **kwargs):
        if where == "quantize":  # the int8 file is half-written when the interrupt comes
            args[1].write_bytes(b"half")
        raise KeyboardInterrupt

    target = (pipeline.parity, "file_parity") if where == "parity" else (quantize, "quantize")
    monkeypatch.setattr(*target, interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.export(checkpoint[0], pipeline.ExportOptions(
            out=tmp_path / "model.onnx", verify=SAMPLE_DATA / "val" / "fractured", int8=True,
            calibration=SAMPLE_DATA / "train", int8_eval=SAMPLE_DATA / "val"))
    assert names(tmp_path) == []


def test_int8_refused_then_forced(checkpoint, graph, labelled, tmp_path):
    out = tmp_path / "model.onnx"
    (tmp_path / "model.int8.onnx").write_bytes(b"made from an older model.onnx")
    opts = pipeline.ExportOptions(out=out, verify=labelled, int8=True,
                                  calibration=SAMPLE_DATA / "train", calibration_images=16,
                                  auc_drop_limit=-1.0)
    with pytest.raises(pipeline.ExportFailed, match="int8 model refused: ROC-AUC drops"):
        pipeline.export(checkpoint[0], opts)
    assert names(tmp_path) == ["model.export.json", "model.onnx"]  # fp32 is fine and kept
    saved = json.loads((tmp_path / "model.export.json").read_text())
    assert saved["ok"] is False and saved["int8"]["written"] is False
    assert "ROC-AUC drops" in saved["int8"]["problem"]
    assert saved["removed"] == [str(tmp_path / "model.int8.onnx")]  # the stale one is gone

    report = pipeline.export(checkpoint[0], dataclasses.replace(opts, force=True))
    assert names(tmp_path) == ["model.export.json", "model.int8.onnx", "model.onnx"]
    assert report["ok"] is True and report["int8"]["forced"] is True
    saved = json.loads((tmp_path / "model.export.json").read_text())
    assert saved["int8"]["forced"] is True and saved["int8"]["problem"]
    int8 = load_model(tmp_path / "model.int8.onnx")
    assert int8.meta.training["quantization"]["per_channel"] is True


def test_int8_accepted_with_labelled_int8_eval(checkpoint, graph, tmp_path):
    report = pipeline.export(checkpoint[0], pipeline.ExportOptions(
        out=tmp_path / "m.onnx", int8=True, calibration=SAMPLE_DATA / "train",
        calibration_images=16, int8_eval=SAMPLE_DATA / "test", auc_drop_limit=1.0, threads=1))
    assert report["int8"]["images"] == 40 and report["int8"]["written"] is True
    assert report["int8"]["calibration_images"] == 16
    assert report["int8"]["eval_folder"] == str(SAMPLE_DATA / "test")
    assert "parity" in report and "files" not in report["parity"]  # no --verify given
    assert names(tmp_path) == ["m.export.json", "m.int8.onnx", "m.onnx"]


@pytest.mark.parametrize("opts, message", [
    (dict(out=Path("model.pt")), "name the model file"),
    (dict(verify=Path("/no/such/folder")), "--verify /no/such/folder: not a folder"),
    (dict(verify=SAMPLE_DATA / "extras" / "broken" / "empty.jpg"), "not a folder"),
    (dict(int8=True), "--int8 needs --calibration"),
    (dict(int8=True, calibration=SAMPLE_DATA / "train"), "needs labelled images"),
    (dict(int8=True, calibration=SAMPLE_DATA / "train", verify=SAMPLE_DATA / "extras"),
     "--verify: .*not classes of this model"),
])
def test_unusable_options_fail_before_exporting(checkpoint, tmp_path, monkeypatch, opts,
                                                message):
    monkeypatch.setattr(pipeline, "to_onnx", lambda *a, **k: pytest.fail("exported anyway"))
    opts = {"out": tmp_path / "model.onnx", **opts}
    with pytest.raises(ExportError, match=message):
        pipeline.export(checkpoint[0], pipeline.ExportOptions(**opts))
    assert names(tmp_path) == []


@pytest.fixture(scope="module")
def trained_on(tmp_path_factory):
    """(best.pt with the module's weights that records a DATA folder, that folder): 4 images
    per class of sample_data's train/ and val/."""
    root = tmp_path_factory.mktemp("trained")
    for split in ("train", "val"):
        link_slice(SAMPLE_DATA, root / "data" / split, per_class=4, split=split)
    return write_checkpoint(root / "best.pt", input_size=64, data=root / "data"), root / "data"


def test_the_training_data_table_and_thresholds_go_into_fp32_and_int8(trained_on, graph,
                                                                         tmp_path):
    best, data = trained_on
    report = pipeline.export(best, pipeline.ExportOptions(
        out=tmp_path / "m.onnx", int8=True, calibration=SAMPLE_DATA / "train",
        calibration_images=8, int8_eval=data / "val", auc_drop_limit=1.0,
        threshold_for="sensitivity:0.75", threads=1))
    t = report["training_data"]
    assert t["embedded"] is True and (t["train"], t["val"], t["described"]) == (8, 8, 16)
    train_file = sorted((data / "train" / "fractured").iterdir())[0]
    for name, point in (("m.onnx", report["operating_point"]),
                        ("m.int8.onnx", report["int8"]["operating_point"])):
        model = load_model(tmp_path / name)
        assert membership.training_data(model).split_of(sha256_file(train_file)) == "train"
        # each file's threshold is chosen on its own probabilities of the val images
        assert model.meta.threshold == point["threshold"] and point["sensitivity"] >= 0.75
        assert model.meta.training["operating_point"] == point


def test_a_checkpoint_naming_no_data_exports_without_a_table(checkpoint, graph, tmp_path):
    report = pipeline.export(checkpoint[0], pipeline.ExportOptions(out=tmp_path / "m.onnx"))
    assert report["training_data"]["embedded"] is False
    assert "names no training data" in report["training_data"]["reason"]
    assert membership.ENTRY not in read_props((tmp_path / "m.onnx").read_bytes())


def test_no_training_hashes_leaves_the_table_out(trained_on, graph, tmp_path):
    report = pipeline.export(trained_on[0], pipeline.ExportOptions(
        out=tmp_path / "m.onnx", training_hashes=False))
    assert report["training_data"] == {"embedded": False, "reason": "--no-training-hashes"}
    model = load_model(tmp_path / "m.onnx")
    assert model.meta.training_data == {} and membership.training_data(model) is None
