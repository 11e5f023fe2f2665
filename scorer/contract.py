"""The fxscore model contract: the metadata every fxscore ONNX model carries.

The scorer owns this definition; `fxscore.export` writes exactly what `ModelMeta.to_props()`
returns and checks it with `validate()` before a model file is kept. Everything the scorer needs
to reproduce validation-time behaviour (class names, input size, normalisation, resize method,
threshold) lives here, so a model file is self-describing and cannot be scored with the wrong
preprocessing.

The metadata is one JSON document stored in the ONNX `metadata_props` under `META_KEY`.
The graph takes `input_name` (float32, NCHW, dynamic batch) and returns the probability of
`positive_class` (sigmoid inside the graph), shape [N] or [N, 1].
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

META_KEY = "fxscore"
FORMAT_VERSION = 1
RESIZE_METHODS = ("bilinear", "bicubic", "lanczos")
REQUIRED = ("format_version", "class_names", "positive_class", "input_size", "mean", "std",
            "resize", "threshold", "model_name", "model_version")


class ContractError(ValueError):
    """A model's metadata is missing or does not follow the fxscore contract."""


@dataclass(frozen=True)
class Preprocess:
    """The parameters of the one preprocessing definition (see `fxscore.preprocess`)."""

    input_size: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize: str = "bilinear"  # always antialiased

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": list(self.input_size), "mean": list(self.mean),
                "std": list(self.std), "resize": self.resize}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        _check_preprocess(d)
        return cls(input_size=(int(d["input_size"][0]), int(d["input_size"][1])),
                   mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
                   std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
                   resize=str(d["resize"]))


@dataclass(frozen=True)
class ModelMeta:
    class_names: tuple[str, ...]
    positive_class: str
    preprocess: Preprocess = Preprocess()
    threshold: float = 0.5
    model_name: str = "fxscore-resnet18"
    model_version: str = "0"
    input_name: str = "input"
    format_version: int = FORMAT_VERSION
    training: dict[str, Any] = field(default_factory=dict)  # free-form training summary

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("preprocess")
        d["class_names"] = list(self.class_names)
        d.update(self.preprocess.to_dict())
        return d

    def to_props(self) -> dict[str, str]:
        """The ONNX metadata_props this model must carry."""
        return {META_KEY: json.dumps(self.to_dict(), sort_keys=True)}

    @property
    def negative_class(self) -> str:
        return next(c for c in self.class_names if c != self.positive_class)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelMeta":
        validate(d)
        return cls(class_names=tuple(d["class_names"]), positive_class=d["positive_class"],
                   preprocess=Preprocess.from_dict(d), threshold=float(d["threshold"]),
                   model_name=str(d["model_name"]), model_version=str(d["model_version"]),
                   input_name=str(d.get("input_name", "input")),
                   format_version=int(d["format_version"]), training=dict(d.get("training", {})))

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> "ModelMeta":
        if META_KEY not in props:
            raise ContractError(
                f"{source} carries no fxscore metadata (ONNX metadata key '{META_KEY}'). "
                "Export it with `fxscore export`, which embeds what the scorer needs.")
        try:
            d = json.loads(props[META_KEY])
        except json.JSONDecodeError as e:
            raise ContractError(f"{source}: fxscore metadata is not valid JSON ({e})") from e
        try:
            return cls.from_dict(d)
        except ContractError as e:
            raise ContractError(f"{source}: {e}") from e


def _check_preprocess(d: dict[str, Any]) -> None:
    size = d.get("input_size")
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, int) and 8 <= v <= 4096 for v in size)):
        raise ContractError(f"input_size must be [height, width] integers in 8..4096, got {size!r}")
    for key in ("mean", "std"):
        v = d.get(key)
        if (not isinstance(v, (list, tuple)) or len(v) != 3
                or not all(isinstance(x, (int, float)) for x in v)):
            raise ContractError(f"{key} must be three numbers, got {v!r}")
    if any(float(x) <= 0 for x in d["std"]):
        raise ContractError(f"std must be positive, got {d['std']!r}")
    if d.get("resize") not in RESIZE_METHODS:
        raise ContractError(f"resize must be one of {RESIZE_METHODS}, got {d.get('resize')!r}")


def validate(d: dict[str, Any]) -> None:
    """Raise ContractError naming the first problem in a metadata dict."""
    if not isinstance(d, dict):
        raise ContractError(f"metadata must be a JSON object, got {type(d).__name__}")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ContractError(f"metadata lacks {', '.join(missing)}")
    if d["format_version"] != FORMAT_VERSION:
        raise ContractError(f"format_version {d['format_version']!r} is not supported by this "
                            f"fxscore (it reads version {FORMAT_VERSION}); upgrade fxscore")
    names = d["class_names"]
    if (not isinstance(names, list) or len(names) != 2 or len(set(names)) != 2
            or not all(isinstance(n, str) and n for n in names)):
        raise ContractError(f"class_names must be two distinct non-empty strings, got {names!r}")
    if d["positive_class"] not in names:
        raise ContractError(f"positive_class {d['positive_class']!r} is not one of {names}")
    _check_preprocess(d)
    t = d["threshold"]
    if not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
        raise ContractError(f"threshold must be a number in [0, 1], got {t!r}")
    if not isinstance(d.get("training", {}), dict):
        raise ContractError("training must be a JSON object")
