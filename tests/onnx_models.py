"""Small fxscore ONNX models built with onnx.helper, for torch-free tests.

The graph is input -> GlobalAveragePool -> Flatten -> Gemm(w, b) -> Sigmoid: the probability of
the positive class rises with the image's mean (normalised) intensity, so tests can predict
labels from pixel values: bright images are "fractured".
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fxscore.contract import ModelMeta, Preprocess


def make_meta(**overrides) -> ModelMeta:
    kw = dict(class_names=("fractured", "not fractured"), positive_class="fractured",
              preprocess=Preprocess(input_size=(64, 64)), threshold=0.5,
              model_name="test-gap", model_version="1")
    kw.update(overrides)
    return ModelMeta(**kw)


def make_model(path: Path, meta: ModelMeta | None = None, *, weight: float = 4.0,
               bias: float = 0.0, with_meta: bool = True, props: dict | None = None) -> Path:
    """Write a tiny fxscore-contract ONNX model to `path` and return it."""
    meta = meta or make_meta()
    h, w = meta.preprocess.input_size
    inp = helper.make_tensor_value_info(meta.input_name, TensorProto.FLOAT, ["N", 3, h, w])
    out = helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1])
    W = numpy_helper.from_array(np.full((3, 1), weight / 3, dtype=np.float32), "W")
    B = numpy_helper.from_array(np.array([bias], dtype=np.float32), "B")
    nodes = [helper.make_node("GlobalAveragePool", [meta.input_name], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "W", "B"], ["logit"]),
             helper.make_node("Sigmoid", ["logit"], ["probability"])]
    graph = helper.make_graph(nodes, "gap", [inp], [out], initializer=[W, B])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    all_props = dict(meta.to_props()) if with_meta else {}
    all_props.update(props or {})
    for k, v in all_props.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    path = Path(path)
    path.write_bytes(model.SerializeToString())
    return path
