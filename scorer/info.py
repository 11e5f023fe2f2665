"""What an fxscore model file carries, as data (`describe`) and as readable text (`format_info`).

    doc = describe(load_model("model.onnx"))     # JSON-able dict: `fxscore info --json`
    print(format_info(doc))                       # `fxscore info`

`model_pairs(doc)` gives the (label, text) rows both the text and the eval report's Model
section use; it also accepts the eval metrics document's "model" entry (the contract's keys
plus path and model_id), so the report and `fxscore info` describe a model the same way.
Reading the graph (opset, precision) needs the `onnx` package, which is torch-free.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

# Operators that exist only in quantised graphs: QDQ pairs (static/dynamic quantisation) and
# the integer kernels of the QOperator format.
INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
            "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd", "QGemm"}
METRIC_LABELS = {"val_loss": "loss", "val_accuracy": "accuracy", "val_auc": "ROC-AUC",
                 "val_sensitivity": "sensitivity", "val_specificity": "specificity"}


def _num(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _short(h: Any, n: int = 12) -> str:
    return f"{h[:n]}..." if isinstance(h, str) and len(h) > n else str(h)


def precision_of(node_ops: Counter) -> str:
    """'int8' when the graph holds quantisation operators, 'fp16' when it computes in half
    precision (Cast to float16), else 'fp32'."""
    if any(op in INT8_OPS for op in node_ops):
        return "int8"
    if node_ops.get("Cast:fp16"):
        return "fp16"
    return "fp32"


def graph_facts(path: str | os.PathLike) -> dict[str, Any]:
    """Opset, IR version, producer, operator counts and precision read from the ONNX file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    ops: Counter = Counter()
    for node in proto.graph.node:
        ops[node.op_type] += 1
        if node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16
                                          for a in node.attribute):
            ops["Cast:fp16"] += 1
    out = proto.graph.output[0] if proto.graph.output else None
    shape = ([d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
             if out is not None else [])
    return {"opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import}.get("ai.onnx"),
            "ir_version": proto.ir_version,
            "producer": " ".join(x for x in (proto.producer_name, proto.producer_version) if x),
            "precision": precision_of(ops), "nodes": len(proto.graph.node),
            "output": {"name": out.name if out is not None else "", "shape": shape}}


def integrity_of(model) -> dict[str, Any]:
    """How the loader checked the file: {"verified": bool, "text": one line}.

    The loader (`fxscore.model`) verifies a format-version-2 model's digest, or the packaged
    default model's pinned sha256; a version-1 model has no digest and is unverified.
    """
    text = getattr(model, "integrity", None)
    verified = bool(getattr(model, "verified", False))
    if not isinstance(text, str):
        text = ("unverified: format version 1 carries no digest"
                if getattr(model.meta, "format_version", 1) < 2 else "unknown")
    return {"verified": verified, "text": text}


def describe(model) -> dict[str, Any]:
    """Everything a loaded `fxscore.model.Model` carries, as a JSON-able dict.

    The keys of the contract (`ModelMeta.to_dict()`) plus path, model_id, sha256, size_bytes,
    the graph's facts (`graph_facts`) and integrity.
    """
    from .hashing import sha256_file

    path = Path(model.path)
    doc: dict[str, Any] = {"path": str(path), "model_id": model.model_id,
                           "sha256": sha256_file(path), "size_bytes": path.stat().st_size,
                           **model.meta.to_dict()}
    doc["negative_class"] = model.meta.negative_class
    doc.update(graph_facts(path))
    doc["integrity"] = integrity_of(model)
    return doc


def _metrics_text(metrics: dict[str, Any]) -> str:
    keys = sorted((k for k in metrics if k.startswith("val_")),
                  key=lambda k: (list(METRIC_LABELS).index(k) if k in METRIC_LABELS else 99, k))
    text = ", ".join(f"{METRIC_LABELS.get(k, k.removeprefix('val_'))} {_num(metrics[k])}"
                     for k in keys)
    if metrics.get("train_loss") is not None:
        text += f" (train loss {_num(metrics['train_loss'])})"
    return text


def training_pairs(training: dict[str, Any]) -> list[tuple[str, str]]:
    """The training summary as readable rows: provenance, best epoch, validation metrics."""
    if not training:
        return [("training", "no training summary in this model")]
    rows: list[tuple[str, str]] = []
    wrapped = training.get("wrapped")
    if isinstance(wrapped, dict):
        rows.append(("wrapped from", f"{wrapped.get('source', '?')} (sha256 "
                                     f"{_short(wrapped.get('source_sha256', '?'))}), output "
                                     f"{wrapped.get('output', '?')}"))
        for note in wrapped.get("adaptations", []):
            rows.append(("adapted", str(note)))
    derived = training.get("derived_from")
    if isinstance(derived, dict):
        changes = "; ".join(f"{k.replace('_', ' ')} {old} -> {new}"
                            for k, (old, new) in (derived.get("changes") or {}).items())
        rows.append(("copied from", f"model {derived.get('model_id', '?')}"
                                    + (f" ({changes})" if changes else "")))
    if "data_fingerprint" in training:
        rows.append(("data fingerprint", _short(training["data_fingerprint"], 16)))
    cfg = training.get("config") or {}
    if "best_epoch" in training:
        # "epoch" is the exported checkpoint's: the best epoch's own (best.pt) says nothing of
        # the epochs that ran after it, so only a later checkpoint's is worth a word.
        ran, best_epoch = training.get("epoch"), training["best_epoch"]
        planned = cfg.get("epochs")
        extra = ", ".join(x for x in (
            f"exported from the checkpoint of epoch {ran}"
            if ran is not None and ran != best_epoch else "",
            f"of at most {planned}" if planned else "") if x)
        rows.append(("best epoch", f"{training['best_epoch']}" + (f" ({extra})" if extra
                                                                   else "")))
    best = training.get("best_metrics") or training.get("metrics") or {}
    if best:
        rows.append(("validation, best epoch", _metrics_text(best)))
    last = training.get("metrics") or {}
    if last and training.get("best_metrics") and last != training["best_metrics"]:
        # best_metrics and metrics are the same epoch unless training went on past the best
        rows.append(("validation, last epoch", _metrics_text(last)))
    if cfg:
        recipe = [f"{k.replace('_', ' ')} {cfg[k]}" for k in
                  ("pretrained", "freeze", "lr", "batch_size", "image_size", "scheduler",
                   "pos_weight", "seed") if k in cfg]
        rows.append(("recipe", ", ".join(recipe)))
    if "test_metrics" in training and training["test_metrics"]:
        rows.append(("test (best epoch)", ", ".join(
            f"{METRIC_LABELS.get(k, k.removeprefix('test_'))} {_num(v)}"
            for k, v in training["test_metrics"].items())))
    q = training.get("quantization")
    if isinstance(q, dict):
        rows.append(("quantised", f"{q.get('weights', 'int8')} weights"
                                  + (" per channel" if q.get("per_channel") else "")
                                  + f", {q.get('activations', '?')} activations, "
                                    f"{q.get('format', '?')}, {q.get('calibration', '?')} on "
                                    f"{q.get('calibration_files', '?')} images"))
    c = training.get("calibration")
    if isinstance(c, dict) and c.get("method") == "temperature":
        rows.append(("calibrated", f"temperature scaling, T {_num(c.get('temperature'))}, fit on "
                                   f"{c.get('images', '?')} {c.get('fit_on', 'val')} images: "
                                   f"ECE {_num(c.get('ece_before'))} -> {_num(c.get('ece_after'))}"))
    op = training.get("operating_point")
    if isinstance(op, dict):
        rows.append(("threshold chosen", f"for {op.get('operating_point', '?')} on "
                                         f"{op.get('images', '?')} {op.get('chosen_on', 'val')} "
                                         f"images: sensitivity {_num(op.get('sensitivity'))}, "
                                         f"specificity {_num(op.get('specificity'))} there"))
    versions = training.get("versions") or {}
    if versions:
        rows.append(("trained with", ", ".join(f"{k} {v}" for k, v in versions.items())))
    export = training.get("export") or {}
    if export:
        rows.append(("exported with", ", ".join(f"{k} {v}" for k, v in export.items()
                                                 if k not in ("opset", "ir_version"))))
    if "checkpoint_sha256" in training:
        rows.append(("checkpoint", f"sha256 {_short(training['checkpoint_sha256'], 16)}"))
    return rows


def _integrity_text(integrity: dict[str, Any]) -> str:
    return str(integrity.get("text") or ("verified" if integrity.get("verified")
                                         else "unverified"))


def model_pairs(doc: dict[str, Any], *, training: bool = True) -> list[tuple[str, str]]:
    """(label, text) rows describing a model: `describe()`'s dict or eval's metrics["model"].

    Keys a document lacks (the eval report has no graph facts) are left out.
    """
    rows = [("name", str(doc["model_name"])), ("version", str(doc["model_version"])),
            ("model id", str(doc["model_id"]))]
    if "path" in doc:
        size = doc.get("size_bytes")
        rows.append(("file", str(doc["path"]) + (
            "" if size is None else f" ({size / 1e6:.1f} MB)" if size >= 1e5
            else f" ({size / 1e3:.1f} kB)")))
    if "sha256" in doc:
        rows.append(("sha256", doc["sha256"]))
    neg = doc.get("negative_class") or next(
        (c for c in doc["class_names"] if c != doc["positive_class"]), "")
    rows += [("classes", ", ".join(doc["class_names"])),
             ("positive class", f"{doc['positive_class']} (probability >= threshold), else "
                                f"{neg}"),
             ("threshold", _num(float(doc["threshold"]), 4))]
    h, w = doc["input_size"]
    fit = ("aspect ratio kept, padded with black" if doc.get("fit") == "pad"
           else "stretched to that size")
    rows.append(("input", f"{h} x {w} px (height x width), {fit}, {doc['resize']} resize "
                          "with antialiasing, grey replicated to 3 channels, float32 NCHW "
                          f"'{doc.get('input_name', 'input')}'"))
    rows.append(("normalisation", "(x - mean) / std on intensities x in [0, 1]; mean "
                                  + ", ".join(_num(float(v)) for v in doc["mean"]) + "; std "
                                  + ", ".join(_num(float(v)) for v in doc["std"])))
    if "opset" in doc:
        rows.append(("graph", f"ONNX opset {doc['opset']}, IR {doc['ir_version']}, "
                              f"{doc['nodes']} nodes" + (f", made by {doc['producer']}"
                                                         if doc.get("producer") else "")))
    if "precision" in doc:
        rows.append(("precision", doc["precision"]))
    rows.append(("format version", str(doc.get("format_version", "?"))))
    if "integrity" in doc:
        rows.append(("integrity", _integrity_text(doc["integrity"])))
    table = doc.get("training_data")
    if isinstance(table, dict) and table:
        near = (f", near-copy descriptors of {table['described']}" if "described" in table
                else "")
        rows.append(("training data", f"sha256 of {table.get('contents', '?')} distinct images "
                                      f"(train {table.get('train', '?')}, val "
                                      f"{table.get('val', '?')}){near}: `fxscore eval` reports "
                                      "copies of them"))
    rows += explain_pairs(doc)
    if training:
        rows += [(f"training: {k}", v) for k, v in training_pairs(doc.get("training") or {})]
    return rows


def explain_pairs(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """Heatmaps and the OOD flag: what the model carries, or the command that adds them."""
    outputs, cam, ood = doc.get("outputs") or {}, doc.get("cam") or {}, doc.get("ood") or {}
    rows = []
    if "feature_map" in outputs and cam:
        cells = cam.get("cells")
        grid = f"{cells[0]} x {cells[1]} cells, " if isinstance(cells, (list, tuple)) else ""
        rows.append(("heatmaps", f"class activation maps ({grid}from graph output "
                                 f"'{outputs['feature_map']}'): `fxscore run --heatmaps DIR`, "
                                 "`fxscore explain`"))
    else:
        rows.append(("heatmaps", "none; add them with `fxscore augment MODEL --out NEW.onnx` "
                                 "(or re-export)"))
    if ood:
        rows.append(("OOD flag", f"{ood.get('method', '?')} on the {ood.get('dim', '?')} "
                                 f"pooled features, threshold {_num(ood.get('threshold'), 2)} "
                                 f"(false-flag rate {_num(ood.get('false_flag_rate'), 3)}, "
                                 f"{_threshold_images(ood)}); fit on "
                                 f"{ood.get('fit_images', '?')} images: rows get ood_score, "
                                 "ood"))
    else:
        rows.append(("OOD flag", "none (rows get no ood columns); add one with `fxscore augment "
                                 "MODEL --out NEW.onnx --ood-fit TRAIN --ood-threshold-on VAL`"))
    return rows


def format_info(doc: dict[str, Any]) -> str:
    """`fxscore info`'s text: the model, then its training summary, as aligned rows."""
    rows, trained = model_pairs(doc, training=False), training_pairs(doc.get("training") or {})
    width = max(len(k) + 2 for k, _ in rows + [(f"  {k}", v) for k, v in trained]) + 1
    lines = [f"{k:<{width}}{v}" for k, v in rows]
    lines += ["", "Training summary"] + [f"  {k:<{width - 2}}{v}" for k, v in trained]
    return "\n".join(lines) + "\n"


def _threshold_images(ood: dict) -> str:
    """Where the OOD threshold was set: 'on 236 held-out images' or 'on 80 images, out of fold'."""
    n, where = ood.get("holdout_images", "?"), ood.get("threshold_from", "")
    return f"on {n} held-out images" if where == "held-out images" else f"on {n} images, {where}"
