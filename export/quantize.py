"""fp32 fxscore model -> static int8 model, and the check that it still ranks X-rays as well.

Static QDQ quantisation with per-channel int8 weights and uint8 activations (the pairing
onnxruntime's x86 kernels are fastest with), calibrated on real images fed through the scorer's
own reading rule (`fxscore.scoring.model_input`), so the activation ranges are those the
deployed model sees.
`quant_pre_process` first folds and shape-infers the graph so every Conv gets quantised.
Whether the result may be shipped is decided on labelled images: the ROC-AUC may drop by at
most `AUC_DROP_LIMIT`.

Same answer on every x86-64 CPU. onnxruntime multiplies uint8 activations by int8 weights with
VNNI instructions where the CPU has them (exact int32 sums) and otherwise with AVX2's
`vpmaddubsw`, which adds two u8 x s8 products into a *saturating* int16: 255 * 127 * 2 = 64770
does not fit, so full-range int8 weights give other results on a CPU without VNNI (up to 0.098
in probability, measured on the first default model). Weights are therefore quantised to 7 bits
(`reduce_range`, -64..64): 255 * 64 * 2 = 32640 always fits, every kernel computes the exact
integer sums, and the outputs agree across CPUs (proven against an exact reference of the
quantised graph in the tests, and natively vs. `qemu-x86_64 -cpu Haswell` on VNNI hosts).

Continuous probabilities. The head (`head_nodes`: the global pooling, the final Gemm/MatMul
and what follows it, Squeeze and Sigmoid) stays in float: quantising it rounds the output to a
few dozen levels, ties different images exactly and coarsens ROC curves.
"""
from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

from fxscore import metrics
from fxscore.contract import ModelMeta
from fxscore.evaluate import Item
from fxscore.images import ImageReadError
from fxscore.model import Model
from fxscore.modelfile import embed
from fxscore.scoring import model_input, score_items

AUC_DROP_LIMIT = 0.01
CALIBRATION_IMAGES = 200  # MinMax ranges settle after ~100 images; more only costs time
CALIBRATION_BATCH = 16
SETTINGS = {"format": "QDQ", "per_channel": True, "weights": "int8", "activations": "uint8",
            "calibration": "MinMax", "reduce_range": True, "head": "float"}
HEAD_OPS = ("Gemm", "MatMul")  # the head's linear layer; these may follow it, and precede it:
AFTER_LINEAR_OPS = ("Sigmoid", "Squeeze", "Unsqueeze", "Reshape", "Flatten", "Identity", "Add")
POOL_OPS = ("ReduceMean", "GlobalAveragePool", "Reshape", "Flatten", "Squeeze", "Identity")


class QuantizeError(RuntimeError):
    """The int8 model cannot be made, or is not good enough to ship."""


class ImageCalibrationReader(CalibrationDataReader):
    """Feeds batches of calibration images, read and preprocessed exactly as the scorer does."""

    def __init__(self, files: Sequence[Path], meta: ModelMeta, batch_size: int = CALIBRATION_BATCH):
        self.files, self.meta, self.batch_size = list(files), meta, batch_size
        self.used: list[Path] = []
        self.unreadable: list[str] = []
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = []
        while len(batch) < self.batch_size and self._next < len(self.files):
            f = self.files[self._next]
            self._next += 1
            try:
                batch.append(model_input(f, self.meta.preprocess))  # as the scorer reads
                self.used.append(f)
            except ImageReadError as e:
                self.unreadable.append(" ".join(str(e).split()))
        return {self.meta.input_name: np.stack(batch)} if batch else None


def pick_calibration(files: Sequence[Path], limit: int = CALIBRATION_IMAGES,
                     seed: int = 0) -> list[Path]:
    """At most `limit` files, drawn reproducibly from the whole folder rather than its first class."""
    files = sorted(files)
    if len(files) <= limit:
        return files
    idx = np.random.default_rng(seed).choice(len(files), size=limit, replace=False)
    return [files[i] for i in sorted(idx)]


def quantize(fp32_path: Path, dest: Path, calibration: Sequence[Path],
             meta: ModelMeta) -> dict[str, Any]:
    """Write the int8 version of the verified fp32 model at `fp32_path` to `dest`.

    `meta` is the contract metadata to embed (the caller marks the version as int8). Returns
    what was done: settings, images used and the unreadable ones.
    """
    reader = ImageCalibrationReader(calibration, meta)
    with tempfile.TemporaryDirectory(prefix="fxscore-int8-") as tmp, _quiet_onnxruntime():
        pre, raw = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        prepared = onnx.load(str(pre))
        if _name_nodes(prepared):
            onnx.save(prepared, str(pre))
        head = head_nodes(prepared)
        del prepared
        try:
            # reduce_range: 7-bit weights, exact on VNNI and AVX2 kernels alike (module doc).
            quantize_static(str(pre), str(raw), reader, quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=head)
        except Exception as e:
            if not reader.used:  # the quantiser's own message would not say why
                raise QuantizeError(_no_calibration(calibration, reader)) from e
            raise
        if not reader.used:
            raise QuantizeError(_no_calibration(calibration, reader))
        proto = onnx.load(str(raw))
    _tidy(proto, onnx.load(str(fp32_path), load_external_data=False).ir_version)
    embed(proto, meta)  # metadata and digest: the last change before the file is written
    onnx.checker.check_model(proto, full_check=True)
    dest.write_bytes(proto.SerializeToString())
    return {**SETTINGS, "onnxruntime": onnxruntime.__version__, "float_nodes": head,
            "calibration_images": len(reader.used), "calibration_unreadable": reader.unreadable}


def head_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the head's nodes, output first: what stays in float.

    Walks back from the output along each node's first non-constant input: the sigmoid and
    shape ops, the linear layer (Gemm/MatMul, with a bias Add), then the global pooling and
    reshapes that feed it: Sigmoid <- Squeeze <- Gemm <- Reshape <- ReduceMean in an exported
    fxscore graph. The pooling stays float too: a pooled feature rounded to uint8 moves the
    logit by a whole step when a float sum (whose order differs between CPUs' kernels) lands
    on the other side of a rounding boundary.
    """
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    constant = {i.name for i in graph.initializer}
    chain: list[onnx.NodeProto] = []
    linear = False
    node = producer.get(graph.output[0].name)
    while node is not None and len(chain) < len(graph.node):
        allowed = POOL_OPS if linear else (*AFTER_LINEAR_OPS, *HEAD_OPS)
        if node.op_type not in allowed:
            break
        chain.append(node)
        linear = linear or node.op_type in HEAD_OPS
        data = [i for i in node.input if i and i not in constant and i in producer
                and producer[i].op_type != "Constant"]
        node = producer[data[0]] if data else None
    if not linear:
        raise QuantizeError(
            f"cannot find the head of the graph: no {'/'.join(HEAD_OPS)} on the path to its "
            f"output ({' <- '.join(n.op_type for n in chain) or 'no nodes'}"
            f"{' <- ' + node.op_type if node is not None else ''}); an fxscore graph ends in a "
            "linear layer and a Sigmoid")
    return [n.name for n in chain]


def _name_nodes(proto: onnx.ModelProto) -> bool:
    """Give every unnamed node a unique name (the quantiser excludes nodes by name)."""
    taken = {n.name for n in proto.graph.node if n.name}
    changed = False
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            name = f"fxscore_{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            changed = True
    return changed


def _no_calibration(files: Sequence[Path], reader: ImageCalibrationReader) -> str:
    first = f" (first: {reader.unreadable[0]})" if reader.unreadable else ""
    return (f"none of the {len(files)} calibration files could be read{first}; pass "
            "--calibration a folder of X-rays")


def _tidy(proto: onnx.ModelProto, ir_version: int) -> None:
    """Make the quantiser's output as portable as the fp32 file: its IR, only the opsets used.

    The pre-processing step imports every domain onnxruntime knows (ai.onnx.ml 5, training,
    preview, ...), some newer than older onnxruntime releases accept, though no node uses them.
    """
    used = {n.domain for n in proto.graph.node}
    keep = [(o.domain, o.version) for o in proto.opset_import if o.domain in used or o.domain == ""]
    del proto.opset_import[:]
    for domain, version in keep:
        proto.opset_import.add(domain=domain, version=version)
    proto.ir_version = ir_version
    drop = {"onnx.infer", "onnx.quant.pre_process"}  # tool breadcrumbs; the report records them
    keep_props = [(p.key, p.value) for p in proto.metadata_props if p.key not in drop]
    del proto.metadata_props[:]
    for key, value in keep_props:
        proto.metadata_props.add(key=key, value=value)


@contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    # The quantiser logs advice to the root logger at WARNING; the caller reports what matters.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def compare(fp32: Model, int8: Model, items: Sequence[Item]) -> dict[str, Any]:
    """fp32 vs int8 on labelled images: ROC-AUC of each, its drop, label agreement."""
    pairs = [(i.path, i.file) for i in items]
    rows32 = list(score_items(fp32, pairs))
    rows8 = list(score_items(int8, pairs))
    ok = [(i, a, b) for i, a, b in zip(items, rows32, rows8)
          if a["probability"] is not None and b["probability"] is not None]
    if not ok:
        raise QuantizeError("none of the labelled images could be read; the int8 model cannot "
                            "be checked")
    positive = fp32.meta.positive_class
    y = np.array([i.true_label == positive for i, _, _ in ok], dtype=int)
    p32 = np.array([a["probability"] for _, a, _ in ok])
    p8 = np.array([b["probability"] for _, _, b in ok])
    auc32, auc8 = metrics.roc_auc(y, p32), metrics.roc_auc(y, p8)
    labels32 = np.array([a["label"] for _, a, _ in ok])
    labels8 = np.array([b["label"] for _, _, b in ok])
    return {"images": len(ok), "unreadable": len(items) - len(ok),
            "positives": int(y.sum()), "negatives": int(len(y) - y.sum()),
            "auc_fp32": auc32, "auc_int8": auc8, "auc_drop": auc32 - auc8,
            "label_agreement": float(np.mean(labels32 == labels8)),
            "max_abs_prob": float(np.max(np.abs(p32 - p8))),
            "accuracy_fp32": float(np.mean((p32 >= fp32.meta.threshold) == y)),
            "accuracy_int8": float(np.mean((p8 >= int8.meta.threshold) == y))}


def problem(result: dict[str, Any], limit: float = AUC_DROP_LIMIT) -> str | None:
    """Why the int8 model must not be shipped, or None."""
    if result["positives"] == 0 or result["negatives"] == 0:
        return (f"the labelled images hold only one class ({result['positives']} positive, "
                f"{result['negatives']} negative), so ROC-AUC cannot be compared")
    if not result["auc_drop"] <= limit:
        return (f"ROC-AUC drops from {result['auc_fp32']:.4f} (fp32) to "
                f"{result['auc_int8']:.4f} (int8), by {result['auc_drop']:.4f} > {limit:g}, "
                f"on {result['images']} labelled images")
    return None
