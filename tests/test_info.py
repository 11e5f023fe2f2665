"""fxscore.info: what a model carries, as data and as the readable rows `info` and eval share."""
from __future__ import annotations

import re

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from fxscore import info
from fxscore.contract import Preprocess
from fxscore.model import load_model
from onnx_models import make_meta, make_model, write_with_props

# As `fxscore train` writes it: the best epoch's metrics, with every digit a float has.
TRAINING = {"best_epoch": 12, "epoch": 12,
            "best_metrics": {"train_loss": 0.3401262260956404, "val_accuracy": 0.904,
                             "val_auc": 0.959549114331723, "val_loss": 0.25102765822410583},
            "metrics": {"train_loss": 0.3401262260956404, "val_accuracy": 0.904,
                        "val_auc": 0.959549114331723, "val_loss": 0.25102765822410583},
            "data_fingerprint": "7371aea8ddb42b7f6c20e001e06c6af19832b106e5d817cfcd077a4fa7383109",
            "config": {"epochs": 40, "pretrained": "none", "freeze": "none", "lr": 0.001,
                       "batch_size": 32, "image_size": 64, "seed": 0},
            "versions": {"fxscore": "0.1.0", "torch": "2.14.1"},
            "checkpoint_sha256": "f8e0ea34c5f893c46957abb8315479382f7b1be8bf50fa4c4c3aebfeb33b96aa"}


@pytest.fixture
def trained(tmp_path):
    return load_model(make_model(tmp_path / "m.onnx", make_meta(training=TRAINING)), threads=1)


def test_describe_holds_the_contract_and_the_graph(trained):
    doc = info.describe(trained)
    assert doc["model_id"] == trained.model_id and doc["sha256"].startswith(trained.model_id)
    assert doc["class_names"] == ["fractured", "not fractured"]
    assert (doc["positive_class"], doc["negative_class"]) == ("fractured", "not fractured")
    assert doc["threshold"] == 0.5 and doc["input_size"] == [64, 64]
    assert (doc["opset"], doc["ir_version"], doc["precision"]) == (17, 8, "fp32")
    assert doc["format_version"] == 2
    assert doc["integrity"]["verified"] is True
    assert doc["integrity"]["text"].startswith("verified: digest sha256:")
    assert doc["training"] == TRAINING


def test_the_readable_form_has_no_raw_json_and_no_repeats(trained):
    text = info.format_info(info.describe(trained))
    assert "validation, best epoch   loss 0.251, accuracy 0.904, ROC-AUC 0.960 (train loss " \
           "0.340)" in text
    assert "validation, last epoch" not in text  # metrics == best_metrics: said once
    assert "best epoch               12 (of at most 40)" in text
    assert not re.search(r"\d\.\d{5,}", text)  # no 16-digit floats
    assert "{" not in text and "best_metrics" not in text
    assert "data fingerprint         7371aea8ddb42b7f..." in text


def test_last_epoch_metrics_appear_when_training_went_on(tmp_path):
    training = {**TRAINING, "epoch": 18, "metrics": {"val_loss": 0.31, "val_auc": 0.95}}
    model = load_model(make_model(tmp_path / "m.onnx", make_meta(training=training)), threads=1)
    rows = dict(info.training_pairs(info.describe(model)["training"]))
    assert rows["best epoch"] == "12 (exported from the checkpoint of epoch 18, of at most 40)"
    assert rows["validation, last epoch"] == "loss 0.310, ROC-AUC 0.950"


def _qdq_model(path):
    """fp32 input -> QuantizeLinear -> DequantizeLinear -> pool -> sigmoid: an int8 graph."""
    meta = make_meta()
    h, w = meta.preprocess.input_size
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
             numpy_helper.from_array(np.array(128, np.uint8), "zero")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "scale", "zero"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"]),
             helper.make_node("GlobalAveragePool", ["dq"], ["gap"]),
             helper.make_node("ReduceMean", ["gap"], ["mean"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Unsqueeze", ["mean", "one"], ["col"]),
             helper.make_node("Sigmoid", ["col"], ["probability"])]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, h, w])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return write_with_props(model, path, meta)


def test_precision_is_read_from_the_graphs_operators(tmp_path):
    assert info.graph_facts(_qdq_model(tmp_path / "q.onnx"))["precision"] == "int8"
    assert info.graph_facts(make_model(tmp_path / "f.onnx"))["precision"] == "fp32"


def test_a_version_1_model_is_unverified(tmp_path):
    path = make_model(tmp_path / "v1.onnx", make_meta(format_version=1), digest=False)
    doc = info.describe(load_model(path, threads=1))
    assert doc["integrity"]["verified"] is False
    assert "integrity        unverified: format version 1" in info.format_info(doc)


def test_the_eval_metrics_model_entry_gives_the_same_rows(trained):
    """metrics.json's "model": the contract's keys plus path and model_id, no graph facts."""
    entry = {"path": str(trained.path), "model_id": trained.model_id, **trained.meta.to_dict()}
    rows = dict(info.model_pairs(entry))
    full = dict(info.model_pairs(info.describe(trained)))
    for key in ("name", "version", "model id", "classes", "positive class", "threshold",
                "input", "normalisation", "training: validation, best epoch"):
        assert rows[key] == full[key], key
    assert "precision" not in rows and "precision" in full


def test_the_packaged_default_model(tmp_path):
    doc = info.describe(load_model(threads=1))
    assert doc["precision"] == "fp32" and doc["opset"] == 18
    assert doc["integrity"]["verified"] is True and "pinned" in doc["integrity"]["text"]
    rows = dict(info.training_pairs(doc["training"]))
    assert "quantised" not in rows
    assert rows["calibrated"].startswith("temperature scaling, T 1.796")
    assert rows["threshold chosen"].startswith("for sensitivity:0.9 on 250 val images")


def test_a_model_without_training_summary(tmp_path):
    model = load_model(make_model(tmp_path / "m.onnx",
                                  make_meta(preprocess=Preprocess(input_size=(32, 48)))), threads=1)
    text = info.format_info(info.describe(model))
    assert "no training summary in this model" in text
    assert "32 x 48 px (height x width), stretched to that size" in text
    padded = load_model(make_model(tmp_path / "p.onnx", make_meta(
        preprocess=Preprocess(input_size=(32, 48), fit="pad"))), threads=1)
    doc = info.describe(padded)
    assert doc["format_version"] == 3
    assert "aspect ratio kept, padded with black" in info.format_info(doc)


def test_heatmap_and_ood_lines_say_what_the_model_carries_or_how_to_add_it(tmp_path):
    from fxscore.explain_graph import augment
    from fxscore.ood import embed_ood
    from onnx_models import make_convnet
    from test_ood import _textures

    meta = make_meta(preprocess=Preprocess(input_size=(32, 32)), model_name="test-cnn")
    plain = make_convnet(tmp_path / "cnn.onnx", meta)
    rows = dict(info.model_pairs(info.describe(load_model(plain))))
    assert rows["heatmaps"].startswith("none; add them with `fxscore augment")
    assert rows["OOD flag"].startswith("none (rows get no ood columns)")

    data, _ = augment(plain.read_bytes(), load_model(plain).meta)
    explained = tmp_path / "cnn.explain.onnx"
    explained.write_bytes(data)
    embed_ood(explained, _textures(tmp_path / "val", 40, seed=0))
    model = load_model(explained)
    rows = dict(info.model_pairs(info.describe(model)))
    cells = model.meta.cam["cells"]
    assert rows["heatmaps"].startswith(f"class activation maps ({cells[0]} x {cells[1]} cells, "
                                       f"from graph output '{model.meta.outputs['feature_map']}'")
    ood = model.meta.ood
    assert rows["OOD flag"].startswith(f"mahalanobis-ledoit-wolf on the {ood['dim']} pooled "
                                       f"features, threshold {ood['threshold']:.2f}")
    assert f"fit on {ood['fit_images']} images" in rows["OOD flag"]
