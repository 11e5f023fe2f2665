"""Training checkpoint -> ONNX graph that ends in the positive-class probability, contract embedded.

The exporter is torch's own (`torch.onnx.export(dynamo=True)`, the default since torch 2.9; the
TorchScript exporter is deprecated and slated for removal). It cannot target opsets below 18
for this network (its down-converter fails on ReduceMean), so the opset is pinned to 18. It
writes IR version 10, which onnxruntime reads only from 1.18 on; nothing in this graph needs
IR 10, so the file is stamped IR 9 (onnxruntime >= 1.15) after dropping the exporter's per-node
debug annotations, the one IR-10 feature it uses.
"""
from __future__ import annotations

import importlib.util
import platform
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from fxscore import __version__
from fxscore.contract import ContractError, ModelMeta, Preprocess
from fxscore.hashing import sha256_file
from fxscore.model import Model, ModelError, load_model
from fxscore.modelfile import embed
from fxscore.train.config import portable_config
from fxscore.train.model import build_model

from .io import finite_or_none

OPSET = 18
OPSETS = (18, 19, 20)  # what IR 9 allows and the exporter reaches; onnxruntime 1.17 runs them all
IR_VERSION = 9
OUTPUT_NAME = "probability"
REQUIRED_KEYS = ("model", "class_names", "positive_class", "preprocess", "epoch", "best_epoch",
                 "metrics", "best_metrics", "data_fingerprint", "versions", "config")


class ExportError(RuntimeError):
    """A checkpoint cannot be exported, or the exported file breaks the contract."""


class ProbabilityModel(nn.Module):
    """The trained network plus the sigmoid: what the scorer runs is what the graph returns."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(x))


def _unreadable_why(path: Path, error: Exception) -> str:
    """Why torch.load failed, in our words (torch's text asks users to file torch issues)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    if not head:
        return "the file is empty"
    if not head.startswith(b"PK") and head[:1] != b"\x80":  # pickles of protocol >= 2 start so
        return "it is neither a torch zip archive nor a pickle"
    if "WeightsUnpickler" in str(error) or "weights_only" in str(error):  # torch.save's zips too
        return ("it holds Python objects other than tensors and plain values, which fxscore "
                "does not load (unpickling them could run code)")
    if head.startswith(b"PK"):
        return "it is a zip archive, but not one written by torch.save"
    return f"it is a damaged or foreign pickle ({type(error).__name__})"


def load_checkpoint(path: str | Path) -> tuple[ProbabilityModel, dict[str, Any]]:
    """Read a `fxscore train` checkpoint -> (network in eval mode, the checkpoint's other entries)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist; pass the best.pt written by "
                          "`fxscore train`")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols and asks users to file issues with torch:
            # not advice for someone who passed the wrong file.
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling, zip and I/O errors all mean "not a checkpoint"
        raise ExportError(f"{path}: not a `fxscore train` checkpoint: {_unreadable_why(path, e)}."
                          " Export the best.pt written by `fxscore train` (or give its run "
                          "folder)") from e
    if not isinstance(ckpt, dict):
        raise ExportError(f"{path}: holds a {type(ckpt).__name__}, not a `fxscore train` checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ExportError(f"{path}: not a `fxscore train` checkpoint (it lacks "
                          f"{', '.join(missing)}); export the best.pt of a training run")
    net = build_model("none")
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ExportError(f"{path}: its weights do not fit fxscore's ResNet18 "
                          f"({str(e).splitlines()[0]})") from e
    rest = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler")}
    rest["sha256"] = sha256_file(path)
    return ProbabilityModel(net).eval(), rest


def build_meta(ckpt: dict[str, Any], *, threshold: float | None = None,
               model_name: str | None = None, model_version: str | None = None,
               opset: int = OPSET) -> ModelMeta:
    """The contract metadata: classes and preprocessing from the checkpoint, plus its training summary.

    model_version defaults to 'ckpt-<first 12 hex of the checkpoint's sha256>', so a model file
    can always be traced to the checkpoint it came from.
    """
    try:
        preprocess = Preprocess.from_dict(ckpt["preprocess"])
        meta = ModelMeta(class_names=tuple(ckpt["class_names"]),
                         positive_class=ckpt["positive_class"], preprocess=preprocess,
                         threshold=0.5 if threshold is None else float(threshold),
                         model_name=model_name or ModelMeta.model_name,
                         model_version=model_version or f"ckpt-{ckpt['sha256'][:12]}",
                         training=finite_or_none(training_summary(ckpt, opset)))
        # The scorer's own validator, on exactly what will be written.
        return ModelMeta.from_props(meta.to_props(), "exported metadata")
    except (ContractError, KeyError, TypeError, ValueError) as e:
        raise ExportError(f"checkpoint metadata does not make a valid fxscore model: {e}") from e


def training_summary(ckpt: dict[str, Any], opset: int = OPSET) -> dict[str, Any]:
    """What the model file says about how it was made (stored under the contract's `training`)."""
    return {"epoch": ckpt["epoch"], "best_epoch": ckpt["best_epoch"],
            "metrics": ckpt["metrics"], "best_metrics": ckpt["best_metrics"],
            "data_fingerprint": ckpt["data_fingerprint"], "versions": ckpt["versions"],
            # relative to the data root: no folder of the machine that built it
            "config": portable_config(ckpt["config"]), "checkpoint_sha256": ckpt["sha256"],
            "export": {"fxscore": __version__, "torch": str(torch.__version__),
                       "onnx": onnx.__version__, "python": platform.python_version(),
                       "opset": opset, "ir_version": IR_VERSION}}


def to_onnx(model: ProbabilityModel, meta: ModelMeta, *, opset: int = OPSET) -> onnx.ModelProto:
    """Export `model` (input meta.input_name, float32 NCHW, dynamic batch -> [N] probabilities)."""
    if opset not in OPSETS:
        raise ExportError(f"opset {opset} is not supported; choose one of {OPSETS}")
    if importlib.util.find_spec("onnxscript") is None:  # torch does not depend on it
        raise ExportError('torch\'s ONNX exporter needs onnxscript: pip install ".[train]" '
                          "(or pip install onnxscript)")
    h, w = meta.preprocess.input_size
    example = torch.zeros(2, 3, h, w)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        program = torch.onnx.export(model.eval(), (example,), None, dynamo=True, verbose=False,
                                    opset_version=opset, input_names=[meta.input_name],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},))
    proto = program.model_proto
    got = {o.domain: o.version for o in proto.opset_import}.get("", None)
    if got != opset:
        raise ExportError(f"torch's exporter wrote opset {got}, not the requested {opset}; "
                          f"use --opset {OPSET}")
    _strip_debug_annotations(proto)
    proto.ir_version = IR_VERSION
    proto.doc_string = (f"fxscore {meta.model_name} {meta.model_version}: probability of "
                        f"'{meta.positive_class}'")
    set_metadata(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def set_metadata(proto: onnx.ModelProto, meta: ModelMeta) -> None:
    """Write the contract's metadata and its digest into `proto`, replacing any earlier ones.

    The digest covers the graph and weights as they are now (`fxscore.modelfile`): this must
    be the last change made to `proto` before it is written.
    """
    embed(proto, meta)


def _strip_debug_annotations(proto: onnx.ModelProto) -> None:
    # Per-node/per-value metadata_props (torch's original node names) exist only from IR 10.
    g = proto.graph
    for item in [*g.node, *g.input, *g.output, *g.value_info]:
        del item.metadata_props[:]
    del g.metadata_props[:]


def verify_file(path: Path, expected: ModelMeta, *, threads: int | None = None) -> Model:
    """Check a written model the way the scorer will see it; return the scorer's loaded Model.

    The ONNX checker, the pinned IR/opset, the scorer's contract validator on the stored
    metadata, and finally `fxscore.model.load_model`, which also checks the graph's input and
    output against the metadata.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path}: the written file is not valid ONNX ({e})") from e
    proto = onnx.load(str(path), load_external_data=False)
    opset = {o.domain: o.version for o in proto.opset_import}.get("")
    if proto.ir_version > IR_VERSION or opset not in OPSETS:
        raise ExportError(f"{path}: IR {proto.ir_version} / opset {opset}; fxscore writes IR "
                          f"<= {IR_VERSION} and opset in {OPSETS} so onnxruntime >= 1.17 loads it")
    try:
        stored = ModelMeta.from_props({p.key: p.value for p in proto.metadata_props}, str(path))
        model = load_model(path, threads=threads)
    except (ContractError, ModelError) as e:
        raise ExportError(str(e)) from e
    if stored.to_props() != expected.to_props():
        raise ExportError(f"{path}: the stored metadata differs from what was meant to be written")
    return model

