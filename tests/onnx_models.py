"""Small fxscore ONNX models built with onnx.helper, for torch-free tests.

`make_model`: input -> GlobalAveragePool -> Flatten -> Gemm(w, b) -> Sigmoid: the probability of
the positive class rises with the image's mean (normalised) intensity, so tests can predict
labels from pixel values: bright images are "fractured".

`make_convnet`: a small residual CNN with random weights (3 convolutions, a skip connection,
pooling, a linear head and the sigmoid), shaped like the exported ResNet18 where quantisation is
concerned, for the int8 tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fxscore.contract import DIGEST_KEY, META_KEY, ModelMeta, Preprocess
from fxscore.modelfile import digest_of


def make_meta(**overrides) -> ModelMeta:
    kw = dict(class_names=("fractured", "not fractured"), positive_class="fractured",
              preprocess=Preprocess(input_size=(64, 64)), threshold=0.5,
              model_name="test-gap", model_version="1")
    kw.update(overrides)
    return ModelMeta(**kw)


def make_model(path: Path, meta: ModelMeta | None = None, *, weight: float = 4.0,
               bias: float = 0.0, with_meta: bool = True, props: dict | None = None,
               graph_meta: ModelMeta | None = None, digest: bool = True,
               head: str = "Sigmoid") -> Path:
    """Write a tiny fxscore-contract ONNX model to `path` and return it.

    `props` are written as given (e.g. metadata that breaks the contract); a version-2 or -3
    fxscore entry among them still gets its digest unless `digest=False`, as `fxscore export`
    would write it, so the loader's other checks are what a test meets. `graph_meta` builds the
    graph for other metadata than the one stored (input size or name disagreeing). `head="Identity"`
    leaves out the sigmoid: the graph returns logits.
    """
    meta = meta or make_meta()
    gm = graph_meta or meta
    h, w = gm.preprocess.input_size
    inp = helper.make_tensor_value_info(gm.input_name, TensorProto.FLOAT, ["N", 3, h, w])
    out = helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1])
    W = numpy_helper.from_array(np.full((3, 1), weight / 3, dtype=np.float32), "W")
    B = numpy_helper.from_array(np.array([bias], dtype=np.float32), "B")
    nodes = [helper.make_node("GlobalAveragePool", [gm.input_name], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "W", "B"], ["logit"]),
             helper.make_node(head, ["logit"], ["probability"])]
    graph = helper.make_graph(nodes, "gap", [inp], [out], initializer=[W, B])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return write_with_props(model, path, meta if with_meta else None, props, digest=digest)


def write_with_props(model: onnx.ModelProto, path: Path, meta: ModelMeta | None,
                     props: dict | None = None, *, digest: bool = True) -> Path:
    """Add `meta` (and `props` over it) to `model`'s metadata, digested unless told not to."""
    all_props = dict(meta.to_props()) if meta is not None else {}
    all_props.update(props or {})
    if digest and META_KEY in all_props:
        try:
            d = json.loads(all_props[META_KEY])
        except json.JSONDecodeError:
            d = None
        if isinstance(d, dict) and d.get("format_version") in (2, 3) and DIGEST_KEY not in d:
            d[DIGEST_KEY] = digest_of(model.SerializeToString(), d)
            all_props[META_KEY] = json.dumps(d)
    for k, v in all_props.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    path = Path(path)
    path.write_bytes(model.SerializeToString())
    return path


def convnet_proto(meta: ModelMeta, *, seed: int = 0, width: int = 32,
                  opset: int = 18) -> onnx.ModelProto:
    """A random-weight residual CNN taking meta's input and returning [N, 1] probabilities.

    Weights are He-initialised at full int8 range once quantised, and the convolutions read
    16-32 channels, so u8 x s8 pairs that overflow int16 are common: exactly what makes a
    saturating kernel differ from an exact one.
    """
    rng = np.random.default_rng(seed)
    h, w = meta.preprocess.input_size
    inits: list = []
    nodes: list = []

    def conv(name: str, x: str, cin: int, cout: int, stride: int = 1) -> str:
        wt = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (cin * 9))).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        inits.extend([numpy_helper.from_array(wt, f"{name}.weight"),
                      numpy_helper.from_array(b, f"{name}.bias")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [name],
                                      name=name, pads=[1, 1, 1, 1], strides=[stride, stride]))
        nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"], name=f"{name}_relu"))
        return f"{name}.relu"

    x = conv("conv1", meta.input_name, 3, width // 2)
    x = conv("conv2", x, width // 2, width, stride=2)
    y = conv("conv3", x, width, width)
    fc_w = (rng.standard_normal((width, 1)) * 0.5).astype(np.float32)
    inits += [numpy_helper.from_array(fc_w, "fc.weight"),
              numpy_helper.from_array(np.array([-0.5], np.float32), "fc.bias")]
    nodes += [helper.make_node("Add", [x, y], ["res"], name="add"),
              helper.make_node("GlobalAveragePool", ["res"], ["pool"], name="pool"),
              helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logit"], name="fc"),
              helper.make_node("Sigmoid", ["logit"], ["probability"], name="sigmoid")]
    graph = helper.make_graph(
        nodes, "convnet",
        [helper.make_tensor_value_info(meta.input_name, TensorProto.FLOAT, ["N", 3, h, w])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def make_convnet(path: Path, meta: ModelMeta | None = None, *, seed: int = 0) -> Path:
    """Write `convnet_proto` with meta (default: 32 x 32 input) and its digest to `path`."""
    meta = meta or make_meta(preprocess=Preprocess(input_size=(32, 32)), model_name="test-cnn")
    return write_with_props(convnet_proto(meta, seed=seed), path, meta)
