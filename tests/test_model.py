"""fxscore.model: loading fxscore ONNX models, refusing unusable or altered ones, threads,
and refusing outputs that are not probabilities."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from fxscore import model as model_module
from fxscore.contract import Preprocess
from fxscore.cpus import available_cpus
from fxscore.model import ModelError, load_model
from fxscore.modelfile import write_model
from fxscore.models import DEFAULT_SHA256

from onnx_models import convnet_proto, make_meta, make_model, write_with_props


def expected_probability(grey: float, weight: float = 4.0, bias: float = 0.0) -> float:
    """make_model's graph on a flat image: sigmoid(weight * mean normalised intensity + bias)."""
    meta = make_meta()
    z = np.mean([(grey - m) / s for m, s in zip(meta.preprocess.mean, meta.preprocess.std)])
    return float(1 / (1 + np.exp(-(weight * z + bias))))


def flat_batch(*greys: float) -> np.ndarray:
    meta = make_meta()
    mean = np.asarray(meta.preprocess.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(meta.preprocess.std, dtype=np.float32)[:, None, None]
    x = np.stack([np.full((3, 64, 64), g, dtype=np.float32) for g in greys])
    return ((x - mean) / std).astype(np.float32)


def test_load_and_predict(tmp_path):
    path = make_model(tmp_path / "m.onnx")
    m = load_model(path, threads=1)
    assert m.model_id == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert m.meta == make_meta()
    assert m.path == path
    assert m.verified and m.integrity.startswith("verified: digest sha256:")
    p = m.predict(flat_batch(0.1, 0.5, 0.9))
    assert p.shape == (3,) and p.dtype == np.float32
    np.testing.assert_allclose(p, [expected_probability(g) for g in (0.1, 0.5, 0.9)], atol=1e-6)
    assert [m.label(float(x)) for x in p] == ["not fractured", "fractured", "fractured"]


def test_label_at_the_threshold_is_positive(tmp_path):
    m = load_model(make_model(tmp_path / "m.onnx", make_meta(threshold=0.3)))
    assert m.label(0.3) == "fractured"
    assert m.label(0.2999) == "not fractured"


def test_output_of_shape_n_works(tmp_path):
    path = make_model(tmp_path / "m.onnx")
    proto = onnx.load(str(path))  # [N, 1] -> [N]: a Flatten-free variant via Reshape
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), "s"))
    proto.graph.node.append(onnx.helper.make_node("Reshape", ["probability", "s"], ["p1"]))
    proto.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info("p1", 1, ["N"]))
    write_model(proto, make_meta(), path)  # a changed graph needs a new digest
    assert load_model(path).predict(flat_batch(0.5, 0.5)).shape == (2,)


def test_threads_are_set_explicitly(tmp_path):
    path = make_model(tmp_path / "m.onnx")
    assert load_model(path, threads=3).session.get_session_options().intra_op_num_threads == 3
    options = load_model(path).session.get_session_options()
    assert options.intra_op_num_threads == available_cpus()
    # idle threads sleep between batches instead of spinning on the CPUs decoding needs then
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def _fixed_batch(path):
    proto = onnx.load(str(path))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    write_model(proto, make_meta(), path)


BAD_MODELS = {
    "missing": (lambda p: None, "does not exist"),
    "directory": (lambda p: p.mkdir(), "is not a file"),
    "not onnx": (lambda p: p.write_bytes(b"\x00garbage" * 50), "not a valid ONNX model"),
    "empty": (lambda p: p.write_bytes(b""), "not a valid ONNX model"),
    "no metadata": (lambda p: make_model(p, with_meta=False), "carries no fxscore metadata"),
    "metadata not json": (lambda p: make_model(p, props={"fxscore": "{oops"}), "not valid JSON"),
    "bad threshold": (lambda p: make_model(p, props={"fxscore": json.dumps(
        {**make_meta().to_dict(), "threshold": 2})}), "threshold"),
    "newer format": (lambda p: make_model(p, props={"fxscore": json.dumps(
        {**make_meta().to_dict(), "format_version": 99})}), "upgrade fxscore"),
    "input size disagrees": (lambda p: make_model(
        p, make_meta(preprocess=Preprocess(input_size=(32, 32))), graph_meta=make_meta()),
        r"expected \[N, 3, 32, 32\]"),
    "input name disagrees": (lambda p: make_model(
        p, make_meta(input_name="pixels"), graph_meta=make_meta()), "names input 'pixels'"),
    "NaN std": (lambda p: make_model(p, props={"fxscore": json.dumps(
        {**make_meta().to_dict(), "std": [0.2, float("nan"), 0.2]})}), "std must be three finite"),
    "infinite mean": (lambda p: make_model(p, props={"fxscore": json.dumps(
        {**make_meta().to_dict(), "mean": [float("inf"), 0.4, 0.4]})}), "mean must be three finite"),
    "1e30 mean": (lambda p: make_model(p, props={"fxscore": json.dumps(
        {**make_meta().to_dict(), "mean": [1e30, 0.4, 0.4]})}), r"mean must lie in \[0, 1\]"),
    "threshold true": (lambda p: make_model(p, props={"fxscore": json.dumps(
        {**make_meta().to_dict(), "threshold": True})}), "threshold must be a number"),
    "v2 without digest": (lambda p: make_model(p, digest=False), "carries no 'digest'"),
    "changed weights": (lambda p: _patch_weight(make_model(p)), "do not match the digest"),
    "fixed batch": (lambda p: _fixed_batch(make_model(p)), "dynamic batch axis"),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_unusable_models_raise_model_error(tmp_path, case):
    make, message = BAD_MODELS[case]
    path = tmp_path / "model.onnx"
    make(path)
    with pytest.raises(ModelError, match=message) as e:
        load_model(path)
    assert str(path) in str(e.value)  # the message names the file


def test_model_from_environment(tmp_path, monkeypatch):
    path = make_model(tmp_path / "env.onnx")
    monkeypatch.setenv("FXSCORE_MODEL", str(path))
    assert load_model().path == path
    other = make_model(tmp_path / "arg.onnx", make_meta(model_version="2"))
    assert load_model(other).path == other  # an explicit path wins
    monkeypatch.setenv("FXSCORE_MODEL", str(tmp_path / "gone.onnx"))
    with pytest.raises(ModelError, match="FXSCORE_MODEL=.*gone.onnx does not exist"):
        load_model()


def test_packaged_default_model(tmp_path, monkeypatch):
    monkeypatch.delenv("FXSCORE_MODEL", raising=False)
    missing = tmp_path / "default.onnx"
    monkeypatch.setattr(model_module, "packaged_model", lambda: (missing, "0" * 64))
    with pytest.raises(ModelError, match="pass --model PATH"):
        load_model()
    path = make_model(missing)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setattr(model_module, "packaged_model", lambda: (path, sha))
    m = load_model()
    assert m.model_id == sha[:12] and m.verified and "pinned" in m.integrity


def _packaged_copy(tmp_path, monkeypatch, flip: int = 0):
    """A copy of the shipped default model, `flip` bytes inverted in its largest weight, that
    the loader takes for the packaged model (with the real pin)."""
    monkeypatch.delenv("FXSCORE_MODEL", raising=False)
    real, pinned = model_module.packaged_model()
    copy = tmp_path / "default.onnx"
    shutil.copyfile(real, copy)
    if flip:
        data = bytearray(copy.read_bytes())
        biggest = max(onnx.load(str(copy)).graph.initializer, key=lambda t: len(t.raw_data))
        at = bytes(data).find(biggest.raw_data)
        assert at > 0 and len(biggest.raw_data) >= flip
        data[at:at + flip] = bytes(b ^ 0xFF for b in data[at:at + flip])
        copy.write_bytes(bytes(data))
    monkeypatch.setattr(model_module, "packaged_model", lambda: (copy, pinned))
    return copy


def test_packaged_default_model_is_pinned(tmp_path, monkeypatch):
    copy = _packaged_copy(tmp_path, monkeypatch)
    m = load_model()
    assert m.path == copy and m.verified and m.model_id == DEFAULT_SHA256[:12]


@pytest.mark.parametrize("flip", [1, 200_000])
def test_packaged_default_model_with_flipped_bytes_is_refused(tmp_path, monkeypatch, flip):
    copy = _packaged_copy(tmp_path, monkeypatch, flip=flip)
    ort.InferenceSession(str(copy), providers=["CPUExecutionProvider"])  # still "valid" ONNX
    with pytest.raises(ModelError, match="pins for its default model.*Reinstall") as e:
        load_model()
    assert str(copy) in str(e.value)


def test_pin_is_the_shipped_file():
    real, pinned = model_module.packaged_model()
    assert pinned == DEFAULT_SHA256 == hashlib.sha256(real.read_bytes()).hexdigest()


def test_shipped_default_model_is_installed_and_valid(monkeypatch):
    """The README's first command relies on the model that ships inside the package."""
    monkeypatch.delenv("FXSCORE_MODEL", raising=False)
    model = load_model()
    assert model.path.name == "default.onnx" and model.path.parent.name == "models"
    assert model.meta.model_name == "fxscore-resnet18-default"
    assert model.meta.positive_class == "fractured"
    assert model.meta.training.get("best_epoch"), "the card's numbers come from the summary"
    h, w = model.meta.preprocess.input_size
    p = model.predict(np.zeros((3, 3, h, w), dtype=np.float32))
    assert p.shape == (3,) and np.all((p >= 0) & (p <= 1))


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="CUDA is installed here")
def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="CUDAExecutionProvider is not available.*onnxruntime-gpu"):
        load_model(make_model(tmp_path / "m.onnx"), providers=("cuda",))


def test_model_of_other_input_size(tmp_path):
    meta = make_meta(preprocess=Preprocess(input_size=(48, 80)))
    m = load_model(make_model(tmp_path / "m.onnx", meta))
    x = np.zeros((2, 3, 48, 80), dtype=np.float32)
    assert m.predict(x).shape == (2,)


# ---------------------------------------------------------------------------- integrity


def _patch_weight(path, delta=1e-3):
    proto = onnx.load(str(path))
    w = next(i for i in proto.graph.initializer if i.name == "W")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) + delta, "W"))
    onnx.save(proto, str(path))
    return path


def _edit_metadata(path, **changes):
    proto = onnx.load(str(path))
    entry = next(p for p in proto.metadata_props if p.key == "fxscore")
    entry.value = json.dumps({**json.loads(entry.value), **changes})
    onnx.save(proto, str(path))
    return path


def _big_model(path):
    """A digested model whose largest weight holds more than 200,000 bytes."""
    meta = make_meta(preprocess=Preprocess(input_size=(32, 32)))
    return write_with_props(convnet_proto(meta, width=128), path, meta)


def test_flipped_bytes_in_the_weights_are_refused(tmp_path):
    path = _big_model(tmp_path / "m.onnx")
    assert load_model(path).verified
    data = bytearray(path.read_bytes())
    weight = max(onnx.load(str(path)).graph.initializer, key=lambda t: len(t.raw_data))
    at = bytes(data).find(weight.raw_data)
    data[at:at + 200_000] = bytes(b ^ 0xFF for b in data[at:at + 200_000])
    path.write_bytes(bytes(data))
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # onnxruntime runs it
    with pytest.raises(ModelError, match="do not match the digest.*hand edit") as e:
        load_model(path)
    assert str(path) in str(e.value) and "Restore the file" in str(e.value)


@pytest.mark.parametrize("changes", [
    {"positive_class": "not fractured"},  # the swapped positive class: every label inverted
    {"threshold": 0.3},
    {"mean": [0.4, 0.4, 0.4]},
    {"class_names": ["not fractured", "fractured"]},
    {"model_version": "2"},
    {"extra": "a key a later version may define"},
], ids=["positive class", "threshold", "mean", "class order", "version", "new key"])
def test_hand_edited_metadata_is_refused(tmp_path, changes):
    path = _edit_metadata(make_model(tmp_path / "m.onnx"), **changes)
    with pytest.raises(ModelError, match="do not match the digest"):
        load_model(path)


def test_resaving_or_other_metadata_keeps_the_digest_valid(tmp_path):
    path = make_model(tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    proto.metadata_props.add(key="site.note", value="approved 2025-01")  # not fxscore's
    onnx.save(proto, str(path))
    assert load_model(path).verified


def test_version_1_models_load_unverified(tmp_path):
    path = make_model(tmp_path / "m.onnx", make_meta(format_version=1))
    m = load_model(path)
    assert m.meta.format_version == 1
    assert not m.verified and m.integrity.startswith("unverified: format version 1")
    np.testing.assert_allclose(m.predict(flat_batch(0.5)), [expected_probability(0.5)], atol=1e-6)


def test_loading_imports_neither_scipy_nor_onnx(tmp_path):
    """The scorer's path stays light: the digest is checked without the onnx package."""
    path = make_model(tmp_path / "m.onnx")
    code = ("import sys, fxscore.model as m\n"
            "assert 'scipy' not in sys.modules, 'import fxscore.model pulled in scipy'\n"
            f"assert m.load_model({str(path)!r}).verified\n"
            "assert 'onnx' not in sys.modules, 'load_model imported onnx'\n"
            "assert 'torch' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("bias, shown", [(57.2, "57.2"), (-0.99, "-0.99"),
                                         (float("nan"), "nan"), (float("inf"), "inf")])
def test_outputs_that_are_not_probabilities_are_fatal(tmp_path, bias, shown):
    """A graph without its sigmoid (logits), or with broken weights, must not write scores."""
    path = make_model(tmp_path / "logits.onnx", weight=0.0, bias=bias, head="Identity")
    m = load_model(path)
    with pytest.raises(ModelError) as e:
        m.predict(flat_batch(0.2, 0.5))
    message = str(e.value)
    assert str(path) in message and f"returned {shown} for image 1 of a batch of 2" in message
    assert "logits, not probabilities" in message and "re-export" in message


def test_saturated_probabilities_are_probabilities(tmp_path):
    m = load_model(make_model(tmp_path / "m.onnx", weight=0.0, bias=200.0))
    assert m.predict(flat_batch(0.5)).tolist() == [1.0]
    m = load_model(make_model(tmp_path / "n.onnx", weight=0.0, bias=-200.0))
    assert m.predict(flat_batch(0.5)).tolist() == [0.0]
