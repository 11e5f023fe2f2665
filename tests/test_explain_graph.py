"""fxscore.explain_graph: heatmap and OOD outputs added to fp32 and int8 graphs without torch."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fxscore.cam import cam_cells
from fxscore.contract import Preprocess
from fxscore.explain_graph import ExplainGraphError, augment, find_head, find_stages
from fxscore.graph_outputs import STATS_FEATURE, MissingOutput
from fxscore.model import ModelError, load_model
from fxscore.ood import fit_features
from onnx_models import convnet_proto, make_convnet, make_meta, make_model, write_with_props

# The first packaged default model (version 1, int8 QDQ, no heatmap outputs), kept as a real
# quantised ResNet18 graph to augment; the packaged model is now fp32 and augmented at export.
INT8_V1 = Path(__file__).resolve().parent / "data" / "resnet18-int8-v1.onnx"
META = make_meta(preprocess=Preprocess(input_size=(32, 32)), model_name="test-cnn")


def _inputs(n: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


@pytest.fixture
def cnn(tmp_path):
    return make_convnet(tmp_path / "cnn.onnx", META)


def _augmented(tmp_path, source, **kw):
    model = load_model(source)
    data, meta = augment(source.read_bytes(), model.meta, **kw)
    out = tmp_path / "augmented.onnx"
    out.write_bytes(data)
    return model, load_model(out), meta


def test_augmented_fp32_model_returns_the_same_probabilities_and_its_evidence(tmp_path, cnn):
    plain, model, meta = _augmented(tmp_path, cnn)
    assert model.verified  # a fresh digest over the new graph and metadata
    assert meta.outputs == {"probability": "probability", "feature_map": "feature_map",
                            "pooled": "pooled"}
    assert meta.cam["cells"] == [16, 16] and len(meta.cam["weights"]) == 32
    x = _inputs()
    np.testing.assert_array_equal(model.predict(x), plain.predict(x))  # bit-identical
    out = model.predict_with(x, ("probability", "feature_map", "pooled"))
    assert out["feature_map"].shape == (4, 32, 16, 16) and out["pooled"].shape == (4, 32)
    np.testing.assert_allclose(out["pooled"], out["feature_map"].mean(axis=(2, 3)), atol=1e-5)
    logit = np.log(out["probability"] / (1 - out["probability"]))
    for i in range(len(x)):  # the CAM is exact for this head: its cells average to logit - b
        cells = cam_cells(out["feature_map"][i], meta.cam["weights"])
        assert cells.mean() + meta.cam["bias"] == pytest.approx(float(logit[i]), abs=1e-4)


def test_predict_fetches_only_the_probability(tmp_path, cnn):
    _, model, _ = _augmented(tmp_path, cnn)
    asked = []
    real_run = model.session.run

    class Spy:
        def __getattr__(self, name):
            return getattr(model.session_real, name)

    object.__setattr__(model, "session_real", model.session)

    def run(names, feeds):
        asked.append(list(names) if names is not None else None)
        return real_run(names, feeds)

    spy = Spy()
    spy.run = run
    object.__setattr__(model, "session", spy)
    model.predict(_inputs(2))
    model.predict_with(_inputs(2), ("probability", "pooled"))
    assert asked == [["probability"], ["probability", "pooled"]]


def test_augmenting_twice_changes_nothing(tmp_path, cnn):
    _, model, meta = _augmented(tmp_path, cnn)
    again, meta2 = augment((tmp_path / "augmented.onnx").read_bytes(), meta)
    proto = onnx.load_from_string(again)
    assert [o.name for o in proto.graph.output] == ["probability", "feature_map", "pooled"]
    assert meta2.outputs == meta.outputs and meta2.cam == meta.cam


def test_int8_qdq_graph_with_a_quantised_head(tmp_path):
    """The first default model: int8 QDQ, its head's weights behind DequantizeLinear."""
    source = tmp_path / "default.onnx"
    source.write_bytes(INT8_V1.read_bytes())
    proto = onnx.load(str(source))
    head = find_head(proto)
    assert head.feature_map.endswith("DequantizeLinear_Output")  # the dequantised block output
    plain, model, meta = _augmented(tmp_path, source)
    assert meta.cam["cells"] == [4, 4] and len(meta.cam["weights"]) == 512
    x = _inputs(3, 128)
    np.testing.assert_array_equal(model.predict(x), plain.predict(x))
    out = model.predict_with(x, ("probability", "feature_map", "pooled"))
    np.testing.assert_allclose(out["pooled"], out["feature_map"].mean(axis=(2, 3)), atol=1e-5)
    logit = np.log(out["probability"] / (1 - out["probability"]))
    cells = cam_cells(out["feature_map"][0], meta.cam["weights"])
    # The quantised head rounds the pooled features and the logit: close, not exact.
    assert cells.mean() + meta.cam["bias"] == pytest.approx(float(logit[0]), abs=0.05)


def test_int8_feature_map_matches_an_exact_integer_reference(tmp_path):
    """The cross-CPU rule for the new output: the feature map of an fxscore int8 graph is the
    dequantised output of exact integer kernels, so onnxruntime on this CPU must equal the
    exact numpy reference (tests/int8_reference.py) to float32 rounding."""
    pytest.importorskip("sympy", reason="onnxruntime's quant_pre_process needs sympy")
    import int8_reference
    from PIL import Image

    from fxscore.export import quantize
    from fxscore.scoring import model_input

    rng = np.random.default_rng(0)
    files = []
    for i in range(24):
        small = rng.random((6, 6))
        img = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize(
            (48, 48), Image.Resampling.BICUBIC), dtype=np.float64) + rng.normal(0, 20, (48, 48))
        img = (img - img.min()) / (img.max() - img.min()) * 255
        files.append(tmp_path / f"t{i}.png")
        Image.fromarray(img.astype(np.uint8)).save(files[-1])
    fp32 = make_convnet(tmp_path / "cnn.onnx", META)
    int8 = tmp_path / "cnn.int8.onnx"
    quantize.quantize(fp32, int8, files[:16], dataclasses.replace(META, model_version="1-int8"))
    _, model, _ = _augmented(tmp_path, int8)
    x = np.stack([model_input(f, META.preprocess) for f in files[16:]])
    fm = model.predict_with(x, ("feature_map",))["feature_map"]
    ref_proto = onnx.load(str(int8))
    name = find_head(ref_proto).feature_map
    del ref_proto.graph.output[:]
    ref_proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    ref = int8_reference.run(ref_proto, x)
    np.testing.assert_allclose(fm, ref, rtol=0, atol=1e-6)


def test_ood_output_equals_the_numpy_reference(tmp_path, cnn):
    plain, model, meta = _augmented(tmp_path, cnn)
    feats = model.predict_with(_inputs(60, seed=1), ("pooled",))["pooled"]
    stats = fit_features(feats)
    data, meta2 = augment((tmp_path / "augmented.onnx").read_bytes(), meta, ood=stats)
    (tmp_path / "ood.onnx").write_bytes(data)
    with_ood = load_model(tmp_path / "ood.onnx")
    assert meta2.ood["threshold"] == pytest.approx(stats.threshold)
    assert with_ood.meta.outputs["ood_score"] == "ood_score"
    x = np.concatenate([_inputs(5, seed=2), 3 * _inputs(5, seed=3)])
    out = with_ood.predict_with(x, ("probability", "pooled", "ood_score"))
    np.testing.assert_allclose(out["ood_score"], stats.distance(out["pooled"]), rtol=1e-4)
    np.testing.assert_array_equal(out["probability"], plain.predict(x))
    # Refitting replaces the branch rather than adding a second one.
    again, _ = augment(data, meta2, ood=stats)
    proto = onnx.load_from_string(again)
    assert [o.name for o in proto.graph.output].count("ood_score") == 1


def test_a_model_without_the_outputs_still_scores_and_says_how_to_get_them(tmp_path, cnn):
    model = load_model(cnn)
    assert model.predict(_inputs(2)).shape == (2,)
    with pytest.raises(MissingOutput, match=r"fxscore augment .*cnn.onnx --out NEW.onnx"):
        model.predict_with(_inputs(2), ("feature_map",))


def test_metadata_naming_an_output_the_graph_lacks_is_refused_at_load(tmp_path):
    meta = dataclasses.replace(META, outputs={"feature_map": "nowhere"},
                               cam={"weights": [0.0] * 32, "bias": 0.0})
    path = write_with_props(convnet_proto(META), tmp_path / "m.onnx", meta)
    with pytest.raises(ModelError, match="names outputs the graph lacks.*nowhere"):
        load_model(path)


def _gap_gemm(w: np.ndarray, *, pool: str = "GlobalAveragePool", end: str = "Sigmoid",
              axes=(2, 3)) -> onnx.ModelProto:
    nodes = []
    inits = [numpy_helper.from_array(w.astype(np.float32), "W")]
    if pool == "ReduceMean":
        inits.append(numpy_helper.from_array(np.array(axes, np.int64), "axes"))
        nodes.append(helper.make_node("ReduceMean", ["input", "axes"], ["gap"], keepdims=1))
    else:
        nodes.append(helper.make_node(pool, ["input"], ["gap"]))
    nodes += [helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "W"], ["logit"]),
              helper.make_node(end, ["logit"], ["probability"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", w.shape[1]])],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("proto, why", [
    (_gap_gemm(np.ones((3, 1))), None),
    (_gap_gemm(np.ones((3, 1)), pool="ReduceMean"), None),
    (_gap_gemm(np.ones((3, 1)), end="Identity"), "does not come from a Sigmoid"),
    (_gap_gemm(np.ones((3, 2))), "not one logit"),
    (_gap_gemm(np.ones((3, 1)), pool="GlobalMaxPool"), "no global average pooling"),
    (_gap_gemm(np.ones((3, 1)), pool="ReduceMean", axes=(1, 2)), "not the two spatial axes"),
])
def test_find_head_accepts_fxscore_heads_only(proto, why):
    if why is None:
        head = find_head(proto)
        assert head.feature_map == "input" and head.pooled == "flat"
        np.testing.assert_array_equal(head.weights, [1, 1, 1])
    else:
        with pytest.raises(ExplainGraphError, match=why):
            find_head(proto)


def test_the_tiny_gap_model_is_augmented_too(tmp_path):
    """make_model: the pooling reads the input itself (a 'feature map' of 3 channels)."""
    path = make_model(tmp_path / "tiny.onnx")
    _, model, meta = _augmented(tmp_path, path)
    assert meta.cam["cells"] == [64, 64] and meta.cam["weights"] == pytest.approx([4 / 3] * 3)


@pytest.mark.torch
@pytest.mark.slow
def test_fxscore_export_adds_heatmap_outputs_and_ood_statistics(tmp_path, tmp_path_factory):
    """The export pipeline: fp32 and int8 files both get the outputs, and statistics fit on
    --calibration (training) images with the threshold on the --verify images, each model on
    its own features; parity was checked before (the probability path is unchanged)."""
    pytest.importorskip("torch")
    pytest.importorskip("sympy")
    from conftest import SAMPLE_DATA
    from export_checkpoints import export_once, link_slice

    from fxscore.export import pipeline

    checkpoint, _ = export_once(tmp_path_factory)
    verify = link_slice(SAMPLE_DATA, tmp_path / "verify", per_class=12)
    train = link_slice(SAMPLE_DATA, tmp_path / "train", per_class=15, split="train")
    out = tmp_path / "model.onnx"
    report = pipeline.export(checkpoint, pipeline.ExportOptions(
        out=out, verify=verify, int8=True, calibration=train, force=True))
    for path, section in ((out, report), (pipeline.int8_path(out), report["int8"])):
        model = load_model(path)
        assert model.verified
        assert set(model.meta.outputs) == {"probability", "feature_map", "pooled",
                                           "ood_features", "ood_score"}
        assert model.meta.ood["feature"] == STATS_FEATURE  # a ResNet18: stage statistics
        assert model.meta.cam["cells"] == [2, 2]  # 64 px input / 32
        # mean and covariance of the training images, threshold on the validation images
        assert (model.meta.ood["fit_images"], model.meta.ood["holdout_images"]) == (30, 24)
        assert section["explain"]["ood"]["threshold"] == model.meta.ood["threshold"]
        x = _inputs(2, 64)
        out_ = model.predict_with(x, ("probability", "ood_score"))
        np.testing.assert_array_equal(out_["probability"], model.predict(x))
    assert load_model(out).meta.ood["threshold"] != load_model(
        pipeline.int8_path(out)).meta.ood["threshold"]


# ---------------------------------------------------------------------------- OOD features


def resnet_proto(meta, *, seed: int = 0, widths=(4, 8, 16)) -> onnx.ModelProto:
    """A random fp32 ResNet-like graph: conv stem + MaxPool, then one residual stage per width
    (each after the first halving the resolution; the second stage has two blocks), global
    pooling, one linear layer and a sigmoid."""
    rng = np.random.default_rng(seed)
    h, w = meta.preprocess.input_size
    inits: list = []
    nodes: list = []

    def conv(name, x, cin, cout, stride=1, k=3, relu=True):
        wt = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2 / (cin * k * k)))
        inits.extend([numpy_helper.from_array(wt.astype(np.float32), f"{name}.w"),
                      numpy_helper.from_array(
                          (rng.standard_normal(cout) * 0.1).astype(np.float32), f"{name}.b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name,
                                      pads=[k // 2] * 4, strides=[stride, stride]))
        if not relu:
            return name
        nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"], name=f"{name}_relu"))
        return f"{name}.relu"

    def block(name, x, cin, cout, stride):
        y = conv(f"{name}.c2", conv(f"{name}.c1", x, cin, cout, stride), cout, cout, relu=False)
        skip = x if stride == 1 else conv(f"{name}.down", x, cin, cout, stride, k=1, relu=False)
        nodes.append(helper.make_node("Add", [y, skip], [f"{name}.add"], name=f"{name}_add"))
        nodes.append(helper.make_node("Relu", [f"{name}.add"], [f"{name}.out"],
                                      name=f"{name}_out"))
        return f"{name}.out"

    x = conv("stem", meta.input_name, 3, widths[0])
    nodes.append(helper.make_node("MaxPool", [x], ["stem.pool"], name="stem_pool",
                                  kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]))
    x, cin = "stem.pool", widths[0]
    for i, width in enumerate(widths):
        for j in range(2 if i == 1 else 1):
            x = block(f"s{i + 1}b{j + 1}", x, cin, width, 2 if i and not j else 1)
            cin = width
    fc_w = (rng.standard_normal((cin, 1)) * 0.5).astype(np.float32)
    inits += [numpy_helper.from_array(fc_w, "fc.w"),
              numpy_helper.from_array(np.array([-0.2], np.float32), "fc.b")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"),
              helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logit"], name="fc"),
              helper.make_node("Sigmoid", ["logit"], ["probability"], name="sigmoid")]
    graph = helper.make_graph(
        nodes, "resnet",
        [helper.make_tensor_value_info(meta.input_name, TensorProto.FLOAT, ["N", 3, h, w])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def make_resnet(path, meta=META, **kw):
    return write_with_props(resnet_proto(meta, **kw), path, meta)


def _stats_of(t: np.ndarray) -> np.ndarray:
    """Per-channel spatial mean and population std of NCHW tensors, float64."""
    t = t.astype(np.float64)
    return np.concatenate([t.mean(axis=(2, 3)), t.std(axis=(2, 3))], axis=1)


def _tapped(data: bytes, tensors, x: np.ndarray) -> list[np.ndarray]:
    """Values of inner tensors of a serialised graph, made outputs of a copy of it."""
    import onnxruntime as ort

    proto = onnx.load_from_string(data)
    del proto.graph.output[1:]
    for t in tensors:
        proto.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(list(tensors), {session.get_inputs()[0].name: x})


def _check_ood_features(data: bytes, model, x: np.ndarray, stages) -> np.ndarray:
    feats = model.predict_with(x, ("ood_features",))["ood_features"]
    tensors = _tapped(data, stages.tensors, x)
    assert [t.shape[1] for t in tensors] == list(stages.channels)
    expected = np.concatenate([_stats_of(t) for t in tensors], axis=1)
    assert feats.shape == (len(x), stages.dim)
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-4)
    return feats


def test_resnet_like_fp32_graph_gets_stage_statistics_for_the_ood_flag(tmp_path):
    source = make_resnet(tmp_path / "resnet.onnx")
    plain, model, meta = _augmented(tmp_path, source)
    assert meta.outputs["ood_features"] == "ood_features"
    proto = onnx.load(tmp_path / "augmented.onnx")
    stages = find_stages(proto, find_head(proto))
    # the stem's MaxPool, the ReLU closing the second stage (two blocks), the feature map
    assert stages.tensors == ("stem.pool", "s2b2.out", "s3b1.out")
    assert stages.channels == (4, 8, 16) and stages.dim == 56
    x = _inputs(6)
    np.testing.assert_array_equal(model.predict(x), plain.predict(x))  # bit-identical
    _check_ood_features((tmp_path / "augmented.onnx").read_bytes(), model, x, stages)
    again, meta2 = augment((tmp_path / "augmented.onnx").read_bytes(), meta)
    assert meta2.outputs == meta.outputs  # augmenting twice adds nothing
    assert [o.name for o in onnx.load_from_string(again).graph.output].count(
        "ood_features") == 1


def test_ood_score_on_stage_statistics_equals_the_numpy_reference(tmp_path):
    plain, model, meta = _augmented(tmp_path, make_resnet(tmp_path / "resnet.onnx"))
    feats = model.predict_with(_inputs(80, seed=1), ("ood_features",))["ood_features"]
    stats = fit_features(feats, feature=STATS_FEATURE)
    data, meta2 = augment((tmp_path / "augmented.onnx").read_bytes(), meta, ood=stats)
    assert meta2.ood["feature"] == STATS_FEATURE and meta2.ood["dim"] == 56
    (tmp_path / "ood.onnx").write_bytes(data)
    with_ood = load_model(tmp_path / "ood.onnx")
    x = np.concatenate([_inputs(5, seed=2), 3 * _inputs(5, seed=3)])
    out = with_ood.predict_with(x, ("probability", "ood_features", "ood_score"))
    np.testing.assert_allclose(out["ood_score"], stats.distance(out["ood_features"]), rtol=1e-4)
    np.testing.assert_array_equal(out["probability"], plain.predict(x))


def test_pooled_statistics_still_measure_the_pooled_features(tmp_path):
    """Statistics of an older model ("feature": "pooled") keep measuring the pooled features
    even on a graph that has stage statistics, through re-augmenting too."""
    _, model, meta = _augmented(tmp_path, make_resnet(tmp_path / "resnet.onnx"))
    stats = fit_features(model.predict_with(_inputs(60, seed=1), ("pooled",))["pooled"])
    data, meta2 = augment((tmp_path / "augmented.onnx").read_bytes(), meta, ood=stats)
    assert meta2.ood["feature"] == "pooled" and meta2.ood["dim"] == 16
    again, meta3 = augment(data, meta2)  # no new statistics: the old ones stay
    assert meta3.ood == meta2.ood
    (tmp_path / "old.onnx").write_bytes(again)
    old = load_model(tmp_path / "old.onnx")
    x = _inputs(5, seed=4)
    out = old.predict_with(x, ("pooled", "ood_score"))
    np.testing.assert_allclose(out["ood_score"], stats.distance(out["pooled"]), rtol=1e-4)


def test_a_graph_without_stages_falls_back_to_the_pooled_features(tmp_path, cnn):
    _, model, meta = _augmented(tmp_path, cnn)
    proto = onnx.load(tmp_path / "augmented.onnx")
    assert find_stages(proto, find_head(proto)) is None  # no MaxPool stem, one residual join
    assert "ood_features" not in meta.outputs
    stats = fit_features(_inputs(40, seed=1).mean(axis=(2, 3)), feature=STATS_FEATURE)
    with pytest.raises(ValueError, match="do not fit this graph"):
        augment((tmp_path / "augmented.onnx").read_bytes(), meta, ood=stats)


def test_the_packaged_model_ships_with_heatmaps_and_stage_statistics():
    """The default model is exported with both: heatmap cells average to its logit minus the
    head's bias (fp32: to float rounding), and the OOD flag reads stem, stage 2 and the last
    feature map."""
    model = load_model()
    assert model.meta.outputs.keys() >= {"feature_map", "pooled", "ood_features"}
    assert model.meta.ood["feature"] == STATS_FEATURE and model.meta.ood["dim"] == 1408
    size = model.meta.preprocess.input_size[0]
    x = np.random.default_rng(0).random((2, 3, size, size)).astype(np.float32) * 2 - 1
    out = model.predict_with(x, ("probability", "feature_map"))
    logit = np.log(out["probability"] / (1 - out["probability"]))
    for i in range(2):
        cells = cam_cells(out["feature_map"][i], model.meta.cam["weights"])
        assert cells.mean() + model.meta.cam["bias"] == pytest.approx(float(logit[i]), abs=1e-4)


def test_int8_resnet18_gets_stage_statistics(tmp_path):
    """The first default model's int8 QDQ ResNet18: stem, stage 2 and feature map as the next
    layer reads them (after the QuantizeLinear/DequantizeLinear pair that is its ReLU)."""
    path = INT8_V1
    plain = load_model(path)
    data, meta = augment(path.read_bytes(), plain.meta)
    (tmp_path / "int8.onnx").write_bytes(data)
    model = load_model(tmp_path / "int8.onnx")
    proto = onnx.load_from_string(data)
    stages = find_stages(proto, find_head(proto))
    assert stages.tensors == ("max_pool2d_DequantizeLinear_Output",
                              "relu_8_DequantizeLinear_Output", "relu_16_DequantizeLinear_Output")
    assert stages.dim == 1408
    size = plain.meta.preprocess.input_size[0]
    x = np.random.default_rng(0).random((3, 3, size, size)).astype(np.float32) * 2 - 1
    np.testing.assert_array_equal(model.predict(x), plain.predict(x))  # bit-identical
    feats = _check_ood_features(data, model, x, stages)
    fm = model.predict_with(x, ("feature_map",))["feature_map"]
    np.testing.assert_allclose(feats[:, 384:896], fm.mean(axis=(2, 3)), rtol=1e-5, atol=1e-5)
