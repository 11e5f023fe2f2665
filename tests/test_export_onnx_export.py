"""Checkpoint -> ONNX (fxscore.export.onnx_export): graph, batch axis, pinned versions, contract."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from export_checkpoints import write_checkpoint  # noqa: E402

from fxscore.contract import ModelMeta  # noqa: E402
from fxscore.export.onnx_export import (IR_VERSION, OPSET, ExportError, build_meta,  # noqa: E402
                                        load_checkpoint, set_metadata, to_onnx, verify_file)
from fxscore.model import load_model  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(torch model, checkpoint entries, meta, path of the exported file), exported once."""
    folder = tmp_path_factory.mktemp("export")
    model, ckpt = load_checkpoint(write_checkpoint(folder / "best.pt", input_size=64))
    meta = build_meta(ckpt, threshold=0.3, model_name="wrist", model_version="7")
    path = folder / "model.onnx"
    path.write_bytes(to_onnx(model, meta).SerializeToString())
    return model, ckpt, meta, path


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_matches_torch_at_batch_1_and_n(exported, batch):
    model, _, _, path = exported
    x = np.random.default_rng(batch).standard_normal((batch, 3, 64, 64), dtype=np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == (batch,)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all((got > 0) & (got < 1))  # a probability: the sigmoid is inside the graph


def test_graph_has_dynamic_batch_pinned_opset_and_ir(exported):
    proto = onnx.load(str(exported[3]))
    assert proto.ir_version == IR_VERSION == 9  # onnxruntime 1.17 reads at most IR 9
    assert {o.domain: o.version for o in proto.opset_import} == {"": OPSET}
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    assert [d.dim_value for d in dims[1:]] == [3, 64, 64]
    assert proto.graph.node[-1].op_type == "Sigmoid"
    # IR-10-only annotations are gone, so the IR 9 stamp is honest.
    assert not any(len(n.metadata_props) for n in proto.graph.node)
    onnx.checker.check_model(proto, full_check=True)


def test_every_contract_key_is_written_and_the_scorer_loads_it(exported):
    _, ckpt, meta, path = exported
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    stored = ModelMeta.from_props(props, str(path))  # the scorer's validator
    assert stored.to_props() == meta.to_props()
    assert set(json.loads(props["fxscore"])) >= set(ModelMeta(("a", "b"), "a").to_dict())
    assert stored.class_names == ("fractured", "not fractured")
    assert stored.positive_class == "fractured"
    assert stored.preprocess.input_size == (64, 64)
    assert (stored.threshold, stored.model_name, stored.model_version) == (0.3, "wrist", "7")
    t = stored.training
    assert (t["epoch"], t["best_epoch"]) == (4, 3)
    assert t["best_metrics"]["val_auc"] == 0.6
    assert t["metrics"]["val_auc"] is None  # NaN in the checkpoint, valid JSON in the model
    assert t["data_fingerprint"] == "0" * 64
    assert t["versions"]["torch"] == str(torch.__version__)
    assert t["config"]["image_size"] == 64
    assert t["checkpoint_sha256"] == ckpt["sha256"]
    assert t["export"]["opset"] == OPSET
    scorer = load_model(path)
    assert scorer.meta.to_props() == meta.to_props()
    assert stored.format_version == 2 and json.loads(props["fxscore"])["digest"]
    assert scorer.verified and scorer.integrity.startswith("verified: digest")
    assert scorer.predict(np.zeros((2, 3, 64, 64), np.float32)).shape == (2,)


def test_verify_file_accepts_the_export_and_rejects_tampered_metadata(exported, tmp_path):
    _, _, meta, path = exported
    assert verify_file(path, meta).meta.to_props() == meta.to_props()
    proto = onnx.load(str(path))
    d = json.loads(next(p.value for p in proto.metadata_props if p.key == "fxscore"))
    d["positive_class"] = "broken"
    del proto.metadata_props[:]
    proto.metadata_props.add(key="fxscore", value=json.dumps(d))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(proto.SerializeToString())
    with pytest.raises(ExportError, match="positive_class"):
        verify_file(bad, meta)


def test_verify_file_rejects_metadata_other_than_intended(exported, tmp_path):
    _, ckpt, meta, path = exported
    proto = onnx.load(str(path))
    set_metadata(proto, build_meta(ckpt, threshold=0.9))
    other = tmp_path / "other.onnx"
    other.write_bytes(proto.SerializeToString())
    with pytest.raises(ExportError, match="differs"):
        verify_file(other, meta)


def test_default_version_names_the_checkpoint(exported):
    _, ckpt, _, _ = exported
    meta = build_meta(ckpt)
    assert meta.model_version == "ckpt-" + ckpt["sha256"][:12]
    assert meta.threshold == 0.5 and meta.model_name == "fxscore-resnet18"


def test_bad_threshold_is_refused_by_the_contract(exported):
    with pytest.raises(ExportError, match="threshold"):
        build_meta(exported[1], threshold=1.5)


def _garbage(path):
    path.write_bytes(b"not a checkpoint")


def _lacks_keys(path):
    torch.save({"model": {}, "class_names": ["a", "b"]}, path)


def _wrong_weights(path):
    write_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["fc.weight"] = torch.zeros(2, 512)
    torch.save(ckpt, path)


def _pickled_object(path):
    write_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["versions"]["torch"] = torch.__version__  # a TorchVersion object, not a str
    torch.save(ckpt, path)


@pytest.mark.parametrize("make, message", [
    (None, "does not exist"),
    (_garbage, "neither a torch zip archive nor a pickle"),
    (_lacks_keys, "lacks positive_class, preprocess"),
    (_wrong_weights, "do not fit"),
    (_pickled_object, "Python objects other than tensors"),
])
def test_bad_checkpoints_are_named_with_the_fix(tmp_path, make, message):
    path = tmp_path / "best.pt"
    if make:
        make(path)
    with pytest.raises(ExportError, match=message) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_unsupported_opset_is_refused_before_exporting(exported):
    model, _, meta, _ = exported
    with pytest.raises(ExportError, match="opset 17"):
        to_onnx(model, meta, opset=17)


def test_missing_onnxscript_is_named_with_the_fix(exported, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real(name, *a))
    model, _, meta, _ = exported
    with pytest.raises(ExportError, match=r'needs onnxscript: pip install "\.\[train\]"'):
        to_onnx(model, meta)
