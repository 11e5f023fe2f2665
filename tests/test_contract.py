"""fxscore.contract: the metadata every model carries, and every number in it checked."""
from __future__ import annotations

import json

import pytest

from fxscore.contract import (FORMAT_VERSION, META_KEY, ContractError, ModelMeta, Preprocess,
                              metadata_dict, validate)

GOOD = ModelMeta(class_names=("fractured", "not fractured"), positive_class="fractured",
                 preprocess=Preprocess(input_size=(64, 64)), threshold=0.5,
                 model_name="m", model_version="1").to_dict()
NAN, INF = float("nan"), float("inf")


def test_good_metadata_round_trips():
    validate(GOOD)
    meta = ModelMeta.from_dict(GOOD)
    assert meta.to_dict() == GOOD
    assert meta.format_version == FORMAT_VERSION == 2
    assert ModelMeta.from_props(meta.to_props()) == meta
    assert "digest" not in json.loads(meta.to_props()[META_KEY])  # modelfile adds it


@pytest.mark.parametrize("version", [1, 2, 3])
def test_readable_versions(version):
    assert ModelMeta.from_dict({**GOOD, "format_version": version}).format_version == version


def test_a_padding_model_is_written_as_version_3_and_a_stretching_one_unchanged():
    # An fxscore that reads only version 2 would ignore `fit` and stretch: it must refuse.
    padded = ModelMeta.from_dict(GOOD)
    padded = ModelMeta(**{**padded.__dict__, "preprocess": Preprocess((64, 64), fit="pad")})
    d = padded.to_dict()
    assert d["fit"] == "pad" and d["format_version"] == 3
    assert ModelMeta.from_dict(d).preprocess.fit == "pad"
    assert "fit" not in GOOD and ModelMeta.from_dict(GOOD).preprocess.fit == "stretch"
    with pytest.raises(ContractError, match="needs format_version 3"):
        validate({**d, "format_version": 2})
    validate({**GOOD, "fit": "stretch", "format_version": 2})


def test_unknown_keys_are_kept_out_of_the_way():
    validate({**GOOD, "heatmap_output": "cam", "later": {"mean": 1}})  # later versions' keys


def test_a_well_formed_digest_is_accepted():
    validate({**GOOD, "digest": "sha256:" + "0f" * 32})


BAD = [
    ("format_version", True, "format_version must be a positive integer"),
    ("format_version", "2", "format_version must be a positive integer"),
    ("format_version", 4, "upgrade fxscore"),
    ("fit", "crop", "fit must be one of"),
    ("format_version", 0, "format_version must be a positive integer"),
    ("std", [0.2, NAN, 0.2], "std must be three finite numbers"),
    ("std", [0.2, INF, 0.2], "std must be three finite numbers"),
    ("std", [0.2, 0.0, 0.2], r"std must lie in \[0.001, 10\]"),
    ("std", [0.2, -0.1, 0.2], r"std must lie in \[0.001, 10\]"),
    ("std", [0.2, 1e-9, 0.2], r"std must lie in \[0.001, 10\]"),
    ("std", [0.2, 0.2], "std must be three finite numbers"),
    ("std", [True, 0.2, 0.2], "std must be three finite numbers"),
    ("mean", [INF, 0.4, 0.4], "mean must be three finite numbers"),
    ("mean", [-INF, 0.4, 0.4], "mean must be three finite numbers"),
    ("mean", [1e30, 0.4, 0.4], r"mean must lie in \[0, 1\]"),
    ("mean", [123.7, 116.3, 103.5], "0..255 units"),
    ("mean", [-0.5, 0.4, 0.4], r"mean must lie in \[0, 1\]"),
    ("mean", ["0.4", 0.4, 0.4], "mean must be three finite numbers"),
    ("threshold", True, "threshold must be a number in"),
    ("threshold", False, "threshold must be a number in"),
    ("threshold", NAN, "threshold must be a number in"),
    ("threshold", INF, "threshold must be a number in"),
    ("threshold", "0.5", "threshold must be a number in"),
    ("threshold", None, "threshold must be a number in"),
    ("threshold", 1.5, "threshold must be a number in"),
    ("threshold", -0.01, "threshold must be a number in"),
    ("input_size", [64.0, 64], "input_size must be"),
    ("input_size", [True, 64], "input_size must be"),
    ("input_size", [64, 5000], "input_size must be"),
    ("input_size", [64], "input_size must be"),
    ("input_size", [NAN, 64], "input_size must be"),
    ("resize", "nearest", "resize must be one of"),
    ("class_names", ["a", "a"], "class_names must be two distinct"),
    ("class_names", ["a", 1], "class_names must be two distinct"),
    ("positive_class", "broken", "positive_class 'broken' is not one of"),
    ("positive_class", ["fractured"], "is not one of"),
    ("model_name", 7, "model_name must be a string"),
    ("model_version", None, "model_version must be a string"),
    ("input_name", "", "input_name must be a non-empty string"),
    ("training", [1], "training must be a JSON object"),
    ("digest", "md5:abc", "digest must be 'sha256:'"),
    ("digest", "sha256:" + "A" * 64, "digest must be 'sha256:'"),
    ("digest", 7, "digest must be 'sha256:'"),
]


@pytest.mark.parametrize("key, value, message", BAD,
                         ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD])
def test_bad_values_are_refused(key, value, message):
    with pytest.raises(ContractError, match=message):
        validate({**GOOD, key: value})


@pytest.mark.parametrize("key", ["std", "mean", "threshold"])
def test_nan_and_infinity_as_json_reads_them_are_refused(key):
    """Python's json reads NaN / Infinity literals: that is how they get into a model file."""
    value = {"std": [0.2, NAN, 0.2], "mean": [INF, 0.4, 0.4], "threshold": NAN}[key]
    text = json.dumps({**GOOD, key: value})
    assert "NaN" in text or "Infinity" in text
    with pytest.raises(ContractError, match=f"model.onnx: {key}"):
        ModelMeta.from_props({META_KEY: text}, "model.onnx")


def test_missing_keys_are_named():
    d = dict(GOOD)
    del d["threshold"], d["std"]
    with pytest.raises(ContractError, match="lacks std, threshold"):
        validate(d)


def test_preprocess_from_dict_checks_too():
    with pytest.raises(ContractError, match="std must be three finite"):
        Preprocess.from_dict({**Preprocess().to_dict(), "std": [NAN, 1, 1]})


@pytest.mark.parametrize("props, message", [
    ({}, "carries no fxscore metadata"),
    ({META_KEY: "{oops"}, "not valid JSON"),
    ({META_KEY: "[" * 100_000}, "not valid JSON"),  # deep nesting: RecursionError
])
def test_metadata_dict_errors(props, message):
    with pytest.raises(ContractError, match=message):
        metadata_dict(props, "m.onnx")


def test_metadata_that_is_not_an_object():
    with pytest.raises(ContractError, match="must be a JSON object"):
        ModelMeta.from_props({META_KEY: "[1, 2]"})
