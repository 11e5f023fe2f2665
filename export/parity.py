"""Proof that the ONNX file computes what the torch model computes, twice over.

(a) Random tensors, batch 1 and batch N, through torch and through the written file.
(b) Real image files, each through the scorer's complete path (`fxscore.scoring.score_items`:
    `model_input`, i.e. read_image at reduced scale -> preprocess, then onnxruntime on the
    written file) versus the torch model on the very tensors that path produces.

Probabilities come from the scorer's own session on the file being shipped. Logits come from a
second, in-memory copy of the same graph whose pre-sigmoid tensor is declared as an extra
output. Inverting the probability instead (log(p / (1 - p))) is no measurement at all where it
matters: in float32 a probability saturates to exactly 1.0 from a logit of about 17 on, and near
0 or 1 the inversion magnifies rounding error by 1 / (p (1 - p)), so a real difference could
neither be seen nor be told from noise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch

from fxscore.contract import ModelMeta
from fxscore.images import ImageReadError
from fxscore.model import Model, session_options
from fxscore.scoring import model_input, score_items

from .onnx_export import ProbabilityModel

TOLERANCE = 1e-4  # fp32 export: max |d logit| and max |d probability|
RANDOM_BATCHES = (1, 5)
CHUNK = 32  # files per step of the file check: bounds memory on a folder of thousands


class ParityError(RuntimeError):
    """The exported graph does not compute what the torch model computes."""


def logit_session(proto: onnx.ModelProto, threads: int | None = None) -> ort.InferenceSession:
    """An in-memory session on a copy of `proto` that also returns the logit (the Sigmoid's input)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    out = copy.graph.output[0].name
    node = next((n for n in copy.graph.node if out in n.output), None)
    if node is None or node.op_type != "Sigmoid":
        raise ParityError(f"the graph's output '{out}' is not produced by a Sigmoid "
                          f"({node.op_type if node else 'no node'}); an fxscore graph ends in one")
    copy.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0],
                                                                onnx.TensorProto.FLOAT, None))
    # The scorer's own settings (threads, optimisation level): the logits are measured on the
    # same kernels the probabilities come from.
    return ort.InferenceSession(copy.SerializeToString(), session_options(threads),
                                providers=["CPUExecutionProvider"])


def onnx_logits(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: x})[1], dtype=np.float32).reshape(len(x))


def torch_outputs(model: ProbabilityModel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) of the torch model on an NCHW float32 batch."""
    with torch.no_grad():
        logit = model.logit(torch.from_numpy(x))
        return logit.numpy().astype(np.float32), torch.sigmoid(logit).numpy().astype(np.float32)


def compare(torch_logit: np.ndarray, torch_prob: np.ndarray, onnx_logit: np.ndarray,
            onnx_prob: np.ndarray, threshold: float) -> dict[str, Any]:
    """Max absolute differences and label agreement (label = probability >= threshold)."""
    d_logit = np.abs(torch_logit.astype(np.float64) - onnx_logit)
    d_prob = np.abs(torch_prob.astype(np.float64) - onnx_prob)
    agree = (torch_prob >= threshold) == (onnx_prob >= threshold)
    return {"n": int(len(d_prob)),
            "max_abs_logit": float(d_logit.max()) if len(d_logit) else 0.0,
            "max_abs_prob": float(d_prob.max()) if len(d_prob) else 0.0,
            "label_agreement": float(agree.mean()) if len(agree) else 1.0,
            "label_disagreements": int((~agree).sum())}


def random_parity(model: ProbabilityModel, scorer: Model, logits: ort.InferenceSession,
                  batches: Sequence[int] = RANDOM_BATCHES, seed: int = 0) -> list[dict[str, Any]]:
    """(a) torch vs the written file on standard-normal tensors, one entry per batch size."""
    h, w = scorer.meta.preprocess.input_size
    rng = np.random.default_rng(seed)
    out = []
    for n in batches:
        x = rng.standard_normal((n, 3, h, w), dtype=np.float32)
        t_logit, t_prob = torch_outputs(model, x)
        res = compare(t_logit, t_prob, onnx_logits(logits, x), scorer.predict(x),
                      scorer.meta.threshold)
        out.append({"batch": n, **res})
    return out


def file_parity(model: ProbabilityModel, scorer: Model, logits: ort.InferenceSession,
                items: Iterable[tuple[str, Path]], *, batch_size: int = 16,
                progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """(b) each file through the scorer's complete path vs torch on the same preprocessed tensor.

    Files that cannot be read are listed, not compared; the scorer must fail on exactly the
    files the reader fails on.
    """
    items = list(items)
    meta: ModelMeta = scorer.meta
    t_logit, t_prob, o_logit, o_prob, names = [], [], [], [], []
    unreadable, mismatched = [], []
    for start in range(0, len(items), CHUNK):
        chunk = items[start:start + CHUNK]
        rows = list(score_items(scorer, chunk, batch_size=batch_size))
        xs = []
        for (name, path), row in zip(chunk, rows):
            try:
                x = model_input(path, meta.preprocess)  # the scorer's one reading rule
            except ImageReadError as e:
                unreadable.append({"path": name, "error": " ".join(str(e).split())})
                if row["probability"] is not None:
                    mismatched.append(name)
                continue
            if row["probability"] is None:
                mismatched.append(name)
                continue
            xs.append(x)
            names.append(name)
            o_prob.append(row["probability"])
        if xs:
            batch = np.stack(xs)
            tl, tp = torch_outputs(model, batch)
            t_logit.append(tl)
            t_prob.append(tp)
            o_logit.append(onnx_logits(logits, batch))
        if progress:  # progress(done, total), for the CLI's bar
            progress(min(start + CHUNK, len(items)), len(items))
    res: dict[str, Any] = {"found": len(items), "unreadable": unreadable,
                           "reader_mismatch": mismatched}
    if not names:
        return {**res, **compare(*(np.zeros(0, np.float32),) * 4, meta.threshold)}
    tl, tp, ol = np.concatenate(t_logit), np.concatenate(t_prob), np.concatenate(o_logit)
    op = np.asarray(o_prob, dtype=np.float32)
    res.update(compare(tl, tp, ol, op, meta.threshold))
    worst = int(np.argmax(np.abs(tp.astype(np.float64) - op)))
    res["worst"] = {"path": names[worst], "torch_prob": float(tp[worst]),
                    "onnx_prob": float(op[worst]), "torch_logit": float(tl[worst]),
                    "onnx_logit": float(ol[worst])}
    return res


def problems(report: dict[str, Any], tolerance: float = TOLERANCE) -> list[str]:
    """Why the parity report fails, one line each; empty when the export is faithful."""
    out = []
    checks = [(f"random tensors, batch {r['batch']}", r) for r in report.get("random", [])]
    if "files" in report:
        checks.append((f"{report['files']['n']} image files", report["files"]))
    for what, r in checks:
        for key in ("max_abs_logit", "max_abs_prob"):
            if not r[key] <= tolerance:  # also catches NaN
                out.append(f"{what}: {key.replace('max_abs_', 'max |d ')}| = {r[key]:.3g} "
                           f"exceeds {tolerance:g}")
    files = report.get("files")
    if files is not None:
        if files["reader_mismatch"]:
            out.append(f"the scorer and the reader disagree on which files are readable: "
                       f"{files['reader_mismatch'][:3]}")
        if files["n"] == 0:
            out.append(f"no readable image among the {files['found']} files of --verify; "
                       "point it at a folder of X-rays")
    return out
