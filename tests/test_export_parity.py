"""Parity (fxscore.export.parity): torch vs the written file, on tensors and on real image files.

Every check is also shown to fail: a graph with one weight nudged must not pass.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from conftest import SAMPLE_DATA  # noqa: E402
from export_checkpoints import exported_files, link_slice  # noqa: E402,F401
from onnx import numpy_helper  # noqa: E402

from fxscore.contract import ModelMeta  # noqa: E402
from fxscore.export import parity  # noqa: E402
from fxscore.export.onnx_export import load_checkpoint, set_metadata  # noqa: E402
from fxscore.files import find_images  # noqa: E402
from fxscore.model import load_model  # noqa: E402


@pytest.fixture(scope="module")
def exported(exported_files):
    """(torch model, ONNX graph, the scorer's Model of it, the logit session)."""
    ckpt_path, path = exported_files
    proto = onnx.load(str(path))
    return load_checkpoint(ckpt_path)[0], proto, load_model(path), parity.logit_session(proto)


def model_meta(proto):
    return ModelMeta.from_props({p.key: p.value for p in proto.metadata_props})


@pytest.fixture(scope="module")
def corrupted(exported, tmp_path_factory):
    """The same graph with the head's bias shifted by 0.01: a small, real defect."""
    model, proto, _, _ = exported
    bad = onnx.ModelProto()
    bad.CopyFrom(proto)
    init = next(i for i in bad.graph.initializer if i.name.endswith("fc.bias"))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.01, init.name))
    set_metadata(bad, model_meta(proto))  # an exporter bug, not a damaged file: digest matches
    path = tmp_path_factory.mktemp("corrupt") / "model.onnx"
    path.write_bytes(bad.SerializeToString())
    return model, bad, load_model(path), parity.logit_session(bad)


def test_random_tensors_agree_at_batch_1_and_5(exported):
    report = parity.random_parity(*exported[:1], *exported[2:])
    assert [r["batch"] for r in report] == [1, 5]
    for r in report:
        assert r["max_abs_logit"] < 1e-4 and r["max_abs_prob"] < 1e-4
        assert r["label_agreement"] == 1.0
    assert parity.problems({"random": report}) == []


def test_logit_output_is_the_pre_sigmoid_tensor(exported):
    model, _, scorer, logits = exported
    x = np.random.default_rng(3).standard_normal((4, 3, 64, 64), dtype=np.float32)
    onnx_logit = parity.onnx_logits(logits, x)
    t_logit, t_prob = parity.torch_outputs(model, x)
    np.testing.assert_allclose(onnx_logit, t_logit, atol=1e-4)
    np.testing.assert_allclose(1 / (1 + np.exp(-onnx_logit)), scorer.predict(x), atol=1e-6)


def test_a_corrupted_weight_fails_the_random_check(corrupted):
    report = {"random": parity.random_parity(*corrupted[:1], *corrupted[2:])}
    for r in report["random"]:
        assert r["max_abs_logit"] == pytest.approx(0.01, rel=1e-3)
        assert r["max_abs_prob"] > 1e-3
    found = parity.problems(report)
    assert len(found) == 4 and "batch 1: max |d logit| = 0.01 exceeds 0.0001" in found[0]


def test_sample_files_agree_through_the_scorers_path(exported):
    items = list(find_images(SAMPLE_DATA / "val"))
    report = parity.file_parity(exported[0], *exported[2:], items)
    assert report["found"] == report["n"] == len(items) == 40
    assert report["max_abs_logit"] < 1e-4 and report["max_abs_prob"] < 1e-4
    assert report["label_agreement"] == 1.0
    assert report["worst"]["path"] in {name for name, _ in items}
    assert parity.problems({"files": report}) == []


def test_a_corrupted_weight_fails_the_file_check(corrupted):
    items = list(find_images(SAMPLE_DATA / "val" / "fractured"))[:6]
    report = parity.file_parity(corrupted[0], *corrupted[2:], items)
    assert report["max_abs_logit"] == pytest.approx(0.01, rel=1e-3)
    assert any("6 image files: max |d logit|" in p for p in parity.problems({"files": report}))


def test_unreadable_files_are_listed_not_compared(exported):
    items = list(find_images(SAMPLE_DATA / "extras"))
    report = parity.file_parity(exported[0], *exported[2:], items)
    broken = {u["path"] for u in report["unreadable"]}
    assert {"broken/empty.jpg", "broken/not_an_image.png", "broken/truncated.png"} <= broken
    assert report["n"] == len(items) - len(broken) > 5  # DICOM, 16-bit, palette, ... compared
    assert report["reader_mismatch"] == []
    assert report["max_abs_prob"] < 1e-4
    assert parity.problems({"files": report}) == []


def test_no_readable_file_is_a_problem(exported):
    items = list(find_images(SAMPLE_DATA / "extras" / "broken"))
    report = parity.file_parity(exported[0], *exported[2:], items)
    assert report["n"] == 0
    assert any("no readable image" in p for p in parity.problems({"files": report}))


def test_nan_is_a_problem():
    r = {"batch": 1, "max_abs_logit": float("nan"), "max_abs_prob": 0.0}
    assert len(parity.problems({"random": [r]})) == 1


def test_a_graph_not_ending_in_sigmoid_is_refused(exported):
    proto = onnx.ModelProto()
    proto.CopyFrom(exported[1])
    proto.graph.node[-1].op_type = "Relu"
    with pytest.raises(parity.ParityError, match="not produced by a Sigmoid"):
        parity.logit_session(proto)


@pytest.mark.realdata
def test_real_xrays_agree_through_the_scorers_path(exported, real_data_root, tmp_path):
    root = link_slice(real_data_root, tmp_path / "slice", per_class=12)
    items = list(find_images(root))
    report = parity.file_parity(exported[0], *exported[2:], items)
    assert report["found"] == 24 and report["n"] >= 20
    assert report["max_abs_logit"] < 1e-4 and report["max_abs_prob"] < 1e-4
    assert parity.problems({"files": report}) == []
