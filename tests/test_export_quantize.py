"""Static int8 quantisation (fxscore.export.quantize) and the fp32-vs-int8 check."""
from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from conftest import SAMPLE_DATA  # noqa: E402
from export_checkpoints import exported_files  # noqa: E402,F401
from onnx import numpy_helper  # noqa: E402

from fxscore.evaluate import items_from_folders  # noqa: E402
from fxscore.export import quantize  # noqa: E402
from fxscore.export.onnx_export import IR_VERSION, verify_file  # noqa: E402
from fxscore.files import find_images  # noqa: E402
from fxscore.model import load_model  # noqa: E402

CALIBRATION = sorted(f for _, f in find_images(SAMPLE_DATA / "train"))


@pytest.fixture(scope="module")
def models(exported_files, tmp_path_factory):
    """(fp32 Model, int8 Model, int8 path, quantize() result), calibrated on 24 sample images."""
    folder = tmp_path_factory.mktemp("int8")
    fp32 = exported_files[1]
    meta = load_model(fp32).meta
    meta8 = dataclasses.replace(meta, model_version=meta.model_version + "-int8")
    int8 = folder / "model.int8.onnx"
    done = quantize.quantize(fp32, int8, quantize.pick_calibration(CALIBRATION, limit=24), meta8)
    return verify_file(fp32, meta), verify_file(int8, meta8), int8, done


def test_int8_graph_is_qdq_per_channel_and_portable(models):
    _, _, path, done = models
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 20
    assert "Conv" in ops  # QDQ keeps float ops between Q/DQ pairs, not QLinearConv
    inits = {i.name: i for i in proto.graph.initializer}
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                 and inits.get(n.input[0]) is not None and inits[n.input[0]].data_type
                 == onnx.TensorProto.INT8 and len(inits[n.input[0]].dims) == 4]
    assert len(weight_dq) == 20  # every conv of resnet18 (BN folded in)
    scales = [numpy_helper.to_array(inits[n.input[1]]) for n in weight_dq]
    assert all(s.ndim == 1 and s.size == inits[n.input[0]].dims[0]
               for s, n in zip(scales, weight_dq))  # one scale per output channel
    assert proto.ir_version == IR_VERSION
    assert {o.domain for o in proto.opset_import} == {""}  # no stray domain imports
    assert done["calibration_images"] == 24 and done["calibration_unreadable"] == []
    assert path.stat().st_size < 0.3 * models[0].path.stat().st_size


def test_int8_keeps_the_contract(models):
    fp32, int8, _, _ = models
    assert int8.meta.class_names == fp32.meta.class_names
    assert int8.meta.preprocess == fp32.meta.preprocess
    assert int8.meta.model_version.endswith("-int8")


def test_int8_tracks_fp32_on_sample_images(models):
    fp32, int8, _, _ = models
    items = items_from_folders(SAMPLE_DATA / "val", fp32.meta.class_names)
    result = quantize.compare(fp32, int8, items)
    assert result["images"] == 40 and result["unreadable"] == 0
    assert (result["positives"], result["negatives"]) == (20, 20)
    assert 0 <= result["auc_fp32"] <= 1 and 0 <= result["auc_int8"] <= 1
    assert result["auc_drop"] == pytest.approx(result["auc_fp32"] - result["auc_int8"])
    # Quantised, not identical, but close: a broken quantiser scatters the probabilities.
    assert 0 < result["max_abs_prob"] < 0.1
    assert result["label_agreement"] >= 0.9


def test_calibration_skips_unreadable_files(models, tmp_path):
    fp32 = models[0]
    files = sorted(f for _, f in find_images(SAMPLE_DATA / "extras" / "broken")) + CALIBRATION[:4]
    meta8 = dataclasses.replace(fp32.meta, model_version="x-int8")
    done = quantize.quantize(fp32.path, tmp_path / "q.onnx", files, meta8)
    assert done["calibration_images"] == 4 and len(done["calibration_unreadable"]) == 3


def test_no_readable_calibration_image_is_an_error(models, tmp_path):
    fp32 = models[0]
    files = sorted(f for _, f in find_images(SAMPLE_DATA / "extras" / "broken"))
    with pytest.raises(quantize.QuantizeError, match="none of the 3 calibration files"):
        quantize.quantize(fp32.path, tmp_path / "q.onnx", files, fp32.meta)
    assert not (tmp_path / "q.onnx").exists()


def _result(**kw):
    base = {"positives": 20, "negatives": 20, "auc_fp32": 0.90, "auc_int8": 0.89,
            "auc_drop": 0.01, "images": 40}
    return {**base, **kw}


@pytest.mark.parametrize("result, refused", [
    (_result(), False),  # exactly at the limit is allowed
    (_result(auc_int8=0.95, auc_drop=-0.05), False),
    (_result(auc_int8=0.8899, auc_drop=0.0101), True),
    (_result(auc_drop=float("nan")), True),
    (_result(positives=0), True),
])
def test_auc_drop_decision(result, refused):
    assert (quantize.problem(result) is not None) == refused


def test_a_tiny_limit_refuses_a_real_comparison(models):
    fp32, int8, _, _ = models
    result = quantize.compare(fp32, int8, items_from_folders(SAMPLE_DATA / "val",
                                                             fp32.meta.class_names))
    assert quantize.problem(result, limit=1.0) is None
    assert "ROC-AUC drops" in quantize.problem(result, limit=-1.0)


def test_pick_calibration_is_reproducible_and_spread(tmp_path):
    files = [tmp_path / f"{c}{i:03d}.png" for c in "ab" for i in range(100)]
    picked = quantize.pick_calibration(files, limit=50)
    assert picked == quantize.pick_calibration(list(reversed(files)), limit=50)
    assert len(picked) == 50 and len(set(picked)) == 50
    assert 10 < sum(p.name.startswith("a") for p in picked) < 40  # both halves represented
    assert quantize.pick_calibration(files[:7], limit=50) == sorted(files[:7])


def test_calibration_reader_feeds_the_scorers_preprocessing(models):
    meta = models[0].meta
    reader = quantize.ImageCalibrationReader(CALIBRATION[:5], meta, batch_size=2)
    batches = []
    while (b := reader.get_next()) is not None:
        batches.append(b[meta.input_name])
    assert [len(b) for b in batches] == [2, 2, 1]
    from fxscore.images import read_image
    from fxscore.preprocess import preprocess
    np.testing.assert_array_equal(batches[0][0], preprocess(read_image(CALIBRATION[0]),
                                                            meta.preprocess))
