"""fxscore.model: loading fxscore ONNX models, refusing unusable ones, choosing threads."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fxscore import model as model_module
from fxscore.contract import Preprocess
from fxscore.model import ModelError, available_cpus, cgroup_cpu_quota, load_model

from onnx_models import make_meta, make_model


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
    onnx.save(proto, str(path))
    assert load_model(path).predict(flat_batch(0.5, 0.5)).shape == (2,)


def test_threads_are_set_explicitly(tmp_path):
    path = make_model(tmp_path / "m.onnx")
    assert load_model(path, threads=3).session.get_session_options().intra_op_num_threads == 3
    default = load_model(path).session.get_session_options().intra_op_num_threads
    assert default == available_cpus()


def test_available_cpus_honours_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(model_module, "cgroup_cpu_quota", lambda: None)
    assert available_cpus() == 6
    monkeypatch.setattr(model_module, "cgroup_cpu_quota", lambda: 2.5)
    assert available_cpus() == 3  # a 2.5-CPU quota can keep 3 threads partly busy
    monkeypatch.setattr(model_module, "cgroup_cpu_quota", lambda: 0.2)
    assert available_cpus() == 1


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    # a batch job deep in the host's hierarchy: its own and its parents' limits count
    ({"cpu.max": "max 100000\n", "job/cpu.max": "400000 100000\n",
      "job/step/cpu.max": "max 100000\n"}, 4.0),
    ({"job/cpu.max": "800000 100000\n", "job/step/cpu.max": "200000 100000\n"}, 2.0),
    ({"other/cpu.max": "100000 100000\n"}, None),  # a sibling's limit is not ours
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_cpu_quota(tmp_path, files, expected):
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (tmp_path / "self").write_text("0::/job/step\n")
    assert cgroup_cpu_quota(root, tmp_path / "self") == expected


def _fixed_batch(path):
    proto = onnx.load(str(path))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(proto, str(path))


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
    "input size disagrees": (lambda p: make_model(p, props={"fxscore": json.dumps(
        {**make_meta().to_dict(), "input_size": [32, 32]})}), r"expected \[N, 3, 32, 32\]"),
    "input name disagrees": (lambda p: make_model(p, props={"fxscore": json.dumps(
        {**make_meta().to_dict(), "input_name": "pixels"})}), "names input 'pixels'"),
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
    monkeypatch.setattr(model_module.resources, "files", lambda package: tmp_path)
    with pytest.raises(ModelError, match="pass --model PATH"):
        load_model()
    path = make_model(tmp_path / "default.onnx")
    assert load_model().model_id == hashlib.sha256(path.read_bytes()).hexdigest()[:12]


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
