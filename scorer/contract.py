"""The fxscore model contract: the metadata every fxscore ONNX model carries.

The scorer owns this definition; `fxscore.export` writes exactly what `ModelMeta.to_dict()`
returns (through `fxscore.modelfile`, which adds the digest) and checks it with `validate()`
before a model file is kept. Everything the scorer needs to reproduce validation-time behaviour
(class names, input size, normalisation, resize method, threshold) lives here, so a model file
is self-describing and cannot be scored with the wrong preprocessing.

The metadata is one JSON document stored in the ONNX `metadata_props` under `META_KEY`.
The graph takes `input_name` (float32, NCHW, dynamic batch) and returns the probability of
`positive_class` (sigmoid inside the graph), shape [N] or [N, 1].

Format versions: 1 (fxscore 0.1.0) and 2, which adds `digest`: a sha256 over the model's
weights, graph and this metadata, verified at load (see `fxscore.modelfile`). Version-1 files
still load and are reported as unverified. Keys this version does not define are kept in the
file and ignored, so later versions can add optional keys. Version 2 defines three optional
keys, `outputs`, `cam` and `ood` (heatmap outputs and the OOD flag, `fxscore.graph_outputs`),
and `training_data`: the sha256 and counts of the training-data table the file carries in its
own metadata entry (`fxscore.membership`). Version 3 adds `fit` ("pad": aspect-preserving,
see `fxscore.preprocess.fit_to_input`); only files that pad are written as version 3.

Every number is checked to be finite and in range here, because JSON as Python reads it accepts
NaN and Infinity and `true` is an int to Python: a NaN std or a threshold of `true` would
otherwise pass and score every image wrong without an error.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

META_KEY = "fxscore"
FORMAT_VERSION = 2  # what this fxscore writes, unless the file needs version 3 (below)
READABLE_VERSIONS = (1, 2, 3)
# Version 3 is version 2 plus the key `fit`: how the image is brought to input_size. "stretch"
# (the only rule before version 3, and the default when the key is absent) resizes to the
# input size; "pad" keeps the aspect ratio and pads with black. A file that pads is written as
# version 3, so that an older fxscore, which would ignore the key and stretch, refuses it.
FIT_METHODS = ("stretch", "pad")
PAD_VERSION = 3
DIGEST_KEY = "digest"  # format version 2: "sha256:<64 hex>", see fxscore.modelfile
RESIZE_METHODS = ("bilinear", "bicubic", "lanczos")
REQUIRED = ("format_version", "class_names", "positive_class", "input_size", "mean", "std",
            "resize", "threshold", "model_name", "model_version")
INPUT_SIZE_RANGE = (8, 4096)
# Pixels reach `preprocess` as intensities in [0, 1], so a channel mean lies in [0, 1]; 123.7
# means 0..255 units. A std below 0.001 or above 10 turns the input into noise or nothing.
MEAN_RANGE = (0.0, 1.0)
STD_RANGE = (1e-3, 10.0)
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


class ContractError(ValueError):
    """A model's metadata is missing or does not follow the fxscore contract."""


@dataclass(frozen=True)
class Preprocess:
    """The parameters of the one preprocessing definition (see `fxscore.preprocess`)."""

    input_size: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize: str = "bilinear"  # always antialiased
    fit: str = "stretch"  # "stretch" to input_size, or "pad": keep the aspect ratio, pad black

    def to_dict(self) -> dict[str, Any]:
        d = {"input_size": list(self.input_size), "mean": list(self.mean),
             "std": list(self.std), "resize": self.resize}
        if self.fit != "stretch":  # absent means stretch: version-2 files stay byte-identical
            d["fit"] = self.fit
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        _check_preprocess(d)
        return cls(input_size=(int(d["input_size"][0]), int(d["input_size"][1])),
                   mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
                   std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
                   resize=str(d["resize"]), fit=str(d.get("fit", "stretch")))


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
    # Optional keys (fxscore.graph_outputs): extra graph outputs by role, the head's weights
    # for heatmaps, the OOD flag's threshold. Left out of the metadata when empty.
    outputs: dict[str, str] = field(default_factory=dict)
    cam: dict[str, Any] = field(default_factory=dict)
    ood: dict[str, Any] = field(default_factory=dict)
    # fxscore.membership: summary of the training-data table (its own ONNX metadata entry).
    training_data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("preprocess")
        for key in ("outputs", "cam", "ood", "training_data"):
            if not d[key]:
                del d[key]
        d["class_names"] = list(self.class_names)
        d.update(self.preprocess.to_dict())
        if self.preprocess.fit != "stretch":
            d["format_version"] = max(d["format_version"], PAD_VERSION)
        return d

    def to_props(self) -> dict[str, str]:
        """The metadata as an ONNX metadata_props entry, without a digest.

        To write a model file use `fxscore.modelfile.write_model` / `embed`, which add the
        digest that format version 2 requires; this is for comparing metadata.
        """
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
                   format_version=int(d["format_version"]), training=dict(d.get("training", {})),
                   outputs=dict(d.get("outputs") or {}), cam=dict(d.get("cam") or {}),
                   ood=dict(d.get("ood") or {}),
                   training_data=dict(d.get("training_data") or {}))

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> "ModelMeta":
        d = metadata_dict(props, source)
        try:
            return cls.from_dict(d)
        except ContractError as e:
            raise ContractError(f"{source}: {e}") from e


def metadata_dict(props: dict[str, str], source: str = "model") -> dict[str, Any]:
    """The fxscore metadata JSON of a model's metadata_props, parsed but not yet validated."""
    if META_KEY not in props:
        raise ContractError(
            f"{source} carries no fxscore metadata (ONNX metadata key '{META_KEY}'). "
            "Export it with `fxscore export`, which embeds what the scorer needs.")
    try:
        return json.loads(props[META_KEY])
    except (json.JSONDecodeError, RecursionError) as e:
        raise ContractError(f"{source}: fxscore metadata is not valid JSON ({e})") from e


def _is_number(x: Any) -> bool:
    """A finite JSON number: not a bool (True == 1 to Python), not NaN or infinite."""
    return (isinstance(x, (int, float)) and not isinstance(x, bool)
            and math.isfinite(float(x)))


def _check_preprocess(d: dict[str, Any]) -> None:
    size = d.get("input_size")
    lo, hi = INPUT_SIZE_RANGE
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
                       for v in size)):
        raise ContractError(f"input_size must be [height, width] integers in {lo}..{hi}, "
                            f"got {size!r}")
    for key, (lo_v, hi_v) in (("mean", MEAN_RANGE), ("std", STD_RANGE)):
        v = d.get(key)
        if (not isinstance(v, (list, tuple)) or len(v) != 3
                or not all(_is_number(x) for x in v)):
            raise ContractError(f"{key} must be three finite numbers, got {v!r}")
        if not all(lo_v <= float(x) <= hi_v for x in v):
            why = (" (intensities are scaled to [0, 1] before normalising; 0..255 units?)"
                   if key == "mean" else "")
            raise ContractError(f"{key} must lie in [{lo_v:g}, {hi_v:g}]{why}, got {v!r}")
    if d.get("resize") not in RESIZE_METHODS:
        raise ContractError(f"resize must be one of {RESIZE_METHODS}, got {d.get('resize')!r}")
    fit = d.get("fit", "stretch")
    if fit not in FIT_METHODS:
        raise ContractError(f"fit must be one of {FIT_METHODS}, got {fit!r}")
    if fit != "stretch" and d.get("format_version", PAD_VERSION) < PAD_VERSION:
        raise ContractError(f"fit {fit!r} needs format_version {PAD_VERSION} (an fxscore that "
                            "reads an earlier version would stretch the image); re-export")


def validate(d: dict[str, Any]) -> None:
    """Raise ContractError naming the first problem in a metadata dict (any readable version).

    A `digest` is checked for its form only; whether it matches the file is
    `fxscore.modelfile.check_digest`'s job, which the loader runs for version-2 files.
    """
    if not isinstance(d, dict):
        raise ContractError(f"metadata must be a JSON object, got {type(d).__name__}")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ContractError(f"metadata lacks {', '.join(missing)}")
    version = d["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ContractError(f"format_version must be a positive integer, got {version!r}")
    if version not in READABLE_VERSIONS:
        raise ContractError(f"format_version {version!r} is not supported by this fxscore (it "
                            f"reads versions {', '.join(map(str, READABLE_VERSIONS))}); "
                            "upgrade fxscore")
    names = d["class_names"]
    if (not isinstance(names, list) or len(names) != 2 or len(set(names)) != 2
            or not all(isinstance(n, str) and n for n in names)):
        raise ContractError(f"class_names must be two distinct non-empty strings, got {names!r}")
    if not isinstance(d["positive_class"], str) or d["positive_class"] not in names:
        raise ContractError(f"positive_class {d['positive_class']!r} is not one of {names}")
    _check_preprocess(d)
    t = d["threshold"]
    if not _is_number(t) or not 0.0 <= float(t) <= 1.0:
        raise ContractError(f"threshold must be a number in [0, 1], got {t!r}")
    for key in ("model_name", "model_version"):
        if not isinstance(d[key], str):
            raise ContractError(f"{key} must be a string, got {d[key]!r}")
    name = d.get("input_name", "input")
    if not isinstance(name, str) or not name:
        raise ContractError(f"input_name must be a non-empty string, got {name!r}")
    if not isinstance(d.get("training", {}), dict):
        raise ContractError("training must be a JSON object")
    from .graph_outputs import OutputsError, check_optional  # heatmap / OOD keys

    try:
        check_optional(d)
    except OutputsError as e:
        raise ContractError(str(e)) from None
    if d.get("training_data") is not None:
        from .membership import MembershipError, check_summary

        try:
            check_summary(d["training_data"])
        except MembershipError as e:
            raise ContractError(str(e)) from None
    digest = d.get(DIGEST_KEY)
    if digest is not None and not (isinstance(digest, str) and _DIGEST_RE.fullmatch(digest)):
        raise ContractError(f"{DIGEST_KEY} must be 'sha256:' and 64 lowercase hex digits, got "
                            f"{str(digest)[:80]!r}")
