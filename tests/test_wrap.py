"""fxscore.wrap: third-party ONNX classifiers brought to the contract; fxscore models re-stamped.

The "third-party" models are built with onnx.helper: Flatten -> Gemm with random weights, so
every pixel, channel and output column matters, in the layout and units the options describe.
Each wrapped model is checked against the same arithmetic done independently in numpy here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fxscore.contract import META_KEY
from fxscore.model import ModelError, load_model
from fxscore.preprocess import preprocess
from fxscore.wrap import WrapError, WrapSpec, parse_output, rewrap, sample_images, wrap_onnx
from onnx_models import make_model

H, W = 16, 12
CLASSES = ("fractured", "not fractured")


def third_party(path: Path, *, layout: str = "nchw", channels: int = 3, k: int = 2,
                batch: int | str = "N", final: str | None = None, seed: int = 0,
                opset: int = 17, reshape_batch_1: bool = False, elem=TensorProto.FLOAT,
                h: int | str = H, w: int | str = W, extra_input: bool = False) -> Path:
    """An ONNX classifier: input (layout, channels) -> Flatten -> Gemm -> k scores [-> final].

    Weights come from `weights(...)`, so tests can compute the expected scores in numpy.
    """
    shape = [batch, channels, h, w] if layout == "nchw" else [batch, h, w, channels]
    wt, b = weights(channels, k, seed)
    inits = [numpy_helper.from_array(wt, "W"), numpy_helper.from_array(b, "B")]
    if reshape_batch_1:  # a graph pinned to batch 1 (a Reshape with a literal shape)
        inits.append(numpy_helper.from_array(np.array([1, -1], np.int64), "shape"))
        nodes = [helper.make_node("Reshape", ["pixels", "shape"], ["flat"])]
    else:
        nodes = [helper.make_node("Flatten", ["pixels"], ["flat"], axis=1)]
    nodes.append(helper.make_node("Gemm", ["flat", "W", "B"], ["scores"]))
    out_name = "scores"
    if final:
        nodes.append(helper.make_node(final, ["scores"], ["out"], **(
            {"axis": 1} if final == "Softmax" else {})))
        out_name = "out"
    inputs = [helper.make_tensor_value_info("pixels", elem, shape)]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [batch, 1]))
    graph = helper.make_graph(nodes, "third_party", inputs,
                              [helper.make_tensor_value_info(out_name, TensorProto.FLOAT,
                                                             [batch, k])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def weights(channels: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal((channels * H * W, k)) * 0.3 / np.sqrt(H * W))
            .astype(np.float32), (rng.standard_normal(k) * 0.1).astype(np.float32))


def expected(image: np.ndarray, *, layout: str, channels: int, k: int, mean, std,
             scale: float, kind: str, index: int | None, final: str | None = None,
             seed: int = 0) -> float:
    """What the classifier says about `image` (H, W intensities in [0, 1]), in numpy."""
    pixels = np.stack([image * scale] * channels, axis=0)  # (C, H, W) in its own units
    mean = np.asarray(mean, np.float64)[:, None, None]
    std = np.asarray(std, np.float64)[:, None, None]
    z = (pixels - mean) / std
    if layout == "nhwc":
        z = z.transpose(1, 2, 0)
    wt, b = weights(channels, k, seed)
    s = z.reshape(-1) @ wt.astype(np.float64) + b
    if final == "Sigmoid":  # the classifier's own last operator
        s = 1 / (1 + np.exp(-s))
    elif final == "Softmax":
        s = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    if kind == "logit":
        return float(1 / (1 + np.exp(-s[0])))
    if kind == "probability" and index is None:
        return float(s[0])
    if kind == "softmax":
        e = np.exp(s - s.max())
        return float((e / e.sum())[index])
    return float(s[index])


def spec(**kw) -> WrapSpec:
    base = dict(class_names=CLASSES, positive_class="fractured", input_size=(H, W),
                mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), output="softmax:1")
    base.update(kw)
    return WrapSpec(**base)


@pytest.mark.parametrize("layout, channels, scale, output, k, final, batch", [
    ("nchw", 3, 1, "softmax:1", 2, None, "N"),           # timm / torchvision class logits
    ("nchw", 3, 1, "logit", 1, None, "N"),               # one logit: sigmoid added
    ("nchw", 1, 1, "probability", 1, "Sigmoid", "N"),    # MONAI-style 1-channel, sigmoid inside
    ("nhwc", 3, 255, "probability:0", 3, "Softmax", 1),  # Keras: NHWC, 0-255, fixed batch 1
    ("nhwc", 1, 255, "softmax:2", 3, None, "N"),         # grey NHWC, 3 classes' logits
])
def test_wrapped_model_computes_what_the_classifier_does(tmp_path, layout, channels, scale,
                                                         output, k, final, batch):
    src = third_party(tmp_path / "their.onnx", layout=layout, channels=channels, k=k,
                      final=final, batch=batch)
    if channels == 1:
        mean, std = ((0.45 * scale,), (0.22 * scale,))
    else:
        mean, std = tuple(v * scale for v in (0.5, 0.4, 0.3)), tuple(v * scale for v in
                                                                       (0.2, 0.25, 0.3))
    s = spec(layout=layout, mean=mean, std=std, input_range=scale, output=output)
    report = wrap_onnx(src, tmp_path / "fx.onnx", s)
    model = load_model(tmp_path / "fx.onnx", threads=1)
    assert model.verified and model.meta.format_version == 2
    assert model.meta.class_names == CLASSES and model.meta.model_name == "their"
    assert report["check"]["max_abs_prob"] <= 1e-5
    kind, index = parse_output(output)
    images = [np.clip(im[:H, :W], 0, 1) for im in sample_images((H, W))]
    x = np.stack([preprocess(im, model.meta.preprocess) for im in images])
    got = model.predict(x)
    want = [expected(im, layout=layout, channels=channels, k=k,
                     mean=mean * (3 // len(mean)) if channels == 3 else mean,
                     std=std * (3 // len(std)) if channels == 3 else std, scale=scale,
                     kind=kind, index=index, final=final) for im in images]
    np.testing.assert_allclose(got, want, atol=2e-5)
    notes = " ".join(report["adaptations"])
    assert ("Transpose" in notes) == (layout == "nhwc")
    assert ("1-channel" in notes) == (channels == 1)
    assert ("0-255" in notes) == (scale == 255)
    assert ("made dynamic" in notes) == (batch == 1)


def test_a_wrapped_model_scores_through_the_scorer(tmp_path):
    from fxscore.scoring import score_items

    src = third_party(tmp_path / "their.onnx")
    wrap_onnx(src, tmp_path / "fx.onnx", spec())
    model = load_model(tmp_path / "fx.onnx", threads=1)
    sample = Path(__file__).resolve().parent.parent / "sample_data" / "test"
    files = sorted(p for p in sample.rglob("*") if p.is_file())[:6]
    rows = list(score_items(model, [(p.name, p) for p in files], workers=1))
    assert all(not r["error"] and 0 <= r["probability"] <= 1 for r in rows)
    assert {r["label"] for r in rows} <= set(CLASSES)


def _is_nhwc(tmp):
    return third_party(tmp / "m.onnx", layout="nhwc")


@pytest.mark.parametrize("build, kw, message", [
    (lambda t: third_party(t / "m.onnx", channels=4), {}, "has 4 channels; fxscore supports 1"),
    (_is_nhwc, {}, "try --layout nhwc"),
    (lambda t: third_party(t / "m.onnx", h=20), {}, "input height is fixed to 20 but "
                                                    "--input-size says 16; give --input-size 20,12"),
    (lambda t: third_party(t / "m.onnx", extra_input=True), {}, "the graph takes 2 inputs"),
    (lambda t: third_party(t / "m.onnx", elem=TensorProto.UINT8), {}, "is UINT8; fxscore feeds "
                                                                       "float32"),
    (lambda t: third_party(t / "m.onnx"), {"output": "logit"}, "has 2 values per image; for "
                                                               "class scores say which column"),
    (lambda t: third_party(t / "m.onnx", k=1), {"output": "probability"}, "not a probability in "
                                                                          "[0, 1]; it is a logit"),
    (lambda t: third_party(t / "m.onnx"), {"output": "softmax:5"}, "has only 2 column(s)"),
    (lambda t: third_party(t / "m.onnx"), {"output": "sigmoid"}, "say what the model's output "
                                                                 "is"),
    (lambda t: third_party(t / "m.onnx", channels=1), {}, "takes 1 channel, so --mean and --std "
                                                          "are one value each"),
    (lambda t: third_party(t / "m.onnx"), {"mean": (128.0, 128.0, 128.0)},
     "mean must lie in [0, 1] (intensities are scaled to [0, 1]"),
    (lambda t: third_party(t / "m.onnx"), {"positive_class": "broken"}, "--positive 'broken' "
                                                                        "is not one of"),
    (lambda t: third_party(t / "m.onnx", batch=1, reshape_batch_1=True), {},
     "cannot score a batch of 4 images after wrapping"),
    (lambda t: make_model(t / "m.onnx"), {}, "is already an fxscore model"),
    (lambda t: (t / "m.onnx").write_bytes(b"not onnx") and t / "m.onnx", {},
     "not a readable ONNX model"),
])
def test_refusals_name_the_fix_and_write_nothing(tmp_path, build, kw, message):
    src = build(tmp_path)
    with pytest.raises(WrapError) as e:
        wrap_onnx(src, tmp_path / "out" / "fx.onnx", spec(**kw))
    assert message in str(e.value)
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == []  # no model, no temporary


def test_a_fixed_batch_input_with_a_batch_free_graph_is_made_dynamic(tmp_path):
    wrap_onnx(third_party(tmp_path / "m.onnx", batch=1), tmp_path / "fx.onnx", spec())
    model = load_model(tmp_path / "fx.onnx", threads=1)
    x = np.zeros((5, 3, H, W), np.float32)
    assert model.predict(x).shape == (5,)


def test_old_opset_slice_with_attributes(tmp_path):
    src = third_party(tmp_path / "m.onnx", channels=1, opset=9)
    wrap_onnx(src, tmp_path / "fx.onnx", spec(mean=(0.5,), std=(0.25,)))
    assert load_model(tmp_path / "fx.onnx", threads=1).verified


# ---- re-stamping an fxscore model ---------------------------------------------------------

def test_rewrap_changes_threshold_and_version_only(tmp_path):
    src = make_model(tmp_path / "m.onnx")
    report = rewrap(src, tmp_path / "t.onnx", threshold=0.37, model_version="1.1")
    old, new = load_model(src, threads=1), load_model(tmp_path / "t.onnx", threads=1)
    assert new.verified and new.meta.format_version == 2
    assert (new.meta.threshold, new.meta.model_version) == (0.37, "1.1")
    assert new.meta.model_name == old.meta.model_name
    assert report["changes"] == {"threshold": [0.5, 0.37], "model_version": ["1", "1.1"]}
    assert new.meta.training["derived_from"]["model_id"] == old.model_id
    a, b = (onnx.load(str(p)) for p in (src, tmp_path / "t.onnx"))
    assert a.graph == b.graph  # weights and graph untouched
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    assert np.array_equal(old.predict(x), new.predict(x))
    assert new.label(0.4) == "fractured" and old.label(0.4) == "not fractured"


def test_rewrap_of_a_damaged_model_is_refused(tmp_path):
    src = make_model(tmp_path / "m.onnx")
    data = bytearray(src.read_bytes())
    w = data.find(np.float32(4.0 / 3).tobytes())  # a weight
    data[w] ^= 0x01
    src.write_bytes(bytes(data))
    with pytest.raises(WrapError, match="do not match the digest"):
        rewrap(src, tmp_path / "t.onnx", threshold=0.3)
    assert not (tmp_path / "t.onnx").exists()


@pytest.mark.parametrize("kw, out, message", [
    ({}, "t.onnx", "say what to change"),
    ({"threshold": 1.5}, "t.onnx", "--threshold must be a number in [0, 1]"),
    ({"threshold": 0.3}, "m.onnx", "is the source model"),
    ({"threshold": 0.3}, "t.txt", "name the model file *.onnx"),
])
def test_rewrap_refusals(tmp_path, kw, out, message):
    src = make_model(tmp_path / "m.onnx")
    with pytest.raises(WrapError, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("*", r"\*")):
        rewrap(src, tmp_path / out, **kw)


def test_a_version_1_model_gets_a_digest_when_re_stamped(tmp_path):
    from onnx_models import make_meta

    src = make_model(tmp_path / "v1.onnx", make_meta(format_version=1), digest=False)
    report = rewrap(src, tmp_path / "v2.onnx", threshold=0.4)
    assert report["source_integrity"].startswith("unverified")
    new = load_model(tmp_path / "v2.onnx", threads=1)
    assert new.verified and new.meta.format_version == 2
    props = {p.key for p in onnx.load(str(tmp_path / "v2.onnx")).metadata_props}
    assert props == {META_KEY}
    with pytest.raises(ModelError):  # and its digest really binds it
        bad = bytearray((tmp_path / "v2.onnx").read_bytes())
        bad[bad.find(b'"threshold": 0.4')+14] = ord("9")
        (tmp_path / "bad.onnx").write_bytes(bytes(bad))
        load_model(tmp_path / "bad.onnx", threads=1)
