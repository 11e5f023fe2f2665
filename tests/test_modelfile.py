"""fxscore.modelfile: the digest that binds a model's weights, graph and metadata."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import onnx
import pytest
from onnx import numpy_helper

from fxscore.contract import META_KEY, ContractError
from fxscore.model import load_model
from fxscore.modelfile import (DigestError, canonical_json, check_digest, digest_of, embed,
                               embed_bytes, read_props, write_model)

from onnx_models import convnet_proto, make_meta


@pytest.fixture
def proto():
    return convnet_proto(make_meta())


def _meta_of(data: bytes) -> dict:
    return json.loads(read_props(data)[META_KEY])


def test_embedded_digest_verifies_and_follows_the_documented_scheme(proto):
    data = embed_bytes(proto.SerializeToString(), make_meta())
    d = _meta_of(data)
    assert d["format_version"] == 2 and d["digest"].startswith("sha256:")
    assert check_digest(data, d) == d["digest"]
    # The scheme, recomputed independently with onnx: the model minus its metadata entries,
    # then the metadata JSON minus the digest, canonical.
    bare = onnx.load_from_string(data)
    del bare.metadata_props[:]
    body = bare.SerializeToString()
    meta = json.dumps({k: v for k, v in d.items() if k != "digest"}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True).encode()
    want = hashlib.sha256(b"fxscore-model-digest/1\n" + len(body).to_bytes(8, "little") + body
                          + len(meta).to_bytes(8, "little") + meta).hexdigest()
    assert d["digest"] == "sha256:" + want
    assert canonical_json(d).encode() == meta


def test_every_weight_and_the_graph_are_covered(proto):
    data = embed_bytes(proto.SerializeToString(), make_meta())
    d = _meta_of(data)
    for init in proto.graph.initializer:  # any one value of any weight
        changed = onnx.load_from_string(data)
        t = next(i for i in changed.graph.initializer if i.name == init.name)
        a = numpy_helper.to_array(t).copy()
        a.flat[len(a.flat) // 2] += 0.5
        t.CopyFrom(numpy_helper.from_array(a, t.name))
        with pytest.raises(DigestError, match="do not match"):
            check_digest(changed.SerializeToString(), d)
    changed = onnx.load_from_string(data)
    changed.graph.node[1].op_type = "LeakyRelu"  # structure, not weights
    with pytest.raises(DigestError):
        check_digest(changed.SerializeToString(), d)


def test_metadata_is_covered_but_other_keys_and_reserialising_are_not_changes(proto):
    data = embed_bytes(proto.SerializeToString(), make_meta())
    d = _meta_of(data)
    with pytest.raises(DigestError):
        check_digest(data, {**d, "threshold": 0.4})
    again = onnx.load_from_string(data)
    again.metadata_props.add(key="note", value="x")
    resaved = again.SerializeToString()  # metadata now sits in field order, another key added
    assert resaved != data
    assert check_digest(resaved, _meta_of(resaved)) == d["digest"]


def test_embedding_again_replaces_the_entry_and_keeps_other_keys(proto):
    proto.metadata_props.add(key="producer.note", value="kept")
    first = embed_bytes(proto.SerializeToString(), make_meta(threshold=0.3))
    second = embed_bytes(first, make_meta(threshold=0.7))
    props = read_props(second)
    assert set(props) == {"producer.note", META_KEY}
    d = json.loads(props[META_KEY])
    assert d["threshold"] == 0.7 and check_digest(second, d)


def test_embed_works_in_place_on_a_proto_and_upgrades_version_1(proto):
    out = embed(proto, make_meta(format_version=1))
    assert out is proto
    d = json.loads(next(p.value for p in proto.metadata_props if p.key == META_KEY))
    assert d["format_version"] == 2
    assert check_digest(proto.SerializeToString(), d)


def test_write_model_writes_a_verified_file_atomically(proto, tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_model(proto, make_meta(), tmp_path / "m.onnx")
    finally:
        os.umask(umask)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)  # the scoring account can read it
    m = load_model(path)
    assert m.verified and m.meta == make_meta()
    write_model(path.read_bytes(), make_meta(threshold=0.9), path)  # bytes work too
    assert load_model(path).meta.threshold == 0.9


def test_write_model_leaves_nothing_when_it_fails(proto, tmp_path):
    bad = dataclasses.replace(make_meta(), training={"auc": float("nan")})
    with pytest.raises(ContractError, match="cannot be written as JSON"):
        write_model(proto, bad, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_missing_digest(proto):
    data = proto.SerializeToString()
    with pytest.raises(DigestError, match="carries no 'digest'"):
        check_digest(data, {"format_version": 2})


@pytest.mark.parametrize("data", [b"\x0f\x01", b"\x0a\xff\xff\xff\xff\x0f", b"\x80" * 20,
                                  b"\x0a\x05ab"])
def test_not_protobuf_is_a_contract_error(data):
    with pytest.raises(ContractError, match="not an ONNX model"):
        read_props(data)


def test_digest_of_ignores_metadata_entries(proto):
    d = make_meta().to_dict()
    plain = proto.SerializeToString()
    proto.metadata_props.add(key="anything", value="at all")
    assert digest_of(proto.SerializeToString(), d) == digest_of(plain, d)
